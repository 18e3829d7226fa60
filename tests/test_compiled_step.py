"""The denoising step as it runs on a GPU: compiled forward, one host sync, bounded scratch.

The compiled engines (`enforce_eager=False`) run the model body through vLLM's compilation
(inductor on CPU; on a GPU also the captured piecewise CUDA graphs, with windows padded to the
capture sizes) and must still equal the oracle exactly, for the bidirectional and the
block-diffusion families.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from vllm import SamplingParams

from tests.engines import start_engine, stop_engine
from tests.reference import ReferenceModel
from tests.reference.block_model import BlockReferenceModel
from tests.reference.llada2_model import LLaDA2ReferenceModel
from tests.test_block_engine import (
    LLADA21_CASES,
    SDAR_CASES,
    SDAR_PROMPTS,
    V2_CASES,
    V2_PROMPTS,
    llada2_oracle,
    llada21_oracle,
    sdar_oracle,
    v2_oracle,
)
from tests.test_block_engine import engine_run as block_run
from tests.test_block_engine import params as block_params
from tests.test_engine_oracle import MAX_TOKENS, PROMPTS, engine_run, oracle_run
from tests.worker_probes import (
    body_compilation,
    start_counting_host_reads,
    stop_counting_host_reads,
)

CASES = [
    {"dllm_cache": cache, "dllm_block_length": block, **rule}
    for cache in ("none", "prefix", "dual")
    for block, rule in ((8, {"dllm_threshold": 0.9}), (32, {"dllm_steps": MAX_TOKENS}))
]


@pytest.fixture(params=["llada", "dream"])
def compiled(request):
    family = request.param
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    llm = request.getfixturevalue(f"{family}_compiled_engine")
    return llm, ReferenceModel(checkpoint), checkpoint


def _params(extra: dict) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra)


def test_the_compiled_body_runs(compiled, llada_engine):
    llm, _, _ = compiled
    assert llm.collective_rpc(body_compilation) == [(True, True)]
    assert llada_engine.collective_rpc(body_compilation)[0][0] is False  # enforce_eager


def test_compiled_engine_equals_oracle_alone(compiled):
    llm, oracle, checkpoint = compiled
    for extra in CASES:
        (got,) = engine_run(llm, [PROMPTS[1]], [_params(extra)])
        assert got == oracle_run(oracle, checkpoint, PROMPTS[1], extra), extra


def test_compiled_engine_equals_oracle_in_mixed_batches(compiled):
    """Every cache mode and rule at once, both prompts: window sizes from 8 to the canvas."""
    llm, oracle, checkpoint = compiled
    cases = [(prompt, extra) for extra in CASES for prompt in PROMPTS]
    expected = [oracle_run(oracle, checkpoint, p, e) for p, e in cases]
    for order in (list(range(len(cases))), list(reversed(range(len(cases))))):
        got = engine_run(llm, [cases[i][0] for i in order], [_params(cases[i][1]) for i in order])
        assert got == [expected[i] for i in order]


def test_one_host_sync_per_step(llada_compiled_engine):
    """Each denoising step of a mixed batch reads device values on the host exactly once,
    with top-k / top-p / min-p, the entropy-bounded rule, Dream's loop and its samplers in
    Fast-dLLM's block loop in the batch."""
    llm = llada_compiled_engine
    mixed = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=t, seed=seed, extra_args=extra)
        for (t, seed), extra in zip(
            [(0.0, None), (1.0, 3), (0.7, None), (0.0, None), (1.5, 4), (0.0, None)],
            [*CASES[:5], {**CASES[5], "dllm_remasking": "random"}],
            strict=True,
        )
    ] + [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=5, top_k=7, top_p=0.8,
                       min_p=0.05, extra_args=CASES[2]),
        SamplingParams(max_tokens=MAX_TOKENS, extra_args={
            "dllm_block_length": 8, "dllm_remasking": "entropy_bounded"}),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.5, seed=6, top_p=0.9, extra_args={
            "dllm_alg": "topk_margin", "dllm_steps": 6, "dllm_alg_temp": 0.5}),
        SamplingParams(max_tokens=MAX_TOKENS, extra_args={
            "dllm_alg": "topk_margin", "dllm_threshold": 0.01, "dllm_block_length": 8,
            "dllm_cache": "prefix"}),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=7, extra_args={
            "dllm_alg": "entropy", "dllm_block_length": 8, "dllm_cache": "dual",
            "dllm_steps": 16, "dllm_alg_temp": 0.3}),
    ]  # fmt: skip
    llm.collective_rpc(start_counting_host_reads)
    try:
        engine_run(llm, [PROMPTS[i % 2] for i in range(len(mixed))], mixed)
    finally:
        (records,) = llm.collective_rpc(stop_counting_host_reads)
    steps = [calls for num_reqs, calls in records if num_reqs]
    # The engine core steps while the requests arrive one by one, so a short one may finish
    # before the last is added. Greedy and sampled requests alternate: any step that held more
    # than half of them held both kinds.
    assert max(num_reqs for num_reqs, _ in records) > len(mixed) // 2, records
    assert steps and all(calls == ["cpu"] for calls in steps), records


#: Temperature, filters, requests (of 32 rows) and rows per chunk of each case: greedy 16 bytes
#: per fp32 logit, sampled 28, sampled and filtered 54 (`bytes_per_logit`). Filtered rows are
#: sorted, the slowest part: fewer requests, still several chunks.
SCRATCH_CASES = {"greedy": (0.0, False, 64, 192), "sampled": (1.0, False, 64, 109),
                 "filtered": (1.0, True, 16, 56)}  # fmt: skip


@pytest.mark.parametrize("case", list(SCRATCH_CASES))
def test_sampler_scratch_is_bounded_by_vllms_profiled_sampler_memory(case):
    """64 requests x block 32 (16 filtered), LLaDA's 126,464-token vocabulary, fp32: the step's
    vocabulary-sized memory (measured as the peak resident memory above the resident memory
    before the step, Linux's high-water mark reset through `/proc/self/clear_refs`) stays within
    what vLLM's profile held for its sampler at `max_num_seqs` 256, where unchunked logits
    alone would take 1 GiB; greedy rows (no noise scratch) get larger chunks than sampled ones,
    and rows with top-k / top-p / min-p (sorted once each, Dream's order and tempered
    confidence) smaller ones, each filling the budget to at least half."""
    temperature, filtered, requests, expected_chunk = SCRATCH_CASES[case]
    script = textwrap.dedent(
        f"""
        import re, torch
        from vllm_dllm.sampling import (Filters, propose_rows, rows_per_chunk, row_keys,
                                        sampler_profile_bytes)
        def kib(field):
            status = open("/proc/self/status").read()
            return int(re.search(field + r":\\s+(\\d+)", status).group(1)) * 1024
        torch.manual_seed(0)
        vocab, rows, hidden_size = 126464, {requests} * 32, 16
        head = torch.nn.Linear(hidden_size, vocab, bias=False)
        hidden = torch.randn(rows, hidden_size)
        temperature = torch.full((rows,), {temperature})
        keys = filters = None
        if {temperature} > 0:
            keys = row_keys(torch.arange(rows) // 32, torch.zeros(rows, dtype=torch.int64),
                            torch.arange(rows) % 32, 1)
        if {filtered}:
            pick = torch.arange(rows) % 4
            filters = Filters(torch.tensor([0, 50, 1000, 20000])[pick],
                              torch.tensor([0.9, 1.0, 0.5, 0.95])[pick],
                              torch.tensor([0.0, 0.05, 0.0, 0.01])[pick], top_p_first=True)
        budget = sampler_profile_bytes(256, vocab, 4)
        chunk = rows_per_chunk(vocab, budget, 4, keys is not None, filters is not None)
        with torch.inference_mode():
            warm = None if keys is None else keys[:4]
            propose_rows(hidden[:4], head, 7, temperature[:4], warm, 4, {filtered},
                         None if filters is None else filters.rows(slice(0, 4)))  # warm-up
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident memory (VmHWM) restarts from the current
            before = kib("VmRSS")
            x0, conf = propose_rows(hidden, head, 7, temperature, keys, chunk, {filtered}, filters)
            after = kib("VmHWM")
        assert x0.shape == (rows,) and bool((conf > 0).all())
        print(after - before, budget, chunk)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    growth, budget, chunk = map(int, out.stdout.split())
    # 4 MiB for what is not vocabulary-sized (per-row results, page rounding).
    assert budget // 2 <= growth <= budget + (4 << 20), (growth, budget)
    assert chunk == expected_chunk


@pytest.fixture(scope="module", params=["fast_dllm_v2", "sdar", "llada2"])
def block_compiled(request):
    """A compiled engine per block-diffusion family (module-scoped: shut down after use)."""
    family = request.param
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    llm = start_engine(checkpoint, enforce_eager=False)
    yield family, llm, checkpoint
    stop_engine(llm)


def _block_cases(family: str, checkpoint) -> list[tuple[list[int], dict, object]]:
    """(prompt, parameters, expected) of every case of the family."""
    if family == "fast_dllm_v2":
        model = BlockReferenceModel(checkpoint)
        cases = [(p, e, v2_oracle) for p in V2_PROMPTS for e in V2_CASES.values()]
    elif family == "sdar":
        model = BlockReferenceModel(checkpoint)
        cases = [(p, e, sdar_oracle) for p in SDAR_PROMPTS for e in SDAR_CASES.values()]
    else:
        model = LLaDA2ReferenceModel(checkpoint)
        cases = [(p, {"dllm_threshold": 0.3}, llada2_oracle) for p in V2_PROMPTS]
        cases += [(p, e, llada21_oracle) for p in V2_PROMPTS for e in LLADA21_CASES.values()]
    return [(p, e, oracle(model, checkpoint, p, e)) for p, e, oracle in cases]


def test_compiled_block_diffusion_equals_oracle_in_mixed_batches(block_compiled):
    """Prefill windows of several blocks, folded block writes, sub-block windows, all in one
    compiled forward per step."""
    family, llm, checkpoint = block_compiled
    assert llm.collective_rpc(body_compilation) == [(True, True)]
    cases = _block_cases(family, checkpoint)
    expected = [want for _, _, want in cases]
    for order in (list(range(len(cases))), list(reversed(range(len(cases))))):
        got = block_run(llm, [cases[i][0] for i in order], [block_params(cases[i][1])
                                                            for i in order])  # fmt: skip
        assert got == [expected[i] for i in order]


def test_block_diffusion_step_reads_the_device_once(block_compiled):
    family, llm, checkpoint = block_compiled
    cases = _block_cases(family, checkpoint)
    mixed = [block_params(extra, temperature=(0.0, 1.2)[i % 2], seed=i)
             for i, (_, extra, _) in enumerate(cases)]  # fmt: skip
    llm.collective_rpc(start_counting_host_reads)
    try:
        block_run(llm, [prompt for prompt, _, _ in cases], mixed)
    finally:
        (records,) = llm.collective_rpc(stop_counting_host_reads)
    steps = [calls for num_reqs, calls in records if num_reqs]
    # The engine core steps while the requests arrive one by one, so a short one may finish
    # before the last is added. Greedy and sampled requests alternate: any step that held more
    # than half of them held both kinds.
    assert max(num_reqs for num_reqs, _ in records) > len(mixed) // 2, records
    assert steps and all(calls == ["cpu"] for calls in steps), records
