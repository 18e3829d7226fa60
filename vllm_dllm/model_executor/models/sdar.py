"""SDAR (JetLM/SDAR-1.7B-Chat, -4B-Chat, -8B-Chat) on vLLM layers.

A Qwen3 body: Qwen3 tensor names (already ours), no q/k/v bias, an RMSNorm over each head of q
and of k before RoPE (`self_attn.q_norm` / `k_norm`), and `head_dim` from the config (16 heads of
128 on SDAR-1.7B's 2048-wide hidden state). Untied LM head. Position j is scored by its own
hidden state (`logits_shift = 0`). Attention is block-causal over blocks of `config.block_size`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from vllm_dllm.model_executor.models.block_diffusion import BlockDiffusionLM


class SDARForCausalLM(BlockDiffusionLM):
    logits_shift = 0
    mask_token = "<|MASK|>"
    release_mask_token_id = 151669
    qkv_bias = False
    qk_norm = True

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """As every block-diffusion family, and no q/k/v biases (the body gives SDAR none)."""
        BlockDiffusionLM.check_config(config)
        if config.attention_bias:
            raise ValueError("SDAR checkpoints with attention_bias=true are not supported")
