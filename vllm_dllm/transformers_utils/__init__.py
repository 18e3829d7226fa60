"""Hugging Face config classes for the diffusion checkpoints."""

from __future__ import annotations

import contextlib


def register_configs() -> None:
    """Make `AutoConfig` read LLaDA and Dream configs without `--trust-remote-code`.

    The real checkpoints ship their config classes as remote code (`auto_map`); registering
    our own classes for their `model_type` lets transformers (and so vLLM) load them locally.
    """
    from transformers import AutoConfig

    from vllm_dllm.transformers_utils.configs import DreamConfig, LLaDAConfig
    from vllm_dllm.transformers_utils.configs.llada2_moe import LLaDA2MoeConfig

    for config_cls in (LLaDAConfig, DreamConfig):
        # ValueError: already registered in this process (register() may run more than once).
        with contextlib.suppress(ValueError):
            AutoConfig.register(config_cls.model_type, config_cls)
    # LLaDA 2.x (model_type llada2_moe); transformers has no class of its own for it.
    with contextlib.suppress(ValueError):
        AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig)
