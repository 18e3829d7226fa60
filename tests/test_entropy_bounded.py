"""The entropy-bounded rule (the EB-sampler) on hand-made distributions (pure functions).

Each position's score is the negative entropy of its own distribution after temperature and
filters; a step commits the lowest-entropy positions while their summed entropy stays within
the bound, and always at least one.
"""

from __future__ import annotations

import math

import torch

from vllm_dllm.sampling import Filters, ScoreKind, SelectionRule, propose, select

MASK = 5


def _row(*probs: float) -> list[float]:
    """Logits of a distribution over tokens 0..4 (MASK, token 5, gets a large logit: ignored)."""
    return [math.log(p) if p > 0 else -1e4 for p in probs] + [10.0]


# Four positions with known entropies (nats): a one-hot, two near-certain ones, a uniform.
LOGITS = torch.tensor([
    _row(0.25, 0.25, 0.25, 0.25, 0.0),  # ln 4 = 1.386
    _row(1.0, 0.0, 0.0, 0.0, 0.0),  # 0
    _row(0.9, 0.1, 0.0, 0.0, 0.0),  # 0.325
    _row(0.97, 0.01, 0.01, 0.01, 0.0),  # 0.168
])  # fmt: skip
ENTROPIES = [math.log(4), 0.0, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)),
             -(0.97 * math.log(0.97) + 3 * 0.01 * math.log(0.01))]  # fmt: skip


def _scores(temperature: float = 0.0, filters: Filters | None = None) -> torch.Tensor:
    rows = LOGITS.shape[0]
    keys = None if temperature == 0 else torch.arange(rows, dtype=torch.int64)
    kinds = torch.full((rows,), int(ScoreKind.NEG_ENTROPY))
    _, score = propose(LOGITS, MASK, torch.full((rows,), temperature), keys, True, filters, kinds)
    return score


def test_scores_are_negative_entropies_without_mask():
    torch.testing.assert_close(_scores(), -torch.tensor(ENTROPIES), rtol=1e-5, atol=1e-6)


def _select(score: torch.Tensor, bound: float, candidates=(True, True, True, True)) -> list[int]:
    chosen = select(
        score.unsqueeze(0),
        torch.tensor([candidates]),
        torch.tensor([int(SelectionRule.ENTROPY_BOUNDED)]),
        threshold=torch.tensor([0.9]),
        factor=torch.tensor([1.0]),
        quota=torch.tensor([1]),
        entropy_bound=torch.tensor([bound]),
    )
    return torch.nonzero(chosen[0]).flatten().tolist()


def test_longest_low_entropy_prefix_within_the_bound():
    score = _scores()
    # Sorted entropies 0, .168, .325, 1.386: running sums 0, .168, .493, 1.879.
    assert _select(score, 0.1) == [1]
    assert _select(score, 0.35) == [1, 3]  # SDAR's default bound
    assert _select(score, 0.5) == [1, 2, 3]
    assert _select(score, 2.0) == [0, 1, 2, 3]


def test_at_least_one_and_only_candidates():
    score = _scores()
    # Without the certain position the lowest entropy (.168) alone exceeds the bound: taken.
    assert _select(score, 0.01, candidates=(True, False, True, True)) == [3]
    assert _select(score, 0.5, candidates=(True, False, False, False)) == [0]


def test_entropy_is_of_the_tempered_filtered_distribution():
    # Top-k 1 leaves one token (entropy 0), except where the top logits tie: all are kept.
    rows = LOGITS.shape[0]
    one_token = Filters(torch.ones(rows, dtype=torch.int64), torch.ones(rows), torch.zeros(rows))
    expected = torch.tensor([-math.log(4), 0.0, 0.0, 0.0])
    torch.testing.assert_close(_scores(1.0, one_token), expected, rtol=0, atol=1e-5)
    # Temperature 2 flattens: the uniform row stays ln 4, the others rise.
    hot = -_scores(2.0)
    assert abs(hot[0] - math.log(4)) < 1e-5
    assert all(hot[i] > ENTROPIES[i] + 1e-3 for i in (2, 3))


def test_margin_score_is_top1_minus_top2():
    rows = LOGITS.shape[0]
    kinds = torch.full((rows,), int(ScoreKind.MARGIN))
    _, score = propose(LOGITS, MASK, torch.zeros(rows), None, True, None, kinds)
    torch.testing.assert_close(score, torch.tensor([0.0, 1.0, 0.8, 0.96]), rtol=0, atol=1e-5)
