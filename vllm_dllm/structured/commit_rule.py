"""The commit rule under a grammar: which proposals a constrained request may commit.

A diffusion step proposes a token for every masked position of a block and commits several,
in any order. An autoregressive grammar mask only describes the next token after a committed
prefix, so it cannot be applied to every row. The rule (docs/design.md, "Structured output"):

- The **frontier** is the first position of the output not yet committed. A matcher holds the
  grammar state after the committed prefix, so the frontier row's logits get the matcher's
  token bitmask before the proposal: its proposal is always a valid next token.
- The frontier is always committed (its score is raised above every other candidate's, so
  every selection rule picks it first and counts it), and a position right of it only as part
  of a contiguous run of selected positions starting at the frontier (`constrain_selection`).
- The host feeds the run to the matcher in order; the run ends at the first token the matcher
  rejects (`accepted_run`). That token and the rest of the run are put back to MASK before the
  next forward (`clear_from_frontier`) and proposed again; the rejected one, when it becomes
  the frontier, under the bitmask.

So every committed sequence is a prefix the grammar accepts, at every step: a stream never
shows text the grammar forbids, and end-of-text is committed only where the grammar may end.
Nothing here knows vLLM: device functions are pure torch, the matcher is anything with
`accept_token`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class Matcher(Protocol):
    """What the rule needs of a grammar matcher (xgrammar's `GrammarMatcher` has it)."""

    def accept_token(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...


def apply_token_bitmask_(scores: Tensor, rows: Tensor, bitmask: Tensor) -> None:
    """Set `scores[rows[k], t]` to `-inf` wherever bit `t` of `bitmask[k]` is 0, in place.

    `bitmask` is `[G, ceil(V / 32)]` int32 in xgrammar's layout (bit `t % 32` of word
    `t // 32` allows token `t`); tokens past its last word are forbidden. Pure tensor work on
    the device, so it adds no host sync.
    """
    vocab = scores.shape[-1]
    token = torch.arange(vocab, device=scores.device)
    word = (token >> 5).clamp(max=bitmask.shape[-1] - 1)
    allowed = (bitmask[:, word] >> (token & 31)) & 1
    allowed &= (token < 32 * bitmask.shape[-1]).to(allowed.dtype)
    scores[rows] = scores[rows].masked_fill(allowed == 0, float("-inf"))


def raise_frontier(confidence: Tensor, is_frontier: Tensor, by_entropy: Tensor) -> Tensor:
    """Scores `[N, B]` with each frontier raised above every other candidate of its row.

    `+inf` wins every rule that ranks by score; the entropy-bounded rule (rows where
    `by_entropy` `[N]` is set) sums negative scores, so there the frontier gets 0 (no entropy),
    the best a negative entropy can be, and wins the tie as the lowest candidate position.
    """
    top = torch.where(by_entropy.unsqueeze(-1), 0.0, float("inf")).to(confidence.dtype)
    return torch.where(is_frontier, top, confidence)


def constrain_selection(chosen: Tensor, frontier: Tensor) -> Tensor:
    """Cut each constrained row's selection `[N, B]` to the contiguous run from its frontier.

    `frontier` is `[N]`: the block column of the row's frontier, or -1 for a row without a
    constraint (left unchanged). The frontier itself is always kept, so a constrained request
    commits at least one token per step whatever its rule selected.
    """
    column = torch.arange(chosen.shape[-1], device=chosen.device).unsqueeze(0)
    start = frontier.unsqueeze(-1).to(column.dtype)
    constrained = start >= 0
    chosen = chosen | (column == start)
    gap = ~chosen & (column > start)
    first_gap = torch.where(
        gap.any(dim=-1, keepdim=True),
        gap.to(torch.int32).argmax(dim=-1, keepdim=True).to(column.dtype),
        chosen.shape[-1],
    )
    run = (column >= start) & (column < first_gap)
    return torch.where(constrained, run, chosen)


def clear_from_frontier(
    tokens: Tensor, index: Tensor, frontier: Tensor, block_len: Tensor, mask_token_id: int
) -> None:
    """Put MASK back at every block column from each constrained row's frontier on.

    `index` is `[N, B]`, the table index of each block column (a sink for columns outside the
    block); `frontier` `[N]` is -1 for rows without a constraint. Under the rule nothing right
    of the frontier is ever committed except the run being checked, so this removes exactly
    the tokens the matcher rejected in the previous step (and is a no-op otherwise).
    """
    column = torch.arange(index.shape[-1], device=index.device).unsqueeze(0)
    start = frontier.unsqueeze(-1).to(column.dtype)
    clear = (start >= 0) & (column >= start) & (column < block_len.unsqueeze(-1))
    # A dense write (no boolean indexing, which would read the device for its size); columns
    # that share the sink rewrite its value unchanged.
    tokens[index] = torch.where(clear, mask_token_id, tokens[index])


def accepted_run(matcher: Matcher, committed: np.ndarray, frontier: int) -> int:
    """Advance `matcher` over the run `committed[frontier:]` (stopping at the first -1);
    return how many of its tokens the grammar accepted, in order.

    A token after one that terminates the grammar (its end-of-text) is rejected too.
    """
    accepted = 0
    for token in committed[frontier:]:
        if token < 0 or matcher.is_terminated() or not matcher.accept_token(int(token)):
            break
        accepted += 1
    return accepted


@dataclass(frozen=True)
class FrontierMasks:
    """The step's frontier rows and their bitmasks, on the device.

    `rows` are the candidate rows of the frontiers (ascending) as the host knows them, so that
    a chunk of candidate rows finds its frontiers without reading the device; `device_rows`
    and `bitmask` (`[G, words]` int32) are the same rows and their bitmasks on the device.
    """

    rows: np.ndarray
    device_rows: Tensor
    bitmask: Tensor

    def chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor] | None:
        """(rows relative to `start`, bitmasks) of the frontiers among rows `[start, stop)`."""
        lo, hi = np.searchsorted(self.rows, (start, stop))
        if lo == hi:
            return None
        return self.device_rows[lo:hi].to(torch.int64) - start, self.bitmask[lo:hi]
