"""The engine against the oracle: same token ids and same number of model forwards.

Every case runs through the real vLLM engine (tiny fp32 checkpoints) and through
`tests/reference` (plain torch, dense attention), for each cache mode x selection rule x block
length, LLaDA and Dream, prompts of different lengths.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.engines import dllm_score, end_token_ids
from tests.oracle_cache import memoized
from tests.reference import ReferenceModel, generate
from tests.tolerances import assert_decisive, assert_forward_close

MAX_TOKENS = 32
# Prompts whose oracle decisions are all clear of fp32 rounding (`assert_decisive`) in every
# case of this file, for both checkpoints.
PROMPTS = ([17, 99, 42], [5, 9, 200, 13, 77, 64, 34, 120, 2, 250, 31])
RULES = {
    "threshold-0.9": {"dllm_threshold": 0.9},
    "threshold-0.02": {"dllm_threshold": 0.02},
    "factor-1.0": {"dllm_factor": 1.0},
    "steps-one-per-step": {"dllm_steps": MAX_TOKENS},
}
ORACLE_RULE_KEYS = {"dllm_threshold": "threshold", "dllm_factor": "factor", "dllm_steps": "steps"}


def engine_run(llm, prompts, params_list):
    """(tokens, forwards) per request, in order."""
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params_list, use_tqdm=False
    )
    return [
        (list(o.outputs[0].token_ids), o.kv_transfer_params["dllm"]["forwards"]) for o in outputs
    ]


@memoized
def oracle_run(model: ReferenceModel, checkpoint, prompt, extra_args, **kwargs):
    rule = {ORACLE_RULE_KEYS[k]: v for k, v in extra_args.items() if k in ORACLE_RULE_KEYS}
    block = extra_args["dllm_block_length"]
    result = generate(
        model,
        prompt,
        gen_length=-(-MAX_TOKENS // block) * block,
        block_length=block,
        cache=extra_args["dllm_cache"],
        end_token_ids=kwargs.pop("end_token_ids", end_token_ids(checkpoint)),
        max_tokens=MAX_TOKENS,
        **rule,
        **kwargs,
    )
    assert_decisive(result.margins, model)
    return result.tokens, result.num_forwards


def sampling_params(extra_args, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra_args, **kwargs)


@pytest.fixture(params=["llada", "dream"])
def family(request):
    return request.param


@pytest.fixture
def engine_and_oracle(family, request):
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    llm = request.getfixturevalue(f"{family}_engine")
    return llm, ReferenceModel(checkpoint), checkpoint


@pytest.mark.parametrize("block_length", [8, 32])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_tokens_and_forwards_equal_oracle(engine_and_oracle, cache, rule, block_length):
    llm, oracle, checkpoint = engine_and_oracle
    extra = {"dllm_cache": cache, "dllm_block_length": block_length, **RULES[rule]}
    for prompt in PROMPTS:
        (got,) = engine_run(llm, [prompt], [sampling_params(extra)])
        assert got == oracle_run(oracle, checkpoint, prompt, extra), (prompt, extra)


def test_batched_requests_equal_alone(engine_and_oracle):
    """A mixed batch (rules, caches, block lengths, prompt lengths) in two orders."""
    llm, oracle, checkpoint = engine_and_oracle
    cases = [
        (prompt, {"dllm_cache": cache, "dllm_block_length": block, **RULES[rule]})
        for prompt, cache, rule, block in [
            (PROMPTS[0], "dual", "threshold-0.9", 8),
            (PROMPTS[1], "prefix", "factor-1.0", 32),
            (PROMPTS[0], "none", "steps-one-per-step", 32),
            (PROMPTS[1], "dual", "threshold-0.02", 8),
            (PROMPTS[1], "none", "threshold-0.9", 16),
        ]
    ]
    expected = [oracle_run(oracle, checkpoint, p, extra) for p, extra in cases]
    for order in (list(range(len(cases))), list(reversed(range(len(cases))))):
        got = engine_run(
            llm, [cases[i][0] for i in order], [sampling_params(cases[i][1]) for i in order]
        )
        assert got == [expected[i] for i in order]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine_and_oracle):
    llm, _, _ = engine_and_oracle
    extra = {"dllm_cache": "dual", "dllm_block_length": 8, "dllm_threshold": 0.5}
    hot = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, seed=1234, extra_args=extra)
    (alone,) = engine_run(llm, [PROMPTS[0]], [hot])
    (again,) = engine_run(llm, [PROMPTS[0]], [hot])
    assert alone == again
    batched = engine_run(
        llm, [PROMPTS[1], PROMPTS[0], PROMPTS[1]], [sampling_params(extra), hot, hot]
    )
    assert batched[1] == alone
    other_seed = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, seed=99, extra_args=extra)
    (different,) = engine_run(llm, [PROMPTS[0]], [other_seed])
    greedy = engine_run(llm, [PROMPTS[0]], [sampling_params(extra)])[0]
    assert alone != greedy or different != greedy  # noise changes at least one draw


def test_seeded_filtered_sampling_equals_oracle(engine_and_oracle):
    """Temperature > 0 with top-k / top-p: the oracle draws the engine's counter-based noise
    after its own filters; LLaDA scores a draw by its raw probability, Dream by its probability
    under the filtered, tempered distribution (each release's confidence)."""
    llm, oracle, checkpoint = engine_and_oracle
    extra = {"dllm_cache": "dual", "dllm_block_length": 8, "dllm_threshold": 0.3}
    cases = [
        (PROMPTS[0], 1.0, 3, {}),
        (PROMPTS[1], 1.5, 4, {"top_k": 5}),
        (PROMPTS[0], 0.8, 7, {"top_p": 0.5}),
    ]
    results = []
    for prompt, temperature, seed, filters in cases:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
                                extra_args=extra, **filters)  # fmt: skip
        (got,) = engine_run(llm, [prompt], [params])
        want = oracle_run(oracle, checkpoint, prompt, extra, temperature=temperature, seed=seed,
                          counter_noise=True, **filters)  # fmt: skip
        assert got == want, filters
        results.append(got)
    hot = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, seed=4, extra_args=extra)
    unfiltered = engine_run(llm, [PROMPTS[1]], [hot])
    assert unfiltered[0] != results[1]  # the filter changed the draw


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_entropy_bounded_selection_equals_oracle(engine_and_oracle, cache):
    """The EB-sampler in Fast-dLLM's block loop: lowest entropies first, summed within the bound."""
    llm, oracle, checkpoint = engine_and_oracle
    forwards = {}
    # The tiny models' entropies are near ln 320 = 5.8: 0.35 commits one position per step,
    # 12 two or three.
    for bound in (0.35, 12.0):
        extra = {"dllm_cache": cache, "dllm_block_length": 8,
                 "dllm_remasking": "entropy_bounded", "dllm_eb_threshold": bound}  # fmt: skip
        for prompt in PROMPTS:
            (got,) = engine_run(llm, [prompt], [sampling_params(extra, ignore_eos=True)])
            want = oracle_run(oracle, checkpoint, prompt, extra, remasking="entropy_bounded",
                              eb_threshold=bound, end_token_ids=())  # fmt: skip
            assert got == want, (prompt, bound)
            forwards[bound, len(prompt)] = got[1]
    assert all(forwards[12.0, n] < forwards[0.35, n] for n in map(len, PROMPTS))


def test_early_stop_does_fewer_forwards(engine_and_oracle):
    """An end token committed in the first block ends the request there."""
    llm, oracle, checkpoint = engine_and_oracle
    extra = {"dllm_cache": "dual", "dllm_block_length": 8, "dllm_steps": MAX_TOKENS}
    free = oracle_run(oracle, checkpoint, PROMPTS[1], extra, end_token_ids=())
    stop_token = free[0][3]  # committed within the first block of 8
    stopped = SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        stop_token_ids=[stop_token],
        extra_args=extra,
    )
    (got,) = engine_run(llm, [PROMPTS[1]], [stopped])
    assert got == oracle_run(
        oracle, checkpoint, PROMPTS[1], extra, end_token_ids=(stop_token,)
    )
    assert got[0][-1] == stop_token and len(got[0]) <= 4
    assert got[1] < free[1] == MAX_TOKENS


def test_engine_logits_equal_oracle_dense_forward(engine_and_oracle):
    """The model's logits through vLLM's paged-KV path equal the oracle's dense forward."""
    llm, oracle, _ = engine_and_oracle
    mask = oracle.spec.mask_token_id
    canvas = PROMPTS[1] + [mask] * 8 + [7, 8, 9] + [mask] * 13
    length = len(canvas)
    (full,) = dllm_score(llm, canvas, [(0, length)])[0]
    expected = oracle.forward(torch.tensor(canvas), torch.arange(length))
    assert_forward_close(torch.tensor(full), expected, oracle)


@pytest.mark.parametrize("window", ["prefix", "dual"])
def test_engine_cached_window_equals_full_forward(engine_and_oracle, window):
    """Tokens unchanged: a cached window's logits equal the full forward's (engine KV path)."""
    llm, oracle, _ = engine_and_oracle
    canvas = PROMPTS[1] + [3, 4, 5, 6] * 8
    length, start = len(canvas), len(PROMPTS[1]) + 8
    end = length if window == "prefix" else start + 8
    full, cached = dllm_score(llm, canvas, [(0, length), (start, end)])[0]
    full = torch.tensor(full)
    assert_forward_close(torch.tensor(cached), full[start:end], oracle)


def test_random_requests_of_different_block_lengths_are_batch_independent(engine_and_oracle):
    """Seeded sampling and random remasking with blocks of 8, 16 and 32 in one batch: each
    request's random numbers depend on that request alone, so it equals its single run."""
    llm, _, _ = engine_and_oracle
    cases = [
        (PROMPTS[i % 2], SamplingParams(
            max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
            extra_args={"dllm_cache": "dual", "dllm_block_length": block,
                        "dllm_threshold": 0.3, "dllm_remasking": remasking},
        ))  # fmt: skip
        for i, (temperature, seed, block, remasking) in enumerate(
            [
                (1.0, 7, 8, "low_confidence"),
                (0.0, 8, 16, "random"),
                (1.5, 9, 32, "random"),
                (0.8, None, 16, "low_confidence"),
            ]
        )
    ]
    alone = [engine_run(llm, [p], [sp])[0] for p, sp in cases if sp.seed is not None]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        got = engine_run(llm, [cases[i][0] for i in order], [cases[i][1] for i in order])
        seeded = {i: g for i, g in zip(order, got, strict=True) if cases[i][1].seed is not None}
        assert [seeded[i] for i in sorted(seeded)] == alone
