"""Config classes for the diffusion LLMs, registered with transformers by the plugin."""

from vllm_dllm.transformers_utils.configs.dream import DreamConfig
from vllm_dllm.transformers_utils.configs.llada import LLaDAConfig
from vllm_dllm.transformers_utils.configs.llada2_moe import LLaDA2MoeConfig

__all__ = ["DreamConfig", "LLaDAConfig"]
__all__ += ["LLaDA2MoeConfig"]
