"""vLLM's prefix caching for the block-diffusion families: exact, and used.

Fast-dLLM v2, SDAR and LLaDA 2.x keep vLLM's prefix caching on (the plugin's shared engines
have it on by default). Each family's engine runs requests that share a long prompt prefix
in a mixed batch (greedy and seeded sampling, a request with another block length, one that
shares nothing, Fast-dLLM v2's sub-block cache), from an empty cache and again, reversed, with
the prefix cached, and a chat's next turn that resends the previous answer; an engine with prefix
caching off runs the same requests. Tokens and forwards must be identical, and the cached
engine must report hits covering the shared whole KV blocks (128 tokens on CPU), the previous
answer's included.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.engines import MAX_MODEL_LEN

#: vLLM's KV block on CPU: the granularity of a prefix-cache hit.
KV_BLOCK = 128
SHARED = [(7 * i) % 250 + 1 for i in range(300)]
#: Questions after the shared prefix: the prompt ends mid-block, on a 4- and 32-block boundary.
QUESTIONS = ([5, 9, 200], [(11 * i) % 240 + 3 for i in range(20)], [17] * 9)
#: A prompt that shares nothing with the others.
OTHER = [(13 * i) % 230 + 2 for i in range(140)]


def run(llm, prompts, params_list):
    """(tokens, forwards, cached prompt tokens) per request, in order."""
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params_list, use_tqdm=False
    )
    return [
        (list(o.outputs[0].token_ids), o.kv_transfer_params["dllm"]["forwards"],
         o.num_cached_tokens or 0)
        for o in outputs
    ]  # fmt: skip


def expected_hit(prompt_len: int, shared: int, block: int) -> int:
    """Whole KV blocks of the shared prefix, before the prompt's last whole diffusion block."""
    first_decoded = prompt_len // block * block
    return min(shared, max(first_decoded - 1, 0)) // KV_BLOCK * KV_BLOCK


def check(on, off, block: int, family_params: list[dict], other_block: dict | None) -> None:
    """The on/off comparison and the hits, for one family's engines."""
    greedy = SamplingParams(temperature=0.0, max_tokens=40, extra_args=family_params[0])
    prompts = [SHARED + q for q in QUESTIONS]
    params_list = [
        SamplingParams(temperature=0.0, max_tokens=40, extra_args=family_params[0]),
        SamplingParams(temperature=0.8, seed=7, max_tokens=24, extra_args=family_params[-1]),
        SamplingParams(temperature=0.0, max_tokens=33, extra_args=family_params[0]),
    ]
    prompts.append(OTHER)
    params_list.append(SamplingParams(temperature=0.7, seed=3, max_tokens=40))
    if other_block is not None:
        # Another block length: neither reads nor writes the cache, still exact.
        prompts.append(SHARED + [4, 4])
        params_list.append(SamplingParams(temperature=0.0, max_tokens=16, extra_args=other_block))

    # From an empty cache: the first request computes the shared prefix, the others reuse it
    # (admitted in the same step, they read the K/V its prefill writes in that forward).
    on.reset_prefix_cache()
    first = run(on, prompts, params_list)
    second = run(on, prompts[::-1], params_list[::-1])[::-1]
    reference = run(off, prompts, params_list)
    assert [r[:2] for r in first] == [r[:2] for r in reference]
    assert [r[:2] for r in second] == [r[:2] for r in reference]
    assert all(r[2] == 0 for r in reference)
    assert first[0][2] == 0
    for i, q in enumerate(QUESTIONS):
        hit = expected_hit(len(SHARED) + len(q), len(SHARED), block)
        assert hit > 0
        assert second[i][2] == hit, (i, second[i][2], hit)
        if i:
            assert first[i][2] == hit, (i, first[i][2], hit)
    assert first[len(QUESTIONS)][2] == 0  # shares nothing
    if other_block is not None:
        assert first[-1][2] == second[-1][2] == 0

    # A chat's next turn resends the previous answer: its finished blocks are hits too.
    turn1 = SHARED[:160]
    (answer,) = run(on, [turn1], [SamplingParams(temperature=0.0, max_tokens=120,
                                                 extra_args=family_params[0])])  # fmt: skip
    turn2 = turn1 + answer[0] + [8, 6, 7, 5, 3, 0, 9, 2, 1, 4]
    assert len(turn2) + 40 <= MAX_MODEL_LEN
    (cont,) = run(on, [turn2], [greedy])
    (cont_off,) = run(off, [turn2], [greedy])
    assert cont[:2] == cont_off[:2]
    assert len(answer[0]) == 120, "the checks below need the whole answer"
    # 256 > 160: the second KV block holds the answer's first 96 tokens.
    assert cont[2] == expected_hit(len(turn2), len(turn1) + 120, block) == 256


off_options = {"enable_prefix_caching": False}


@pytest.fixture
def sdar_off_engine(engine_pool, sdar_tiny_dir):
    return engine_pool.engine("sdar_off", sdar_tiny_dir, **off_options)


@pytest.fixture
def fast_dllm_v2_off_engine(engine_pool, fast_dllm_v2_tiny_dir):
    return engine_pool.engine("fast_dllm_v2_off", fast_dllm_v2_tiny_dir, **off_options)


@pytest.fixture
def llada2_off_engine(engine_pool, llada2_tiny_dir):
    return engine_pool.engine("llada2_off", llada2_tiny_dir, **off_options)


def test_sdar_prefix_cache_is_exact_and_hits(sdar_engine, sdar_off_engine):
    check(
        sdar_engine, sdar_off_engine, 4,
        [{}, {"dllm_remasking": "low_confidence_static", "dllm_steps": 2}],
        {"dllm_block_length": 8},
    )  # fmt: skip


def test_fast_dllm_v2_prefix_cache_is_exact_and_hits(fast_dllm_v2_engine, fast_dllm_v2_off_engine):
    # The sub-block cache writes stale K/V inside the current block: never cached.
    check(
        fast_dllm_v2_engine, fast_dllm_v2_off_engine, 32,
        [{"dllm_threshold": 0.3}, {"dllm_cache": "dual", "dllm_threshold": 0.3}], None,
    )  # fmt: skip


def test_llada2_prefix_cache_is_exact_and_hits(llada2_engine, llada2_off_engine):
    check(
        llada2_engine, llada2_off_engine, 32,
        [{}, {"dllm_editing_threshold": 0.5, "dllm_max_post_steps": 2}],
        {"dllm_block_length": 8, "dllm_steps": 8},
    )  # fmt: skip


@pytest.fixture
def sdar_small_kv_engine(engine_pool, sdar_tiny_dir):
    """Four usable KV blocks of 128 tokens (one canvas of `MAX_MODEL_LEN` fills them all; vLLM
    keeps a fifth as its null block), with vLLM's statistics on (`LLM.get_metrics`)."""
    return engine_pool.engine(
        "sdar_small_kv", sdar_tiny_dir, num_gpu_blocks_override=5, disable_log_stats=False
    )


def counter(llm, name: str) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def test_evicted_blocks_are_recomputed_and_hits_are_counted(sdar_small_kv_engine,
                                                            sdar_off_engine):
    """A shared prefix hits while its blocks are cached (vLLM's `vllm:prefix_cache_hits` and
    `vllm:prefix_cache_queries` count it); once a canvas that needs every KV block has evicted
    them, the same prompt is computed in full, with the same tokens and forwards."""
    llm = sdar_small_kv_engine
    llm.reset_prefix_cache()
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    prompt = SHARED + QUESTIONS[1]
    reference = run(sdar_off_engine, [prompt], [greedy])[0]
    hits = counter(llm, "vllm:prefix_cache_hits")
    queries = counter(llm, "vllm:prefix_cache_queries")
    run(llm, [SHARED + [1]], [greedy])
    (hit,) = run(llm, [prompt], [greedy])
    assert hit == (*reference[:2], 256)
    assert counter(llm, "vllm:prefix_cache_hits") - hits == 256
    assert counter(llm, "vllm:prefix_cache_queries") - queries == len(SHARED) + 1 + len(prompt)
    # A canvas of four KV blocks: every cached block is evicted to make room.
    run(llm, [OTHER * 3 + OTHER[:50]], [SamplingParams(temperature=0.0, max_tokens=40)])
    (recomputed,) = run(llm, [prompt], [greedy])
    assert recomputed == (*reference[:2], 0)
