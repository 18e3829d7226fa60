"""LLaDA (GSAI-ML/LLaDA-8B-Instruct / -Base) on vLLM layers.

Checkpoint layout (the real repo's tensor names): `model.transformer.wte`,
`model.transformer.blocks.{i}.{q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out,attn_norm,
ff_norm}`, `model.transformer.ln_f` and the untied LM head `model.transformer.ff_out`. In a block
`ff_proj` is the SwiGLU gate and `up_proj` the up projection. Position j's logits come from
hidden state j (no shift).
"""

from __future__ import annotations

from transformers import PretrainedConfig
from vllm.model_executor.models.utils import WeightsMapper

from vllm_dllm.model_executor.models.bidirectional_transformer import (
    FUSED_PROJECTIONS,
    DiffusionLM,
)
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape


class LLaDAModelLM(DiffusionLM):
    logits_shift = 0
    # Substring renames apply in order: the LM head `model.transformer.ff_out` is renamed before
    # the per-block `.ff_out.` (the MLP down projection) could match it.
    hf_to_vllm_mapper = (
        WeightsMapper(
            orig_to_new_substr={
                "model.transformer.ff_out.": "lm_head.",
                "model.transformer.wte.": "model.embed_tokens.",
                "model.transformer.ln_f.": "model.norm.",
                "model.transformer.blocks.": "model.layers.",
                ".q_proj.": ".self_attn.q_proj.",
                ".k_proj.": ".self_attn.k_proj.",
                ".v_proj.": ".self_attn.v_proj.",
                ".attn_out.": ".self_attn.o_proj.",
                ".ff_proj.": ".mlp.gate_proj.",
                ".up_proj.": ".mlp.up_proj.",
                ".ff_out.": ".mlp.down_proj.",
                ".attn_norm.": ".input_layernorm.",
                ".ff_norm.": ".post_attention_layernorm.",
            }
        )
        | FUSED_PROJECTIONS
    )

    @staticmethod
    def shape_from_config(config: PretrainedConfig) -> TransformerShape:
        if config.weight_tying:
            raise ValueError("LLaDA checkpoints with weight_tying=true are not supported")
        if config.include_bias:
            raise ValueError("LLaDA checkpoints with include_bias=true are not supported")
        return TransformerShape.from_config(config, qkv_bias=bool(config.include_qkv_bias))
