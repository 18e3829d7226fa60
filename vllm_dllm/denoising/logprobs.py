"""A request's reported log-probabilities, kept by canvas position until the position is emitted.

Tokens reach vLLM in canvas order once they are final, which may be many steps after the step
that committed them; a token's log-probabilities are those of that step (for LLaDA 2.1's
editing, of the step that last rewrote it), so each position keeps its own until it is emitted.
Plain host arrays, filled from the step's single transfer.
"""

from __future__ import annotations

import numpy as np

from vllm_dllm.sampling.logprobs import unpack


class LogprobRecord:
    """Per generated position: token and alternative ids, their log-probabilities, the rank."""

    def __init__(self, num_logprobs: int, first_position: int, num_positions: int) -> None:
        self.num_logprobs = num_logprobs
        self.first_position = first_position
        width = num_logprobs + 1
        self.ids = np.zeros((num_positions, width), dtype=np.int32)
        self.values = np.zeros((num_positions, width), dtype=np.float32)
        self.ranks = np.zeros(num_positions, dtype=np.int32)

    def record(self, positions: np.ndarray, packed: np.ndarray, batch_num_logprobs: int) -> None:
        """Keep the packed rows (`vllm_dllm.sampling.logprobs`, computed with the step's
        `batch_num_logprobs` alternatives, at least this request's) of committed `positions`."""
        ids, values, ranks = unpack(packed, batch_num_logprobs)
        width = self.num_logprobs + 1
        offsets = positions - self.first_position
        self.ids[offsets] = ids[:, :width]
        self.values[offsets] = values[:, :width]
        self.ranks[offsets] = ranks

    def take(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids, log-probabilities and ranks of canvas positions `[start, stop)`."""
        rows = slice(start - self.first_position, stop - self.first_position)
        return self.ids[rows], self.values[rows], self.ranks[rows]
