"""The only place that knows vLLM releases differ: shims for vLLM 0.26.0 to 0.32.0.

The plugin drives vLLM internals (scheduler output, attention metadata builders) whose shapes
changed between releases. Each shim detects the feature it needs on the objects at hand, never
the version string, so a backport or a patched build takes the right path. Every docstring names
the release range that needs the fallback; when support for those releases is dropped, the shim
collapses to its first branch.

0.26.0 is the floor: the scheduler relies on `Request.num_in_flight_tokens`, which 0.26 added.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.core.sched.output import SchedulerOutput

if TYPE_CHECKING:
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.worker.utils import AttentionGroup


def build_attn_metadata(group: AttentionGroup, common: CommonAttentionMetadata) -> Any:
    """Attention metadata of one attention group for a batch described by `common`.

    vLLM 0.32 builds through `AttentionGroup.build_metadata`, which also maps the block table to
    the backend's kernel blocks. vLLM 0.26 (up to 0.31) has no such method: the caller builds
    through the group's metadata builder and maps manager blocks to kernel blocks itself, as its
    model runner's block table does (kernel block `j` of block `b` is `b * ratio + j`).
    """
    if hasattr(group, "build_metadata"):
        return group.build_metadata(common)
    builder = group.get_metadata_builder()
    ratio = group.kv_cache_spec.block_size // builder.kv_cache_spec.block_size
    if ratio > 1:
        table = common.block_table_tensor
        offsets = torch.arange(ratio, dtype=table.dtype, device=table.device)
        kernel_table = (table.unsqueeze(-1) * ratio + offsets).flatten(1)
        common = dataclasses.replace(common, block_table_tensor=kernel_table)
    return builder.build(common_prefix_len=0, common_attn_metadata=common)


def scheduler_output(**fields: Any) -> SchedulerOutput:
    """A `SchedulerOutput` from the fields every supported release has.

    vLLM 0.26 (up to 0.31) requires `num_common_prefix_blocks` (cascade attention's shared
    prefix per KV cache group); 0.32 removed cascade attention and gives it a default. A
    diffusion batch never shares a prefix, so it is empty, as in vLLM's own
    `SchedulerOutput.make_empty`.
    """
    if "num_common_prefix_blocks" in _required_scheduler_output_fields():
        fields.setdefault("num_common_prefix_blocks", [])
    return SchedulerOutput(**fields)


@functools.cache
def _required_scheduler_output_fields() -> frozenset[str]:
    return frozenset(
        f.name
        for f in dataclasses.fields(SchedulerOutput)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def fused_moe(**kwargs: Any) -> torch.nn.Module:
    """vLLM's fused mixture-of-experts layer, built from the same keyword arguments.

    vLLM 0.32 builds it with the function `FusedMoEFactory`; vLLM 0.26 (up to the release that
    added the factory) with the `FusedMoE` class itself.
    """
    from vllm.model_executor.layers import fused_moe as layers

    build = getattr(layers, "FusedMoEFactory", None) or layers.FusedMoE
    return build(**kwargs)


def record_prefix_cache_hit(manager: Any, request: Any, num_hits: int) -> None:
    """Count an admitted request's prefix-cache lookup in vLLM's statistics
    (`vllm:prefix_cache_queries`, `vllm:prefix_cache_hits`).

    vLLM 0.32 records at admission (`KVCacheManager.record_prefix_cache_stats`), so the hit
    counted is the one used. vLLM 0.26 (up to 0.31) records inside `get_computed_blocks`, every
    lookup, with the hit before the caller cuts it: nothing is left to do here.
    """
    record = getattr(manager, "record_prefix_cache_stats", None)
    if record is not None:
        record(request, num_hits)


def grammar_wait_status() -> Any:
    """The status of a request whose grammar vLLM is still compiling: vLLM 0.32's
    `WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR`, `WAITING_FOR_FSM` up to 0.31."""
    from vllm.v1.request import RequestStatus

    status = getattr(RequestStatus, "WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR", None)
    return status if status is not None else RequestStatus.WAITING_FOR_FSM
