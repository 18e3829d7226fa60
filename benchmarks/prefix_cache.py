"""Prefix caching for the block-diffusion families: prompt compute and wall time, on and off.

Two workloads on random SDAR and LLaDA 2.x checkpoints of a few million parameters (hidden 256,
4 layers; in their released layouts, `vllm_dllm.testing`), each family on two engines in this
process, one with vLLM's prefix caching on (the plugin's default for these families) and one
with it off, alive together and run alternately, `--rounds` (2) rounds each (the fastest kept):

- **shared system prompt**: `--requests` (32) prompts that share a `--system` (1,024) token
  prefix and differ in a 40-token question, sent together, `--max-tokens` (32) each, greedy,
  `ignore_eos`;
- **chat**: `--turns` (3) turns, each resending the whole history (the shared prefix, every
  earlier question and answer) plus a new question, `--chat-tokens` (128) each, one request at
  a time.

Each round uses new prompts, so it starts from an empty cache for them. It reports the prompt
tokens the engine computed (prompt tokens minus vLLM's `num_cached_tokens`), the wall time, the
off / on ratios of both, each chat turn's cached tokens, and whether the tokens and forwards were
identical on and off in every round (they must be).

    .venv/bin/python benchmarks/prefix_cache.py             # a few minutes on our 2-core CPU
    .venv/bin/python benchmarks/prefix_cache.py --out DIR   # default benchmarks/out

Writes `DIR/prefix_cache.json` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTION_TOKENS = 40
MAX_MODEL_LEN = 2048
BUDGET = 4096


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", type=int, default=1024, help="shared prompt tokens")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--chat-tokens", type=int, default=128, help="new tokens per chat turn")
    p.add_argument("--rounds", type=int, default=2, help="rounds per engine (best kept)")
    p.add_argument("--families", nargs="+", default=["sdar", "llada2"])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    return p.parse_args(argv)


def write_checkpoint(family: str, root: Path) -> Path:
    """A tiny-but-not-trivial random checkpoint of `family` (3-4 M parameters)."""
    if family == "sdar":
        from vllm_dllm.testing.block_checkpoints import BlockShape, write_sdar_checkpoint

        shape = BlockShape(hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=4,
                           intermediate_size=704, block_size=4, tie_word_embeddings=False)
        return write_sdar_checkpoint(root / family, shape, seed=1)
    from vllm_dllm.testing.llada2_checkpoints import MoeShape, write_llada2_checkpoint

    return write_llada2_checkpoint(
        root / family, MoeShape(hidden_size=256, num_layers=4, intermediate_size=704), seed=1
    )


def tokens(seed: int, n: int) -> list[int]:
    """`n` byte tokens (the checkpoints' byte-level vocabulary), different for each seed."""
    draw = random.Random(seed)
    return [draw.randrange(1, 251) for _ in range(n)]


def generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[Any], float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
    )
    return outputs, time.perf_counter() - start


def summary(prompts: list[list[int]], outputs: list[Any], wall: float) -> dict[str, Any]:
    prompt_tokens = sum(len(p) for p in prompts)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    return {
        "wall_s": round(wall, 3),
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached,
        "computed_prompt_tokens": prompt_tokens - cached,
        "forwards": sum(o.kv_transfer_params["dllm"]["forwards"] for o in outputs),
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
    }


def answers(outputs: list[Any]) -> list[Any]:
    """What must not change with the cache: each request's tokens and forwards."""
    return [[list(o.outputs[0].token_ids), o.kv_transfer_params["dllm"]["forwards"]]
            for o in outputs]  # fmt: skip


def start_engine(checkpoint: Path, caching: bool, args: argparse.Namespace) -> Any:
    from vllm import LLM

    llm = LLM(
        model=str(checkpoint), dtype="float32", enforce_eager=True, seed=0,
        max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=BUDGET, max_num_seqs=args.requests,
        enable_prefix_caching=caching,
    )  # fmt: skip
    # Warm-up on another prefix: start-up costs stay out of the timings.
    generate(llm, [tokens(999, 200)], 8)
    return llm


def shared_prompt(llm: Any, args: argparse.Namespace, round_: int) -> tuple[dict, list]:
    """The requests sharing the system prompt, sent together (a new system prompt per round,
    so each round starts from an empty cache for it)."""
    system = tokens(1000 * round_, args.system)
    prompts = [system + tokens(1000 * round_ + i + 1, QUESTION_TOKENS)
               for i in range(args.requests)]  # fmt: skip
    outputs, wall = generate(llm, prompts, args.max_tokens)
    return summary(prompts, outputs, wall), answers(outputs)


def chat(llm: Any, args: argparse.Namespace, round_: int) -> tuple[dict, list]:
    """A chat, one turn at a time, each resending the whole history and a new question."""
    history = tokens(1000 * round_ + 500, args.system)
    prompts, outputs, wall = [], [], 0.0
    for turn in range(args.turns):
        prompt = history + tokens(1000 * round_ + 600 + turn, QUESTION_TOKENS)
        (out,), seconds = generate(llm, [prompt], args.chat_tokens)
        prompts.append(prompt)
        outputs.append(out)
        wall += seconds
        history = prompt + list(out.outputs[0].token_ids)
    result = summary(prompts, outputs, wall)
    result["cached_per_turn"] = [o.num_cached_tokens or 0 for o in outputs]
    return result, answers(outputs)


def compare(checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both workloads on both engines, alive together and run alternately (on, off, on, off,
    ...), so the machine's load falls on both alike; each engine's fastest round is kept."""
    engines = {"on": start_engine(checkpoint, True, args),
               "off": start_engine(checkpoint, False, args)}  # fmt: skip
    try:
        entry: dict[str, Any] = {"identical_on_off": True}
        for name, workload in (("shared_prompt", shared_prompt), ("chat", chat)):
            best: dict[str, dict] = {}
            for round_ in range(1, args.rounds + 1):
                seen = {}
                for caching, llm in engines.items():
                    result, seen[caching] = workload(llm, args, round_)
                    if caching not in best or result["wall_s"] < best[caching]["wall_s"]:
                        best[caching] = result
                entry["identical_on_off"] &= seen["on"] == seen["off"]
            entry[name] = {
                **best,
                "prompt_compute_saving": ratio(
                    best["off"]["computed_prompt_tokens"], best["on"]["computed_prompt_tokens"]
                ),
                "wall_time_gain": ratio(best["off"]["wall_s"], best["on"]["wall_s"]),
            }
        return entry
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()


def ratio(off: float, on: float) -> float:
    return round(off / on, 2) if on else float("inf")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    families = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            families[family] = compare(write_checkpoint(family, Path(tmp)), args)
    doc = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "question_tokens": QUESTION_TOKENS,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "families": families,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
