"""The resident canvas table: stored by KV slot, so its size follows the KV cache's capacity."""

from __future__ import annotations

import numpy as np
import torch

from vllm_dllm.denoising.canvases import Canvases

MASK = 99


def canvases(max_len: int, num_kv_blocks: int = 8, num_slots: int = 257) -> Canvases:
    return Canvases(num_slots, max_len, num_kv_blocks, 16, MASK, torch.device("cpu"), False)


def test_token_table_memory_is_bounded_by_the_kv_capacity_not_max_model_len():
    """Dream's default context (131,072) with 256 running requests: the per-slot token table
    was 257 x 131,073 int32 on the device and again pinned on the host (about 0.13 GB each);
    stored by KV slot it is one entry per KV token whatever the context length. What still
    grows with the context is the block table (one int32 per 16-token block per slot, as vLLM's
    own block table)."""
    small, large = canvases(1024), canvases(131072)
    assert small.tokens.numel() == large.tokens.numel() == (8 + 1) * 16
    block_tables = 2 * 257 * 4 * (131072 // 16 - 1024 // 16)
    assert large.nbytes() - small.nbytes() == block_tables
    assert large.nbytes() < 257 * 131073 * 4 // 7


def test_canvases_live_in_their_kv_slots():
    table = canvases(64)
    a = table.add([1, 2, 3], 20, [5, 2])  # positions 0-15 in block 5, 16-19 in block 2
    b = table.add([7] * 17, 17, [0, 7])
    assert table.read(a, 0, 20) == [1, 2, 3] + [MASK] * 17
    assert table.read(b, 15, 17) == [7, 7]
    positions = torch.tensor([0, 15, 16, 19])
    assert table.index(a, positions).tolist() == [80, 95, 32, 35]
    assert table.tokens[table.index(a, positions)].tolist() == [1, MASK, MASK, MASK]
    # Positions past a block go to the scratch block, never to another request's tokens.
    sink = torch.tensor([table.sink])
    assert table.index(a, sink).tolist() == table.index(b, sink).tolist() == [8 * 16]
    table.apply_commits(
        np.array([a, b]), np.array([[16, table.sink], [16, 3]]), np.array([[4, 5], [-1, 6]])
    )
    assert table.read(a, 16, 17) == [4] and table.read(b, 0, 17) == [7, 7, 7, 6] + [7] * 13
