"""Dream's own sampler (`dllm_alg`) on the engine against the release's loop, and its checks.

The oracle (`tests/reference/dream_alg_generate.py`) is Dream's `diffusion_generate` at
temperature 0: the engine must give the same tokens and forwards for each `alg`, several step
counts (steps that commit nothing included) and prompt lengths; `origin`, random by design,
draws the engine's counter-based uniforms in the oracle, so a seeded request matches it too.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from tests.engines import end_token_ids
from tests.reference import ReferenceModel
from tests.reference.dream_alg_generate import generate_dream_alg
from tests.test_engine_oracle import engine_run
from tests.tolerances import assert_decisive
from vllm_dllm.config import DllmParamError, parse_dllm_params
from vllm_dllm.denoising.dream_alg import DreamAlgState
from vllm_dllm.denoising.request import new_state
from vllm_dllm.sampling import SelectionRule

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


def test_mixed_batch_with_the_other_rules(dream_engine, dream_tiny_dir):
    """Dream-loop requests batch with Fast-dLLM block requests, each as if alone."""
    threshold = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0,
        extra_args={"dllm_block_length": 4, "dllm_threshold": 0.3},
    )  # fmt: skip
    cases = [
        (PROMPTS[0], _params("entropy", 5)),
        (PROMPTS[1], threshold),
        (PROMPTS[1], _params("topk_margin", 7)),
        (PROMPTS[0], _params("origin", 4, seed=9)),
    ]
    alone = [engine_run(dream_engine, [p], [sp])[0] for p, sp in cases]
    assert engine_run(dream_engine, [p for p, _ in cases], [sp for _, sp in cases]) == alone


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


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({"dllm_alg": "entropy", "dllm_threshold": 0.9}, "dllm_threshold"),
        ({"dllm_alg": "entropy", "dllm_factor": 1.0}, "dllm_factor"),
        ({"dllm_alg": "entropy", "dllm_cache": "dual"}, "dllm_cache"),
        ({"dllm_alg": "entropy", "dllm_block_length": 4}, "dllm_block_length"),
        ({"dllm_alg": "entropy", "dllm_remasking": "random"}, "dllm_remasking"),
        ({"dllm_alg": "origin", "dllm_alg_temp": 0.5}, "dllm_alg_temp"),
        ({"dllm_alg_temp": 0.5}, "dllm_alg_temp"),
        ({"dllm_alg": "greedy"}, "dllm_alg"),
    ],
)
def test_combinations_that_mean_nothing_are_refused_naming_the_parameter(extra, name):
    with pytest.raises(DllmParamError, match=f"^{name}"):
        parse_dllm_params(extra, max_tokens=MAX_TOKENS)


def test_refused_through_the_engine_which_keeps_serving(dream_engine):
    bad = SamplingParams(max_tokens=MAX_TOKENS, extra_args={"dllm_alg": "entropy",
                                                            "dllm_cache": "dual"})  # fmt: skip
    with pytest.raises((ValueError, VLLMValidationError), match="dllm_cache"):
        engine_run(dream_engine, [PROMPTS[0]], [bad])
    assert engine_run(dream_engine, [PROMPTS[0]], [_params("entropy", 4)])[0][0]
