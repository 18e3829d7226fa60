"""On a CUDA GPU: the engine equals the oracle with vLLM's GPU attention backends, CUDA graphs on
and off, and bf16 stays close to it.

Run with `pytest -m gpu` on a machine with CUDA; elsewhere every test here is skipped (the same
checks run on CPU attention in `test_engine_oracle.py` and `test_compiled_step.py`). Each engine
is started once per module and shut down before the next, so only one holds GPU memory.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from tests.engines import start_engine
from tests.reference import ReferenceModel
from tests.reference.block_model import BlockReferenceModel
from tests.test_block_engine import (
    SDAR_CASES,
    SDAR_PROMPTS,
    V2_CASES,
    V2_PROMPTS,
    sdar_oracle,
    v2_oracle,
)
from tests.test_block_engine import engine_run as block_run
from tests.test_block_engine import params as block_params
from tests.test_engine_oracle import MAX_TOKENS, PROMPTS, engine_run, oracle_run
from tests.worker_probes import start_counting_host_reads, stop_counting_host_reads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU; CPU attention runs the same checks in test_engine_oracle.py",
    ),
]

#: vLLM's GPU attention backends that run non-causal attention over the paged KV cache.
BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")
CASES = [
    {"dllm_cache": cache, "dllm_block_length": block, **rule}
    for cache in ("none", "prefix", "dual")
    for block, rule in ((8, {"dllm_threshold": 0.9}), (32, {"dllm_steps": MAX_TOKENS}))
]
#: bf16 logits against the fp32 oracle: bf16 keeps 8 significant bits (relative error 2**-9
#: per rounding), accumulated over the tiny model's layers and its LM head.
BF16_ATOL, BF16_RTOL = 0.05, 0.02
GPU_MEMORY = 0.3


def _stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    torch.cuda.empty_cache()


@pytest.fixture(
    scope="module",
    params=[
        (family, backend, eager)
        for family in ("llada", "dream")
        for backend in BACKENDS
        for eager in (False, True)
    ],
    ids=lambda p: f"{p[0]}-{p[1]}-{'eager' if p[2] else 'graphs'}",
)
def gpu_engine(request):
    family, backend, eager = request.param
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    llm = start_engine(
        checkpoint,
        enforce_eager=eager,
        attention_backend=backend,
        gpu_memory_utilization=GPU_MEMORY,
    )
    yield llm, ReferenceModel(checkpoint), checkpoint
    _stop(llm)


def _params(extra: dict) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra)


def test_gpu_engine_equals_oracle(gpu_engine):
    """Batch 1, then every case at once: windows of 8 to the whole canvas, whose total token
    count falls between CUDA-graph capture sizes and is padded."""
    llm, oracle, checkpoint = gpu_engine
    cases = [(prompt, extra) for extra in CASES for prompt in PROMPTS]
    expected = [oracle_run(oracle, checkpoint, p, e) for p, e in cases]
    for (prompt, extra), want in zip(cases, expected, strict=True):
        assert engine_run(llm, [prompt], [_params(extra)]) == [want], extra
    got = engine_run(llm, [p for p, _ in cases], [_params(e) for _, e in cases])
    assert got == expected


def test_gpu_step_reads_the_device_once(gpu_engine):
    llm, _, _ = gpu_engine
    llm.collective_rpc(start_counting_host_reads)
    try:
        engine_run(llm, [PROMPTS[i % 2] for i in range(len(CASES))], [_params(e) for e in CASES])
    finally:
        (records,) = llm.collective_rpc(stop_counting_host_reads)
    assert all(calls == ["cpu"] for num_reqs, calls in records if num_reqs), records


@pytest.fixture(scope="module")
def bf16_engine(llada_tiny_dir):
    llm = start_engine(llada_tiny_dir, dtype="bfloat16", gpu_memory_utilization=GPU_MEMORY)
    yield llm, ReferenceModel(llada_tiny_dir)
    _stop(llm)


def test_bf16_logits_are_close_to_the_fp32_oracle(bf16_engine):
    llm, oracle = bf16_engine
    mask = oracle.spec.mask_token_id
    canvas = PROMPTS[1] + [mask] * 8 + [7, 8, 9] + [mask] * 13
    (logits,) = llm.collective_rpc("dllm_score", args=(canvas, [(0, len(canvas))]))[0]
    expected = oracle.forward(torch.tensor(canvas), torch.arange(len(canvas)))
    torch.testing.assert_close(torch.tensor(logits), expected, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_bf16_tokens_equal_the_oracle_on_a_peaked_checkpoint(llada_peaked_dir):
    """Peaked logits leave bf16 rounding no room to change an argmax or a threshold decision."""
    llm = start_engine(llada_peaked_dir, dtype="bfloat16", gpu_memory_utilization=GPU_MEMORY)
    try:
        oracle = ReferenceModel(llada_peaked_dir)
        for extra in CASES:
            got = engine_run(llm, [PROMPTS[1]], [_params(extra)])
            assert got == [oracle_run(oracle, llada_peaked_dir, PROMPTS[1], extra)], extra
    finally:
        _stop(llm)


@pytest.fixture(
    scope="module",
    params=[(family, backend) for family in ("fast_dllm_v2", "sdar") for backend in BACKENDS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def gpu_block_engine(request):
    """Block-diffusion engines with CUDA graphs: several windows per request in one forward."""
    family, backend = request.param
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    llm = start_engine(checkpoint, attention_backend=backend, gpu_memory_utilization=GPU_MEMORY)
    yield family, llm, BlockReferenceModel(checkpoint), checkpoint
    _stop(llm)


def test_gpu_block_diffusion_equals_oracle(gpu_block_engine):
    family, llm, oracle, checkpoint = gpu_block_engine
    if family == "fast_dllm_v2":
        cases = [(p, extra) for p in V2_PROMPTS for extra in V2_CASES.values()]
        run_oracle = v2_oracle
    else:
        cases = [(p, extra) for p in SDAR_PROMPTS for extra in SDAR_CASES.values()]
        run_oracle = sdar_oracle
    expected = [run_oracle(oracle, checkpoint, p, e) for p, e in cases]
    got = block_run(llm, [p for p, _ in cases], [block_params(e) for _, e in cases])
    assert got == expected
