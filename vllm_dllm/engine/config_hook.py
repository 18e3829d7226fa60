"""Zero-configuration engine set-up for diffusion checkpoints.

vLLM consults `MODELS_CONFIG_MAP` (architecture -> `VerifyAndUpdateConfig`) while it builds its
`VllmConfig`, before the platform picks a worker or the engine picks a scheduler. Registering our
architectures there lets the plugin install its scheduler, worker and request validator, and turn
off what would corrupt a diffusion request, without any dLLM-specific flag from the user.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vllm.config import CUDAGraphMode
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from vllm_dllm.families import Family

logger = init_logger(__name__)

SCHEDULER_CLS = "vllm_dllm.engine.scheduler.DllmScheduler"
CPU_WORKER_CLS = "vllm_dllm.engine.worker.DllmCPUWorker"
GPU_WORKER_CLS = "vllm_dllm.engine.worker.DllmGPUWorker"
PARAMS_VALIDATOR_CLS = "vllm_dllm.engine.request_validation:DllmParamsValidator"


class DllmEngineConfig(VerifyAndUpdateConfig):
    """Configures vLLM to run the denoising loop for a diffusion architecture."""

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        from vllm.platforms import current_platform

        from vllm_dllm.config import check_server_defaults
        from vllm_dllm.families import family_of

        # A malformed VLLM_DLLM_DEFAULTS fails at start-up, not per request.
        family = family_of(vllm_config.model_config.hf_config)
        check_server_defaults(family)
        _refuse_unsupported(vllm_config, family)
        _use_piecewise_cuda_graphs(vllm_config)

        scheduler_config = vllm_config.scheduler_config
        if scheduler_config.scheduler_cls not in (None, SCHEDULER_CLS):
            raise ValueError(
                f"vllm-dllm drives diffusion models with its own scheduler; "
                f"scheduler_cls={scheduler_config.scheduler_cls!r} cannot be used with them."
            )
        scheduler_config.scheduler_cls = SCHEDULER_CLS
        # The denoising step needs the previous step's commits before it can plan the next.
        scheduler_config.async_scheduling = False

        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = (
                CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
            )

        # A prefix-cache hit would reuse K/V computed without the later canvas tokens, and the
        # DualCache rewrites K/V of earlier positions in place: both need prefix caching off.
        vllm_config.cache_config.enable_prefix_caching = False

        # Our step runs on the V1 worker; Model Runner V2 (default where Triton exists) has its
        # own, incompatible, diffusion path. The variable reaches the workers spawned later.
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

        install(SCHEDULER_CLS)
        logger.info(
            "vllm-dllm: diffusion engine enabled for %s (scheduler %s, worker %s)",
            model_config.architecture,
            SCHEDULER_CLS,
            parallel_config.worker_cls,
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
        raise ValueError(
            "attention backend FLEX_ATTENTION: its metadata holds at most max_num_seqs attention "
            "sequences per forward, and a block-diffusion prompt is one sequence per block; use "
            "FLASH_ATTN or TRITON_ATTN for this model."
        )
    window = vllm_config.model_config.get_sliding_window()
    if window is not None:
        raise ValueError(
            f"sliding_window={window}: vllm-dllm runs diffusion models with full attention over "
            "the canvas; sliding-window attention (use_sliding_window=true) is not supported."
        )
    if vllm_config.kv_transfer_config is not None:
        raise ValueError(
            "kv_transfer_config: vllm-dllm does not support KV transfer (disaggregated prefill, "
            "KV connectors) for diffusion models; remove --kv-transfer-config."
        )
    if getattr(vllm_config, "diffusion_config", None) is not None:
        raise ValueError(
            "diffusion_config: --diffusion-config configures vLLM's own diffusion path "
            "(Model Runner V2, GPU only), which vllm-dllm does not use; set the dllm_* "
            "parameters per request (vllm_xargs) or server-wide with --dllm-defaults instead."
        )


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
        raise ValueError(
            f"{RAY_V2_ENV}=0: {why}; unset it (or set it to 1) to use vLLM's default Ray "
            "executor (RayExecutorV2) with diffusion models."
        )
    if isinstance(backend, type) and any(
        cls.__name__ == "RayDistributedExecutor" for cls in backend.__mro__
    ):
        raise ValueError(
            f"distributed_executor_backend={backend.__name__}: {why}; use "
            'distributed_executor_backend="ray" (RayExecutorV2) with diffusion models.'
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


def install_config_hooks(architectures: object) -> None:
    """Register `DllmEngineConfig` for each diffusion architecture name, and our variable.

    vLLM warns about (or, with `--fail-on-environ-validation`, refuses) every `VLLM_*`
    environment variable it does not know; `VLLM_DLLM_DEFAULTS` is ours, so it is declared in
    vLLM's table of variables.
    """
    from vllm import envs
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_dllm.config import DEFAULTS_ENV

    for arch in architectures:  # type: ignore[attr-defined]
        MODELS_CONFIG_MAP.setdefault(arch, DllmEngineConfig)
    envs.environment_variables.setdefault(DEFAULTS_ENV, lambda: os.environ.get(DEFAULTS_ENV))
