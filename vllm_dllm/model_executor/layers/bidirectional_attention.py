"""Bidirectional attention over vLLM's paged KV cache.

A diffusion LM attends over the whole canvas in both directions, yet the denoising loop must keep
K/V between steps (the block-wise cache). vLLM's `ENCODER_ONLY` attention is bidirectional but
keeps no KV cache, so we keep a normal `DECODER` layer (ordinary `FullAttentionSpec` paged blocks)
and wrap its backend's metadata builder so that every batch it builds is non-causal, the pattern
vLLM's own `EncoderOnlyAttention` uses.
"""

from __future__ import annotations

import functools
from copy import copy

import torch
from vllm.config import CacheConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionType,
    CommonAttentionMetadata,
    subclass_attention_backend,
)
from vllm.v1.attention.selector import get_attn_backend


@functools.lru_cache
def bidirectional_backend(underlying: type[AttentionBackend]) -> type[AttentionBackend]:
    """`underlying` with a metadata builder that always sets `causal=False`."""
    if not underlying.supports_non_causal():
        raise ValueError(
            f"attention backend {underlying.get_name()} cannot run non-causal attention, "
            "which diffusion models need; use CPU_ATTN, FLASH_ATTN, TRITON_ATTN or FLEX_ATTENTION"
        )
    base_builder = underlying.get_builder_cls()

    class BidirectionalBuilder(base_builder):  # type: ignore[misc,valid-type]
        def build(
            self,
            common_prefix_len: int,
            common_attn_metadata: CommonAttentionMetadata,
            fast_build: bool = False,
        ) -> AttentionMetadata:
            metadata = copy(common_attn_metadata)
            metadata.causal = False
            return super().build(common_prefix_len, metadata, fast_build)

    return subclass_attention_backend(
        name_prefix="Bidirectional_",
        attention_backend_cls=underlying,
        builder_cls=BidirectionalBuilder,
    )


class BidirectionalAttention(Attention):
    """A `DECODER` attention layer (paged KV cache kept) whose attention is non-causal."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        kv_cache_dtype = cache_config.cache_dtype if cache_config is not None else "auto"
        underlying = get_attn_backend(
            head_size,
            torch.get_default_dtype(),
            kv_cache_dtype,
            attn_type=AttentionType.DECODER,
        )
        super().__init__(
            num_heads=num_heads,
            head_size=head_size,
            scale=scale,
            num_kv_heads=num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            attn_backend=bidirectional_backend(underlying),
            attn_type=AttentionType.DECODER,
            prefix=prefix,
        )
