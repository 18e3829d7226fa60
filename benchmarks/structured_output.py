"""Structured output on the trained model: tokens per forward and wall time, constrained by a
regex against unconstrained.

    .venv/bin/python benchmarks/structured_output.py                # 64 addition problems
    .venv/bin/python benchmarks/structured_output.py --n 16 --out benchmarks/out

One `vllm.LLM` on `models/llada-arith` (fp32, eager, seed 0), DualCache, threshold 0.9, blocks
of 8, greedy. The held-out addition problems of its training run go in one batch per variant:
free, then each answer constrained by `[0-9]{1,4}` (enforced at commit, `vllm_dllm.structured`).
After a warm-up batch of each (grammars compiled, caches warm), the two variants alternate
`--repeats` times and each reports its median wall time: other work on a shared machine shows
up as spread, not as a bias against one variant. Prints one line per variant and writes
`OUT/structured_output.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

REGEX = "[0-9]{1,4}"
XARGS = {"dllm_cache": "dual", "dllm_threshold": 0.9, "dllm_block_length": 8}


def params(regex: str | None):  # noqa: ANN201  (vllm.SamplingParams)
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        max_tokens=16,
        temperature=0,
        extra_args=XARGS,
        structured_outputs=None if regex is None else StructuredOutputsParams(regex=regex),
    )


def run(llm, problems: list, regex: str | None) -> dict:  # noqa: ANN001  (vllm.LLM)
    """One timed batch: accuracy, tokens per forward (output tokens over forwards, both from
    the engine's per-request statistics) and wall seconds."""
    prompts = [p.prompt for p in problems]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params(regex), use_tqdm=False)
    seconds = time.perf_counter() - start
    stats = [o.kv_transfer_params["dllm"] for o in outputs]
    tokens = sum(s["output_tokens"] for s in stats)
    forwards = sum(s["forwards"] for s in stats)
    correct = sum(o.outputs[0].text == p.answer for o, p in zip(outputs, problems, strict=True))
    return {
        "constraint": regex,
        "requests": len(problems),
        "accuracy": correct / len(problems),
        "output_tokens": tokens,
        "forwards": forwards,
        "tokens_per_forward": tokens / forwards,
        "wall_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="held-out addition problems")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from train_tiny_llada import EVAL_SEED, TrainConfig, heldout_set
    from vllm import LLM

    pool = heldout_set(8 * args.n, EVAL_SEED, TrainConfig())
    problems = [p for p in pool if p.task == "add"][: args.n]
    llm = LLM(model=str(REPO / "models" / "llada-arith"), dtype="float32", enforce_eager=True,
              max_model_len=128, seed=0)  # fmt: skip
    try:
        for regex in (None, REGEX):
            run(llm, problems, regex)  # warm-up
        runs: dict[str | None, list[dict]] = {None: [], REGEX: []}
        for _ in range(args.repeats):
            for regex in runs:
                runs[regex].append(run(llm, problems, regex))
    finally:
        llm.llm_engine.engine_core.shutdown()
    results = []
    for batches in runs.values():
        median = sorted(batches, key=lambda r: r["wall_s"])[len(batches) // 2]
        results.append({**median, "wall_s_all": [r["wall_s"] for r in batches]})
    free, constrained = results
    for r in results:
        print(
            f"{'regex ' + r['constraint'] if r['constraint'] else 'unconstrained':22s} "
            f"{r['requests']} requests  accuracy {r['accuracy']:.3f}  "
            f"tokens/forward {r['tokens_per_forward']:.2f}  median wall {r['wall_s']:.2f} s"
        )
    ratio = constrained["wall_s"] / free["wall_s"]
    print(f"constrained / unconstrained median wall time (CPU): {ratio:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured_output.json").write_text(
        json.dumps({"results": results, "wall_ratio": ratio}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
