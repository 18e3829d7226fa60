"""Tensor parallelism: TP=2 on CPU (multiprocess backend) gives exactly the TP=1 tokens.

One TP=2 engine per family (LLaDA: 2 heads, one per rank; Dream: 4 q / 2 KV heads, one KV head
per rank; LLaDA-MoE: 2 of its 4 heads per rank, every expert's intermediate dimension split
over the ranks by vLLM's FusedMoE), started after the other family's is shut down. The
reference is the session's TP=1 engine with the same settings (fp32, eager, max_model_len 512,
seed 0).

Every rank runs the sampler on the all-gathered logits, so ranks agree only if they draw the
same random numbers. A seeded request is compared with TP=1 token for token. An unseeded one
cannot be compared with TP=1 (its seed comes from the request id, which vLLM randomises), so
the ranks are compared with each other: a test-only worker extension (`tests.engines.
CanvasRecorder`, added with vLLM's `worker_extension_cls`; the plugin still picks its own worker)
records a digest of
every request's canvas on every rank after every step.

Ranks that diverge do not fail cleanly: the rank whose plan disagrees with the schedule raises,
the other waits in a collective until `VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`. The engine here is
started with a short timeout so that such a bug fails the test instead of hanging the suite.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.engines import dllm_score, end_token_ids, start_tp2_engine, stop_engine
from tests.reference import bidirectional_oracle
from tests.tolerances import assert_forward_close

MAX_TOKENS = 32
PROMPTS = ([17, 101, 42], [5, 9, 200, 13, 77, 64, 33, 120, 2, 250, 31])


def _params(extra: dict, **kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=MAX_TOKENS, extra_args=extra, **kwargs)


# (prompt, params): cache modes x rules, one seeded temperature > 0 request.
DETERMINISTIC = [
    (PROMPTS[0], _params({"dllm_cache": "dual", "dllm_block_length": 8, "dllm_threshold": 0.9})),
    (PROMPTS[1], _params({"dllm_cache": "prefix", "dllm_block_length": 32, "dllm_factor": 1.0})),
    (PROMPTS[0], _params({"dllm_cache": "none", "dllm_block_length": 16, "dllm_steps": 32})),
    (
        PROMPTS[1],
        _params(
            {"dllm_cache": "dual", "dllm_block_length": 8, "dllm_threshold": 0.5},
            temperature=1.5,
            seed=1234,
        ),
    ),
]
UNSEEDED = (
    PROMPTS[1],
    _params(
        {
            "dllm_cache": "dual",
            "dllm_block_length": 8,
            "dllm_threshold": 0.5,
            "dllm_remasking": "random",
        },
        temperature=1.0,
    ),
)


@pytest.fixture(scope="module", params=["llada", "dream", "llada_moe"])
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


def test_engine_is_tensor_parallel(tp2_engine):
    config = tp2_engine.llm_engine.vllm_config
    assert config.parallel_config.tensor_parallel_size == 2
    assert config.parallel_config.distributed_executor_backend == "mp"
    # The plugin installed its worker and scheduler under TP too.
    assert config.parallel_config.worker_cls == "vllm_dllm.engine.worker.DllmCPUWorker"
    assert config.scheduler_config.scheduler_cls == "vllm_dllm.engine.scheduler.DllmScheduler"


def test_tp2_tokens_equal_tp1(family, tp2_engine, request):
    """One mixed batch on TP=2 (with the unseeded request) against TP=1, token for token."""
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    tp1_engine = request.getfixturevalue(f"{family}_engine")
    tp2_engine.collective_rpc("dllm_test_record_canvases")
    got, got_stats = _run(tp2_engine, [*DETERMINISTIC, UNSEEDED])
    # Both ranks held the same canvases after every step, every request (unseeded one included).
    rank0, rank1 = tp2_engine.collective_rpc("dllm_test_canvas_log")
    assert len(rank0) == len(DETERMINISTIC) + 1 and all(rank0.values())
    assert rank0 == rank1

    expected, expected_stats = _run(tp1_engine, DETERMINISTIC)
    for i in range(len(DETERMINISTIC)):
        assert list(got[i].token_ids) == list(expected[i].token_ids), DETERMINISTIC[i]
        assert got[i].finish_reason == expected[i].finish_reason
        assert got_stats[i] == expected_stats[i]

    # The unseeded random request: finished (no crash, no hang) with a complete answer.
    unseeded, stats = got[-1], got_stats[-1]
    tokens = list(unseeded.token_ids)
    mask = bidirectional_oracle(checkpoint).spec.mask_token_id
    assert tokens and mask not in tokens
    if unseeded.finish_reason == "length":
        assert len(tokens) == MAX_TOKENS
    else:
        assert unseeded.finish_reason == "stop"
        assert tokens[-1] in end_token_ids(checkpoint)
    assert stats["output_tokens"] == len(tokens) and stats["forwards"] >= 1


def test_ranks_see_identical_logits(family, tp2_engine, request):
    """Each rank's logits (sharded model, all-gathered vocabulary) are the same on both ranks
    and equal the oracle's dense forward; a cached window equals the full forward."""
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    oracle = bidirectional_oracle(checkpoint)
    mask = oracle.spec.mask_token_id
    canvas = PROMPTS[1] + [mask] * 8 + [7, 8, 9] + [mask] * 13
    length, start = len(canvas), len(PROMPTS[1])
    ranks = dllm_score(tp2_engine, canvas, [(0, length), (start, start + 8)])
    assert len(ranks) == 2
    assert ranks[0] == ranks[1]
    full, cached = (torch.tensor(x) for x in ranks[0])
    expected = oracle.forward(torch.tensor(canvas), torch.arange(length))
    assert_forward_close(full, expected, oracle)
    assert_forward_close(cached, full[start : start + 8], oracle)
