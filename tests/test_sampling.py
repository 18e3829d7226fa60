"""Proposal, scoring, selection, the steps schedule and the counter-based random numbers
(docs/design.md, steps 2-4 of the algorithm)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_dllm.sampling import (
    GUMBEL_STREAM,
    REMASK_STREAM,
    SelectionRule,
    gumbel,
    propose,
    propose_rows,
    row_keys,
    rows_per_chunk,
    sampler_profile_bytes,
    select,
    steps_quota,
    uniform,
)
from vllm_dllm.sampling.noise import _unit_interval_, mix64

T, F, S = SelectionRule.THRESHOLD, SelectionRule.FACTOR, SelectionRule.STEPS


# --------------------------------------------------------------------------- helpers


def select_one(
    conf: list[float],
    rule: SelectionRule,
    *,
    candidates: list[bool] | None = None,
    threshold: float = 0.9,
    factor: float = 1.0,
    quota: int = 1,
) -> list[int]:
    """Run `select` on a single row and return the selected positions."""
    cand = candidates if candidates is not None else [True] * len(conf)
    chosen = select(
        torch.tensor([conf], dtype=torch.float32),
        torch.tensor([cand]),
        torch.tensor([int(rule)]),
        torch.tensor([threshold]),
        torch.tensor([factor]),
        torch.tensor([quota]),
    )
    assert chosen.shape == (1, len(conf)) and chosen.dtype == torch.bool
    return chosen[0].nonzero().flatten().tolist()


def reference_select_row(
    conf: list[float], cand: list[bool], rule: int, threshold: float, factor: float, quota: int
) -> set[int]:
    """Plain-Python statement of the rules, one row, for cross-checking the batched code.

    Values are compared as float32 (conf is float32 data; a Python float bound is rounded to
    float32, as in the reference implementations).
    """

    def f32(x: float) -> float:
        return torch.tensor(x, dtype=torch.float32).item()

    order = sorted((i for i in range(len(conf)) if cand[i]), key=lambda i: (-conf[i], i))
    if not order:
        return set()
    if rule == T:
        return {order[0]} | {i for i in order if conf[i] >= f32(threshold)}
    if rule == F:
        n = 1
        while n < len(order) and conf[order[n]] >= f32(1 - factor / (n + 2)):
            n += 1
        return set(order[:n])
    return set(order[: min(max(quota, 1), len(order))])


class HostSyncDetector(TorchDispatchMode):
    """Records ops that copy a tensor value to the host (`.item()`, `.tolist()`, `bool(t)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.float64_numel = 0
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(str(func))
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.max_numel = max(self.max_numel, tensor.numel())
                if tensor.dtype == torch.float64:
                    self.float64_numel = max(self.float64_numel, tensor.numel())
        return out


# --------------------------------------------------------------------------- select: rules


def test_threshold_selects_all_confident_candidates() -> None:
    assert select_one([0.5, 0.95, 0.92, 0.3, 0.9], T, threshold=0.9) == [1, 2, 4]


def test_threshold_always_selects_the_most_confident() -> None:
    assert select_one([0.5, 0.6, 0.2, 0.55], T, threshold=0.99) == [1]
    assert select_one([0.1], T, threshold=1.0) == [0]


def test_threshold_ignores_non_candidates() -> None:
    conf = [0.99, 0.3, 0.97, 0.4]
    assert select_one(conf, T, candidates=[False, True, False, True], threshold=0.9) == [3]


def test_factor_example_from_the_spec() -> None:
    # .99 .9 .8 .3 with f = 1: bounds for i = 2, 3, 4 are 2/3, 3/4, 4/5 -> the scan fails at
    # i = 4, the last candidate. Fast-dLLM's reference selects all 4 here; the spec selects 3.
    conf = [0.3, 0.9, 0.99, 0.8]
    assert select_one(conf, F, factor=1.0) == [1, 2, 3]


def test_factor_selects_all_when_every_bound_holds() -> None:
    assert select_one([0.99, 0.9, 0.8, 0.81], F, factor=1.0) == [0, 1, 2, 3]


def test_factor_stops_at_the_first_failure_and_keeps_c1() -> None:
    assert select_one([0.6, 0.5, 0.2], F, factor=1.0) == [0]  # .5 < 2/3
    assert select_one([0.6, 0.5, 0.2], F, factor=1.5) == [0, 1]  # .5 >= .5, .2 < 1 - 1.5/4
    assert select_one([0.01, 0.001], F, factor=0.01) == [0]


def test_steps_selects_the_top_quota() -> None:
    conf = [0.1, 0.7, 0.3, 0.9, 0.5]
    assert select_one(conf, S, quota=2) == [1, 3]
    assert select_one(conf, S, quota=3) == [1, 3, 4]


def test_steps_quota_is_clipped_to_candidates_and_at_least_one() -> None:
    conf = [0.1, 0.7, 0.3, 0.9]
    cand = [True, False, True, False]
    assert select_one(conf, S, candidates=cand, quota=10) == [0, 2]
    assert select_one(conf, S, candidates=cand, quota=0) == [2]


def test_ties_go_to_the_lower_position() -> None:
    assert select_one([0.5, 0.5, 0.5, 0.5], S, quota=2) == [0, 1]
    assert select_one([0.2, 0.5, 0.1, 0.5], T, threshold=0.9) == [1]
    assert select_one(
        [0.2, 0.5, 0.1, 0.5, 0.5], S, candidates=[True, False, True, True, True], quota=2
    ) == [3, 4]
    assert select_one([0.9, 0.9, 0.9], F, factor=0.2) == [0]  # 0.9 < 1 - 0.2/3


def test_ties_in_wide_rows_go_to_lower_positions() -> None:
    """Wide rows with few distinct values: an unstable sort would reorder the ties."""
    gen = torch.Generator().manual_seed(15)
    rows, width = 8, 256
    conf = torch.randint(0, 3, (rows, width), generator=gen).float() / 4 + 0.25
    cand = torch.rand(rows, width, generator=gen) < 0.8
    quota = torch.randint(1, 100, (rows,), generator=gen)
    chosen = select(
        conf, cand, torch.full((rows,), int(S)), torch.zeros(rows), torch.zeros(rows), quota
    )
    for r in range(rows):
        expected = reference_select_row(
            conf[r].tolist(), cand[r].tolist(), S, 0.0, 0.0, int(quota[r])
        )
        assert set(chosen[r].nonzero().flatten().tolist()) == expected, r


def test_rows_without_candidates_select_nothing() -> None:
    for rule in SelectionRule:
        assert select_one([0.99, 0.98], rule, candidates=[False, False], quota=2) == []


def test_batched_mixed_rules_equal_row_by_row() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, width = 96, 16
    conf = torch.rand(rows, width, generator=gen)
    conf[::7] = 0.5  # rows of ties
    conf[1::5, ::2] = 0.97  # rows with many confident positions
    cand = torch.rand(rows, width, generator=gen) < 0.6
    cand[::11] = False  # rows with no candidates
    rule = torch.randint(0, 3, (rows,), generator=gen)
    threshold = torch.rand(rows, generator=gen) * 0.5 + 0.5
    factor = torch.rand(rows, generator=gen) * 2 + 0.1
    quota = torch.randint(0, 6, (rows,), generator=gen)
    batched = select(conf, cand, rule, threshold, factor, quota)
    assert set(rule.tolist()) == {0, 1, 2}
    for r in range(rows):
        alone = select(
            conf[r : r + 1], cand[r : r + 1], rule[r : r + 1], threshold[r : r + 1],
            factor[r : r + 1], quota[r : r + 1],
        )  # fmt: skip
        assert torch.equal(batched[r], alone[0]), r
        expected = reference_select_row(
            conf[r].tolist(), cand[r].tolist(), int(rule[r]), float(threshold[r]),
            float(factor[r]), int(quota[r]),
        )  # fmt: skip
        assert set(batched[r].nonzero().flatten().tolist()) == expected, r
    assert not (batched & ~cand).any()
    has_candidate = cand.any(dim=-1)
    assert torch.equal(batched.any(dim=-1), has_candidate)


def test_select_does_no_host_sync() -> None:
    conf = torch.rand(4, 8)
    cand = torch.rand(4, 8) < 0.5
    with HostSyncDetector() as detector:
        select(
            conf, cand, torch.tensor([0, 1, 2, 0]), torch.full((4,), 0.9), torch.ones(4),
            torch.full((4,), 2),
        )  # fmt: skip
    assert detector.syncs == []


# --------------------------------------------------------------------------- steps schedule


def llada_num_transfer_tokens(masked: int, steps: int) -> list[int]:
    """LLaDA's `get_num_transfer_tokens`, transcribed."""
    base, remainder = divmod(masked, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


def test_steps_quota_example() -> None:
    assert [steps_quota(32, 5, i) for i in range(5)] == [7, 7, 6, 6, 6]
    assert steps_quota(torch.tensor(32), 5, torch.arange(5)).tolist() == [7, 7, 6, 6, 6]


@pytest.mark.parametrize("masked", [1, 5, 31, 32, 64])
@pytest.mark.parametrize("steps", [1, 3, 8, 32, 40])
def test_steps_quota_matches_llada_and_sums_to_masked(masked: int, steps: int) -> None:
    quotas = steps_quota(torch.tensor(masked), torch.tensor(steps), torch.arange(steps))
    assert quotas.dtype == torch.int64
    assert quotas.tolist() == llada_num_transfer_tokens(masked, steps)
    assert int(quotas.sum()) == masked


def test_steps_quota_is_batched() -> None:
    masked = torch.tensor([32, 31, 7, 64])
    steps = torch.tensor([5, 4, 3, 64])
    step_index = torch.tensor([1, 3, 0, 63])
    expected = [llada_num_transfer_tokens(int(m), int(s))[int(i)] for m, s, i in zip(
        masked, steps, step_index, strict=True)]  # fmt: skip
    assert steps_quota(masked, steps, step_index).tolist() == expected


def test_steps_rule_decodes_a_block_in_exactly_m_steps() -> None:
    """The select + schedule loop of one block: quota i commits exactly quota i positions."""
    gen = torch.Generator().manual_seed(1)
    width, m = 32, 5
    masked = torch.ones(2, width, dtype=torch.bool)
    for step in range(m):
        quota = steps_quota(torch.tensor([width, width]), m, step)
        chosen = select(
            torch.rand(2, width, generator=gen), masked, torch.tensor([S, S]),
            torch.zeros(2), torch.zeros(2), quota,
        )  # fmt: skip
        assert chosen.sum(dim=-1).tolist() == quota.tolist()
        masked &= ~chosen
    assert not masked.any()


# --------------------------------------------------------------------------- propose


def keys_for(seed: int, rows: int, step: int = 0, first_position: int = 0) -> torch.Tensor:
    """Gumbel keys of `rows` consecutive positions of one request at one step."""
    return row_keys(
        torch.full((rows,), seed), torch.full((rows,), step),
        torch.arange(first_position, first_position + rows), GUMBEL_STREAM,
    )  # fmt: skip


@pytest.mark.parametrize("mask_token_id", [0, 5, 9])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 50.0])
def test_mask_is_never_proposed(mask_token_id: int, temperature: float) -> None:
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(2))
    logits[:, mask_token_id] = 100.0
    temps = torch.full((64,), temperature)
    keys = None if temperature == 0.0 else keys_for(1, 64)
    x0, conf = propose(logits, mask_token_id, temps, keys)
    assert not (x0 == mask_token_id).any()
    # Confidence excludes MASK from the softmax: with MASK it would be below e^-90.
    assert (conf > 1e-6).all()


def test_greedy_is_first_argmax_without_mask() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 2.0, 5.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    x0, _ = propose(logits, 3, torch.zeros(3))
    assert x0.tolist() == [1, 0, 0]
    x0_noise_path, _ = propose(logits, 3, torch.zeros(3), keys_for(2, 3))
    assert x0_noise_path.tolist() == [1, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_confidence_matches_float64_softmax(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, mask = 5000, 4321
    logits = (torch.randn(48, vocab, generator=gen) * 4).to(dtype)
    logits[::3, 17] += 20  # peaked rows: confidence near 1
    logits[1::3, mask] += 30  # MASK would dominate the softmax if it were not excluded
    temps = torch.zeros(48)
    temps[::2] = 1.0
    x0, conf = propose(logits, mask, temps, keys_for(3, 48))
    assert conf.dtype == torch.float32 and x0.dtype == torch.int64
    ref_logits = logits.to(torch.float64)
    ref_logits[:, mask] = float("-inf")
    expected = ref_logits.softmax(dim=-1).gather(-1, x0[:, None]).squeeze(-1)
    # fp32 rounding of exp(l - logsumexp(l)): the log of a sum of `vocab` positive terms is off
    # by about sqrt(vocab) units of rounding, the shift by the largest logit by its magnitude
    # in units; 4x that, relative to the confidence, whatever order a CPU sums in.
    rtol = 4 * (vocab**0.5 + float(logits.float().abs().max())) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(conf.double(), expected, atol=0, rtol=rtol)
    greedy = ref_logits.argmax(dim=-1)
    assert torch.equal(x0[1::2], greedy[1::2])


def test_no_float64_vocab_tensor_and_bounded_scratch() -> None:
    rows, vocab, chunk = 32, 1000, 4
    hidden = torch.randn(rows, vocab)
    for keys, temps in ((None, torch.zeros(rows)), (keys_for(4, rows), torch.ones(rows))):
        with HostSyncDetector() as detector:
            propose_rows(hidden, lambda h: h * 2, 7, temps, keys, chunk)
        assert detector.syncs == [] and detector.float64_numel == 0
        assert detector.max_numel <= chunk * vocab  # never an [N, V] tensor


def test_chunk_budget_is_what_vllm_profiled_for_its_sampler() -> None:
    """The budget is what vLLM's profiled sampler held per logit (bf16 logits, their float32
    copy, probabilities and noise: 14 bytes; float32: 12). Greedy rows, which need no noise
    scratch, get larger chunks than sampled ones: a bf16 greedy step fits as many rows as vLLM's
    sampler had requests, and a step whose rows fit the budget is one GEMM."""
    vocab = 126464
    assert sampler_profile_bytes(256, vocab, 2) == 256 * vocab * 14
    assert sampler_profile_bytes(256, vocab, 4) == 256 * vocab * 12
    assert rows_per_chunk(vocab, sampler_profile_bytes(256, vocab, 2), 2, False) == 256
    assert rows_per_chunk(vocab, sampler_profile_bytes(256, vocab, 2), 2, True) == 256 * 14 // 26
    assert rows_per_chunk(vocab, sampler_profile_bytes(256, vocab, 4), 4, False) == 192
    assert rows_per_chunk(vocab, sampler_profile_bytes(2048, vocab, 2), 2, False) == 64 * 32
    for itemsize in (2, 4):
        for sampling in (False, True):
            budget = sampler_profile_bytes(32, vocab, itemsize)
            rows = rows_per_chunk(vocab, budget, itemsize, sampling)
            per_logit = itemsize + (24 if sampling else 12)
            assert rows * vocab * per_logit <= budget < (rows + 1) * vocab * per_logit
    assert rows_per_chunk(10**9, 1, 2, True) == 1


def test_chunking_does_not_change_results() -> None:
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(37, 300, generator=gen).to(torch.bfloat16)
    temps = torch.linspace(0, 2, 37)
    keys = keys_for(5, 37)
    for noise in (None, keys):
        whole = propose_rows(hidden, lambda h: h, 3, temps, noise, 37)
        for chunk in (1, 5, 36, 100):
            chunked = propose_rows(hidden, lambda h: h, 3, temps, noise, chunk)
            assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_noise_bits_equal_a_uint64_reference() -> None:
    """int64 arithmetic that wraps like uint64: the hash equals NumPy's unsigned SplitMix64."""
    np = pytest.importorskip("numpy")
    x = torch.randint(-(2**63), 2**63 - 1, (4096,), dtype=torch.int64)
    ref = x.numpy().view(np.uint64).copy()
    with np.errstate(over="ignore"):
        ref ^= ref >> np.uint64(30)
        ref *= np.uint64(0xBF58476D1CE4E5B9)
        ref ^= ref >> np.uint64(27)
        ref *= np.uint64(0x94D049BB133111EB)
        ref ^= ref >> np.uint64(31)
    assert (mix64(x).numpy().view(np.uint64) == ref).all()


def test_uniform_is_in_the_open_unit_interval_and_uniform() -> None:
    u = uniform(torch.arange(200_000))
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert torch.isfinite(gumbel(torch.arange(64), 1000)).all()


def test_the_largest_draw_stays_below_one() -> None:
    """Top 24 bits all ones: `(2**24 - 1 + 0.5) / 2**24` rounds to 1 in float32, which would make
    the Gumbel noise `+inf`, and `0 * inf` a NaN that `argmax` takes for a greedy row in a
    sampled batch (or `inf - inf` for a filtered-out token). A row of LLaDA's vocabulary meets
    it once in about 130 rows; this key's row does, at column 111,716."""
    top = _unit_interval_(torch.tensor([-1, 0], dtype=torch.int64))
    assert float(top[0]) == 1.0 - 2.0**-24 and float(top[1]) == 0.5 / 2**24
    key = row_keys(torch.tensor([0]), torch.tensor([0]), torch.tensor([19]), GUMBEL_STREAM)
    noise = gumbel(key, 126_464)
    assert torch.isfinite(noise).all() and float(noise[0, 111_716]) > 16.0
    x0, _ = propose(torch.zeros(2, 126_464), 7, torch.tensor([1.0, 0.0]), key.repeat(2))
    assert int(x0[0]) == 111_716 and int(x0[1]) == 0  # the greedy row takes the argmax


def test_gumbel_sampling_is_reproducible_and_batch_independent() -> None:
    vocab = 50
    logits = torch.randn(20, vocab, generator=torch.Generator().manual_seed(5)) * 0.1
    # Request A (seed 11) owns rows 0..3 when alone.
    alone, _ = propose(logits[:4], 0, torch.ones(4), keys_for(11, 4))
    again, _ = propose(logits[:4], 0, torch.ones(4), keys_for(11, 4))
    assert torch.equal(alone, again)
    # In a batch: another request (rows 0..5), request B (seed 12, rows 6..9), then A.
    batch_logits = torch.cat([logits[4:10], logits[10:14], logits[:4]])
    temps = torch.cat([torch.full((6,), 2.0), torch.full((4,), 0.5), torch.ones(4)])
    keys = torch.cat([keys_for(7, 6), keys_for(12, 4), keys_for(11, 4)])
    batched, _ = propose(batch_logits, 0, temps, keys)
    assert torch.equal(batched[10:14], alone)
    other_seed, _ = propose(logits[:4], 0, torch.ones(4), keys_for(99, 4))
    assert not torch.equal(other_seed, alone)


def test_seeded_stream_differs_across_steps_and_not_across_batches() -> None:
    """A request's noise at step k depends on (seed, k, position) only."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(6)) * 0.1
    steps_alone = [propose(logits[:3], 1, torch.ones(3), keys_for(21, 3, step=k))[0]
                   for k in (0, 1)]  # fmt: skip
    mixed = torch.cat([logits[3:], logits[:3]])
    mixed_keys = torch.cat([keys_for(5, 3), keys_for(21, 3, step=0)])
    steps_batched = [propose(mixed, 1, torch.ones(6), mixed_keys)[0][3:],
                     propose(logits[:3], 1, torch.ones(3), keys_for(21, 3, step=1))[0]]  # fmt: skip
    assert torch.equal(steps_alone[0], steps_batched[0])
    assert torch.equal(steps_alone[1], steps_batched[1])
    noise = [gumbel(keys_for(21, 3, step=k), 40) for k in (0, 1)]
    assert not torch.equal(noise[0], noise[1])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gumbel_samples_follow_softmax_at_temperature(temperature: float) -> None:
    rows = 40_000
    base = torch.tensor([2.0, 0.5, 9.0, 0.0, -1.0])  # index 2 is MASK
    logits = base.expand(rows, -1).contiguous()
    x0, _ = propose(logits, 2, torch.full((rows,), temperature), keys_for(7, rows))
    freq = torch.bincount(x0, minlength=5).double() / rows
    kept = base.double().clone()
    kept[2] = float("-inf")
    expected = (kept / temperature).softmax(dim=-1)
    # Binomial frequencies of 40,000 draws: standard deviation at most 0.0025; allow 4 of them.
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_greedy_rows_in_a_sampled_batch_are_plain_argmax() -> None:
    logits = torch.randn(16, 30, generator=torch.Generator().manual_seed(8))
    temps = torch.tensor([0.0, 5.0] * 8)
    x0, _ = propose(logits, 29, temps, keys_for(9, 16))
    masked = logits.clone()
    masked[:, 29] = float("-inf")
    assert torch.equal(x0[::2], masked.argmax(dim=-1)[::2])
    assert not torch.equal(x0[1::2], masked.argmax(dim=-1)[1::2])


# --------------------------------------------------------------------------- random remasking


def test_random_scores_are_per_request_and_per_step() -> None:
    """The `random` remasking score of a position depends on its request's key only."""

    def scores(seed: int, rows: int, step: int = 0) -> torch.Tensor:
        return uniform(row_keys(torch.full((rows,), seed), torch.full((rows,), step),
                                torch.arange(rows), REMASK_STREAM))  # fmt: skip

    alone = scores(13, 3)
    assert ((alone >= 0) & (alone < 1)).all() and alone.unique().numel() == 3
    batched = torch.cat([scores(14, 4), scores(13, 3)])
    assert torch.equal(batched[4:], alone)
    assert not torch.equal(scores(13, 3, step=1), alone)
    gumbel_keys = keys_for(13, 3)
    assert not torch.equal(uniform(gumbel_keys), alone)  # streams are independent


def test_tempered_confidence_is_the_probability_of_the_tempered_logits():
    """Block-diffusion releases compare softmax(logits / T)[x0] to their thresholds; greedy rows
    (T = 0) keep softmax(logits)[x0]."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])
    keys = row_keys(torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.arange(4), 1)
    x0, plain = propose(logits, 7, temperature, keys)
    same_x0, tempered = propose(logits, 7, temperature, keys, tempered_confidence=True)
    assert torch.equal(x0, same_x0)
    scaled = logits.clone()
    scaled[:, 7] = float("-inf")
    divisor = torch.where(temperature > 0, temperature, 1.0)[:, None]
    expected = (scaled / divisor).softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
    # Two fp32 orderings of one softmax (see test_confidence_matches_float64_softmax).
    rtol = 4 * (50**0.5 + float((scaled[torch.isfinite(scaled)] / 0.5).abs().max()))
    torch.testing.assert_close(tempered, expected, atol=0,
                               rtol=rtol * torch.finfo(torch.float32).eps)
    assert torch.equal(plain[0], tempered[0]) and not torch.allclose(plain[1:], tempered[1:])
