"""Smoke test of the benchmark code (benchmarks/): tiny sizes, one engine, real vLLM.

`python benchmarks/run.py --smoke` runs every dLLM section's cases (cache modes, parallel rules,
batching, the in-process overhead profile) on the tiny random LLaDA in ONE engine process, and
writes results.json / results.md / results.png. The numbers are meaningless at these sizes; the
test checks the pipeline and the shape and sanity of what it writes. The autoregressive
reference and the step benchmark need engines of their own, so here only the AR checkpoint
writer is checked.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import engine_job, report, run
from benchmarks.run import TINY_MODEL, write_llama_like
from tests.engines import IN_PROCESS_ENV
from vllm_dllm.testing.checkpoints import write_llada_checkpoint


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("bench_out")
    # The job's engine runs in its process (vLLM's single-process engine core, see
    # `tests.engines.start_engine`): the smoke test checks what is measured and written.
    with pytest.MonkeyPatch.context() as env:
        for name, value in IN_PROCESS_ENV.items():
            env.setenv(name, value)
        doc = run.main(["--smoke", "--out", str(out)])
    return doc, out


def test_files_written(smoke) -> None:
    doc, out = smoke
    assert json.loads((out / "results.json").read_text())["settings"]["profile"] == "smoke"
    md = (out / "results.md").read_text()
    for heading in ("## Targets", "## 1. Cache", "## 2. Parallel", "## 3. Batching",
                    "## 4. Autoregressive", "## 5. Engine overhead", "## 6. Denoising step"):
        assert heading in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [j["job"] for j in doc["jobs"]] == ["cache"]
    assert all(j.get("error") is None for j in doc["jobs"]), doc["jobs"]


def test_cache_rows(smoke) -> None:
    doc, _ = smoke
    rows = doc["cache"]
    gens = doc["settings"]["cache_gens"]
    assert [(r["gen"], r["mode"]) for r in rows] == [
        (g, m) for g in gens for m in ("none", "prefix", "dual")
    ]
    for r in rows:
        # One token per step: exactly one forward per generated token.
        assert r["forwards"] == r["gen"]
        assert r["tokens_per_s"] > 0 and r["ms_per_forward"] > 0 and r["wall_s"] > 0
        assert r["speedup_vs_none"] > 0
        if r["mode"] == "none":
            assert r["speedup_vs_none"] == 1.0
    # The longer generation's `none` is extrapolated from one forward per block.
    assert [r["measured"] for r in rows if r["mode"] == "none"] == [True, False]


def test_parallel_and_batching_rows(smoke) -> None:
    doc, _ = smoke
    par = doc["parallel"]
    assert {(r["mode"], r["rule"]) for r in par} == {
        (m, rule) for m in ("dual", "none") for rule, _ in run.PARALLEL_RULES
    }
    for r in par:
        assert r["problems"] == doc["settings"]["parallel_problems"]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["tokens_per_s"] > 0 and r["tokens_per_forward"] > 0
        assert r["forwards_per_request"] >= 1
    bat = doc["batching"]
    assert [r["concurrency"] for r in bat] == doc["settings"]["batching"]
    assert bat[0]["scaling_vs_1"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in bat)
    # Batch independence: every concurrency decodes the same tokens in the same forwards.
    assert len({(r["output_tokens"], r["forwards"], r["accuracy"]) for r in bat}) == 1


def test_overhead_profile(smoke) -> None:
    doc, _ = smoke
    ov = doc["overhead"]
    prof = ov["profile"]
    assert prof["steps"] == doc["settings"]["overhead_gen"]
    stages = prof["stages_ms_per_step"]
    assert stages[engine_job.MODEL] > stages[engine_job.LM_HEAD] > 0
    assert stages[engine_job.REST] > 0
    assert sum(stages.values()) == pytest.approx(prof["ms_per_step"], rel=0.01)
    assert ov["biggest_stage"] in stages
    assert "Self CPU" in prof["torch_profiler_top_ops"]


def test_step_section_from_cases() -> None:
    """The step table's ratios, from hand-made case results (the smoke run has no step jobs)."""
    cases = {
        f"step-{mode}-{engine}": {"group": "step", "ms_per_forward": ms,
                                  "meta": {"mode": mode, "engine": engine, "prompt": 8, "gen": 4}}
        for mode, engine, ms in (("none", "eager", 10.0), ("dual", "eager", 4.0),
                                 ("none", "compiled", 5.0), ("dual", "compiled", 1.0))
    }
    step = report._step_section(cases)
    assert step["dual_over_none"] == {"eager": 0.4, "compiled": 0.2}
    dual = next(r for r in step["rows"] if r["cache"] == "dual")
    assert dual["compiled_over_eager"] == 0.25
    assert next(r for r in step["rows"] if r["cache"] == "prefix")["eager_ms_per_step"] is None
    assert "| dual | 4 | 1 | 0.25 | 0.4 | 0.2 |" in report.step_table(step)


def test_targets_listed(smoke) -> None:
    doc, _ = smoke
    assert [t["required"] for t in doc["targets"]] == [5.0, 2.5, 2.0]
    for t in doc["targets"]:
        assert isinstance(t["measured"], float) and isinstance(t["met"], bool)


def test_llama_reference_checkpoint(tmp_path) -> None:
    """The AR reference checkpoint loads as a transformers Llama with the LLaDA's sizes."""
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    llada = write_llada_checkpoint(tmp_path / "llada", TINY_MODEL, seed=0)
    llama = write_llama_like(tmp_path / "llama", TINY_MODEL, 1, tokenizer_from=llada)
    config = AutoConfig.from_pretrained(llama)
    assert isinstance(config, LlamaConfig)
    shape = TINY_MODEL.shape
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.vocab_size) == (shape.hidden_size, shape.num_layers, shape.num_heads,
                                   shape.vocab_size)
    expected = set(LlamaForCausalLM(config).state_dict())
    with safe_open(str(llama / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected
    assert (llama / "tokenizer.json").read_bytes() == (llada / "tokenizer.json").read_bytes()
