"""Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_1.5B / _7B) on vLLM layers.

A Qwen2.5 body: Qwen2 tensor names (already ours, so only the q/k/v and gate/up projections are
fused on loading), q/k/v biases, grouped KV heads; the 1.5B release ties its LM head to the
embedding and ships no `lm_head.weight`, the 7B release has its own. Trained with the token
shift of an autoregressive model: the token at canvas position j is scored by hidden state
j - 1, so `logits_shift = 1`. Attention is block-causal over blocks of `config.bd_size`.
"""

from __future__ import annotations

from vllm_dllm.model_executor.models.block_diffusion import BlockDiffusionLM


class Fast_dLLM_QwenForCausalLM(BlockDiffusionLM):
    logits_shift = 1
    mask_token = "|<MASK>|"
    release_mask_token_id = 151665
    qkv_bias = True
