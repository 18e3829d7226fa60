"""vllm-dllm: diffusion language models on vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it once in every process it
starts (API server, engine core, each worker, the registry-inspection subprocess), so it only
records names: model classes are imported lazily by vLLM when a model is actually built.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Hugging Face architecture name -> "module:Class" of our vLLM implementation.
MODEL_CLASSES: dict[str, str] = {
    "LLaDAModelLM": "vllm_dllm.model_executor.models.llada:LLaDAModelLM",
    "DreamModel": "vllm_dllm.model_executor.models.dream:DreamModel",
    "Fast_dLLM_QwenForCausalLM": (
        "vllm_dllm.model_executor.models.fast_dllm_v2:Fast_dLLM_QwenForCausalLM"
    ),
    "SDARForCausalLM": "vllm_dllm.model_executor.models.sdar:SDARForCausalLM",
    "LLaDA2MoeModelLM": "vllm_dllm.model_executor.models.llada2_moe:LLaDA2MoeModelLM",
    "LLaDAMoEModelLM": "vllm_dllm.model_executor.models.llada_moe:LLaDAMoEModelLM",
}

_registered = False


def register() -> None:
    """Register the diffusion architectures, their HF configs and the engine hook with vLLM.

    Idempotent: a second call in the same process does nothing.
    """
    global _registered
    if _registered:
        return

    from vllm import ModelRegistry

    for arch, target in MODEL_CLASSES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)

    from vllm_dllm.transformers_utils import register_configs

    register_configs()

    from vllm_dllm.engine.config_hook import install_config_hooks

    install_config_hooks(MODEL_CLASSES)

    from vllm_dllm.cli import leave_interrupt_to_api_server

    leave_interrupt_to_api_server()
    _registered = True
