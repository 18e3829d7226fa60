"""Zero-configuration engine set-up for diffusion checkpoints.

vLLM consults `MODELS_CONFIG_MAP` (architecture -> `VerifyAndUpdateConfig`) while it builds its
`VllmConfig`, before the platform picks a worker or the engine picks a scheduler. Registering our
architectures there lets the plugin install its scheduler, worker and request validator, and turn
off what would corrupt a diffusion request, without any dLLM-specific flag from the user.

Start-up refusals are `StartUpRefusal`s: one line naming the argument, the value and what is
allowed. vLLM builds its `VllmConfig` as a pydantic dataclass, which wraps an error raised here in
a multi-line `ValidationError`; `EngineArgs.create_engine_config` is wrapped to raise the
refusal itself (offline `LLM(...)` and the servers alike), which `vllm-dllm serve` (and `vllm
serve`, through `install_cli_refusal_hook`) print as one line with exit status 2. The same
wrapper logs, once the configuration is complete, what the plugin set (one INFO line) and every
explicit user setting it overrode (a WARNING each).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any

from vllm.config import CUDAGraphMode
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_dllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

    from vllm_dllm.families import Family

logger = init_logger(__name__)


class StartUpRefusal(ValueError):
    """A setting the plugin refuses at start-up, described in one line.

    `argument` is the offline spelling (an `LLM(...)` / `EngineArgs` keyword, an environment
    variable or a checkpoint key), `flag` the command line's where there is one, `value` what
    was given and `reason` why it is refused and what is allowed instead. Offline the message is
    `argument=value: reason`; `cli_message` gives `flag value: reason` for the servers' CLIs.
    """

    def __init__(self, argument: str, value: Any, reason: str, flag: str | None = None) -> None:
        self.argument = argument
        self.value = value
        self.reason = reason
        self.flag = flag
        super().__init__(argument, value, reason)

    def __str__(self) -> str:
        return f"{self.argument}={_offline_text(self.value)}: {self.reason}"

    def cli_message(self, flag: str | None = None) -> str:
        """The line a CLI prints: the flag (`flag`, else this refusal's) and the value as typed;
        the offline line where the setting has no flag."""
        flag = flag or self.flag
        if flag is None:
            return str(self)
        return f"{flag} {_cli_text(self.value)}: {self.reason}"


def _offline_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _cli_text(value: Any) -> str:
    return shlex.quote(_offline_text(value))

SCHEDULER_CLS = "vllm_dllm.engine.scheduler.DllmScheduler"
CPU_WORKER_CLS = "vllm_dllm.engine.worker.DllmCPUWorker"
GPU_WORKER_CLS = "vllm_dllm.engine.worker.DllmGPUWorker"
PARAMS_VALIDATOR_CLS = "vllm_dllm.engine.request_validation:DllmParamsValidator"


class DllmEngineConfig(VerifyAndUpdateConfig):
    """Configures vLLM to run the denoising loop for a diffusion architecture."""

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        from vllm.platforms import current_platform

        from vllm_dllm.families import family_of

        # Defaults that do not suit the model fail at start-up, not per request.
        family = family_of(vllm_config.model_config.hf_config)
        _check_defaults(vllm_config.model_config, family)
        _refuse_unsupported(vllm_config, family)
        _use_piecewise_cuda_graphs(vllm_config)

        scheduler_config = vllm_config.scheduler_config
        if scheduler_config.scheduler_cls not in (None, SCHEDULER_CLS):
            cls = scheduler_config.scheduler_cls
            raise StartUpRefusal(
                "scheduler_cls",
                cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}",
                "vllm-dllm drives diffusion models with its own scheduler; leave it unset",
                flag="--scheduler-cls",
            )
        scheduler_config.scheduler_cls = SCHEDULER_CLS
        # The denoising step needs the previous step's commits before it can plan the next.
        scheduler_config.async_scheduling = False

        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = (
                CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
            )

        # LLaDA and Dream: a prefix-cache hit would reuse K/V computed without the later canvas
        # tokens, and the DualCache rewrites K/V of earlier positions in place, so prefix caching
        # is off. Block-diffusion families keep vLLM's setting (on by default): the K/V of their
        # finished blocks are final, and the scheduler caches only those
        # (`vllm_dllm.engine.prefix_cache`).
        if not family.block_causal:
            vllm_config.cache_config.enable_prefix_caching = False

        # Our step runs on the V1 worker; Model Runner V2 (default where Triton exists) has its
        # own, incompatible, diffusion path. The variable reaches the workers spawned later.
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
            logger.warning(
                "vllm-dllm: VLLM_USE_V2_MODEL_RUNNER=%s is overridden: diffusion models run on "
                "vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)",
                os.environ["VLLM_USE_V2_MODEL_RUNNER"],
            )
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"

        # vLLM runs `validate_params` of the configured logits processors on every request in
        # the front end: that is where bad `dllm_*` parameters become a 400 naming them.
        model_config = vllm_config.model_config
        processors = list(model_config.logits_processors or [])
        if PARAMS_VALIDATOR_CLS not in processors:
            processors.append(PARAMS_VALIDATOR_CLS)
        model_config.logits_processors = processors
        # Front-end checks that need the prompt: the rounded-up canvas fits, errors precede streams.
        from vllm_dllm.engine.front_end import install
        from vllm_dllm.engine.outputs import install_choice_statistics

        install(SCHEDULER_CLS)
        # Each choice of an n > 1 request keeps its own statistics.
        install_choice_statistics()


def _check_defaults(model_config: ModelConfig, family: Family) -> None:
    """The checkpoint's diffusion defaults, `--override-generation-config`'s and
    `VLLM_DLLM_DEFAULTS` (`--dllm-defaults`) must suit the served model's family."""
    from vllm_dllm.defaults import (
        CHECKPOINT_FILE,
        DEFAULTS_ENV,
        check_defaults,
        checkpoint_file_defaults,
    )

    failure = check_defaults(model_config, family)
    if failure is None:
        return
    where, err = failure
    reason = str(err).removeprefix("server default ").removeprefix(f"{DEFAULTS_ENV} ")
    if where == DEFAULTS_ENV:
        # No flag: `vllm serve` has none; `vllm-dllm serve` names its own.
        raise StartUpRefusal(DEFAULTS_ENV, os.environ.get(DEFAULTS_ENV, "").strip(), reason)
    if where == CHECKPOINT_FILE:
        values = checkpoint_file_defaults(model_config)
        raise StartUpRefusal(f"{model_config.model}/{CHECKPOINT_FILE}", values, reason)
    raise StartUpRefusal(
        where, model_config.override_generation_config, reason,
        flag="--override-generation-config",
    )


def _refuse_unsupported(vllm_config: VllmConfig, family: Family) -> None:
    """Fail start-up on settings that would silently break diffusion requests.

    - KV transfer: a KV connector returns its own `kv_transfer_params` with every finished
      request, the field that carries our per-request statistics, and moves KV that the DualCache
      rewrites in place; the plugin implements neither side of it.
    - vLLM's `--diffusion-config` configures vLLM's native diffusion path (Model Runner V2, GPU
      only, DiffusionGemma), not this plugin, which runs on the V1 runner with per-request
      `dllm_*` parameters.
    - vLLM's older Ray executor (`_refuse_legacy_ray_executor`).
    - FLEX_ATTENTION for a block-diffusion family: its builder copies per-sequence arrays into
      buffers of `max_num_seqs` entries, and a block-diffusion prefill has one attention
      sequence per prompt block.
    - A sliding window: vLLM would keep only the window's KV blocks of each request, while
      every query of a denoising step attends to the whole canvas. The config classes clear a
      window that the checkpoint switches off (`use_sliding_window: false`).
    """
    _refuse_legacy_ray_executor(vllm_config)
    backend = vllm_config.attention_config.backend
    if family.block_causal and backend is not None and backend.name == "FLEX_ATTENTION":
        raise StartUpRefusal(
            "attention_backend",
            "FLEX_ATTENTION",
            f"its metadata holds at most max_num_seqs attention sequences per forward, and a "
            f"block-diffusion prompt ({family.name}) is one sequence per block; use FLASH_ATTN "
            f"or TRITON_ATTN",
            flag="--attention-backend",
        )
    window = vllm_config.model_config.get_sliding_window()
    if window is not None:
        raise StartUpRefusal(
            "sliding_window",
            window,
            "vllm-dllm runs diffusion models with full attention over the canvas; the "
            "checkpoint's sliding-window attention (use_sliding_window=true in its config.json) "
            "is not supported",
        )
    if vllm_config.kv_transfer_config is not None:
        raise StartUpRefusal(
            "kv_transfer_config",
            _config_dict(vllm_config.kv_transfer_config),
            "vllm-dllm does not support KV transfer (disaggregated prefill, KV connectors) for "
            "diffusion models; leave it unset",
            flag="--kv-transfer-config",
        )
    if getattr(vllm_config, "diffusion_config", None) is not None:
        raise StartUpRefusal(
            "diffusion_config",
            _config_dict(vllm_config.diffusion_config),
            "it configures vLLM's own diffusion path (Model Runner V2, GPU only), which "
            "vllm-dllm does not use; leave it unset and set the dllm_* parameters per request "
            "(vllm_xargs) or server-wide with --dllm-defaults",
            flag="--diffusion-config",
        )


def _config_dict(config: Any) -> dict[str, Any] | str:
    """The fields of a vLLM config that differ from their defaults (what the user set)."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return str(config)
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        plain = value is None or isinstance(value, int | float | str | bool)
        if plain and value != field.default and not field.name.startswith("_"):
            out[field.name] = value
    return out


#: The variable that makes vLLM pick its older Ray executor, which bypasses `execute_model`.
RAY_V2_ENV = "VLLM_USE_RAY_V2_EXECUTOR_BACKEND"


def _refuse_legacy_ray_executor(vllm_config: VllmConfig) -> None:
    """Refuse vLLM's older Ray executor (`RayDistributedExecutor`).

    Its workers run a step through `RayWorkerWrapper.execute_model_ray`, which calls the model
    runner's `execute_model` directly instead of the worker's: the plugin's denoising step, which
    replaces the worker's `execute_model`, would be skipped and vLLM's token-by-token runner would
    run on a diffusion schedule. vLLM picks that executor for `distributed_executor_backend="ray"`
    when the variable is 0 (default 1: `RayExecutorV2`, which calls the worker's method).
    """
    from vllm import envs

    backend = vllm_config.parallel_config.distributed_executor_backend
    why = (
        "vLLM's older Ray executor calls the model runner directly and would skip vllm-dllm's "
        "denoising step"
    )
    if backend == "ray" and not envs.VLLM_USE_RAY_V2_EXECUTOR_BACKEND:
        raise StartUpRefusal(
            RAY_V2_ENV,
            os.environ.get(RAY_V2_ENV, "0"),
            f"{why}; unset it (or set it to 1) to use vLLM's default Ray executor "
            "(RayExecutorV2) with diffusion models",
        )
    if isinstance(backend, type) and any(
        cls.__name__ == "RayDistributedExecutor" for cls in backend.__mro__
    ):
        raise StartUpRefusal(
            "distributed_executor_backend",
            backend.__name__,
            f'{why}; use distributed_executor_backend="ray" (RayExecutorV2) with diffusion '
            "models",
        )


def diffusion_cudagraph_mode(requested: CUDAGraphMode) -> CUDAGraphMode:
    """The CUDA-graph mode a diffusion engine runs with, given the one vLLM would use.

    Every denoising batch is a mixed, non-causal batch (never vLLM's uniform decode), so only
    the mode's mixed-batch part applies; and a full graph would replay the attention metadata it
    was captured with, which cannot describe the step's windows, so the step never replays one.
    Full graphs therefore become piecewise ones (everything but attention): capturing them
    would only cost start-up time and memory, and their fixed-size attention buffers (for
    FlashAttention 3 a scheduler-metadata array sized by `max(max_num_seqs, largest capture)`)
    would overflow on a forward with more attention sequences than that.
    """
    mixed = requested.mixed_mode()
    return CUDAGraphMode.PIECEWISE if mixed == CUDAGraphMode.FULL else mixed


def _use_piecewise_cuda_graphs(vllm_config: VllmConfig) -> None:
    """Set the compilation config's CUDA-graph mode to `diffusion_cudagraph_mode`'s.

    vLLM fills an unset mode with its optimization level's default after this hook runs
    (FULL_AND_PIECEWISE from -O2, NONE at -O0), so an unset mode becomes PIECEWISE (NONE at -O0),
    and a mode the user set explicitly is changed with a warning that names it.
    """
    compilation = vllm_config.compilation_config
    requested = compilation.cudagraph_mode
    if requested is None:
        if vllm_config.optimization_level > 0:
            compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
        return
    mode = diffusion_cudagraph_mode(requested)
    if mode != requested:
        logger.warning(
            "vllm-dllm: cudagraph_mode=%s is replaced by cudagraph_mode=%s for diffusion models: "
            "their denoising batches never replay full CUDA graphs.",
            requested.name,
            mode.name,
        )
        compilation.cudagraph_mode = mode


#: Why prefix caching is off for LLaDA and Dream, as the start-up line and its warning say it.
PREFIX_CACHING_WHY = (
    "LLaDA and Dream attend bidirectionally, so a prompt's K/V depend on the canvas after it, "
    "and the DualCache rewrites K/V in place: a cached prefix would share K/V that are not final"
)
#: What prefix caching shares for the block-diffusion families, as the start-up line says it.
PREFIX_CACHING_BLOCKS = (
    "whole blocks with final K/V only: attention across blocks is causal, so they depend only on "
    "the tokens up to them"
)


def start_up_refusal(err: BaseException) -> StartUpRefusal | None:
    """The `StartUpRefusal` that `err` is or wraps (pydantic's `ValidationError` keeps the error
    raised inside a validator in each error's `ctx`), else None."""
    if isinstance(err, StartUpRefusal):
        return err
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return None
    try:
        details = errors()
    except Exception:  # noqa: BLE001 - not pydantic's ValidationError after all
        return None
    for detail in details:
        cause = (detail.get("ctx") or {}).get("error")
        if isinstance(cause, StartUpRefusal):
            return cause
    return None


def _explicit_overrides(engine_args: Any) -> dict[str, tuple[Any, str]]:
    """Settings the user asked for that a diffusion engine turns off: name -> (value, flag)."""
    out = {}
    if engine_args.enable_prefix_caching is True:
        out["enable_prefix_caching"] = (True, "--enable-prefix-caching")
    if getattr(engine_args, "async_scheduling", None) is True:
        out["async_scheduling"] = (True, "--async-scheduling")
    return out


def _log_start_up(config: VllmConfig, explicit: dict[str, tuple[Any, str]]) -> None:
    """One INFO line with what the plugin set; a WARNING for each explicit setting it undid."""
    from vllm_dllm.defaults import default_sources
    from vllm_dllm.families import family_of

    family = family_of(config.model_config.hf_config)
    prefix_caching = config.cache_config.enable_prefix_caching
    mode = config.compilation_config.cudagraph_mode
    defaults = ", ".join(
        f"{key}={value} ({source})"
        for key, value, source in default_sources(config.model_config, family)
    )
    logger.info(
        "vllm-dllm: %s is a %s diffusion model: scheduler %s, worker %s, prefix caching %s, "
        "async scheduling %s, cudagraph_mode %s, request defaults: %s",
        config.model_config.architecture,
        family.name,
        config.scheduler_config.scheduler_cls,
        config.parallel_config.worker_cls,
        _prefix_caching_text(prefix_caching, family.block_causal),
        "on" if config.scheduler_config.async_scheduling else "off (each step plans from the "
        "previous step's commits)",
        mode.name if mode is not None else "NONE",
        defaults or "the plugin's (no checkpoint or server defaults)",
    )
    if "enable_prefix_caching" in explicit and not prefix_caching:
        logger.warning(
            "vllm-dllm: enable_prefix_caching=True (%s) is overridden: prefix caching is off "
            "for %s, a %s diffusion model (%s)",
            explicit["enable_prefix_caching"][1],
            config.model_config.architecture,
            family.name,
            PREFIX_CACHING_WHY,
        )
    if "async_scheduling" in explicit and not config.scheduler_config.async_scheduling:
        logger.warning(
            "vllm-dllm: async_scheduling=True (%s) is overridden: diffusion models schedule "
            "synchronously (each denoising step plans from the previous step's commits)",
            explicit["async_scheduling"][1],
        )


def _prefix_caching_text(on: bool, block_causal: bool) -> str:
    """The start-up line's prefix-caching part: what is cached, or why nothing is."""
    if on:
        return f"on ({PREFIX_CACHING_BLOCKS})"
    if block_causal:
        return "off (as configured)"
    return f"off ({PREFIX_CACHING_WHY})"


def _wrap_create_engine_config() -> None:
    """Wrap `EngineArgs.create_engine_config` (once per process): refusals come out as the
    one-line `StartUpRefusal`, not pydantic's wrapping, and a diffusion engine's configuration
    is logged (`_log_start_up`). vLLM loads plugins (`register`) in `EngineArgs.__post_init__`,
    so the wrapper is in place before any configuration is created."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_vllm_dllm", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> VllmConfig:
        explicit = _explicit_overrides(self)
        try:
            config = original(self, *args, **kwargs)
        except ValueError as err:
            refusal = start_up_refusal(err)
            if refusal is None:
                raise
            given = getattr(self, refusal.argument, None)
            if isinstance(given, dict | str | int | float):  # as the user wrote it
                refusal.value = given
            if refusal is err:
                raise
            raise refusal from None
        if config.scheduler_config.scheduler_cls == SCHEDULER_CLS:
            _log_start_up(config, explicit)
        return config

    create_engine_config._vllm_dllm = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def install_cli_refusal_hook(program: str) -> None:
    """In a command-line process (`program`, e.g. `vllm serve`): an uncaught `StartUpRefusal`
    (or a pydantic error wrapping one) is printed as `program: error: LINE` on stderr and the
    process exits with status 2, as argparse does for a bad flag; anything else reaches the
    previous hook (Python's traceback) unchanged."""
    previous = sys.excepthook
    if getattr(previous, "_vllm_dllm", False):
        return

    def hook(kind: type[BaseException], err: BaseException, traceback: Any) -> None:
        refusal = start_up_refusal(err)
        if refusal is None:
            previous(kind, err, traceback)
            return
        print(f"{program}: error: {refusal.cli_message()}", file=sys.stderr, flush=True)
        sys.exit(2)

    hook._vllm_dllm = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def install_config_hooks(architectures: object) -> None:
    """Register `DllmEngineConfig` for each diffusion architecture name, and our variable.

    vLLM warns about (or, with `--fail-on-environ-validation`, refuses) every `VLLM_*`
    environment variable it does not know; `VLLM_DLLM_DEFAULTS` is ours, so it is declared in
    vLLM's table of variables. In vLLM's own command (`vllm serve ...`, the `vllm` script),
    start-up refusals become one line (`install_cli_refusal_hook`).
    """
    from vllm import envs
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_dllm.defaults import DEFAULTS_ENV

    for arch in architectures:  # type: ignore[attr-defined]
        MODELS_CONFIG_MAP.setdefault(arch, DllmEngineConfig)
    envs.environment_variables.setdefault(DEFAULTS_ENV, lambda: os.environ.get(DEFAULTS_ENV))
    _wrap_create_engine_config()
    argv = getattr(sys, "argv", None) or [""]
    if os.path.basename(argv[0]) == "vllm" and argv[1:2]:
        install_cli_refusal_hook(f"vllm {argv[1]}")
