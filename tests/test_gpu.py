"""On a CUDA GPU: every family with vLLM's GPU attention backends, CUDA graphs on and off.

- FLASH_ATTN runs fp16/bf16 only (vLLM refuses a float32 model at start-up), so it runs bf16.
- TRITON_ATTN runs float32 and bf16. Its float32 runs set `TRITON_F32_DEFAULT=ieee`: Triton's
  `tl.dot` otherwise multiplies float32 in TF32 (10-bit mantissas), which is not the oracle's
  arithmetic.
- float32 engines equal the oracle exactly: tokens and forwards, mixed batches.
- bf16 engines: the logits of a fixed canvas stay within `bf16_atol` of the float32 oracle, and
  on the peaked LLaDA checkpoint the tokens equal the oracle's.
- Every engine: the CUDA-graph mode is PIECEWISE with graphs (NONE eager), and each denoising
  step synchronises with the GPU exactly once (`torch.cuda.set_sync_debug_mode`).

Run with `pytest -m gpu` on a machine with CUDA; elsewhere every test here is skipped (the same
checks run on CPU attention in the other test files). LLaDA 2.x needs vLLM's fused-MoE kernels
(`vllm._moe_C`); without them its engines are skipped. Each engine is started once per
parameter set and shut down before the next, so only one holds GPU memory.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from vllm import SamplingParams
from vllm.config import CUDAGraphMode

from tests.engines import dllm_score, start_engine
from tests.reference import ReferenceModel
from tests.reference.block_model import BlockReferenceModel
from tests.reference.llada2_model import LLaDA2ReferenceModel
from tests.test_block_engine import engine_run as block_run
from tests.test_block_engine import params as block_params
from tests.test_compiled_step import CASES, _block_cases
from tests.test_engine_oracle import MAX_TOKENS, PROMPTS, engine_run, oracle_run
from tests.worker_probes import start_counting_cuda_syncs, stop_counting_cuda_syncs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU; CPU attention runs the same checks in the other test files",
    ),
]

FAMILIES = ("llada", "dream", "fast_dllm_v2", "sdar", "llada2")
BIDIRECTIONAL = ("llada", "dream")
#: (backend, dtype): FLASH_ATTN has no float32 kernels.
SETTINGS = (("FLASH_ATTN", "bfloat16"), ("TRITON_ATTN", "float32"), ("TRITON_ATTN", "bfloat16"))
GPU_MEMORY = 0.3
#: Small enough to capture quickly, large enough that the tests' batches replay graphs; larger
#: batches run uncaptured, which the tests then also cover.
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

#: bf16 keeps 8 significant bits: each rounding has a relative error of at most
#: u = 2**-9. The tiny models' forward rounds about 20 times between the embedding and the
#: logits (2 layers of norm, q/k/v, attention, output, norm, gate/up, down, residual adds, then
#: the final norm and the LM head), so a logit is off by at most about 20u of the logits'
#: magnitude in the worst case (about 4.5u when the roundings' signs are independent).
BF16_ROUNDINGS = 20
BF16_UNIT_ROUNDOFF = 2.0**-9


def bf16_atol(expected: torch.Tensor) -> float:
    """The worst-case bf16 error bound above, relative to the largest logit."""
    return BF16_ROUNDINGS * BF16_UNIT_ROUNDOFF * float(expected.abs().max())


def _has_moe_kernels() -> bool:
    return importlib.util.find_spec("vllm._moe_C") is not None


def _stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    torch.cuda.empty_cache()


def _start(checkpoint, backend: str, dtype: str, eager: bool, monkeypatch: pytest.MonkeyPatch):
    if backend == "TRITON_ATTN" and dtype == "float32":
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")  # read by the engine's workers
    return start_engine(
        checkpoint,
        in_process=False,  # the process layout a GPU user runs
        dtype=dtype,
        enforce_eager=eager,
        attention_backend=backend,
        gpu_memory_utilization=GPU_MEMORY,
        compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES},
    )


@pytest.fixture(
    scope="module",
    params=[
        (family, backend, dtype, eager)
        for family in FAMILIES
        for backend, dtype in SETTINGS
        for eager in (False, True)
    ],
    ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}-{'eager' if p[3] else 'graphs'}",
)
def gpu_engine(request):
    family, backend, dtype, eager = request.param
    if family == "llada2" and not _has_moe_kernels():
        pytest.skip("LLaDA 2.x needs vLLM's fused-MoE kernels (vllm._moe_C), not installed")
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    with pytest.MonkeyPatch.context() as monkeypatch:
        llm = _start(checkpoint, backend, dtype, eager, monkeypatch)
    yield family, dtype, eager, llm, checkpoint
    _stop(llm)


def test_cuda_graph_mode(gpu_engine):
    """Piecewise graphs only: denoising batches never replay a full graph, and full graphs'
    fixed attention buffers (FlashAttention 3's scheduler metadata) would overflow on a prefill
    of more block windows than `max_num_seqs`."""
    _, _, eager, llm, _ = gpu_engine
    mode = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode
    assert mode == (CUDAGraphMode.NONE if eager else CUDAGraphMode.PIECEWISE)


def test_float32_engine_equals_oracle(gpu_engine):
    """Tokens and forwards equal the oracle's, alone and in a mixed batch (window sizes from a
    sub-block to the whole canvas, totals between capture sizes)."""
    family, dtype, _, llm, checkpoint = gpu_engine
    if dtype != "float32":
        pytest.skip("bf16 rounding may change a decision; bf16 is compared by its logits")
    if family in BIDIRECTIONAL:
        oracle = ReferenceModel(checkpoint)
        cases = [(prompt, extra) for extra in CASES for prompt in PROMPTS]
        expected = [oracle_run(oracle, checkpoint, p, e) for p, e in cases]
        params = [_params(e) for _, e in cases]
        assert engine_run(llm, [p for p, _ in cases[:1]], params[:1]) == expected[:1]
        assert engine_run(llm, [p for p, _ in cases], params) == expected
    else:
        cases = _block_cases(family, checkpoint)
        got = block_run(llm, [p for p, _, _ in cases], [block_params(e) for _, e, _ in cases])
        assert got == [want for _, _, want in cases]


def test_bf16_logits_are_close_to_the_float32_oracle(gpu_engine):
    family, dtype, _, llm, checkpoint = gpu_engine
    if dtype != "bfloat16":
        pytest.skip("float32 engines are compared token for token")
    if family in BIDIRECTIONAL:
        oracle = ReferenceModel(checkpoint)
        mask = oracle.spec.mask_token_id
        canvas = PROMPTS[1] + [mask] * 8 + [7, 8, 9] + [mask] * 13
        (rows,) = dllm_score(llm, canvas, [(0, len(canvas))])[0]
        got = torch.tensor(rows)
        expected = oracle.forward(torch.tensor(canvas), torch.arange(len(canvas)))
    else:
        model_cls = LLaDA2ReferenceModel if family == "llada2" else BlockReferenceModel
        model = model_cls(checkpoint)
        block = model.spec.block_size
        mask = model.spec.mask_token_id
        canvas = [(11 * i) % 250 + 1 for i in range(2 * block + 3)] + [mask] * (block - 3)
        windows = [(s, s + block, s + block) for s in range(0, len(canvas), block)]
        (per_block,) = dllm_score(llm, canvas, windows)
        got = torch.cat([torch.tensor(rows) for rows in per_block])
        expected = model.forward(torch.tensor(canvas), 0, model.new_cache(), block_size=block)
    torch.testing.assert_close(got, expected, atol=bf16_atol(expected), rtol=0)


def test_each_step_synchronises_once(gpu_engine):
    """Exactly one operation per denoising step makes the host wait for the GPU: the final
    device-to-host copy of the commits (mixed batch, greedy and sampled requests)."""
    family, _, _, llm, checkpoint = gpu_engine
    llm.collective_rpc(start_counting_cuda_syncs)
    try:
        if family in BIDIRECTIONAL:
            mixed = [
                SamplingParams(max_tokens=MAX_TOKENS, temperature=(0.0, 1.0)[i % 2], seed=i,
                               extra_args=extra)  # fmt: skip
                for i, extra in enumerate(CASES)
            ]
            engine_run(llm, [PROMPTS[i % 2] for i in range(len(mixed))], mixed)
        else:
            cases = _block_cases(family, checkpoint)
            mixed = [block_params(extra, temperature=(0.0, 1.2)[i % 2], seed=i)
                     for i, (_, extra, _) in enumerate(cases)]  # fmt: skip
            block_run(llm, [prompt for prompt, _, _ in cases], mixed)
    finally:
        (records,) = llm.collective_rpc(stop_counting_cuda_syncs)
    steps = [syncs for num_reqs, syncs in records if num_reqs]
    assert steps and all(len(syncs) == 1 for syncs in steps), records


def _params(extra: dict) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra)


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
def test_bf16_tokens_equal_the_oracle_on_a_peaked_checkpoint(llada_peaked_dir, backend):
    """Peaked logits leave bf16 rounding no room to change an argmax or a threshold decision:
    with CUDA graphs, every cache mode and rule equals the float32 oracle."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        llm = _start(llada_peaked_dir, backend, "bfloat16", False, monkeypatch)
    try:
        oracle = ReferenceModel(llada_peaked_dir)
        cases = [(prompt, extra) for extra in CASES for prompt in PROMPTS]
        expected = [oracle_run(oracle, llada_peaked_dir, p, e) for p, e in cases]
        got = engine_run(llm, [p for p, _ in cases], [_params(e) for _, e in cases])
        assert got == expected
    finally:
        _stop(llm)

