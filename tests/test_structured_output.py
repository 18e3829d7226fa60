"""Structured output through the real engine, every family (`vllm_dllm.structured`).

Per family, one batch of 20 constrained requests (JSON schemas, regexes, choices) mixed with
unconstrained ones: every constrained output validates and ends with `stop`; the unconstrained
requests' tokens equal a run without the constrained ones. On the trained model, the regex
answer is right and still commits several tokens per forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines import NO_FREE_WHITESPACE
from tests.structured_cases import MAX_TOKENS, cases

REPO = Path(__file__).resolve().parent.parent
PER_FAMILY = 20
FAMILIES = {
    "llada": "llada_tiny_dir",
    "dream": "dream_tiny_dir",
    "fast_dllm_v2": "fast_dllm_v2_tiny_dir",
    "sdar": "sdar_tiny_dir",
    "llada2": "llada2_tiny_dir",
}
#: The engine option for JSON without free whitespace.
STRUCTURED = {"structured_outputs_config": NO_FREE_WHITESPACE}


def _params(spec: dict | None, seed: int | None = None, temperature: float = 0.0):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=temperature,
        seed=seed,
        structured_outputs=None if spec is None else StructuredOutputsParams(**spec),
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_constrained_batch_validates_and_leaves_the_others_unchanged(
    family: str, engine_pool, request: pytest.FixtureRequest
) -> None:
    checkpoint = request.getfixturevalue(FAMILIES[family])
    llm = engine_pool.engine(f"{family}_structured", checkpoint, **STRUCTURED)
    free_prompts = ["The cat", "Numbers: 1 2 3", "Hello"]
    free = [_params(None), _params(None), _params(None, seed=7, temperature=1.0)]
    alone = [o.outputs[0].token_ids for o in llm.generate(free_prompts, free, use_tqdm=False)]

    constrained = cases(PER_FAMILY)
    prompts = [f"Answer {i}:" for i in range(PER_FAMILY)]
    # Half greedy, half seeded sampling: the constraint holds for draws too.
    params = [
        _params(c.spec, seed=i, temperature=0.0 if i % 2 else 1.0)
        for i, c in enumerate(constrained)
    ]
    outputs = llm.generate(prompts + free_prompts, params + free, use_tqdm=False)
    for case, out in zip(constrained, outputs[:PER_FAMILY], strict=False):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (family, case.spec, completion.text)
        assert case.valid(completion.text), (family, case.spec, completion.text)
    mixed = [o.outputs[0].token_ids for o in outputs[PER_FAMILY:]]
    assert mixed == alone, family


def test_trained_model_answers_under_a_regex_in_parallel() -> None:
    """`123+989=` under `[0-9]{1,4}`: `1112`, more than one token per forward."""
    from tests.engines import start_engine, stop_engine

    llm = start_engine(REPO / "models" / "llada-arith", max_model_len=128)
    try:
        xargs = {"dllm_cache": "dual", "dllm_threshold": 0.9, "dllm_block_length": 8}
        results = {}
        for name, spec in (("free", None), ("regex", {"regex": "[0-9]{1,4}"})):
            sp = _params(spec)
            sp.max_tokens = 16
            sp.extra_args = xargs
            out = llm.generate(["123+989="], sp, use_tqdm=False)[0]
            results[name] = (out.outputs[0].text, out.kv_transfer_params["dllm"])
    finally:
        stop_engine(llm)
    text, stats = results["regex"]
    assert text == "1112", results
    assert stats["forwards"] < len("1112"), results  # several digits in one forward
    assert results["free"][0] == "1112", results


def test_a_constrained_step_still_reads_the_device_once(engine_pool, llada_tiny_dir) -> None:
    """Bitmasks go up with the step, the matcher reads the step's one transfer back: a step
    of a batch mixing constrained and free requests makes exactly one host read."""
    from tests.worker_probes import start_counting_host_reads, stop_counting_host_reads

    llm = engine_pool.engine("llada_structured", llada_tiny_dir, **STRUCTURED)
    constrained = cases(4)
    params = [_params(c.spec) for c in constrained] + [_params(None), _params(None, 5, 1.0)]
    llm.collective_rpc(start_counting_host_reads)
    try:
        llm.generate([f"Q{i}:" for i in range(len(params))], params, use_tqdm=False)
    finally:
        (records,) = llm.collective_rpc(stop_counting_host_reads)
    steps = [calls for num_reqs, calls in records if num_reqs]
    assert max(num_reqs for num_reqs, _ in records) > len(constrained), records
    assert steps and all(calls == ["cpu"] for calls in steps), records
