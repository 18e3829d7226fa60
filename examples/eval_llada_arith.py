"""Accuracy against tokens per forward for the trained ``models/llada-arith``, through the engine.

The evaluation: held-out problems (made by ``train_tiny_llada.py`` from their own seed and
excluded from training) run through the plugin engine (``vllm.LLM`` with the plugin active, not
the test oracle) for every selection rule and cache mode; exact-match accuracy and tokens per
forward per cell. Tokens per forward is the run's total output tokens (the answer plus its end
token, what a user receives) over its total forwards, both read from the engine's per-request
statistics (``RequestOutput.kv_transfer_params["dllm"]``).

    .venv/bin/python examples/eval_llada_arith.py                  # 400 problems, ~2 min
    .venv/bin/python examples/eval_llada_arith.py --n 100 --out-dir /tmp/eval
    .venv/bin/python examples/eval_llada_arith.py --out-dir docs/llada-arith   # the README's

Prints the table; with ``--out-dir`` also writes ``OUT_DIR/eval.json`` (every cell, per task)
and ``OUT_DIR/eval.png`` (accuracy against tokens per forward, one marker per rule, one colour
per cache mode). The committed figures in ``docs/llada-arith/`` change only when asked to.
Every request of every cell goes to the engine in one ``generate`` call: the engine's results
do not depend on the batch (``tests/test_engine_oracle.py`` checks it), so batching only makes
the run faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from train_tiny_llada import EVAL_SEED, Example, TrainConfig, heldout_set  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "models" / "llada-arith"
CACHES = ("none", "prefix", "dual")


def rules(canvas: int) -> dict[str, dict[str, float | int]]:
    """The selection rules the evaluation reports, as per-request ``dllm_*`` parameters."""
    return {
        "one token per step": {"dllm_steps": canvas},
        "threshold 0.9": {"dllm_threshold": 0.9},
        "threshold 0.7": {"dllm_threshold": 0.7},
        "threshold 0.5": {"dllm_threshold": 0.5},
        "factor 1.0": {"dllm_factor": 1.0},
        "two tokens per step": {"dllm_steps": canvas // 2},
    }


def heldout(n: int) -> list[Example]:
    """The held-out problems of the shipped training run (its default task mix)."""
    return heldout_set(n, EVAL_SEED, TrainConfig())


def evaluate(
    llm,  # noqa: ANN001  (vllm.LLM; vLLM is imported lazily so --help works without it)
    problems: Sequence[Example],
    cells: dict[tuple[str, str], dict],
    gen_len: int,
    block_length: int,
    progress: bool = False,
) -> dict[tuple[str, str], dict]:
    """Run ``problems`` under each cell's parameters in one batch; score each cell.

    ``cells`` maps (rule, cache) to ``dllm_*`` parameters. Prompts are plain text in completion
    style: vLLM's tokenizer adds the BOS, as for any completion request. ``progress`` shows
    vLLM's progress bar with tokens/s and tokens per forward.
    """
    from vllm import SamplingParams

    from vllm_dllm.entrypoints.progress import dllm_progress

    prompts: list[str] = []
    params: list[SamplingParams] = []
    for extra in cells.values():
        for ex in problems:
            prompts.append(ex.prompt)
            params.append(
                SamplingParams(
                    max_tokens=gen_len,
                    temperature=0.0,
                    extra_args={"dllm_block_length": block_length, **extra},
                )
            )
    outputs = llm.generate(prompts, params, use_tqdm=dllm_progress(llm) if progress else False)
    results: dict[tuple[str, str], dict] = {}
    for i, key in enumerate(cells):
        chunk = outputs[i * len(problems) : (i + 1) * len(problems)]
        stats = [o.kv_transfer_params["dllm"] for o in chunk]
        per_task: dict[str, list[int]] = {}
        for ex, out in zip(problems, chunk, strict=True):
            per_task.setdefault(ex.task, []).append(int(out.outputs[0].text == ex.answer))
        forwards = sum(s["forwards"] for s in stats)
        tokens = sum(s["output_tokens"] for s in stats)
        results[key] = {
            "rule": key[0],
            "cache": key[1],
            "params": cells[key],
            "accuracy": sum(map(sum, per_task.values())) / len(problems),
            "tokens_per_forward": tokens / forwards,
            "forwards_per_problem": forwards / len(problems),
            "per_task_accuracy": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
        }
    return results


def table(results: dict[tuple[str, str], dict]) -> str:
    """Markdown table: one row per rule, accuracy / tokens per forward per cache mode."""
    rule_names = list(dict.fromkeys(r for r, _ in results))
    head = "| rule | " + " | ".join(f"{c}: acc / tok per fwd" for c in CACHES) + " |"
    lines = [head, "|" + "---|" * (len(CACHES) + 1)]
    for rule in rule_names:
        cells = [results[(rule, c)] for c in CACHES if (rule, c) in results]
        lines.append(
            f"| {rule} | "
            + " | ".join(f"{100 * r['accuracy']:.1f}% / {r['tokens_per_forward']:.2f}"
                         for r in cells)
            + " |"
        )
    return "\n".join(lines)


MARKERS = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {"none": (90, 90, 90), "prefix": (31, 119, 180), "dual": (214, 39, 40)}


def plot(results: dict[tuple[str, str], dict], path: Path, title: str) -> None:
    """Accuracy (y) against tokens per forward (x): a marker shape per rule, a colour per cache.

    Drawn with Pillow (a vLLM dependency) rather than matplotlib, which the plugin does not
    otherwise need.
    """
    from PIL import Image, ImageDraw, ImageFont

    w, h, left, right, top, bottom = 900, 560, 80, 260, 50, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    rows = list(results.values())
    xmax = max(1.0, max(r["tokens_per_forward"] for r in rows)) * 1.1
    accs = [100 * r["accuracy"] for r in rows]
    ymin = max(0.0, min(accs) - 5)
    ymin = 5 * int(ymin // 5)

    def xy(tpf: float, acc: float) -> tuple[float, float]:
        x = left + (w - left - right) * tpf / xmax
        y = h - bottom - (h - top - bottom) * (acc - ymin) / (100 - ymin)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(int(xmax) + 1):
        x, _ = xy(k, ymin)
        d.line([x, h - bottom, x, h - bottom + 5], fill="black")
        d.text((x - 3, h - bottom + 8), str(k), fill="black", font=font)
    for acc in range(ymin, 101, 5):
        _, y = xy(0, acc)
        d.line([left - 5, y, left, y], fill="black")
        d.text((left - 35, y - 6), f"{acc}%", fill="black", font=font)
    d.text((left + 150, h - 25), "tokens per forward (output tokens / forwards)", fill="black",
           font=font)
    d.text((10, top - 30), "exact-match accuracy", fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    rule_names = list(dict.fromkeys(r["rule"] for r in rows))
    shapes = dict(zip(rule_names, MARKERS, strict=False))
    for r in rows:
        _marker(d, *xy(r["tokens_per_forward"], 100 * r["accuracy"]), shapes[r["rule"]],
                COLOURS[r["cache"]])
    lx, ly = w - right + 20, top
    for rule in rule_names:
        _marker(d, lx + 6, ly + 6, shapes[rule], (0, 0, 0))
        d.text((lx + 18, ly), rule, fill="black", font=font)
        ly += 20
    ly += 10
    for cache, colour in COLOURS.items():
        d.rectangle([lx, ly, lx + 12, ly + 12], fill=colour)
        d.text((lx + 18, ly), f"cache {cache}", fill="black", font=font)
        ly += 20
    img.save(path)


def _marker(d, x: float, y: float, shape: str, colour: tuple[int, int, int]) -> None:  # noqa: ANN001
    r = 6
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], outline=colour, width=2)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], outline=colour, width=2)
    elif shape == "diamond":
        d.polygon([(x, y - r), (x - r, y), (x, y + r), (x + r, y)], outline=colour, width=2)
    elif shape == "cross":
        d.line([x - r, y - r, x + r, y + r], fill=colour, width=2)
        d.line([x - r, y + r, x + r, y - r], fill=colour, width=2)
    else:
        d.line([x - r, y, x + r, y], fill=colour, width=2)
        d.line([x, y - r, x, y + r], fill=colour, width=2)
        d.line([x - r, y - r, x + r, y + r], fill=colour, width=2)


def start_engine(model: Path, max_num_seqs: int = 256):  # noqa: ANN201  (vllm.LLM)
    """The engine as a user starts it; fp32 because our CPUs have no native bf16 matmul."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM

    return LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=128,
               max_num_seqs=max_num_seqs, seed=0)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate every (rule, cache) cell, print the table; with --out-dir write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="checkpoint directory (default: the bundled models/llada-arith)")
    p.add_argument("--n", type=int, default=400,
                   help="held-out problems to score, the same every run (default: 400)")
    p.add_argument("--block-length", type=int, default=8,
                   help="dllm_block_length of every request (default: 8, as trained)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write eval.json and eval.png here (default: print the table only)")
    args = p.parse_args(argv)

    gen_len = TrainConfig().gen_len
    canvas = -(-gen_len // args.block_length) * args.block_length
    problems = heldout(args.n)
    cells = {(rule, cache): {"dllm_cache": cache, **extra}
             for rule, extra in rules(canvas).items() for cache in CACHES}
    llm = start_engine(args.model)
    start = time.perf_counter()
    results = evaluate(llm, problems, cells, gen_len, args.block_length, progress=True)
    wall = time.perf_counter() - start
    print(table(results))
    doc = {
        "model": str(args.model.relative_to(REPO_ROOT) if args.model.is_relative_to(REPO_ROOT)
                     else args.model),
        "problems": args.n,
        "eval_seed": EVAL_SEED,
        "max_tokens": gen_len,
        "block_length": args.block_length,
        "command": " ".join(["python examples/eval_llada_arith.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "engine_wall_s": round(wall, 1),
        "cells": list(results.values()),
    }
    if args.out_dir is None:
        return doc
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "eval.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(results, args.out_dir / "eval.png",
         f"llada-arith, {args.n} held-out problems, max_tokens {gen_len}, "
         f"block {args.block_length}, through the vLLM engine")
    print(f"wrote {args.out_dir / 'eval.json'} and {args.out_dir / 'eval.png'}")
    return doc


if __name__ == "__main__":
    main()
