"""Step plans: which canvas positions a denoising step recomputes, and which keys they see.

Every denoising step of a request is a *step plan*: one or more query windows, each a range
`[start, end)` of canvas positions whose hidden states (and K/V) are recomputed, attending to
the keys `[0, key_end)`. K/V of positions outside the windows are whatever the paged cache
holds from earlier steps.

Bidirectional models (LLaDA, Dream) see the whole canvas (`key_end` = its length), and reusing
stale K/V is the Fast-dLLM approximation, which the oracle reproduces exactly:

- `none`: every step recomputes the whole canvas (exact, the vanilla baseline).
- `prefix` (PrefixCache): a block's first step is a full forward; later steps recompute the
  block and the still-masked rest of the gap `[s, gap_end)` and reuse the prefix K/V of that
  first step (and an infilling suffix's: fixed context like the prompt).
- `dual` (DualCache): a block's first step is a full forward; later steps recompute only the
  block `[s, e)` and reuse both prefix and suffix K/V.

Block-diffusion models attend block-causally: a query in block k sees blocks `0..k`, so a window
is one block and its keys end with it (`block_windows`). Several blocks in one forward (a
prompt's prefill, a finished block's K/V write folded into the next block's step) are several
windows of the same request, each with its own key range; the K/V of finished blocks are then
exact and never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class CacheMode(str, Enum):
    NONE = "none"
    PREFIX = "prefix"
    DUAL = "dual"


@dataclass(frozen=True)
class Window:
    """Recompute canvas positions `[start, end)`, attending to keys `[0, key_end)`."""

    start: int
    end: int
    key_end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class StepPlan:
    """One forward of one request: its query windows, in canvas order.

    The last window holds the rows that score the positions the step may commit.
    """

    windows: tuple[Window, ...]

    @property
    def num_tokens(self) -> int:
        return sum(window.num_tokens for window in self.windows)


def plan_step(
    mode: CacheMode,
    canvas_len: int,
    block_start: int,
    block_end: int,
    first_step: bool,
    gap_end: int | None = None,
) -> StepPlan:
    """The plan of a bidirectional step of the block `[block_start, block_end)`.

    `first_step` is the block's first forward, which always refreshes every position: earlier
    tokens' K/V depend on later ones in a bidirectional model, so nothing carries over blocks.
    `gap_end` ends the generated positions (default `canvas_len`); an infilling suffix after it
    is fixed context, whose K/V a PrefixCache step reuses from the block's first forward as it
    reuses the prompt's.
    """
    if first_step or mode is CacheMode.NONE:
        start, end = 0, canvas_len
    elif mode is CacheMode.PREFIX:
        start, end = block_start, canvas_len if gap_end is None else gap_end
    else:
        start, end = block_start, block_end
    return StepPlan((Window(start, end, canvas_len),))


def block_windows(start: int, end: int, block_length: int) -> tuple[Window, ...]:
    """Block-causal windows over the whole blocks of `[start, end)`: one per block."""
    return tuple(Window(s, s + block_length, s + block_length)
                 for s in range(start, end, block_length))  # fmt: skip
