"""Every running request's canvas and KV block table, resident on the device, by batch slot.

A request gets a slot (a row of the block table) when it starts and keeps it until it ends. Its
canvas (token ids, MASK where undecided) is stored by **KV slot**: canvas position `p` of a
request lives at the index of the paged-KV slot that holds its K/V,
`block_table[slot, p // block_size] * block_size + p % block_size`. The scheduler admits a
request only when its whole canvas has KV blocks, and no two running requests share a block, so
one flat table of the KV cache's token capacity holds every live canvas: its size is bounded by
the KV cache (4 bytes per KV token), not by `max_num_seqs x max_model_len`.

The canvas and block table are written to the device once, at the start; after that each step
reads its windows straight from these tensors and writes its commits back in place, so nothing
proportional to a canvas crosses the host-device boundary again. The host keeps a mirror of the
tokens (updated from the step's one device-to-host transfer), which is where the newly final
tokens are read from for vLLM.

Position `sink` of every slot maps to a scratch block past the KV cache (the block table's last
column): gathers and scatters for positions that do not exist (block columns past a shorter
block) go there instead of being masked out with a sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class Canvases:
    """The device token table by KV slot, its host mirror, and the block table by batch slot
    (see the module docstring for why the table is indexed by KV slot)."""

    def __init__(
        self,
        num_slots: int,
        max_len: int,
        num_kv_blocks: int,
        kv_block_size: int,
        mask_token_id: int,
        device: torch.device,
        pin_memory: bool,
    ) -> None:
        self.kv_block_size = kv_block_size
        self.mask_token_id = mask_token_id
        max_blocks = -(-max_len // kv_block_size)
        #: A position past every canvas; its column points at the scratch block.
        self.sink = max_blocks * kv_block_size
        num_tokens = (num_kv_blocks + 1) * kv_block_size
        self.tokens = torch.full((num_tokens,), mask_token_id, dtype=torch.int32, device=device)
        self._host_blocks = torch.zeros((num_slots, max_blocks + 1), dtype=torch.int32,
                                        pin_memory=pin_memory)  # fmt: skip
        self._host_blocks[:, max_blocks] = num_kv_blocks
        self._block_table = self._host_blocks.to(device)
        #: The block table as attention reads it (without the scratch column).
        self.block_table = self._block_table[:, :max_blocks]
        # The host mirror, by KV slot like the device table.
        self.host = np.full(num_tokens, mask_token_id, dtype=np.int32)
        # Pinned sources of the start-of-request uploads. A step's uploads are complete when it
        # ends with its device-to-host transfer, so the next step reuses the area from the start;
        # the canvases started in one step hold KV blocks, so they fit in the KV capacity.
        self._staging = torch.empty(num_tokens, dtype=torch.int32, pin_memory=pin_memory)
        self._staged = 0
        self._free = list(range(num_slots - 1, -1, -1))

    def index(self, slot: Tensor | int, positions: Tensor) -> Tensor:
        """Flat index (int64) of canvas `positions` of batch `slot`s (broadcast), on the device:
        the KV slot of each position, which `sink` maps into the scratch block."""
        kv_block = self._block_table[slot, positions // self.kv_block_size].to(torch.int64)
        return kv_block * self.kv_block_size + positions % self.kv_block_size

    def _host_index(self, slot: int | np.ndarray, positions: np.ndarray) -> np.ndarray:
        blocks = self._host_blocks.numpy()[slot, positions // self.kv_block_size]
        return blocks.astype(np.int64) * self.kv_block_size + positions % self.kv_block_size

    def begin_step(self) -> None:
        """The previous step's uploads are done (it ended with a device-to-host transfer)."""
        self._staged = 0

    def add(
        self,
        prompt: Sequence[int],
        canvas_len: int,
        block_ids: Sequence[int],
        suffix: Sequence[int] = (),
    ) -> int:
        """Start a canvas `prompt ++ [MASK] * gap ++ suffix` of `canvas_len` positions (an
        infilling request's `suffix` is fixed context after the gap); returns its slot."""
        slot = self._free.pop()
        self._host_blocks.numpy()[slot, : len(block_ids)] = block_ids
        staged = self._staging.numpy()[self._staged : self._staged + canvas_len]
        gap_end = canvas_len - len(suffix)
        staged[: len(prompt)] = prompt
        staged[len(prompt) : gap_end] = self.mask_token_id
        staged[gap_end:] = suffix
        self.host[self._host_index(slot, np.arange(canvas_len))] = staged
        # Asynchronous copies from pinned memory, then a scatter by KV slot on the device.
        self._block_table[slot, : len(block_ids)].copy_(
            self._host_blocks[slot, : len(block_ids)], non_blocking=True
        )
        canvas = self._staging[self._staged : self._staged + canvas_len]
        self._staged += canvas_len
        device = self.tokens.device
        positions = torch.arange(canvas_len, device=device)
        self.tokens[self.index(slot, positions)] = canvas.to(device, non_blocking=True)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def read(self, slot: int, start: int, stop: int) -> list[int]:
        """Canvas positions `[start, stop)` of `slot` from the host mirror."""
        return self.host[self._host_index(slot, np.arange(start, stop))].tolist()

    def apply_commits(self, slots: np.ndarray, positions: np.ndarray, tokens: np.ndarray) -> None:
        """Mirror the step's commits on the host: `tokens >= 0` were written at `positions`."""
        index = self._host_index(slots[:, None], positions)
        self.host[index] = np.where(tokens >= 0, tokens, self.host[index])

    def nbytes(self) -> int:
        """Bytes held for the canvases on the device and in pinned host memory."""
        tensors = (self.tokens, self._block_table, self._host_blocks, self._staging)
        return sum(t.numel() * t.element_size() for t in tensors) + self.host.nbytes
