"""Structured output on the trained model: tokens per forward and wall time, constrained by a
regex against unconstrained.

    .venv/bin/python benchmarks/structured_output.py                # 64 addition problems
    .venv/bin/python benchmarks/structured_output.py --n 16 --out benchmarks/out

One `vllm.LLM` on `models/llada-arith` (fp32, eager, seed 0), DualCache, threshold 0.9, blocks
of 8, greedy. The held-out addition problems of its training run go in one batch per variant:
free, then each answer constrained by `[0-9]{1,4}` (enforced at commit, `vllm_dllm.structured`).
Each variant runs twice and the second run is timed (the first compiles grammars and warms
caches). Prints one line per variant and writes `OUT/structured_output.json`.
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


def run(llm, problems: list, regex: str | None) -> dict:  # noqa: ANN001  (vllm.LLM)
    """One timed batch: accuracy, tokens per forward (output tokens over forwards, both from
    the engine's per-request statistics) and wall seconds."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    params = SamplingParams(
        max_tokens=16,
        temperature=0,
        extra_args=XARGS,
        structured_outputs=None if regex is None else StructuredOutputsParams(regex=regex),
    )
    prompts = [p.prompt for p in problems]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: grammars compiled, caches warm
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
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
        results = [run(llm, problems, None), run(llm, problems, REGEX)]
    finally:
        llm.llm_engine.engine_core.shutdown()
    free, constrained = results
    for r in results:
        print(
            f"{'regex ' + r['constraint'] if r['constraint'] else 'unconstrained':22s} "
            f"{r['requests']} requests  accuracy {r['accuracy']:.3f}  "
            f"tokens/forward {r['tokens_per_forward']:.2f}  wall {r['wall_s']:.2f} s"
        )
    ratio = constrained["wall_s"] / free["wall_s"]
    print(f"constrained / unconstrained wall time (CPU): {ratio:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured_output.json").write_text(
        json.dumps({"results": results, "wall_ratio": ratio}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
