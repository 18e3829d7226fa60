"""Hugging Face config classes for the diffusion checkpoints."""

from __future__ import annotations

import contextlib


def register_configs() -> None:
    """Make `AutoConfig` read the diffusion configs without `--trust-remote-code`.

    LLaDA, Dream, Fast-dLLM v2, SDAR and LLaDA 2.x checkpoints ship their config classes as
    remote code (`auto_map`); registering our own classes for their `model_type` lets
    transformers (and so vLLM) load them locally.
    """
    from transformers import AutoConfig

    from vllm_dllm.transformers_utils.configs import (
        DreamConfig,
        FastDLLMV2Config,
        LLaDA2MoeConfig,
        LLaDAConfig,
        SDARConfig,
    )

    for config_cls in (LLaDAConfig, DreamConfig, FastDLLMV2Config, SDARConfig, LLaDA2MoeConfig):
        # ValueError: already registered in this process (register() may run more than once).
        with contextlib.suppress(ValueError):
            AutoConfig.register(config_cls.model_type, config_cls)
