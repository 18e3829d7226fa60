"""Dream's own sampler (`dllm_alg`) on the engine against the releases' loops, and its checks.

Two oracles: `tests/reference/dream_alg_generate.py` is Dream's `diffusion_generate` at
temperature 0 (the generation one block, full forwards): the engine must give the same tokens
and forwards for each `alg`, several step counts (steps that commit nothing included) and prompt
lengths; `origin`, random by design, draws the engine's counter-based uniforms in the oracle, so
a seeded request matches it too. `tests/reference/dream_block_generate.py` is Fast-dLLM's Dream
block loop with the request's alg as the score (several blocks, the cache modes, Dream's
schedule in each block or the threshold rule on a margin), seeded `alg_temp` and temperature
draws included.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from tests.engines import end_token_ids
from tests.oracle_cache import memoized
from tests.reference import ReferenceModel
from tests.reference.dream_alg_generate import generate_dream_alg
from tests.reference.dream_block_generate import generate_dream_block_alg
from tests.test_engine_oracle import engine_run
from tests.tolerances import assert_decisive
from vllm_dllm.config import DllmParamError, parse_dllm_params
from vllm_dllm.denoising.dream_alg import DreamAlgState, DreamBlockAlgState
from vllm_dllm.denoising.request import BidirectionalState, new_state
from vllm_dllm.sampling import ScoreKind, SelectionRule

MAX_TOKENS = 12
PROMPTS = ([17, 101, 42], [5, 9, 200, 13, 77, 64, 33, 120, 2, 250, 31])


def _params(alg: str, steps: int, **kwargs) -> SamplingParams:
    extra = {"dllm_alg": alg, "dllm_steps": steps, "dllm_block_length": MAX_TOKENS,
             "dllm_cache": "none"}  # fmt: skip
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra, **kwargs)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy", "origin"])
def test_tokens_and_forwards_equal_dreams_loop(dream_engine, dream_tiny_dir, alg):
    """Every alg's decisions clear fp32 rounding (`assert_decisive`) except `entropy`'s: the
    random checkpoint's distributions are all close to uniform, their entropies within 1e-5 of
    each other, so that case's token equality holds on this CPU's rounding only."""
    model = ReferenceModel(dream_tiny_dir)
    ends = end_token_ids(dream_tiny_dir)
    # 12 steps: one token per step; 5: uneven quotas; 20: more steps than tokens (some commit
    # nothing); 1: everything at once.
    for steps in (12, 5, 20, 1):
        for prompt in PROMPTS:
            (got,) = engine_run(dream_engine, [prompt], [_params(alg, steps, seed=3)])
            want = generate_dream_alg(model, prompt, max_new_tokens=MAX_TOKENS, steps=steps,
                                      alg=alg, end_token_ids=ends, seed=3)  # fmt: skip
            if alg != "entropy":  # see below
                assert_decisive(want.margins, model)
            assert got == (want.tokens, want.num_forwards), (steps, prompt)


# Fast-dLLM's Dream block loop ---------------------------------------------------------------

BLOCK_ALGS = ("maskgit_plus", "topk_margin", "entropy")
CACHES = ("none", "prefix", "dual")
#: (block length, dllm_steps, prompt) run for every alg and cache: 3 blocks of 4 steps, 2 of 4.
SCHEDULES = [(4, 12, 0), (6, 8, 1)]
#: More step counts, one cache each: 4 blocks of 3 steps; 2 steps per block (the opening, then
#: everything); one block with a cache; 8 steps per block of 4 (steps that commit nothing).
MORE_SCHEDULES = {"none": [(3, 12, 1)], "prefix": [(4, 6, 1), (12, 12, 0)], "dual": [(4, 24, 0)]}


def _block_alg(alg: str, cache: str, block: int, **extra) -> dict:
    return {"dllm_alg": alg, "dllm_cache": cache, "dllm_block_length": block, **extra}


@memoized
def block_oracle(model, checkpoint, prompt, extra, temperature=0.0, seed=0):
    """Fast-dLLM's Dream block loop with the request's alg (decisions clear of fp32 rounding)."""
    block = extra["dllm_block_length"]
    result = generate_dream_block_alg(
        model, prompt, gen_length=-(-MAX_TOKENS // block) * block, block_length=block,
        cache=extra["dllm_cache"], alg=extra["dllm_alg"], steps=extra.get("dllm_steps"),
        threshold=extra.get("dllm_threshold"), alg_temp=extra.get("dllm_alg_temp", 0.0),
        temperature=temperature, end_token_ids=end_token_ids(checkpoint), max_tokens=MAX_TOKENS,
        seed=seed,
    )  # fmt: skip
    assert_decisive(result.margins, model)
    return result.tokens, result.num_forwards


def _sampling(extra: dict, temperature: float = 0.0, seed: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
                          extra_args=extra)  # fmt: skip


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("alg", BLOCK_ALGS)
def test_block_loop_tokens_and_forwards_equal_fast_dllms_dream_loop(dream_engine, dream_tiny_dir,
                                                                    alg, cache):  # fmt: skip
    """Dream's schedule inside each block of Fast-dLLM's loop, scored by the request's alg."""
    model = ReferenceModel(dream_tiny_dir)
    for block, steps, prompt in SCHEDULES + MORE_SCHEDULES[cache]:
        extra = _block_alg(alg, cache, block, dllm_steps=steps)
        (got,) = engine_run(dream_engine, [PROMPTS[prompt]], [_sampling(extra)])
        assert got == block_oracle(model, dream_tiny_dir, PROMPTS[prompt], extra), extra


#: Seeded draws: `alg_temp` (the schedule's positions drawn by softmax(score / alg_temp)) and
#: temperature (the tokens drawn), one case per alg and cache.
DRAWN = [
    (_block_alg("topk_margin", "dual", 4, dllm_steps=12, dllm_alg_temp=0.5), 0.0, 3),
    (_block_alg("entropy", "prefix", 6, dllm_steps=8, dllm_alg_temp=0.01), 0.0, 5),
    (_block_alg("maskgit_plus", "none", 4, dllm_steps=12, dllm_alg_temp=0.3), 0.0, 7),
    (_block_alg("topk_margin", "dual", 4, dllm_steps=12), 0.8, 11),
    (_block_alg("entropy", "prefix", 4, dllm_steps=12), 1.0, 2),
    (_block_alg("maskgit_plus", "none", 6, dllm_steps=8), 0.7, 4),
]

#: The threshold rule on the top-1 minus top-2 margin (the random checkpoint's margins are
#: around 0.001 to 0.02): several blocks with each cache, and one block.
MARGIN_THRESHOLDS = [
    *(_block_alg("topk_margin", cache, 4, dllm_threshold=0.005) for cache in CACHES),
    _block_alg("topk_margin", "none", 12, dllm_threshold=0.01),
    _block_alg("topk_margin", "dual", 12, dllm_threshold=0.002),
]


def test_seeded_draws_equal_the_oracle(dream_engine, dream_tiny_dir):
    model = ReferenceModel(dream_tiny_dir)
    for prompt in PROMPTS:
        for extra, temperature, seed in DRAWN:
            (got,) = engine_run(dream_engine, [prompt], [_sampling(extra, temperature, seed)])
            assert got == block_oracle(model, dream_tiny_dir, prompt, extra, temperature, seed), (
                extra, temperature)


def test_threshold_on_the_margin_equals_the_oracle(dream_engine, dream_tiny_dir):
    """Every masked position of the block whose margin is >= the threshold, always the best;
    steps that commit several positions (fewer forwards than tokens) included."""
    model = ReferenceModel(dream_tiny_dir)
    forwards = []
    for prompt in PROMPTS:
        for extra in MARGIN_THRESHOLDS:
            (got,) = engine_run(dream_engine, [prompt], [_sampling(extra)])
            assert got == block_oracle(model, dream_tiny_dir, prompt, extra), extra
            forwards.append(got[1])
    assert min(forwards) < MAX_TOKENS // 2


def test_maskgit_plus_with_a_rule_is_the_plain_rule(dream_engine):
    """`maskgit_plus` scores by the proposal's probability: with a threshold or factor it is the
    request without `dllm_alg`."""
    for rule in ({"dllm_threshold": 0.01}, {"dllm_factor": 1.0}):
        for cache, block in (("prefix", 4), ("dual", 6), ("none", 12)):
            plain = {"dllm_cache": cache, "dllm_block_length": block, **rule}
            with_alg = {**plain, "dllm_alg": "maskgit_plus"}
            got = engine_run(dream_engine, PROMPTS, [_sampling(with_alg)] * 2)
            assert got == engine_run(dream_engine, PROMPTS, [_sampling(plain)] * 2), plain


def test_mixed_batch_with_the_other_rules(dream_engine, dream_tiny_dir):
    """Dream-loop requests, Fast-dLLM block-loop requests with Dream's samplers and plain
    requests batch together, each as if alone; the block-loop ones equal their oracle."""
    model = ReferenceModel(dream_tiny_dir)
    threshold = _sampling({"dllm_block_length": 4, "dllm_threshold": 0.3})
    steps = _sampling({"dllm_block_length": 4, "dllm_cache": "prefix", "dllm_steps": 12})
    block_cases = [
        (PROMPTS[0], _block_alg("entropy", "prefix", 4, dllm_steps=12), 0.0, None),
        (PROMPTS[1], MARGIN_THRESHOLDS[2], 0.0, None),
        (PROMPTS[1], *DRAWN[0]),
        (PROMPTS[0], *DRAWN[4]),
    ]
    cases = [
        (PROMPTS[0], _params("entropy", 5)),
        (PROMPTS[1], threshold),
        *((p, _sampling(e, t, s)) for p, e, t, s in block_cases[:2]),
        (PROMPTS[1], _params("topk_margin", 7)),
        (PROMPTS[0], steps),
        *((p, _sampling(e, t, s)) for p, e, t, s in block_cases[2:]),
        (PROMPTS[0], _params("origin", 4, seed=9)),
    ]
    alone = [engine_run(dream_engine, [p], [sp])[0] for p, sp in cases]
    assert engine_run(dream_engine, [p for p, _ in cases], [sp for _, sp in cases]) == alone
    oracle = [block_oracle(model, dream_tiny_dir, p, e, t, s or 0) for p, e, t, s in block_cases]
    assert [alone[i] for i in (2, 3, 6, 7)] == oracle


def test_quota_schedule_is_the_releases():
    """`int(masked * (1 - s / t))` per step in float32, the rest at the last step."""
    params = parse_dllm_params({"dllm_alg": "maskgit_plus", "dllm_steps": 4}, max_tokens=10)
    assert (params.block_length, params.cache, params.steps) == (10, "none", 4)
    state = new_state(prompt_len=3, params=params, logits_shift=1, end_token_ids=frozenset(),
                      temperature=0.0, seed=0)  # fmt: skip
    assert isinstance(state, DreamAlgState)
    t = torch.linspace(1, 1e-3, 5)
    quotas = []
    for i in range(4):
        targets = state.targets()
        assert targets.rule == SelectionRule.QUOTA and targets.num_candidates == state.num_masked
        quotas.append(targets.quota)
        expected = state.num_masked if i == 3 else int(state.num_masked * (1 - t[i + 1] / t[i]))
        assert targets.quota == expected
        committed = torch.full((11,), -1)
        committed[: targets.quota] = 5
        state.advance(committed.numpy(), targets.quota)
    assert sum(quotas) == 10 and state.num_masked == 0


def test_origin_commits_each_position_with_probability_one_minus_s_over_t():
    params = parse_dllm_params({"dllm_alg": "origin", "dllm_steps": 4}, max_tokens=10)
    state = new_state(prompt_len=3, params=params, logits_shift=1, end_token_ids=frozenset(),
                      temperature=0.0, seed=0)  # fmt: skip
    targets = state.targets()
    t = torch.linspace(1, 1e-3, 5)
    assert targets.rule == SelectionRule.BERNOULLI
    # A uniform draw is >= the threshold with probability 1 - s / t.
    assert targets.threshold == pytest.approx(float(t[1] / t[0]), abs=1e-6)


def test_block_schedule_is_the_releases_in_every_block():
    """Fast-dLLM's Dream loop: step 0 of a block commits its first position alone (Dream), then
    steps 1 .. m - 1 have the quotas `int(masked * (1 - T[i + 1] / T[i]))`, the rest at the
    last; LLaDA, without the opening, runs the schedule from step 0. Forwards: m per block."""
    extra = {"dllm_alg": "entropy", "dllm_block_length": 5, "dllm_steps": 8}
    params = parse_dllm_params(extra, max_tokens=10)
    assert (params.cache, params.steps_per_block, params.dream_loop) == ("none", 4, False)
    t = torch.linspace(1, 1e-3, 5)
    for shift in (1, 0):
        state = new_state(prompt_len=3, params=params, logits_shift=shift,
                          end_token_ids=frozenset(), temperature=0.0, seed=0)  # fmt: skip
        assert isinstance(state, DreamBlockAlgState)
        for block in range(2):
            masked, quotas = 5, []
            for i in range(4):
                targets = state.targets()
                assert (targets.block_start, targets.rule) == (3 + 5 * block, SelectionRule.QUOTA)
                if shift and i == 0:
                    assert (targets.hi, targets.num_candidates, targets.quota) == (1, 1, 1)
                else:
                    want = masked if i == 3 else int(masked * (1 - t[i + 1] / t[i]))
                    assert (targets.num_candidates, targets.quota) == (masked, want)
                quotas.append(targets.quota)
                committed = torch.full((6,), -1)
                committed[: targets.quota] = 5
                state.advance(committed.numpy(), targets.quota)
                masked -= targets.quota
            assert sum(quotas) == 5 and state.blocks_done == block + 1
        assert state.steps == 8


@pytest.mark.parametrize(
    ("extra", "kind", "rule", "loop"),
    [
        ({"dllm_alg": "entropy"}, ScoreKind.NEG_ENTROPY, "steps", DreamAlgState),
        ({"dllm_alg": "entropy", "dllm_cache": "dual"}, ScoreKind.NEG_ENTROPY, "steps",
         DreamBlockAlgState),
        ({"dllm_alg": "topk_margin", "dllm_block_length": 4}, ScoreKind.MARGIN, "steps",
         DreamBlockAlgState),
        ({"dllm_alg": "topk_margin", "dllm_threshold": 0.05}, ScoreKind.MARGIN, "threshold",
         BidirectionalState),
        ({"dllm_alg": "maskgit_plus", "dllm_factor": 1.0, "dllm_cache": "prefix"},
         ScoreKind.PROBABILITY, "factor", BidirectionalState),
    ],
)  # fmt: skip
def test_which_loop_and_score(extra, kind, rule, loop):
    params = parse_dllm_params(extra, max_tokens=MAX_TOKENS)
    state = new_state(prompt_len=3, params=params, logits_shift=1, end_token_ids=frozenset(),
                      temperature=0.0, seed=0)  # fmt: skip
    assert (type(state), state.score_kind, params.rule) == (loop, kind, rule)


def test_defaults_with_an_alg():
    """Dream's own loop: one block, no cache, max_tokens steps. The block loop: one step per
    generated position (m = the block length). A request naming `dllm_alg` drops the server's
    rule, block and cache defaults; an alg among the server's defaults keeps its companions."""
    server = {"dllm_cache": "prefix", "dllm_block_length": 4, "dllm_threshold": 0.5}
    params = parse_dllm_params({"dllm_alg": "entropy"}, MAX_TOKENS, server)
    assert (params.block_length, params.cache, params.rule, params.steps) == (12, "none",
                                                                              "steps", 12)
    params = parse_dllm_params({"dllm_alg": "entropy", "dllm_block_length": 5}, MAX_TOKENS)
    assert (params.gen_length, params.steps, params.steps_per_block) == (15, 15, 5)
    server = {"dllm_alg": "topk_margin", "dllm_threshold": 0.05, "dllm_cache": "dual"}
    params = parse_dllm_params({}, MAX_TOKENS, server)
    assert (params.alg, params.rule, params.threshold, params.cache) == ("topk_margin",
                                                                         "threshold", 0.05, "dual")
    params = parse_dllm_params({"dllm_steps": 6, "dllm_block_length": 4}, MAX_TOKENS, server)
    assert (params.rule, params.steps_per_block, params.cache) == ("steps", 2, "dual")


@pytest.mark.parametrize(
    ("extra", "name", "why"),
    [
        ({"dllm_alg": "entropy", "dllm_threshold": 0.9}, "dllm_threshold", "not comparable"),
        ({"dllm_alg": "entropy", "dllm_factor": 1.0}, "dllm_factor", "not comparable"),
        ({"dllm_alg": "topk_margin", "dllm_factor": 1.0}, "dllm_factor", "a top-1 minus top-2"),
        ({"dllm_alg": "origin", "dllm_cache": "dual"}, "dllm_cache", "no origin form"),
        ({"dllm_alg": "origin", "dllm_block_length": 4}, "dllm_block_length", "no origin form"),
        ({"dllm_alg": "origin", "dllm_threshold": 0.5}, "dllm_threshold", "no origin form"),
        ({"dllm_alg": "entropy", "dllm_remasking": "random"}, "dllm_remasking", "the alg"),
        ({"dllm_alg": "topk_margin", "dllm_remasking": "entropy_bounded"}, "dllm_remasking",
         "the alg"),
        ({"dllm_alg": "topk_margin", "dllm_threshold": 0.1, "dllm_alg_temp": 0.5},
         "dllm_alg_temp", "no quota"),
        ({"dllm_alg": "entropy", "dllm_block_length": 4, "dllm_steps": 3}, "dllm_steps",
         "at least 2 steps"),
        ({"dllm_alg": "entropy", "dllm_cache": "prefix", "dllm_steps": 1}, "dllm_steps",
         "at least 2 steps"),
        ({"dllm_alg": "entropy", "dllm_block_length": 4, "dllm_steps": 8}, "dllm_steps",
         "multiple of the number of blocks"),
        ({"dllm_alg": "origin", "dllm_alg_temp": 0.5}, "dllm_alg_temp", "origin"),
        ({"dllm_alg_temp": 0.5}, "dllm_alg_temp", "needs dllm_alg"),
        ({"dllm_alg": "greedy"}, "dllm_alg", "must be one of"),
    ],
)  # fmt: skip
def test_combinations_that_mean_nothing_are_refused_naming_the_parameter(extra, name, why):
    with pytest.raises(DllmParamError, match=f"^{name}.*{why}"):
        parse_dllm_params(extra, max_tokens=MAX_TOKENS)


def test_refused_through_the_engine_which_keeps_serving(dream_engine):
    bad = SamplingParams(max_tokens=MAX_TOKENS, extra_args={"dllm_alg": "entropy",
                                                            "dllm_threshold": 0.5})  # fmt: skip
    with pytest.raises((ValueError, VLLMValidationError), match="dllm_threshold"):
        engine_run(dream_engine, [PROMPTS[0]], [bad])
    assert engine_run(dream_engine, [PROMPTS[0]], [_params("entropy", 4)])[0][0]
