"""Top-k, top-p (nucleus) and min-p filtering of candidate rows before the draw (pure torch).

Every filter keeps a prefix of a row's tokens sorted by logit, so a row's whole filter is one
number: the smallest logit it keeps (`keep_from`). Batched over rows with per-row parameters
(neutral values `top_k = 0`, `top_p = 1`, `min_p = 0` leave a row untouched, bit for bit), one
sort per row, no host syncs. Temperature matters to top-p and min-p (they look at
`softmax(logits / T)`), not to top-k.

The order of the filters is a model family's convention (docs/design.md, "Sampling"):

- top-k first, then top-p over the renormalised top-k distribution: SDAR's and LLaDA 2.x's
  releases, and vLLM's own sampler (which applies min-p before both, as here);
- top-p over the full distribution, then top-k: Dream's `sample_tokens` (`top_p_first`).

Ties at the cut are kept (the releases' top-k keeps every logit equal to the k-th; at a top-p
cut, tied logits have equal probability and sort in no defined order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Extra vocabulary-sized bytes per element while `keep_from` runs (sorted logits 4 and the sort's
#: int64 indices 8, their tempered copy 4, the probabilities 4 and their cumulative sum 4, and
#: two bool masks), on top of what the proposal itself holds (`proposal.bytes_per_logit`).
FILTER_BYTES_PER_LOGIT = 26


@dataclass(frozen=True)
class Filters:
    """Per-row filter parameters of candidate rows (`[N]` each)."""

    top_k: Tensor  # int64, 0 = off
    top_p: Tensor  # float32 in (0, 1], 1 = off
    min_p: Tensor  # float32 in [0, 1], 0 = off
    #: The family applies top-p before top-k (Dream) instead of after (everyone else).
    top_p_first: bool = False

    def rows(self, rows: slice) -> Filters:
        return Filters(self.top_k[rows], self.top_p[rows], self.min_p[rows], self.top_p_first)


def keep_from(scores: Tensor, temperature: Tensor, filters: Filters) -> Tensor:
    """The smallest score each row keeps, `[N, 1]`: keep `scores >= keep_from(...)`.

    Args:
        scores: `[N, V]` float32 logits (MASK already `-inf`).
        temperature: `[N]` float; top-p and min-p look at `softmax(scores / T)`. Rows with
            `T = 0` keep everything.
        filters: per-row parameters.
    """
    vocab = scores.shape[-1]
    ordered = torch.sort(scores, dim=-1, descending=True).values
    divisor = torch.where(temperature > 0, temperature, 1.0).to(torch.float32).unsqueeze(-1)
    tempered = ordered / divisor
    rank = torch.arange(vocab, device=scores.device)
    # min-p: probability >= min_p * the top probability.
    floor = tempered[:, :1] + filters.min_p.unsqueeze(-1).log()
    kept_min_p = (tempered >= floor).sum(dim=-1, keepdim=True)
    # top-k: every logit at least the k-th largest.
    k = filters.top_k.clamp(min=1, max=vocab).unsqueeze(-1)
    kth = ordered.gather(-1, k - 1)
    kept_top_k = torch.where(
        filters.top_k.unsqueeze(-1) > 0, (ordered >= kth).sum(dim=-1, keepdim=True), vocab
    )
    # top-p over what the filters before it kept: the tokens whose preceding mass is <= p.
    before_top_p = kept_min_p if filters.top_p_first else torch.minimum(kept_min_p, kept_top_k)
    inside = rank < before_top_p
    probs = tempered.masked_fill_(~inside, float("-inf")).softmax(dim=-1)
    preceding = probs.cumsum(dim=-1).sub_(probs)
    top_p = filters.top_p.unsqueeze(-1)
    kept_top_p = ((preceding <= top_p) & inside).sum(dim=-1, keepdim=True)
    kept = torch.where(top_p >= 1.0, before_top_p, kept_top_p)
    if filters.top_p_first:
        kept = torch.minimum(kept, kept_top_k)
    # A greedy row takes the argmax, which no filter drops: leave its scores (and so its
    # confidence) untouched.
    kept = torch.where(temperature.unsqueeze(-1) > 0, kept, vocab)
    return ordered.gather(-1, kept - 1)


def apply_filters_(scores: Tensor, temperature: Tensor, filters: Filters) -> Tensor:
    """Set the logits each row's filters drop to `-inf`, in place; returns `scores`."""
    cut = keep_from(scores, temperature, filters)
    return scores.masked_fill_(scores < cut, float("-inf"))
