"""LLaDA (GSAI-ML/LLaDA-8B-Instruct / -Base) on vLLM layers.

Checkpoint layout (the real repo's tensor names): `model.transformer.wte`,
`model.transformer.blocks.{i}.{q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out,attn_norm,
ff_norm}`, `model.transformer.ln_f` and the untied LM head `model.transformer.ff_out`. In a block
`ff_proj` is the SwiGLU gate and `up_proj` the up projection. Position j's logits come from
hidden state j (no shift).
"""

from __future__ import annotations

import re

from vllm_dllm.model_executor.models.bidirectional_transformer import (
    DiffusionLM,
    TransformerShape,
    rope_theta_of,
)

_BLOCK_TENSORS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
_TOP_TENSORS = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.weight$")


class LLaDAModelLM(DiffusionLM):
    logits_shift = 0

    @staticmethod
    def shape_from_config(config: object) -> TransformerShape:
        c = config
        if getattr(c, "weight_tying", False):
            raise ValueError("LLaDA checkpoints with weight_tying=true are not supported")
        if getattr(c, "include_bias", False):
            raise ValueError("LLaDA checkpoints with include_bias=true are not supported")
        hidden = int(c.d_model)
        return TransformerShape(
            hidden_size=hidden,
            num_heads=int(c.n_heads),
            num_kv_heads=int(c.n_kv_heads or c.n_heads),
            num_layers=int(c.n_layers),
            intermediate_size=int(c.mlp_hidden_size or c.mlp_ratio * hidden),
            vocab_size=int(c.embedding_size or c.vocab_size),
            rms_norm_eps=float(c.rms_norm_eps),
            rope_theta=rope_theta_of(c, default=500000.0),
            max_position=int(c.max_sequence_length),
            qkv_bias=bool(getattr(c, "include_qkv_bias", False)),
        )

    @classmethod
    def checkpoint_to_vllm_name(cls, name: str) -> str | None:
        if name in _TOP_TENSORS:
            return _TOP_TENSORS[name]
        match = _BLOCK_RE.match(name)
        if match is None or match.group(2) not in _BLOCK_TENSORS:
            return None
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.weight"

    @classmethod
    def expected_checkpoint_names(cls, config: object) -> set[str]:
        blocks = {
            f"model.transformer.blocks.{i}.{t}.weight"
            for i in range(int(config.n_layers))  # type: ignore[attr-defined]
            for t in _BLOCK_TENSORS
        }
        return blocks | set(_TOP_TENSORS)
