"""Dream (Dream-org/Dream-v0-Instruct-7B / -Base-7B) on vLLM layers.

Dream is Qwen2.5 run bidirectionally: Qwen2 tensor names (already ours, so only the q/k/v and
gate/up projections are fused on loading), q/k/v biases, grouped KV heads. Its logits are
**shifted**: the token at canvas position j is predicted from hidden state j - 1 (the reference
code does `logits = cat(logits[:, :1], logits[:, :-1])`). `logits_shift = 1` states that
contract; the denoiser applies it when it picks the rows that score a position.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from vllm_dllm.model_executor.models.bidirectional_transformer import (
    DiffusionLM,
)
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape


class DreamModel(DiffusionLM):
    logits_shift = 1

    @staticmethod
    def shape_from_config(config: PretrainedConfig) -> TransformerShape:
        if config.tie_word_embeddings:
            raise ValueError("Dream checkpoints with tie_word_embeddings=true are not supported")
        return TransformerShape.from_config(config, qkv_bias=True)
