"""Config classes for the diffusion LLMs, registered with transformers by the plugin."""

from vllm_dllm.transformers_utils.configs.dream import DreamConfig
from vllm_dllm.transformers_utils.configs.fast_dllm_v2 import FastDLLMV2Config
from vllm_dllm.transformers_utils.configs.llada import LLaDAConfig
from vllm_dllm.transformers_utils.configs.llada2_moe import LLaDA2MoeConfig
from vllm_dllm.transformers_utils.configs.llada_moe import LLaDAMoEConfig
from vllm_dllm.transformers_utils.configs.sdar import SDARConfig

__all__ = ["DreamConfig", "FastDLLMV2Config", "LLaDA2MoeConfig", "LLaDAConfig", "LLaDAMoEConfig",
           "SDARConfig"]
