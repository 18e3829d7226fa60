"""Every running request's canvas and KV block table, resident on the device, by batch slot.

A request gets a slot (a row) when it starts and keeps it until it ends. Its canvas (token ids,
MASK where undecided) and block table are written to the device once, at the start; after
that, each step reads its windows straight from these tensors and writes its commits back in
place, so nothing proportional to a canvas crosses the host-device boundary again. The host
keeps a mirror of the tokens (updated from the step's one device-to-host transfer), which is
where the newly final tokens are read from for vLLM.

Column `max_len` of the token table is a sink: gathers and scatters for positions that do not
exist (block columns past a shorter block) go there instead of being masked out with a sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class Canvases:
    def __init__(
        self,
        num_slots: int,
        max_len: int,
        max_blocks: int,
        mask_token_id: int,
        device: torch.device,
        pin_memory: bool,
    ) -> None:
        self.sink = max_len
        self.mask_token_id = mask_token_id
        self.tokens = torch.full(
            (num_slots, max_len + 1), mask_token_id, dtype=torch.int32, device=device
        )
        self.block_table = torch.zeros((num_slots, max_blocks), dtype=torch.int32, device=device)
        # Pinned host copies: the sources of the start-of-request uploads, and the mirror.
        self._host_tokens = torch.full(
            (num_slots, max_len + 1), mask_token_id, dtype=torch.int32, pin_memory=pin_memory
        )
        self._host_blocks = torch.zeros((num_slots, max_blocks), dtype=torch.int32,
                                        pin_memory=pin_memory)  # fmt: skip
        self.host = self._host_tokens.numpy()
        self._free = list(range(num_slots - 1, -1, -1))

    def add(self, prompt: Sequence[int], canvas_len: int, block_ids: Sequence[int]) -> int:
        """Start a canvas `prompt ++ [MASK] * (canvas_len - len(prompt))`; returns its slot."""
        slot = self._free.pop()
        row = self.host[slot]
        row[: len(prompt)] = prompt
        row[len(prompt) : canvas_len] = self.mask_token_id
        blocks = self._host_blocks.numpy()[slot]
        blocks[: len(block_ids)] = block_ids
        # Asynchronous copies from pinned rows; the rows are not written again before the step
        # ends with its device-to-host transfer, which orders after these copies.
        self.tokens[slot, :canvas_len].copy_(self._host_tokens[slot, :canvas_len],
                                             non_blocking=True)  # fmt: skip
        self.block_table[slot, : len(block_ids)].copy_(
            self._host_blocks[slot, : len(block_ids)], non_blocking=True
        )
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def apply_commits(self, slots: np.ndarray, positions: np.ndarray, tokens: np.ndarray) -> None:
        """Mirror the step's commits on the host: `tokens >= 0` were written at `positions`."""
        rows = slots[:, None]
        committed = tokens >= 0
        self.host[rows, positions] = np.where(committed, tokens, self.host[rows, positions])
