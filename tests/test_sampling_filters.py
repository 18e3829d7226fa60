"""Top-k / top-p / min-p filtering of candidate rows (pure functions, no vLLM).

Hand-computed keep sets for each filter and both orders, then the draw itself measured: many
independent rows (distinct counter-based keys) of the same logits, sampled through `propose`,
must show only the kept tokens, with frequencies within stated bounds of their renormalised
probabilities, and each row's confidence must be the probability each family's release defines.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_dllm.sampling import Filters, keep_from, propose, propose_rows, row_keys
from vllm_dllm.sampling.noise import GUMBEL_STREAM

MASK = 7
# Probabilities .5 .3 .15 .05 over tokens 0..3 at temperature 1; tokens 4..6 (and MASK) tiny.
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05, 1e-9, 1e-9, 1e-9, 0.2])


def logits(rows: int = 1) -> torch.Tensor:
    return PROBS.log().expand(rows, -1).clone()


def filters(rows: int, top_k=0, top_p=1.0, min_p=0.0, top_p_first=False) -> Filters:
    return Filters(
        torch.full((rows,), top_k, dtype=torch.int64),
        torch.full((rows,), top_p, dtype=torch.float32),
        torch.full((rows,), min_p, dtype=torch.float32),
        top_p_first,
    )


def kept_tokens(row_logits: torch.Tensor, temperature: float, f: Filters) -> set[int]:
    scores = row_logits.clone()
    scores[:, MASK] = float("-inf")
    cut = keep_from(scores, torch.full((scores.shape[0],), temperature), f)
    kept = (scores[0] >= cut[0]) & scores[0].isfinite()
    return set(torch.nonzero(kept).flatten().tolist())


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {0, 1, 2, 3, 4, 5, 6}),  # neutral: everything but MASK (its logit is -inf)
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1}),  # .5 before .3: 0.5 <= .7, then 0.8 > .7
        ({"top_p": 0.49}, {0}),
        ({"top_p": 0.81}, {0, 1, 2}),
        ({"min_p": 0.35}, {0, 1}),  # p >= .175
        ({"min_p": 0.2}, {0, 1, 2}),  # p >= .1
        ({"top_k": 3, "top_p": 0.6}, {0, 1}),
    ],
)
def test_keep_sets_by_hand(kwargs, expected):
    assert kept_tokens(logits(), 1.0, filters(1, **kwargs)) == expected


def test_order_of_top_k_and_top_p_matters_as_the_releases_apply_them():
    # Top-k 2 renormalises .5/.3 to .625/.375: top-p .6 over that keeps only token 0. Over the
    # full distribution top-p .6 keeps tokens 0 and 1, and top-k 2 keeps both.
    k_first = kept_tokens(logits(), 1.0, filters(1, top_k=2, top_p=0.6))
    p_first = kept_tokens(logits(), 1.0, filters(1, top_k=2, top_p=0.6, top_p_first=True))
    assert (k_first, p_first) == ({0}, {0, 1})


def test_temperature_changes_the_nucleus():
    # At T = 0.5 the probabilities are squared and renormalised (.685 .247 .062 .007), so
    # top-p .7 keeps tokens 0, 1; at T = 2 they flatten to sqrt (.379 .293 .207 .120) and it
    # keeps three tokens.
    assert kept_tokens(logits(), 0.5, filters(1, top_p=0.7)) == {0, 1}
    assert kept_tokens(logits(), 2.0, filters(1, top_p=0.7)) == {0, 1, 2}


def test_ties_at_the_top_k_cut_are_kept():
    row = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0, -1.0, -1.0, 0.0]])
    assert kept_tokens(row, 1.0, filters(1, top_k=2)) == {0, 1, 2}


def test_greedy_rows_are_never_filtered():
    got = kept_tokens(logits(), 0.0, filters(1, top_k=1, top_p=0.1, min_p=0.9))
    assert got == {0, 1, 2, 3, 4, 5, 6}


def _draw(rows: int, temperature: float, f: Filters | None, tempered: bool, seed: int = 5):
    keys = row_keys(
        torch.full((rows,), seed), torch.zeros(rows, dtype=torch.int64), torch.arange(rows),
        GUMBEL_STREAM,
    )  # fmt: skip
    return propose(logits(rows), MASK, torch.full((rows,), temperature), keys, tempered, f)


def _assert_frequencies(x0: torch.Tensor, expected: dict[int, float]) -> None:
    """Only the expected tokens, each within 5 standard deviations of its probability."""
    n = len(x0)
    counts = torch.bincount(x0, minlength=8).tolist()
    assert {t for t, c in enumerate(counts) if c} <= set(expected)
    for token, p in expected.items():
        bound = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(counts[token] / n - p) <= bound, (token, counts[token] / n, p)


ROWS = 40_000


@pytest.mark.parametrize(
    ("kwargs", "temperature", "expected"),
    [
        # Nucleus .7 at T = 1: tokens 0, 1 renormalised to .625 / .375.
        ({"top_p": 0.7}, 1.0, {0: 0.625, 1: 0.375}),
        # Top-k 3 at T = 1: .5 / .3 / .15 over .95.
        ({"top_k": 3}, 1.0, {0: 0.5 / 0.95, 1: 0.3 / 0.95, 2: 0.15 / 0.95}),
        # min-p .35 at T = 1: p >= .175 keeps tokens 0, 1.
        ({"min_p": 0.35}, 1.0, {0: 0.625, 1: 0.375}),
        # T = 2 flattens to sqrt(p): tokens 0..3 get .707 .548 .387 .224 (sum 1.866); top-k 2.
        ({"top_k": 2}, 2.0, {0: 0.7071 / 1.2548, 1: 0.5477 / 1.2548}),
    ],
)
def test_filtered_draws_follow_the_renormalised_distribution(kwargs, temperature, expected):
    x0, _ = _draw(ROWS, temperature, filters(ROWS, **kwargs), tempered=True)
    _assert_frequencies(x0, expected)


def test_unfiltered_draws_follow_the_tempered_distribution():
    x0, _ = _draw(ROWS, 1.0, None, tempered=True)
    _assert_frequencies(x0, {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05, 4: 1e-6, 5: 1e-6, 6: 1e-6})


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_confidence_of_each_family(temperature):
    """Dream, Fast-dLLM v2, SDAR, LLaDA 2.x: the drawn token's probability under the filtered,
    tempered distribution. LLaDA: its probability under the raw logits, filters aside."""
    rows = 64
    f = filters(rows, top_k=3)
    x0, tempered = _draw(rows, temperature, f, tempered=True)
    same_x0, raw = _draw(rows, temperature, f, tempered=False)
    assert torch.equal(x0, same_x0)
    p = PROBS[:MASK] ** (1 / temperature)
    p[3:] = 0  # top-k 3
    p = p / p.sum()
    torch.testing.assert_close(tempered, p[x0], rtol=1e-5, atol=1e-7)
    raw_p = PROBS[:MASK] / PROBS[:MASK].sum()
    torch.testing.assert_close(raw, raw_p[x0], rtol=1e-5, atol=1e-7)


def test_filters_change_nothing_at_temperature_zero():
    rows = 16
    keys = torch.arange(rows, dtype=torch.int64)
    base = propose(logits(rows), MASK, torch.zeros(rows), keys, True, None)
    filtered = propose(logits(rows), MASK, torch.zeros(rows), keys, True,
                       filters(rows, top_k=1, top_p=0.2, min_p=0.5))  # fmt: skip
    assert torch.equal(base[0], filtered[0]) and torch.equal(base[1], filtered[1])


def test_neutral_rows_are_bit_identical_and_chunking_does_not_matter():
    """A row's draw does not depend on whether other rows filter, nor on the chunk size."""
    rows = 12
    hidden = torch.randn(rows, 8, generator=torch.Generator().manual_seed(0))
    keys = torch.arange(rows, dtype=torch.int64) * 977
    temperature = torch.full((rows,), 0.9)
    mixed = Filters(
        torch.tensor([0, 2] * 6), torch.tensor([1.0, 0.8] * 6), torch.tensor([0.0, 0.1] * 6)
    )
    plain = propose_rows(hidden, lambda h: h, MASK, temperature, keys, rows, True, None)
    outs = [
        propose_rows(hidden, lambda h: h, MASK, temperature, keys, chunk, True, mixed)
        for chunk in (1, 5, rows)
    ]
    for out in outs[1:]:
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1])
    neutral = slice(0, rows, 2)
    assert torch.equal(outs[0][0][neutral], plain[0][neutral])
    assert torch.equal(outs[0][1][neutral], plain[1][neutral])
