"""Tensor parallelism on the block-diffusion families: TP=2 on CPU equals TP=1.

LLaDA 2.x's tiny checkpoint has 4 q / 2 KV heads and 4 routed experts plus a shared one:
vLLM's fused MoE splits each expert's intermediate dimension over the ranks.

One TP=2 engine per family (multiprocess backend, started with `tests.engines.start_tp2_engine`
after the other family's is shut down), compared with the session's TP=1 engine on the same
checkpoint (fp32, eager, max_model_len 512, seed 0). The tiny checkpoints split over two ranks:
Fast-dLLM v2 has 2 q heads over 1 KV head (one q head per rank, the KV head replicated, as vLLM
does when there are fewer KV heads than ranks), SDAR 4 q / 2 KV heads (2 / 1 per rank).

A mixed batch (prompts ending inside a block, on a block boundary and inside the first block;
each family's parameters; greedy and seeded sampling) must give TP=1's tokens, finish reasons
and statistics (forwards included). An unseeded sampled request cannot be compared with TP=1
(its seed comes from vLLM's random request id), so both ranks' canvases are compared after
every step (`tests.engines.CanvasRecorder`). See `tests/test_parallel.py` for why a rank
divergence fails with a short execute-model timeout instead of hanging.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.engines import dllm_score, end_token_ids, start_tp2_engine, stop_engine
from tests.reference.block_model import BlockReferenceModel
from tests.reference.llada2_model import LLaDA2ReferenceModel
from tests.tolerances import assert_forward_close

MAX_TOKENS = 40
LONG = [(7 * i) % 250 + 1 for i in range(45)]


def _params(extra: dict, max_tokens: int = MAX_TOKENS, **kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=max_tokens, extra_args=extra, **kwargs)


# (prompt, params) per family: greedy and seeded requests TP=1 must reproduce.
CASES = {
    "fast_dllm_v2": [
        ([17, 101, 42], _params({"dllm_cache": "dual", "dllm_threshold": 0.3})),
        (list(range(1, 33)), _params({}, max_tokens=20)),  # on the block boundary
        (LONG, _params({"dllm_cache": "dual", "dllm_sub_block_length": 16}, max_tokens=70)),
        (LONG, _params({"dllm_sub_block_length": 32, "dllm_threshold": 0.5})),
        (list(range(1, 33)), _params({"dllm_threshold": 0.5}, temperature=1.5, seed=1234)),
        (
            [5, 9, 200, 13, 77],
            _params({"dllm_cache": "dual", "dllm_threshold": 0.3}, temperature=1.0, seed=7),
        ),
    ],
    "sdar": [
        ([17, 101, 42], _params({"dllm_threshold": 0.2})),
        ([5, 9, 200, 13, 77, 64, 33, 120], _params({"dllm_block_length": 8}, max_tokens=13)),
        (
            LONG[:11],
            _params({"dllm_remasking": "low_confidence_static", "dllm_steps": 2}),
        ),
        (
            [5, 9, 200, 13, 77, 64, 33, 120],
            _params({"dllm_threshold": 0.4, "dllm_block_length": 2}),
        ),
        (LONG[:8], _params({"dllm_threshold": 0.5}, temperature=1.5, seed=1234)),
        (
            [17, 101, 42],
            _params(
                {"dllm_remasking": "low_confidence_static", "dllm_steps": 3},
                temperature=1.0,
                seed=7,
            ),
        ),
    ],
    "llada2": [
        ([17, 101, 42], _params({"dllm_threshold": 0.3})),
        (list(range(1, 33)), _params({}, max_tokens=20)),
        (LONG, _params({"dllm_threshold": 0.5, "dllm_editing_threshold": 0.05})),
        (LONG[:20], _params({"dllm_threshold": 0.5, "dllm_steps": 16})),
        (list(range(1, 33)), _params({"dllm_threshold": 0.5}, temperature=1.5, seed=1234)),
    ],
}
UNSEEDED = {
    "fast_dllm_v2": (LONG[:20], _params({"dllm_threshold": 0.5}, temperature=1.0)),
    "sdar": (LONG[:10], _params({"dllm_threshold": 0.5}, temperature=1.0)),
    "llada2": (LONG[:10], _params({"dllm_threshold": 0.5}, temperature=1.0)),
}


def _reference(family: str, checkpoint) -> BlockReferenceModel | LLaDA2ReferenceModel:
    if family == "llada2":
        return LLaDA2ReferenceModel(checkpoint)
    return BlockReferenceModel(checkpoint)


@pytest.fixture(scope="module", params=list(CASES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tp2_engine(family, request):
    """A TP=2 engine on the family's tiny checkpoint; shut down before the next family's."""
    llm = start_tp2_engine(request.getfixturevalue(f"{family}_tiny_dir"))
    yield llm
    stop_engine(llm)


def _run(llm, cases):
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p, _ in cases],
        [sp for _, sp in cases],
        use_tqdm=False,
    )
    return [o.outputs[0] for o in outputs], [o.kv_transfer_params["dllm"] for o in outputs]


def test_heads_split_over_two_ranks(family, tp2_engine):
    config = tp2_engine.llm_engine.vllm_config
    parallel = config.parallel_config
    assert parallel.tensor_parallel_size == 2 and parallel.distributed_executor_backend == "mp"
    assert parallel.worker_cls == "vllm_dllm.engine.worker.DllmCPUWorker"
    hf = config.model_config.hf_config
    per_rank_q = config.model_config.get_num_attention_heads(parallel)
    per_rank_kv = config.model_config.get_num_kv_heads(parallel)
    assert per_rank_q == hf.num_attention_heads // 2
    assert per_rank_kv == max(1, hf.num_key_value_heads // 2)


def test_tp2_mixed_batch_equals_tp1(family, tp2_engine, request):
    """One mixed batch (with an unseeded request) on TP=2 against TP=1, token for token."""
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    tp1_engine = request.getfixturevalue(f"{family}_engine")
    cases = CASES[family]
    tp2_engine.collective_rpc("dllm_test_record_canvases")
    got, got_stats = _run(tp2_engine, [*cases, UNSEEDED[family]])
    rank0, rank1 = tp2_engine.collective_rpc("dllm_test_canvas_log")
    assert len(rank0) == len(cases) + 1 and all(rank0.values())
    assert rank0 == rank1  # same canvases on both ranks after every step, every request

    expected, expected_stats = _run(tp1_engine, cases)
    for i, case in enumerate(cases):
        assert list(got[i].token_ids) == list(expected[i].token_ids), case
        assert got[i].finish_reason == expected[i].finish_reason, case
        assert got_stats[i] == expected_stats[i], case
    # Not a trivial batch: some request ran to max_tokens over several forwards (a request
    # may end at an end token in its first forward).
    assert "length" in {o.finish_reason for o in expected}
    assert max(s["forwards"] for s in expected_stats) > 1

    unseeded, stats = got[-1], got_stats[-1]
    tokens = list(unseeded.token_ids)
    assert tokens and _reference(family, checkpoint).spec.mask_token_id not in tokens
    if unseeded.finish_reason == "length":
        assert len(tokens) == MAX_TOKENS
    else:
        assert unseeded.finish_reason == "stop" and tokens[-1] in end_token_ids(checkpoint)
    assert stats["output_tokens"] == len(tokens) and stats["forwards"] >= 1


def test_tp2_batch_in_reverse_order_equals_tp1(family, tp2_engine, request):
    """The same requests in the other order: each request's answer does not depend on it."""
    cases = CASES[family][::-1]
    got, got_stats = _run(tp2_engine, cases)
    expected, expected_stats = _run(request.getfixturevalue(f"{family}_engine"), cases)
    assert [list(o.token_ids) for o in got] == [list(o.token_ids) for o in expected]
    assert got_stats == expected_stats


def test_ranks_see_identical_block_causal_logits(family, tp2_engine, request):
    """Block by block through the paged cache, each rank's logits (sharded model, all-gathered
    vocabulary) are the same and equal the oracle's block-causal forward of the canvas."""
    model = _reference(family, request.getfixturevalue(f"{family}_tiny_dir"))
    block, mask = model.spec.block_size, model.spec.mask_token_id
    canvas = [(11 * i) % 250 + 1 for i in range(2 * block + 3)] + [mask] * (block - 3)
    windows = [(s, s + block, s + block) for s in range(0, len(canvas), block)]
    ranks = dllm_score(tp2_engine, canvas, windows)
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    expected = model.forward(torch.tensor(canvas), 0, block_size=block)
    assert_forward_close(torch.cat([torch.tensor(rows) for rows in ranks[0]]), expected, model)
