"""Dream (Dream-org/Dream-v0-Instruct-7B / -Base-7B) on vLLM layers.

Dream is Qwen2.5 run bidirectionally: Qwen2 tensor names, q/k/v biases, grouped KV heads. Its
logits are **shifted**: the token at canvas position j is predicted from hidden state j - 1
(the reference code does `logits = cat(logits[:, :1], logits[:, :-1])`). `logits_shift = 1`
states that contract; the denoiser applies it when it picks the rows that score a position.
"""

from __future__ import annotations

import re

from vllm_dllm.model_executor.models.bidirectional_transformer import (
    DiffusionLM,
    TransformerShape,
    rope_theta_of,
)

_LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_TOP_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class DreamModel(DiffusionLM):
    logits_shift = 1

    @staticmethod
    def shape_from_config(config: object) -> TransformerShape:
        c = config
        if getattr(c, "tie_word_embeddings", False):
            raise ValueError("Dream checkpoints with tie_word_embeddings=true are not supported")
        return TransformerShape(
            hidden_size=int(c.hidden_size),
            num_heads=int(c.num_attention_heads),
            num_kv_heads=int(c.num_key_value_heads),
            num_layers=int(c.num_hidden_layers),
            intermediate_size=int(c.intermediate_size),
            vocab_size=int(c.vocab_size),
            rms_norm_eps=float(c.rms_norm_eps),
            rope_theta=rope_theta_of(c, default=1e6),
            max_position=int(c.max_position_embeddings),
            qkv_bias=True,
        )

    @classmethod
    def checkpoint_to_vllm_name(cls, name: str) -> str | None:
        if name in _TOP_TENSORS:
            return name
        match = _LAYER_RE.match(name)
        if match is None or match.group(2) not in _LAYER_TENSORS:
            return None
        return name

    @classmethod
    def expected_checkpoint_names(cls, config: object) -> set[str]:
        layers = {
            f"model.layers.{i}.{t}"
            for i in range(int(config.num_hidden_layers))  # type: ignore[attr-defined]
            for t in _LAYER_TENSORS
        }
        return layers | set(_TOP_TENSORS)
