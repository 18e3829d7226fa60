"""The `vllm-dllm` command, the example scripts' `--help` and start-up refusals (no engine runs).

Every test here runs the real command (the help pages: its entry point, in one process) or
builds vLLM's real engine configuration; none starts an engine, so they take seconds each
(mostly vLLM's import).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import EXAMPLES

VLLM_DLLM = str(Path(sys.executable).with_name("vllm-dllm"))
#: A command that reaches vLLM's configuration: its CPU KV-cache size skips vLLM's check that
#: most of the machine's memory is free (the refusals come before any engine starts).
CLI_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


HELP_COMMANDS = (
    ("serve", "--help"),
    ("--help",),
    ("serve", "--help=vllm-dllm"),
    ("serve", "--help=all"),
    ("serve", "--help=dllm-defaults"),
)


@pytest.fixture(scope="module")
def help_pages() -> dict[tuple[str, ...], tuple[int, str]]:
    """`vllm-dllm ARGS` for each of `HELP_COMMANDS`: exit status and stdout.

    One process runs the command's entry point (`vllm_dllm.cli:main`, what the `vllm-dllm`
    script calls) once per command line, which prints the same bytes as separate runs of the
    script: each run would spend its seconds importing vLLM. The other tests here run the
    script itself.
    """
    probe = (
        "import contextlib, io, json, sys\n"
        "from vllm_dllm.cli import main\n"
        "pages = []\n"
        f"for args in {HELP_COMMANDS!r}:\n"
        "    sys.argv, out, status = ['vllm-dllm', *args], io.StringIO(), 0\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main()\n"
        "        except SystemExit as stop:\n"
        "            status = stop.code or 0\n"
        "    pages.append((status, out.getvalue()))\n"
        "print(json.dumps(pages))\n"
    )
    result = run(sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    pages = json.loads(result.stdout)
    return {args: (status, text) for args, (status, text) in zip(HELP_COMMANDS, pages, strict=True)}


def test_serve_help_lists_our_group(help_pages):
    status, text = help_pages["serve", "--help"]
    assert status == 0
    assert text.startswith("usage: vllm-dllm serve")
    assert "vllm-dllm (diffusion LLMs): --dllm-defaults JSON" in text
    assert "--diffusion-config does not apply" in text
    assert "Details: vllm-dllm serve --help=vllm-dllm." in text
    assert "For full list:            vllm-dllm serve --help=all" in text


def test_help_footer_names_our_command(help_pages):
    status, text = help_pages["--help",]
    assert status == 0
    assert "vllm-dllm [subcommand] --help=all" in text
    assert "vllm [subcommand]" not in text


@pytest.mark.parametrize("search", ["--help=vllm-dllm", "--help=all", "--help=dllm-defaults"])
def test_serve_help_documents_dllm_defaults(help_pages, search):
    status, page = help_pages["serve", search]
    assert status == 0
    # argparse wraps help lines after hyphens too ("--diffusion-" / "config"): undo both.
    text = " ".join(page.split()).replace("- ", "-")
    assert "--dllm-defaults JSON" in text
    assert "--help=vllm-dllm" not in text or search != "--help=vllm-dllm"  # not to itself
    assert "Server-wide defaults for the per-request diffusion parameters" in text
    assert "not vLLM's --diffusion-config" in text


def test_bad_dllm_defaults_is_a_one_line_error():
    result = run(VLLM_DLLM, "serve", "some-model", "--dllm-defaults", '{"dllm_cache": "triple"}')
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        "vllm-dllm serve: error: argument --dllm-defaults: server default dllm_cache must be "
        "one of none, prefix, dual for bidirectional (LLaDA, Dream) models; none, dual for "
        "Fast-dLLM v2 models, got 'triple'"
    ]
    assert "Traceback" not in result.stderr


def test_bad_defaults_variable_is_a_one_line_error():
    result = run(VLLM_DLLM, "serve", "some-model", env={"VLLM_DLLM_DEFAULTS": "{not json"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "vllm-dllm serve: error: VLLM_DLLM_DEFAULTS must be a JSON object"
    )


def test_version_is_answered_without_patching_the_process():
    """`vllm-dllm --version` works on vllm-cpu; `importlib.metadata.version` stays the real one
    for every module outside vLLM's CLI."""
    result = run(VLLM_DLLM, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("vllm-dllm 0.1.0 (vLLM 0.32.0")
    probe = (
        "import importlib.metadata, sys\n"
        "from vllm_dllm import cli\n"
        "cli._answer_vllm_version_lookup()\n"
        "import vllm.entrypoints.cli.main as m\n"
        "print(m.importlib.metadata.version('vllm'))\n"
        "try:\n"
        "    print(importlib.metadata.version('vllm'))\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    print('not found')\n"
    )
    lines = run(sys.executable, "-c", probe).stdout.splitlines()
    assert lines[0].startswith("0.32.0")
    assert lines[1] in ("not found", lines[0])  # vllm-cpu: the real lookup still fails


def test_checkpoint_writer_help_names_every_family():
    result = run(sys.executable, "-m", "vllm_dllm.testing.checkpoints", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m vllm_dllm.testing.checkpoints")
    text = " ".join(result.stdout.split())
    assert "(LLaDA, Dream, Fast-dLLM v2, SDAR, LLaDA 2.x, LLaDA-MoE)" in text


EXAMPLE_SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_example_help(script):
    """Every example answers `--help` with a usage line and a description, and exits 0."""
    result = run(sys.executable, str(EXAMPLES / script), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: "), result.stdout
    assert len(result.stdout.splitlines()) > 3


def engine_config(checkpoint: Path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(checkpoint), dtype="float32", max_model_len=256, **kwargs
    ).create_engine_config()


def refusal(checkpoint: Path, **kwargs) -> str:
    """The message of the start-up refusal `engine_config` raises: one line, and the plugin's
    own error, not pydantic's wrapping of it (what `LLM(...)` raises, since it builds its
    configuration the same way)."""
    from vllm_dllm.engine.config_hook import StartUpRefusal

    with pytest.raises(StartUpRefusal) as info:
        engine_config(checkpoint, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_kv_transfer_config_is_refused_at_start_up(llada_tiny_dir):
    kv = {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}
    assert refusal(llada_tiny_dir, kv_transfer_config=kv) == (
        f"kv_transfer_config={json.dumps(kv)}: vllm-dllm does not support KV transfer "
        "(disaggregated prefill, KV connectors) for diffusion models; leave it unset"
    )


def test_diffusion_config_is_refused_at_start_up(llada_tiny_dir):
    assert refusal(llada_tiny_dir, diffusion_config={"canvas_length": 32}).startswith(
        'diffusion_config={"canvas_length": 32}: it configures vLLM\'s own diffusion path'
    )


def test_a_scheduler_class_is_refused_at_start_up(llada_tiny_dir):
    assert refusal(llada_tiny_dir, scheduler_cls="my.Scheduler") == (
        "scheduler_cls=my.Scheduler: vllm-dllm drives diffusion models with its own "
        "scheduler; leave it unset"
    )


def test_defaults_of_another_family_are_refused_at_start_up(sdar_tiny_dir, monkeypatch):
    from vllm_dllm.defaults import server_defaults

    monkeypatch.setenv("VLLM_DLLM_DEFAULTS", '{"dllm_cache": "dual"}')
    server_defaults.cache_clear()
    try:
        message = refusal(sdar_tiny_dir)
    finally:
        monkeypatch.delenv("VLLM_DLLM_DEFAULTS")
        server_defaults.cache_clear()
    assert message.startswith(
        'VLLM_DLLM_DEFAULTS={"dllm_cache": "dual"}: dllm_cache does not apply to SDAR models'
    )


def test_sliding_window_is_refused_at_start_up(dream_tiny_dir, tmp_path):
    checkpoint = tmp_path / "dream-windowed"
    shutil.copytree(dream_tiny_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=64)
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert refusal(checkpoint).startswith("sliding_window=64: vllm-dllm runs diffusion models")



def test_legacy_ray_executor_is_refused_at_start_up(llada_tiny_dir, monkeypatch):
    """vLLM's older Ray executor calls the model runner directly, skipping the plugin's step."""
    config = engine_config(llada_tiny_dir, distributed_executor_backend="ray")
    assert config.parallel_config.distributed_executor_backend == "ray"  # the default executor
    monkeypatch.setenv("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", "0")
    message = refusal(llada_tiny_dir, distributed_executor_backend="ray")
    assert message.startswith("VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0: vLLM's older Ray")
    engine_config(llada_tiny_dir)  # the variable alone (no Ray executor) is harmless
    monkeypatch.delenv("VLLM_USE_RAY_V2_EXECUTOR_BACKEND")
    from vllm.v1.executor.ray_executor import RayDistributedExecutor

    message = refusal(llada_tiny_dir, distributed_executor_backend=RayDistributedExecutor)
    assert message.startswith("distributed_executor_backend=RayDistributedExecutor: ")



def test_flex_attention_is_refused_for_block_diffusion(sdar_tiny_dir):
    """Its buffers hold `max_num_seqs` sequences; a block-diffusion prefill has one per block."""
    assert refusal(sdar_tiny_dir, attention_backend="FLEX_ATTENTION").startswith(
        "attention_backend=FLEX_ATTENTION: its metadata holds at most max_num_seqs"
    )

def test_cuda_graph_modes_for_diffusion_models():
    """Only the mixed-batch part of a mode applies, and full graphs become piecewise ones."""
    from vllm.config import CUDAGraphMode as M

    from vllm_dllm.engine.config_hook import diffusion_cudagraph_mode

    assert {mode: diffusion_cudagraph_mode(mode) for mode in M} == {
        M.NONE: M.NONE,
        M.PIECEWISE: M.PIECEWISE,
        M.FULL: M.PIECEWISE,
        M.FULL_DECODE_ONLY: M.NONE,
        M.FULL_AND_PIECEWISE: M.PIECEWISE,
    }


@pytest.mark.parametrize(
    ("requested", "level", "expected", "warned"),
    [
        (None, 2, "PIECEWISE", False),  # vLLM's -O2 default would be FULL_AND_PIECEWISE
        (None, 0, None, False),  # -O0: vLLM's default, no graphs
        ("FULL_AND_PIECEWISE", 2, "PIECEWISE", True),
        ("PIECEWISE", 2, "PIECEWISE", False),
    ],
)
def test_config_hook_sets_the_cuda_graph_mode(
    sdar_tiny_dir, caplog, requested, level, expected, warned
):
    """The hook runs before vLLM fills in its optimization level's default mode (the CPU
    platform then turns graphs off, so the hook is applied to the mode as vLLM hands it over);
    a mode the user chose is replaced with a warning that names it."""
    from vllm.config import CUDAGraphMode

    from vllm_dllm.engine.config_hook import _use_piecewise_cuda_graphs

    config = engine_config(sdar_tiny_dir)
    config.compilation_config.cudagraph_mode = requested and CUDAGraphMode[requested]
    config.optimization_level = level
    with plugin_log(caplog):
        _use_piecewise_cuda_graphs(config)
    mode = config.compilation_config.cudagraph_mode
    assert (mode and mode.name) == expected
    assert ("cudagraph_mode=FULL_AND_PIECEWISE is replaced" in caplog.text) == warned


@contextlib.contextmanager
def plugin_log(caplog):
    """Capture the plugin's log records (once each). Its loggers are under vLLM's `vllm`
    logger, which vLLM may have configured not to propagate to the root logger, where `caplog`
    listens."""
    from vllm.config import LoggingConfig
    from vllm.logger import configure_logging_if_needed

    from vllm_dllm.logger import ROOT

    # vLLM applies its logging configuration at a process's first engine configuration, which
    # resets the handlers of the loggers below `vllm`: apply it first, as that call will find it.
    configure_logging_if_needed(LoggingConfig())
    logger = logging.getLogger(ROOT)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


def plugin_lines(caplog, level: int) -> list[str]:
    """The messages the plugin logged at `level`."""
    from vllm_dllm.logger import ROOT

    return [
        r.getMessage() for r in caplog.records if r.name.startswith(ROOT) and r.levelno == level
    ]


def test_start_up_says_what_the_plugin_set_and_what_it_overrode(llada_tiny_dir, caplog):
    """One INFO line with the plugin's settings; a WARNING naming an explicit setting it turns
    off (vLLM's `--enable-prefix-caching`)."""
    lines = functools.partial(plugin_lines, caplog)
    with plugin_log(caplog):
        engine_config(llada_tiny_dir)
    info = lines(logging.INFO)
    assert len(info) == 1
    assert info[0].startswith(
        "vllm-dllm: LLaDAModelLM is a bidirectional (LLaDA, Dream) diffusion model: scheduler "
        "vllm_dllm.engine.scheduler.DllmScheduler, worker vllm_dllm.engine.worker.DllmCPUWorker, "
        "prefix caching off (LLaDA and Dream attend bidirectionally, so a prompt's K/V depend "
        "on the canvas after it"
    )
    assert not lines(logging.WARNING)
    caplog.clear()
    with plugin_log(caplog):
        engine_config(llada_tiny_dir, enable_prefix_caching=True)
    assert lines(logging.WARNING) == [
        "vllm-dllm: enable_prefix_caching=True (--enable-prefix-caching) is overridden: prefix "
        "caching is off for LLaDAModelLM, a bidirectional (LLaDA, Dream) diffusion model (LLaDA "
        "and Dream attend bidirectionally, so a prompt's K/V depend on the canvas after it, and "
        "the DualCache rewrites K/V in place: a cached prefix would share K/V that are not final)"
    ]


def test_prefix_caching_stays_on_for_block_diffusion_and_warns_for_dream(
    sdar_tiny_dir, dream_tiny_dir, caplog
):
    """Block-diffusion families keep vLLM's prefix caching (on by default, off when asked); an
    explicit request for it on Dream is overridden with a WARNING that names the setting, the
    model and the reason."""
    lines = functools.partial(plugin_lines, caplog)
    with plugin_log(caplog):
        assert engine_config(sdar_tiny_dir).cache_config.enable_prefix_caching is True
        assert engine_config(
            sdar_tiny_dir, enable_prefix_caching=False
        ).cache_config.enable_prefix_caching is False
    info = lines(logging.INFO)
    assert "prefix caching on (whole blocks with final K/V only" in info[0], info
    assert "prefix caching off (as configured)" in info[1], info
    assert not lines(logging.WARNING)
    caplog.clear()
    with plugin_log(caplog):
        config = engine_config(dream_tiny_dir, enable_prefix_caching=True)
    assert config.cache_config.enable_prefix_caching is False
    (warning,) = lines(logging.WARNING)
    assert warning.startswith(
        "vllm-dllm: enable_prefix_caching=True (--enable-prefix-caching) is overridden: prefix "
        "caching is off for DreamModel, a bidirectional (LLaDA, Dream) diffusion model (LLaDA "
        "and Dream attend bidirectionally"
    ), warning


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without the notice vLLM's import prints on CPU machines (not ours to change)."""
    return [
        line for line in result.stderr.splitlines()
        if not line.startswith("Triton is installed, but doesn't include CPU backend")
    ]  # fmt: skip


def serve_refusal(checkpoint: Path, flag: str, value: str) -> list[str]:
    """`vllm-dllm serve CHECKPOINT FLAG VALUE` refused at start-up: exit status 2; its stderr
    lines."""
    result = run(VLLM_DLLM, "serve", str(checkpoint), flag, value, env=CLI_ENV)
    assert result.returncode == 2, result.stderr
    return stderr_lines(result)


def test_defaults_of_another_family_are_one_line_on_the_command_line(sdar_tiny_dir):
    """`--dllm-defaults` that the served checkpoint's family does not take: one line naming the
    flag, the value and what the family accepts, exit status 2 (vLLM builds its configuration,
    no engine starts)."""
    assert serve_refusal(sdar_tiny_dir, "--dllm-defaults", '{"dllm_cache": "dual"}') == [
        "vllm-dllm serve: error: --dllm-defaults '{\"dllm_cache\": \"dual\"}': dllm_cache "
        "does not apply to SDAR models (they accept dllm_block_length, dllm_threshold, "
        "dllm_steps, dllm_remasking, dllm_eb_threshold)"
    ]


def test_vllm_serve_prints_a_refusal_as_one_line(llada_tiny_dir):
    """vLLM's own `vllm serve` with the plugin loaded through its entry point (the `vllm`
    script's argv; on vllm-cpu the version lookup answered as `vllm-dllm` does):
    `--diffusion-config` is one line, exit status 2."""
    script = (
        "import sys\n"
        "from vllm_dllm.cli import _answer_vllm_version_lookup\n"
        "_answer_vllm_version_lookup()\n"
        "from vllm.entrypoints.cli.main import main\n"
        f"sys.argv = ['vllm', 'serve', {str(llada_tiny_dir)!r}, '--diffusion-config', '{{}}']\n"
        "main()\n"
    )
    result = run(sys.executable, "-c", script, env=CLI_ENV)
    assert result.returncode == 2, result.stderr
    assert stderr_lines(result) == [
        "vllm serve: error: --diffusion-config '{}': it configures vLLM's own diffusion path "
        "(Model Runner V2, GPU only), which vllm-dllm does not use; leave it unset and set the "
        "dllm_* parameters per request (vllm_xargs) or server-wide with --dllm-defaults"
    ]

@pytest.fixture
def defaults_variable(monkeypatch):
    """`VLLM_DLLM_DEFAULTS` set for one test; the engines of later tests never see it."""
    from vllm_dllm.defaults import server_defaults

    monkeypatch.setenv("VLLM_DLLM_DEFAULTS", '{"dllm_cache": "prefix"}')
    server_defaults.cache_clear()
    yield
    monkeypatch.delenv("VLLM_DLLM_DEFAULTS")
    server_defaults.cache_clear()


def test_defaults_variable_is_a_known_vllm_variable(llada_tiny_dir, defaults_variable):
    """With `fail_on_environ_validation`, vLLM refuses unknown `VLLM_*` variables: ours is
    declared, so the configuration builds."""
    config = engine_config(llada_tiny_dir, fail_on_environ_validation=True)
    assert config.scheduler_config.scheduler_cls.endswith("DllmScheduler")
