"""The shipped trained model through the real engine: accuracy at > 1.5 tokens/forward.

A few dozen held-out problems, scored with the same code as ``examples/eval_llada_arith.py``
(its ``evaluate``), on a vLLM engine that loads ``models/llada-arith`` exactly as a user's
``LLM(model=...)`` does. This is what random-weight checkpoints cannot test: that confidence-aware
parallel unmasking with DualCache commits several tokens per forward *and* keeps the answers
right.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_example

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "llada-arith"
PROBLEMS = 48
ACCURACY_FLOOR = 0.95


@pytest.fixture(scope="module")
def eval_module() -> ModuleType:
    return load_example("eval_llada_arith")


@pytest.fixture(scope="module")
def llm():
    """The engine on the shipped model, with `examples/demo.py`'s settings (fp32, eager, max
    model length 128, seed 0)."""
    from tests.engines import start_engine, stop_engine

    llm = start_engine(MODEL_DIR, max_model_len=128, max_num_seqs=128)
    yield llm
    stop_engine(llm)


@pytest.fixture(scope="module")
def results(eval_module: ModuleType, llm) -> dict:
    problems = eval_module.heldout(PROBLEMS)
    cells = {
        ("one token per step", "none"): {"dllm_cache": "none", "dllm_steps": 16},
        ("threshold 0.9", "dual"): {"dllm_cache": "dual", "dllm_threshold": 0.9},
    }
    return eval_module.evaluate(llm, problems, cells, gen_len=16, block_length=8)


def test_demo_prints_what_the_readme_says(llm, capsys) -> None:
    """`make demo`'s result (after vLLM's start-up output, which depends on the machine) has
    as many lines as the README says, and the lines it shows, timings aside."""
    import re

    readme = (REPO / "README.md").read_text()
    stated = re.search(r"then the (\d+) lines of the result:\n\n```\n(.*?)```", readme, re.S)
    assert stated, "the README no longer states the demo's output"
    load_example("demo").run(llm)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == int(stated.group(1)), printed

    def timeless(line: str) -> str:
        return re.sub(r", [0-9.]+ s$", ", T s", line)

    shown = [line for line in stated.group(2).splitlines() if line.strip() not in ("", "...")]
    assert set(map(timeless, shown)) <= set(map(timeless, printed)), printed


def test_threshold_dual_keeps_accuracy_at_several_tokens_per_forward(results: dict) -> None:
    r = results[("threshold 0.9", "dual")]
    assert r["accuracy"] >= ACCURACY_FLOOR, r
    assert r["tokens_per_forward"] > 1.5, r


def test_one_token_per_step_reaches_the_floor(results: dict) -> None:
    r = results[("one token per step", "none")]
    assert r["accuracy"] >= ACCURACY_FLOOR, r
    # One committed position per forward; the EOS padding after the answer is committed too
    # but never returned, so fewer than one *output* token per forward.
    assert r["tokens_per_forward"] < 1.0, r
    assert r["forwards_per_problem"] <= 16, r


def test_infill_example_fills_every_gap(llm) -> None:
    """`examples/infill.py`: each answer's end given as the suffix, the model writes exactly the
    missing start, for every split of every question (and the whole answer)."""
    example = load_example("infill")
    results = example.infill(llm)
    assert len(results) == 20
    assert example.report(results) == len(results), results
