"""The sizes of the transformer body that every family of this package shares.

Kept free of vLLM imports: the test-fixture writer (`vllm_dllm.testing`) describes its random
checkpoints with the same shape, and the training example uses it without loading vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TransformerShape:
    """Sizes of the shared body.

    Read once from the standard attributes that each family's config class defines
    (`vllm_dllm.transformers_utils.configs`): the config class is the only place that knows how
    a checkpoint's own keys and their defaults resolve (LLaDA's multi-query attention, MLP
    ratio, embedding size; every family's RoPE theta), so the model and vLLM's KV-cache sizing
    can never disagree.

    `qkv_bias`, `o_bias` and `qk_norm` (an RMSNorm over each head of q and k before RoPE,
    Qwen3 style) are properties of the family, not of one config key every family shares, so
    the model class passes them. RoPE rotates the first `head_dim * partial_rotary_factor` dims
    of each head (rotate-half) and passes the rest through (LLaDA 2.x rotates half of each head).
    `explicit_head_dim` is the config's `head_dim` where it has one (Qwen3 bodies, whose heads
    need not split the hidden size); `None` means `hidden_size / num_heads`.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    qkv_bias: bool
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    explicit_head_dim: int | None = None
    o_bias: bool = False
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        qkv_bias: bool,
        qk_norm: bool = False,
        o_bias: bool = False,
        partial_rotary_factor: float = 1.0,
    ) -> TransformerShape:
        return cls(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            num_layers=config.num_hidden_layers,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_parameters["rope_theta"],
            max_position=config.max_position_embeddings,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            o_bias=o_bias,
            partial_rotary_factor=partial_rotary_factor,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            explicit_head_dim=getattr(config, "head_dim", None),
        )

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def q_size(self) -> int:
        """Rows of the q projection (columns of the output projection)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of the k (and of the v) projection."""
        return self.num_kv_heads * self.head_dim
