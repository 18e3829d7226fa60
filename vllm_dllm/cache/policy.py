"""Block-wise cache policy: which canvas positions a denoising step recomputes.

Every denoising step is a *step plan*: a query window `[start, end)` of canvas positions whose
hidden states (and K/V) are recomputed, attending to keys over the whole canvas `[0, L)`. K/V of
positions outside the window are whatever the paged cache holds from earlier steps; that
staleness is the Fast-dLLM approximation, and the oracle reproduces it exactly.

- `none`: every step recomputes the whole canvas (exact, the vanilla baseline).
- `prefix` (PrefixCache): a block's first step is a full forward; later steps recompute the
  block and the still-masked suffix `[s, L)` and reuse the prefix K/V of that first step.
- `dual` (DualCache): a block's first step is a full forward; later steps recompute only the
  block `[s, e)` and reuse both prefix and suffix K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class CacheMode(str, Enum):
    NONE = "none"
    PREFIX = "prefix"
    DUAL = "dual"


@dataclass(frozen=True)
class StepPlan:
    """One forward of one request: recompute `[start, end)`, attending over the whole canvas."""

    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def plan_step(
    mode: CacheMode, canvas_len: int, block_start: int, block_end: int, first_step: bool
) -> StepPlan:
    """The plan of a step of the block `[block_start, block_end)`.

    `first_step` is the block's first forward, which always refreshes every position: earlier
    tokens' K/V depend on later ones in a bidirectional model, so nothing carries over blocks.
    """
    if first_step or mode is CacheMode.NONE:
        return StepPlan(0, canvas_len)
    if mode is CacheMode.PREFIX:
        return StepPlan(block_start, canvas_len)
    return StepPlan(block_start, block_end)
