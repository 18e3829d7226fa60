"""Step 4 of the denoising loop (docs/design.md): choose which masked positions to commit.

One batched pass serves a batch that mixes rules: every row is sorted once, each rule's
selection is computed for all rows over the sorted order, and each row keeps its own rule's.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor


class SelectionRule(IntEnum):
    """Per-row rule ids for `select` (the `rule` of `vllm_dllm.config.DllmParams`, upper-cased)."""

    THRESHOLD = 0
    FACTOR = 1
    STEPS = 2
    #: SDAR's `low_confidence_dynamic`: the threshold rule when it commits at least the quota.
    DYNAMIC = 3
    #: The EB-sampler: scores are negative entropies; the longest run of lowest entropies whose
    #: sum stays within the bound.
    ENTROPY_BOUNDED = 4
    #: Dream's schedule: exactly the `quota` highest scores, which may be none.
    QUOTA = 5
    #: Dream's `origin`: every candidate whose (uniform random) score is >= the threshold, none
    #: forced.
    BERNOULLI = 6


def select(
    confidence: Tensor,
    candidate_mask: Tensor,
    rule_id: Tensor,
    threshold: Tensor,
    factor: Tensor,
    quota: Tensor,
    entropy_bound: Tensor | None = None,
) -> Tensor:
    """Return the `[R, B]` bool mask of positions to commit this step.

    Args:
        confidence: `[R, B]` float scores, one row per request (its block's positions). Values of
            candidates must be finite (probabilities or uniform scores); values of non-candidates
            are ignored (treated as `-inf`).
        candidate_mask: `[R, B]` bool, the still-masked positions that may be committed.
        rule_id: `[R]` int64 `SelectionRule` per row.
        threshold: `[R]` float, used by THRESHOLD rows: select every candidate with
            `conf >= t`, and always the most confident one.
        factor: `[R]` float, used by FACTOR rows: with candidates sorted `c1 >= c2 >= ...`,
            select the longest prefix `1..n` with `c_i >= 1 - f / (i + 1)` for all `2 <= i <= n`.
            (The reference code selects *all* candidates when the scan fails only at the last one;
            this does not.)
        quota: `[R]` int64, used by STEPS rows: select the `quota` most confident candidates,
            clipped to the number of candidates and raised to 1. DYNAMIC rows: every candidate
            with `conf >= t` if there are at least `quota` of them (clipped as for STEPS), else
            the `quota` most confident.
        entropy_bound: `[R]` float, used by ENTROPY_BOUNDED rows, whose `confidence` is the
            negative entropy of each position's distribution: with entropies sorted ascending
            `h1 <= h2 <= ...`, select the longest prefix with `h1 + ... + hn <= bound`, and
            always the first. None when no row uses it.

    QUOTA rows select exactly their `quota` best (possibly none); BERNOULLI rows select every
    candidate with `conf >= t`, possibly none.

    Every row with at least one candidate selects at least one (except QUOTA and BERNOULLI
    rows); a row without candidates selects nothing. Ties in confidence go to the lower
    position (stable sort on descending confidence).
    Comparisons are made in the dtype of `confidence`: `t` and the factor bounds are rounded to
    it once, as a Python float compared with a float32 tensor is in the reference code.
    """
    num_positions = confidence.shape[-1]
    keyed = confidence.masked_fill(~candidate_mask, float("-inf"))
    sorted_conf, order = torch.sort(keyed, dim=-1, descending=True, stable=True)

    # rank: 0-based position in the sorted order; candidates occupy ranks < num_candidates.
    rank = torch.arange(num_positions, device=confidence.device).unsqueeze(0)
    is_candidate = rank < candidate_mask.sum(dim=-1, keepdim=True)
    is_first = rank == 0

    by_threshold = (sorted_conf >= threshold.to(confidence.dtype).unsqueeze(-1)) | is_first

    # 1-based index i = rank + 1, bound 1 - f / (i + 1); formed in float64 on this small [R, B]
    # tensor and rounded once, like the reference's Python-float arithmetic.
    bound = 1.0 - factor.to(torch.float64).unsqueeze(-1) / (rank + 2).to(torch.float64)
    passes = (sorted_conf >= bound.to(confidence.dtype)) | is_first
    by_factor = passes.to(torch.int32).cummin(dim=-1).values.bool()

    by_steps = rank < quota.clamp(min=1).unsqueeze(-1)

    above = sorted_conf >= threshold.to(confidence.dtype).unsqueeze(-1)
    num_above = (above & is_candidate).sum(dim=-1, keepdim=True)
    enough = num_above >= torch.minimum(quota.clamp(min=1).unsqueeze(-1),
                                        candidate_mask.sum(dim=-1, keepdim=True))  # fmt: skip
    by_dynamic = torch.where(enough, above, by_steps)

    rule = rule_id.unsqueeze(-1)
    chosen_sorted = torch.where(
        rule == SelectionRule.THRESHOLD,
        by_threshold,
        torch.where(
            rule == SelectionRule.FACTOR,
            by_factor,
            torch.where(rule == SelectionRule.DYNAMIC, by_dynamic, by_steps),
        ),
    )
    chosen_sorted = torch.where(rule == SelectionRule.QUOTA, rank < quota.unsqueeze(-1),
                                chosen_sorted)  # fmt: skip
    chosen_sorted = torch.where(rule == SelectionRule.BERNOULLI, above, chosen_sorted)
    if entropy_bound is not None:
        # Candidates come first in the sorted order, so the running sum covers only them.
        entropy = torch.where(is_candidate, -sorted_conf, 0.0).cumsum(dim=-1)
        by_entropy = (entropy <= entropy_bound.to(entropy.dtype).unsqueeze(-1)) | is_first
        chosen_sorted = torch.where(rule == SelectionRule.ENTROPY_BOUNDED, by_entropy,
                                    chosen_sorted)  # fmt: skip
    chosen_sorted &= is_candidate
    return torch.zeros_like(candidate_mask).scatter_(-1, order, chosen_sorted)
