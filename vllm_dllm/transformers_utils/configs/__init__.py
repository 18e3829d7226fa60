"""Config classes for the diffusion LLMs, registered with transformers by the plugin."""

from vllm_dllm.transformers_utils.configs.dream import DreamConfig
from vllm_dllm.transformers_utils.configs.llada import LLaDAConfig

__all__ = ["DreamConfig", "LLaDAConfig"]
