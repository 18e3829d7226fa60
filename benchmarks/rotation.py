"""Short requests behind long ones: their latency, and the saturated throughput, on one engine.

A diffusion step costs a whole window per request, so a few long canvases fill a step's token
budget; run first come, first served to completion, a short request sent after them waits for
whole waves of long ones. The scheduler shares the budget in turn (least recently stepped
first), so a short request's latency follows its own work. This measures that mix on the
bundled trained model, in one process, through vLLM's `AsyncLLM` (the engine the server runs):

- `--long` requests (default 48) of `--long-tokens` (112) tokens, `ignore_eos`, no cache, one
  token per step (every step forwards the whole canvas): 16 of them fill the default budget;
- `--delay` seconds (3) later, `--short` requests (8) of 16 tokens with the model's own
  defaults (blocks of 8, DualCache, threshold 0.9);

and reports each short request's latency (submission to its last token), the long requests'
throughput (their output tokens over the time from the first submission to the last finish),
and a digest of the long requests' greedy texts (taking turns must not change them).

    .venv/bin/python benchmarks/rotation.py                     # ~2 min on our 2-core CPU
    .venv/bin/python benchmarks/rotation.py --out DIR           # default benchmarks/out

Writes `DIR/rotation.json` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.run import heldout_problems  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

#: The OpenAI server's default step budget on CPU (vLLM's `max_num_batched_tokens` there).
SERVER_BUDGET = 2048


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO_ROOT / "models" / "llada-arith"))
    p.add_argument("--long", type=int, default=48, help="long requests, sent first")
    p.add_argument("--long-tokens", type=int, default=112)
    p.add_argument("--short", type=int, default=8, help="short requests, sent after --delay")
    p.add_argument("--delay", type=float, default=3.0, help="seconds between the two groups")
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    return p.parse_args(argv)


async def _finish(
    engine: Any, request_id: str, prompt: list[int], params: Any
) -> tuple[float, Any]:
    """Submit one request; return when its last output arrives, and that output."""
    from vllm.inputs import TokensPrompt

    last = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id):
        last = out
    return time.perf_counter(), last


async def measure(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    problems = heldout_problems(args.long + args.short)
    prompts = problems["prompts"]
    long_params = SamplingParams(
        max_tokens=args.long_tokens, temperature=0.0, ignore_eos=True,
        extra_args={"dllm_cache": "none", "dllm_steps": args.long_tokens},
    )  # fmt: skip
    short_params = SamplingParams(max_tokens=problems["gen_len"], temperature=0.0)
    start = time.perf_counter()
    longs = [
        asyncio.create_task(_finish(engine, f"long-{i}", prompts[i], long_params))
        for i in range(args.long)
    ]
    await asyncio.sleep(args.delay)
    short_sent = time.perf_counter()
    shorts = [
        asyncio.create_task(
            _finish(engine, f"short-{i}", prompts[args.long + i], short_params)
        )
        for i in range(args.short)
    ]
    short_done = await asyncio.gather(*shorts)
    long_done = await asyncio.gather(*longs)
    end = max(t for t, _ in long_done)
    long_tokens = sum(len(out.outputs[0].token_ids) for _, out in long_done)
    texts = hashlib.sha256(
        json.dumps([list(out.outputs[0].token_ids) for _, out in long_done]).encode()
    ).hexdigest()[:16]
    latencies = sorted(t - short_sent for t, _ in short_done)
    right = sum(
        list(out.outputs[0].token_ids)[: len(want)] == want
        for (_, out), want in zip(short_done, problems["expected"][args.long :], strict=True)
    )
    return {
        "short_latency_s": {"max": latencies[-1], "median": latencies[len(latencies) // 2],
                            "all": latencies},
        "short_correct": right,
        "long_tokens_per_s": long_tokens / (end - start),
        "long_wall_s": end - start,
        "long_output_tokens": long_tokens,
        "long_texts_sha256": texts,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs(
        model=args.model, dtype="float32", max_model_len=args.max_model_len,
        max_num_batched_tokens=SERVER_BUDGET, enforce_eager=True, seed=0,
    )  # fmt: skip
    engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
    try:
        result = asyncio.run(measure(engine, args))
    finally:
        engine.shutdown()
        del engine  # while the interpreter is whole: its finalizer would run shutdown again late
    doc = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "budget_tokens": SERVER_BUDGET,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        **result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rotation.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
