"""Block-diffusion models on the engine against their oracles: same tokens, same forwards.

Fast-dLLM v2 (tiny checkpoint: block 32, token shift, sub-blocks), SDAR (block 4, no shift) and
LLaDA 2.x (block 32, mixture of experts) run through the real vLLM engine (fp32, paged KV,
block-causal windows) and through `tests/reference/block_generate.py` / `llada2_generate.py`
(plain torch, dense block-causal attention, one request).
Prompts end mid-block, exactly on a block boundary, and inside the first block; parameters cover
each family's rules, its cache option and block lengths; batches mix them in two orders.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt

from tests.engines import dllm_score, end_token_ids
from tests.oracle_cache import memoized
from tests.reference.block_generate import generate_fast_dllm_v2, generate_sdar
from tests.reference.block_model import BlockReferenceModel
from tests.reference.llada2_generate import generate_llada2, generate_llada21
from tests.reference.llada2_model import LLaDA2ReferenceModel
from tests.tolerances import assert_decisive, assert_forward_close

MAX_TOKENS = 40
V2_PROMPTS = ([17, 101, 42], list(range(1, 33)), [(7 * i) % 250 + 1 for i in range(45)])
SDAR_PROMPTS = ([17, 101, 42], [5, 9, 200, 13, 77, 64, 33, 120], V2_PROMPTS[2][:11])


def engine_run(llm, prompts, params_list):
    """(tokens, forwards) per request, in order."""
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params_list, use_tqdm=False
    )
    return [
        (list(o.outputs[0].token_ids), o.kv_transfer_params["dllm"]["forwards"]) for o in outputs
    ]


def params(extra, **kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return SamplingParams(extra_args=extra, **kwargs)


@pytest.fixture(scope="module")
def v2(fast_dllm_v2_tiny_dir):
    return BlockReferenceModel(fast_dllm_v2_tiny_dir)


@pytest.fixture(scope="module")
def sdar(sdar_tiny_dir):
    return BlockReferenceModel(sdar_tiny_dir)


@memoized
def v2_oracle(model, checkpoint, prompt, extra, max_tokens=MAX_TOKENS, **kwargs):
    result = generate_fast_dllm_v2(
        model,
        prompt,
        max_new_tokens=max_tokens,
        small_block_size=extra.get("dllm_sub_block_length", 8),
        threshold=extra.get("dllm_threshold", 0.95),
        use_block_cache=extra.get("dllm_cache", "none") == "dual",
        end_token_ids=kwargs.pop("end_token_ids", end_token_ids(checkpoint)),
        **kwargs,
    )
    assert_decisive(result.margins, model)
    return result.tokens, result.num_forwards


@memoized
def llada2_oracle(model, checkpoint, prompt, extra, max_tokens=MAX_TOKENS, **kwargs):
    block = extra.get("dllm_block_length", 32)
    result = generate_llada2(
        model,
        prompt,
        max_new_tokens=max_tokens,
        block_length=block,
        steps=extra.get("dllm_steps", block),
        threshold=extra.get("dllm_threshold", 0.95),
        end_token_ids=kwargs.pop("end_token_ids", end_token_ids(checkpoint)),
        fold_finished_block=True,
        **kwargs,
    )
    assert_decisive(result.margins, model)
    return result.tokens, result.num_forwards


@memoized
def sdar_oracle(model, checkpoint, prompt, extra, max_tokens=MAX_TOKENS, **kwargs):
    block = extra.get("dllm_block_length", model.spec.block_size)
    result = generate_sdar(
        model,
        prompt,
        max_new_tokens=max_tokens,
        block_length=block,
        denoising_steps=extra.get("dllm_steps"),
        remasking=extra.get("dllm_remasking", "low_confidence_dynamic"),
        threshold=extra.get("dllm_threshold", 0.95),
        eb_threshold=extra.get("dllm_eb_threshold", 0.35),
        end_token_ids=kwargs.pop("end_token_ids", end_token_ids(checkpoint)),
        fold_finished_block=True,
        **kwargs,
    )
    assert_decisive(result.margins, model)
    return result.tokens, result.num_forwards


V2_CASES = {
    "defaults": {},
    "threshold-0.3": {"dllm_threshold": 0.3},
    "sub-block-cache": {"dllm_cache": "dual", "dllm_threshold": 0.3},
    "sub-block-16-cache": {"dllm_cache": "dual", "dllm_sub_block_length": 16},
    "sub-block-32": {"dllm_sub_block_length": 32, "dllm_threshold": 0.5},
}


@pytest.mark.parametrize("case", list(V2_CASES))
def test_fast_dllm_v2_equals_oracle(fast_dllm_v2_engine, fast_dllm_v2_tiny_dir, v2, case):
    extra = V2_CASES[case]
    for prompt in V2_PROMPTS:
        (got,) = engine_run(fast_dllm_v2_engine, [prompt], [params(extra)])
        assert got == v2_oracle(v2, fast_dllm_v2_tiny_dir, prompt, extra), (len(prompt), extra)


SDAR_CASES = {
    "defaults": {},
    "threshold-0.2": {"dllm_threshold": 0.2},
    # dllm_steps is per block, as SDAR's release counts steps: one value for every prompt.
    "static-2-steps": {"dllm_remasking": "low_confidence_static", "dllm_steps": 2},
    "dynamic-3-steps-0.3": {"dllm_threshold": 0.3, "dllm_steps": 3},
    # More steps than positions: one token per step, as the release's quota-0 steps never run.
    "static-9-steps": {"dllm_remasking": "low_confidence_static", "dllm_steps": 9},
    "block-8": {"dllm_block_length": 8, "dllm_threshold": 0.02},
    # The EB-sampler: per-position entropies of the full distribution, summed within the bound.
    "entropy-bounded": {"dllm_remasking": "entropy_bounded"},
    "entropy-bounded-2": {"dllm_remasking": "entropy_bounded", "dllm_eb_threshold": 2.0},
}


@pytest.mark.parametrize("case", list(SDAR_CASES))
def test_sdar_equals_oracle(sdar_engine, sdar_tiny_dir, sdar, case):
    for prompt in SDAR_PROMPTS:
        extra = SDAR_CASES[case]
        (got,) = engine_run(sdar_engine, [prompt], [params(extra)])
        assert got == sdar_oracle(sdar, sdar_tiny_dir, prompt, extra), (len(prompt), extra)


def test_fast_dllm_v2_mixed_batch_in_two_orders(fast_dllm_v2_engine, fast_dllm_v2_tiny_dir, v2):
    cases = [
        (V2_PROMPTS[0], V2_CASES["sub-block-cache"], MAX_TOKENS),
        (V2_PROMPTS[1], V2_CASES["defaults"], 20),
        (V2_PROMPTS[2], V2_CASES["sub-block-16-cache"], MAX_TOKENS),
        (V2_PROMPTS[1], V2_CASES["threshold-0.3"], 70),
        (V2_PROMPTS[2], V2_CASES["sub-block-32"], 9),
    ]
    expected = [v2_oracle(v2, fast_dllm_v2_tiny_dir, p, e, m) for p, e, m in cases]
    for order in (range(len(cases)), reversed(range(len(cases)))):
        order = list(order)
        got = engine_run(
            fast_dllm_v2_engine,
            [cases[i][0] for i in order],
            [params(cases[i][1], max_tokens=cases[i][2]) for i in order],
        )
        assert got == [expected[i] for i in order]


def test_sdar_mixed_batch_in_two_orders(sdar_engine, sdar_tiny_dir, sdar):
    cases = [
        (SDAR_PROMPTS[0], SDAR_CASES["threshold-0.2"], MAX_TOKENS),
        (SDAR_PROMPTS[1], {"dllm_block_length": 8}, 13),
        (SDAR_PROMPTS[2], {"dllm_remasking": "low_confidence_static"}, MAX_TOKENS),
        (SDAR_PROMPTS[1], {"dllm_threshold": 0.4, "dllm_block_length": 2}, 25),
    ]
    expected = [sdar_oracle(sdar, sdar_tiny_dir, p, e, m) for p, e, m in cases]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        got = engine_run(
            sdar_engine,
            [cases[i][0] for i in order],
            [params(cases[i][1], max_tokens=cases[i][2]) for i in order],
        )
        assert got == [expected[i] for i in order]


def reference(family: str, checkpoint):
    """The family's oracle model and loop."""
    if family == "llada2":
        return LLaDA2ReferenceModel(checkpoint), llada2_oracle
    return BlockReferenceModel(checkpoint), v2_oracle if family == "fast_dllm_v2" else sdar_oracle


LLADA2_CASES = {
    "defaults": {},
    "threshold-0.3": {"dllm_threshold": 0.3},
    "steps-8-per-block": {"dllm_threshold": 0.5, "dllm_steps": 8},
}


@pytest.mark.parametrize("case", list(LLADA2_CASES))
def test_llada2_equals_oracle(llada2_engine, llada2_tiny_dir, case):
    model = LLaDA2ReferenceModel(llada2_tiny_dir)
    for prompt in V2_PROMPTS:
        extra = LLADA2_CASES[case]
        (got,) = engine_run(llada2_engine, [prompt], [params(extra)])
        assert got == llada2_oracle(model, llada2_tiny_dir, prompt, extra), (len(prompt), extra)


def test_llada2_mixed_batch_in_two_orders(llada2_engine, llada2_tiny_dir):
    model = LLaDA2ReferenceModel(llada2_tiny_dir)
    cases = [
        (V2_PROMPTS[0], LLADA2_CASES["threshold-0.3"], MAX_TOKENS),
        (V2_PROMPTS[1], LLADA2_CASES["defaults"], 20),
        (V2_PROMPTS[2], {"dllm_threshold": 0.5, "dllm_steps": 16}, MAX_TOKENS),
        (V2_PROMPTS[2], {"dllm_block_length": 16, "dllm_threshold": 0.2}, 30),
    ]
    expected = [llada2_oracle(model, llada2_tiny_dir, p, e, m) for p, e, m in cases]
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        got = engine_run(
            llada2_engine,
            [cases[i][0] for i in order],
            [params(cases[i][1], max_tokens=cases[i][2]) for i in order],
        )
        assert got == [expected[i] for i in order]


@memoized
def llada21_oracle(model, checkpoint, prompt, extra, max_tokens=MAX_TOKENS, **kwargs):
    result = generate_llada21(
        model,
        prompt,
        max_new_tokens=max_tokens,
        block_length=extra.get("dllm_block_length", 32),
        threshold=extra.get("dllm_threshold", 0.95),
        editing_threshold=extra["dllm_editing_threshold"],
        max_post_steps=extra.get("dllm_max_post_steps", 16),
        end_token_ids=kwargs.pop("end_token_ids", end_token_ids(checkpoint)),
        fold_finished_block=True,
        **kwargs,
    )
    assert_decisive(result.margins, model)
    return result.tokens, result.num_forwards


LLADA21_CASES = {
    "release-defaults": {"dllm_editing_threshold": 0.9},
    "edits": {"dllm_editing_threshold": 0.05, "dllm_threshold": 0.3},
    "two-post-steps": {"dllm_editing_threshold": 0.05, "dllm_max_post_steps": 2},
    "no-post-steps-block-16": {
        "dllm_editing_threshold": 0.05,
        "dllm_max_post_steps": 0,
        "dllm_block_length": 16,
    },
}


@pytest.mark.parametrize("case", list(LLADA21_CASES))
def test_llada21_editing_equals_oracle(llada2_engine, llada2_tiny_dir, case):
    """LLaDA 2.1's loop: decoded tokens of the block rewritten, post steps after it fills."""
    model = LLaDA2ReferenceModel(llada2_tiny_dir)
    extra = LLADA21_CASES[case]
    for prompt in V2_PROMPTS:
        (got,) = engine_run(llada2_engine, [prompt], [params(extra)])
        assert got == llada21_oracle(model, llada2_tiny_dir, prompt, extra), (len(prompt), extra)


def test_llada21_editing_changes_the_loop_and_mixes_with_plain_requests(
    llada2_engine, llada2_tiny_dir
):
    model = LLaDA2ReferenceModel(llada2_tiny_dir)
    plain = llada2_oracle(model, llada2_tiny_dir, V2_PROMPTS[2], {"dllm_threshold": 0.3})
    edited = llada21_oracle(model, llada2_tiny_dir, V2_PROMPTS[2], LLADA21_CASES["edits"])
    assert plain != edited  # the low editing threshold rewrites tokens (and adds post steps)
    cases = [
        (V2_PROMPTS[2], LLADA21_CASES["edits"], llada21_oracle),
        (V2_PROMPTS[0], {"dllm_threshold": 0.3}, llada2_oracle),
        (V2_PROMPTS[1], LLADA21_CASES["two-post-steps"], llada21_oracle),
    ]
    expected = [oracle(model, llada2_tiny_dir, p, e) for p, e, oracle in cases]
    for order in ([0, 1, 2], [2, 1, 0]):
        got = engine_run(
            llada2_engine, [cases[i][0] for i in order], [params(cases[i][1]) for i in order]
        )
        assert got == [expected[i] for i in order]


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar", "llada2"])
def test_early_stop_at_end_token(family, request):
    """An end token ends the request at once: same tokens as the oracle, fewer forwards."""
    llm = request.getfixturevalue(f"{family}_engine")
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    oracle_model, oracle = reference(family, checkpoint)
    prompt, extra = [5, 9, 200, 13, 77], {"dllm_threshold": 0.3}
    free = oracle(oracle_model, checkpoint, prompt, extra, end_token_ids=())
    stop_token = free[0][5]
    stopped = params(extra, ignore_eos=True, stop_token_ids=[stop_token])
    (got,) = engine_run(llm, [prompt], [stopped])
    assert got == oracle(oracle_model, checkpoint, prompt, extra, end_token_ids=(stop_token,))
    assert got[0][-1] == stop_token and len(got[0]) <= 6
    assert got[1] < free[1]


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar", "llada2"])
def test_seeded_sampling_equals_oracle_alone_and_in_a_mixed_batch(family, request):
    """Temperature > 0 with a seed, with and without top-k / top-p: the oracle draws the same
    counter-based noise (keyed by seed, forward count and position) after its own filters and
    scores by the filtered, tempered probability, as released."""
    llm = request.getfixturevalue(f"{family}_engine")
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    model, oracle = reference(family, checkpoint)
    extra = {"dllm_threshold": 0.3}
    # Fast-dLLM v2's release filters by top-p only.
    top_k = {} if family == "fast_dllm_v2" else {"top_k": 4}
    cases = [
        ([17, 101, 42, 8, 9], 1.5, 1234, {}),
        (V2_PROMPTS[1], 0.7, 7, {}),
        (V2_PROMPTS[2][:11], 1.0, 99, {}),
        ([17, 101, 42, 8, 9], 1.5, 1234, {"top_p": 0.6, **top_k}),
        (V2_PROMPTS[2][:11], 2.0, 5, {"top_p": 0.3}),
    ]
    expected = [oracle(model, checkpoint, p, extra, temperature=t, seed=seed,
                       **{"top_p": 1.0, **filters})
                for p, t, seed, filters in cases]  # fmt: skip
    for (prompt, t, seed, filters), want in zip(cases, expected, strict=True):
        got = engine_run(llm, [prompt], [params(extra, temperature=t, seed=seed, **filters)])
        assert got == [want], filters
    greedy = oracle(model, checkpoint, V2_PROMPTS[0], extra)
    order = [4, 2, 0, 3, 1]
    got = engine_run(
        llm,
        [V2_PROMPTS[0]] + [cases[i][0] for i in order],
        [params(extra)] + [params(extra, temperature=cases[i][1], seed=cases[i][2],
                                  **cases[i][3]) for i in order],  # fmt: skip
    )
    assert got == [greedy] + [expected[i] for i in order]
    assert any(want != oracle(model, checkpoint, c[0], extra) for c, want
               in zip(cases, expected, strict=True))  # fmt: skip  # sampling changed something
    assert expected[0] != expected[3]  # and filtering changed the draw


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar", "llada2"])
def test_seeded_sampling_is_reproducible_and_batch_independent(family, request):
    llm = request.getfixturevalue(f"{family}_engine")
    extra = {"dllm_threshold": 0.5}
    hot = params(extra, temperature=1.5, seed=1234)
    prompt, other = [17, 101, 42, 8, 9], [5, 9, 200, 13, 77, 64, 33]
    (alone,) = engine_run(llm, [prompt], [hot])
    assert engine_run(llm, [prompt], [hot]) == [alone]
    batched = engine_run(llm, [other, prompt, other], [params(extra), hot, hot])
    assert batched[1] == alone
    (greedy,) = engine_run(llm, [prompt], [params(extra)])
    (reseeded,) = engine_run(llm, [prompt], [params(extra, temperature=1.5, seed=99)])
    assert alone != greedy or reseeded != greedy  # the noise changes at least one draw


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar"])
def test_engine_block_causal_logits_equal_oracle(family, request):
    """Block by block through the paged cache (each block's window sees the K/V the earlier
    windows wrote): the logits equal the oracle's full block-causal forward of the canvas."""
    llm = request.getfixturevalue(f"{family}_engine")
    model = BlockReferenceModel(request.getfixturevalue(f"{family}_tiny_dir"))
    block = model.spec.block_size
    mask = model.spec.mask_token_id
    canvas = [(11 * i) % 250 + 1 for i in range(2 * block + 3)] + [mask] * (block - 3)
    windows = [(s, s + block, s + block) for s in range(0, len(canvas), block)]
    (per_block,) = dllm_score(llm, canvas, windows)
    expected = model.forward(torch.tensor(canvas), 0, model.new_cache(), block_size=block)
    assert_forward_close(torch.cat([torch.tensor(rows) for rows in per_block]), expected, model)


@pytest.mark.parametrize(
    ("family", "extra", "name"),
    [
        ("fast_dllm_v2", {"dllm_cache": "prefix"}, "dllm_cache"),
        ("fast_dllm_v2", {"dllm_factor": 1.0}, "dllm_factor"),
        ("fast_dllm_v2", {"dllm_block_length": 16}, "dllm_block_length"),
        ("fast_dllm_v2", {"dllm_sub_block_length": 5}, "dllm_sub_block_length"),
        ("fast_dllm_v2", {"dllm_remasking": "random"}, "dllm_remasking"),
        ("sdar", {"dllm_cache": "none"}, "dllm_cache"),
        ("sdar", {"dllm_sub_block_length": 2}, "dllm_sub_block_length"),
        ("sdar", {"dllm_remasking": "random"}, "dllm_remasking"),
        ("llada2", {"dllm_cache": "dual"}, "dllm_cache"),
        ("llada2", {"dllm_remasking": "low_confidence_static"}, "dllm_remasking"),
        ("llada2", {"dllm_editing_threshold": 0.9, "dllm_steps": 32}, "dllm_steps"),
        ("llada2", {"dllm_max_post_steps": 3}, "dllm_max_post_steps"),
    ],
)
def test_parameters_that_do_not_apply_are_rejected(family, extra, name, request):
    llm = request.getfixturevalue(f"{family}_engine")
    with pytest.raises((ValueError, VLLMValidationError), match=name):
        engine_run(llm, [[17, 101, 42]], [params(extra)])
    assert engine_run(llm, [[17, 101, 42]], [params({})])[0][0]  # still serving


def test_sdar_long_prompt_prefills_more_windows_than_running_requests(
    sdar_few_seqs_engine, sdar_tiny_dir, sdar
):
    """A 300-token prompt at block 4 prefills 75 block windows in one forward, and two such
    prompts 150 windows, with `max_num_seqs` 8: attention sequences per forward are bounded by
    the scheduled tokens, not by the running requests."""
    prompts = [[(7 * i) % 250 + 1 for i in range(300)], [(11 * i) % 250 + 1 for i in range(301)]]
    extra = {"dllm_threshold": 0.5}
    expected = [sdar_oracle(sdar, sdar_tiny_dir, p, extra) for p in prompts]
    assert engine_run(sdar_few_seqs_engine, prompts[:1], [params(extra)]) == expected[:1]
    assert engine_run(sdar_few_seqs_engine, prompts, [params(extra)] * 2) == expected
