"""The GPU speed table: one engine on a random LLaDA-8B-shaped model, four sections.

    python benchmarks/gpu.py [--shape 8b|tiny] [--out docs/gpu] [--commit SHA] [--sections ...]

vLLM builds the model (the released 8B shape and token ids, bf16) from a config-only directory
with ``load_format="dummy"``: random weights, nothing to download or write. One engine, in vLLM's
normal multi-process mode with CUDA graphs where there are any, serves the cache, batching and
overhead sections (cache mode and batch size are per-request parameters); the floor, a bare
forward in plain torch, runs in this process once the engine is gone. The files are rewritten
after every section, so a run cut short keeps what it measured. benchmarks/README.md says what
each section measures; ``--shape tiny`` is the CPU smoke run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import engine_job, report, run  # noqa: E402
from benchmarks.bare_forward import bare_forward  # noqa: E402
from vllm_dllm.testing import block_checkpoints as bc  # noqa: E402
from vllm_dllm.testing import checkpoints as tc  # noqa: E402
from vllm_dllm.testing import llada2_checkpoints as lc  # noqa: E402

SECTIONS = ("cache", "batching", "overhead", "floor", "prefill")
BATCHES = (1, 8, 32, 64)
BLOCK = 32
#: Per shape: best-of rounds of the batch-1 cases (batching runs once, after a warm-up, to fit
#: the GPU loan) and replays of the floor.
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {"ckpt": tc.LLADA_REAL, "dtype": "bfloat16", "prompt": 512, "gen": 256, "rounds": 3,
           "replays": 50},
    "tiny": {"ckpt": tc.LLADA_TINY, "dtype": "float32", "prompt": 32, "gen": 32, "rounds": 1,
             "replays": 20},
}
#: The block-diffusion prefill row: per shape, the prompt length and the models, with the tiny
#: checkpoints' 320-token vocabulary (a prefill barely touches the LM head). SDAR 8B has
#: Qwen3-8B's shape, at block 4; the LLaDA 2.x model is an MoE of LLaDA 2.0 mini's size class
#: (hidden 2048, 20 layers, 256 experts, 8 per token), at block 32, and needs vLLM's fused-MoE
#: kernels.
PREFILL: dict[str, dict[str, Any]] = {
    "8b": {"prompt": 2048, "models": {
        "sdar": (bc.BlockShape(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                               num_layers=36, intermediate_size=12288, block_size=4,
                               tie_word_embeddings=False), 4),
        "llada2": (lc.MoeShape(hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128,
                               num_layers=20, intermediate_size=5120, moe_intermediate_size=512,
                               num_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4),
                   32)}},
    "tiny": {"prompt": 256, "models": {"sdar": (bc.BlockShape.SDAR, 4),
                                       "llada2": (lc.MoeShape(), 32)}},
}
REST = "rest (scheduler, IPC, inputs, sampler)"
#: Each section's table (report._table's columns; the first names the chart's bars) and the
#: charted value with its unit.
TABLES = {"cache": ("cache=cache|ms/step=ms_per_step|tokens/s=tokens_per_s|vs none=vs_none:x|"
                    "forwards=forwards|wall s=wall_s", "ms_per_step", "ms per step"),
          "batching": ("batch=batch|tokens/s=tokens_per_s|ms/step=ms_per_step|vs batch 1="
                       "vs_batch_1:x|engine steps=steps|wall s=wall_s", "tokens_per_s", "tokens/s"),
          "overhead": ("stage=stage|ms/step=ms|share=share:%", "ms", "ms per step"),
          "floor": ("forward=forward|ms=ms", "ms", "ms"),
          "prefill": ("model=model|block=block|prompt=prompt|windows=windows|prefill ms="
                      "prefill_ms|ms/window=ms_per_window|wall s=wall_s|1-block wall s="
                      "short_wall_s|forwards=forwards", "prefill_ms", "ms per prefill")}
ratio = functools.partial(report._ratio, nd=2)


def case(s: dict, mode: str, batch: int) -> dict:
    """``batch`` greedy requests, ignore_eos, one token per step (``dllm_steps`` = generation)."""
    return run.case(f"{mode}-b{batch}", mode, run.byte_prompts(batch, s["prompt"], 0), s["gen"],
                    {"dllm_cache": mode, "dllm_steps": s["gen"]}, {}, block=BLOCK)


def measure(llm, c: dict, rounds: int) -> dict:
    """A warm-up of the case's whole batch over one block, then the best of ``rounds``."""
    engine_job.run_case_once(llm, dict(engine_job.warmup_case(c), prompts=c["prompts"]))
    return engine_job.summarise(c, [engine_job.run_case_once(llm, c) for _ in range(rounds)])


def cache(x: SimpleNamespace) -> tuple[str, list[dict]]:
    got = {m: measure(x.llm, case(x.s, m, 1), x.s["rounds"]) for m in report.MODES}
    return f"Batch 1, best of {x.s['rounds']}; ms/step: wall time over the request's forwards.", [
        {"cache": m, "ms_per_step": c["ms_per_forward"], "tokens_per_s": c["tokens_per_s"],
         "vs_none": ratio(c["tokens_per_s"], got["none"]["tokens_per_s"]),
         "forwards": c["forwards"], "wall_s": c["best_wall_s"]} for m, c in got.items()]


def batching(x: SimpleNamespace) -> tuple[str, list[dict]]:
    got = {b: measure(x.llm, case(x.s, "dual", b), 1) for b in BATCHES}
    return ("Dual, all prompts in one `generate` call, once after a warm-up; ms/step: wall time "
            "over the engine steps (the most forwards of a request)."), [
        {"batch": b, "tokens_per_s": c["tokens_per_s"], "steps": c["max_forwards"],
         "ms_per_step": round(1000 * c["best_wall_s"] / c["max_forwards"], 3),
         "vs_batch_1": ratio(c["tokens_per_s"], got[1]["tokens_per_s"]),
         "wall_s": c["best_wall_s"]} for b, c in got.items()]


def overhead(x: SimpleNamespace) -> tuple[str, list[dict]]:
    """A batch-1 dual request's steps: model forward and LM head as forward hooks time them in
    the worker (engine_job.attach_timers), the rest is the step's wall time minus both."""
    c, runs = case(x.s, "dual", 1), []
    engine_job.run_case_once(x.llm, c)  # warm, before any hook exists
    x.llm.apply_model(engine_job.attach_timers)
    for _ in range(x.s["rounds"]):
        x.llm.apply_model(engine_job.take_timings)  # drops what an earlier request left
        runs.append((engine_job.run_case_once(x.llm, c),
                     x.llm.apply_model(engine_job.take_timings)[0]))
    result, stages = min(runs, key=lambda r: r[0]["wall_s"])
    wall, steps = result["wall_s"], result["forwards"]
    stages[REST] = wall - sum(stages.values())
    return (f"Batch-1 dual, best of {x.s['rounds']}; model forward and LM head timed in the "
            f"worker by forward hooks ({'CUDA events' if x.cuda else 'host clock'}); the rest "
            "is the step minus both."), [
        {"stage": k, "ms": round(1000 * v / steps, 4), "share": round(v / wall, 4)}
        for k, v in (("step", wall), *stages.items())]


def floor(x: SimpleNamespace) -> tuple[str, list[dict]]:
    ms = bare_forward(x.s["ckpt"].shape, x.s["dtype"], x.canvas, BLOCK, x.s["replays"], x.cuda)
    dual = next((r["ms_per_step"] for r in x.doc["sections"].get("cache", {}).get("rows", [])
                 if r["cache"] == "dual"), None)
    return (f"Plain torch, one {BLOCK}-token window over {x.canvas} cached tokens plus itself, "
            f"median of {x.s['replays']}{'' if x.cuda else '; graphs: not on CPU'}. Engine dual "
            f"batch-1 step over the {'graphed' if x.cuda else 'eager'} floor: "
            f"{ratio(dual, ms['graphed'] or ms['eager'])}x."), [
        {"forward": "bare forward, eager", "ms": ms["eager"]},
        {"forward": "bare forward, CUDA graph", "ms": ms["graphed"]},
        {"forward": "engine dual step, batch 1", "ms": dual}]


def prefill_model(family: str, shape: Any, directory: str, cuda: bool) -> str:
    """The family's checkpoint files. On a GPU the weights are vLLM's dummy ones: only the
    config is the shape's (the tiny checkpoint's tokenizer stays)."""
    write, config = {"sdar": (bc.write_sdar_checkpoint, bc.sdar_config_dict),
                     "llada2": (lc.write_llada2_checkpoint, lc.llada2_config_dict)}[family]
    path = write(Path(directory) / family) if cuda else write(Path(directory) / family, shape)
    if cuda:
        (path / "model.safetensors").unlink()
        (path / "config.json").write_text(json.dumps(dict(config(shape),
                                                          torch_dtype="bfloat16"), indent=2))
    return str(path)


def prefill(x: SimpleNamespace) -> tuple[str, list[dict]]:
    """A prompt of whole blocks is prefilled in one forward with one attention sequence per
    block (block-causal: each sees its own block and the ones before). Per family: a request
    with the long prompt and one request with a one-block prompt, both generating one block one
    token per step (threshold 1 commits the quota of one); the prefill is the difference."""
    from vllm import LLM

    spec, rows = PREFILL[x.shape], []
    for family, (shape, block) in spec["models"].items():
        with tempfile.TemporaryDirectory() as directory:
            model = prefill_model(family, shape, directory, x.cuda)
            options = {"max_model_len": spec["prompt"] + 2 * block, "max_num_seqs": 8,
                       "max_num_batched_tokens": spec["prompt"] + 2 * block, "seed": 0,
                       "dtype": x.s["dtype"], "gpu_memory_utilization": 0.85,
                       "enforce_eager": not x.cuda,
                       **({"load_format": "dummy"} if x.cuda else {})}
            try:
                llm = LLM(model=model, **options)
            except Exception as e:
                traceback.print_exc()
                rows.append({"model": f"{family}: engine failed: {e!r}"[:120], "block": block,
                             "prompt": spec["prompt"], "windows": spec["prompt"] // block,
                             "prefill_ms": None, "ms_per_window": None, "wall_s": None,
                             "short_wall_s": None, "forwards": None})
                continue
            try:
                extra = {"dllm_threshold": 1.0}
                long, short = (measure(llm, run.case(f"{family}-p{n}", "prefill",
                                                     run.byte_prompts(1, n, 0), block, extra, {},
                                                     block=block), x.s["rounds"])
                               for n in (spec["prompt"], block))
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
        ms = 1000 * (long["best_wall_s"] - short["best_wall_s"])
        rows.append({"model": family, "block": block, "prompt": spec["prompt"],
                     "windows": spec["prompt"] // block, "prefill_ms": round(ms, 3),
                     "ms_per_window": round(ms / (spec["prompt"] // block), 4),
                     "wall_s": long["best_wall_s"], "short_wall_s": short["best_wall_s"],
                     "forwards": long["forwards"]})
    return (f"One request, prompt {spec['prompt']} (whole blocks, one attention sequence each) "
            f"against a one-block prompt, each generating one block one token per step, best of "
            f"{x.s['rounds']}; prefill ms: the difference of the two walls; max_num_seqs 8."), rows


def provenance(commit: str | None, argv: list[str], cuda: bool) -> dict[str, Any]:
    """Versions, device, driver, commit (the GPU machine's copy of the tree may lack .git). The
    device's name comes from nvidia-smi until the engine is gone: torch.cuda would initialise
    CUDA here before vLLM starts its processes."""
    import torch
    import vllm

    smi = shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True).stdout.strip().splitlines()
    name, driver = smi[0].split(", ") if smi else ("cpu", None)
    if commit is None and shutil.which("git") and (REPO_ROOT / ".git").exists():
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    return {"device": name if cuda else "cpu", "driver": driver, "vllm": vllm.__version__,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "commit": commit,
            "command": " ".join(["python benchmarks/gpu.py", *argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write(doc: dict, out: Path) -> None:
    """results.json, results.md (provenance, a table per section so far) and results.png."""
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    p, s = doc["provenance"], doc["settings"]
    md = ["# vllm-dllm GPU speed table", "",
          f"`{p['command']}` on {p['device']} (driver {p['driver']}), vLLM {p['vllm']}, torch "
          f"{p['torch']}, CUDA {p['cuda']}, commit {p['commit']}, {p['started']}. Random LLaDA "
          f"({s['shape']}: {s['model']}), {s['dtype']}, prompt {s['prompt']}, generation "
          f"{s['gen']}, block {BLOCK}, one token per step, greedy, ignore_eos.", ""]
    for name, sec in doc["sections"].items():
        md += [f"## {name} ({sec['wall_s']} s)", "", sec["text"], "",
               report._table(TABLES[name][0], sec["rows"]), ""]
    (out / "results.md").write_text("\n".join(md))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return print("[gpu] matplotlib is not installed: no results.png", flush=True)
    fig = Figure(figsize=(20, 8))
    axes = list(fig.subplots(2, 3).flat)
    for spare in axes[len(SECTIONS) :]:
        spare.set_visible(False)
    for i, (ax, name) in enumerate(zip(axes[: len(SECTIONS)], SECTIONS, strict=True)):
        columns, value, unit = TABLES[name]
        label = columns.split("|")[0].split("=")[1]
        rows = [r for r in doc["sections"].get(name, {}).get("rows", []) if r[value] is not None]
        ax.set_title(f"{name} ({p['device']}, {s['shape']})", fontsize=10)
        ax.set_ylabel(unit)
        ax.bar_label(ax.bar(range(len(rows)), [r[value] for r in rows], color=f"C{i}"),
                     fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(rows)), [str(r[label])[:26] for r in rows], fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)


def run_section(x: SimpleNamespace, fn, out: Path) -> None:
    """Run one section and rewrite the files. A failure is recorded and the next section still
    runs: one GPU loan must not lose the floor to a failed engine section."""
    t0 = time.perf_counter()
    try:
        if fn not in (floor, prefill) and isinstance(x.llm, str):
            raise RuntimeError(f"no engine: {x.llm}")
        text, rows = fn(x)
    except Exception as e:
        traceback.print_exc()
        text, rows = f"FAILED: {e!r}", []
    x.doc["sections"][fn.__name__] = {"wall_s": round(time.perf_counter() - t0, 1),
                                      "text": text, "rows": rows}
    write(x.doc, out)
    print(f"\n## {fn.__name__}\n{text}\n{report._table(TABLES[fn.__name__][0], rows)}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="8b", help="tiny: the CPU smoke run")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "gpu")
    p.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = p.parse_args(argv)
    # Before vLLM starts: LLM.apply_model sends engine_job's timers, which the engine's
    # processes import from this tree.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                             os.getenv("PYTHONPATH")]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # CPU only: else 92 % of RAM free
    from vllm.platforms import current_platform

    s, cuda = SHAPES[args.shape], current_platform.is_cuda()
    if not cuda:  # one OpenMP thread per process, as run.py: more thrash on a small shared CPU
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    canvas, top = s["prompt"] + s["gen"], max(BATCHES)
    # A batch's block-opening full forwards (top x canvas tokens) fit one engine step. CPU:
    # eager, sparing minutes of inductor compilation.
    options = {"max_model_len": canvas, "max_num_seqs": top, "max_num_batched_tokens":
               top * canvas, "dtype": s["dtype"], "load_format": "dummy", "seed": 0,
               "gpu_memory_utilization": 0.85, "enforce_eager": not cuda}
    doc = {"provenance": provenance(args.commit, argv, cuda), "sections": {}, "settings": {
        "shape": args.shape, "model": run.shape_dict(s["ckpt"]), "batches": BATCHES, "block": BLOCK,
        "engine": options, **{k: v for k, v in s.items() if k != "ckpt"}}}
    x = SimpleNamespace(llm="not started", s=s, cuda=cuda, doc=doc, canvas=canvas,
                        shape=args.shape)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as model_dir:
        if set(args.sections) - {"floor", "prefill"}:
            from vllm import LLM

            t0 = time.perf_counter()
            try:
                x.llm = LLM(model=str(tc.write_llada_config_files(model_dir, s["ckpt"])),
                            **options)
            except Exception as e:
                traceback.print_exc()
                x.llm = f"the engine failed to start: {e!r}"
            doc["settings"]["engine_start_s"] = round(time.perf_counter() - t0, 1)
        for fn in (f for f in (cache, batching, overhead) if f.__name__ in args.sections):
            run_section(x, fn, args.out)
        if not isinstance(x.llm, str):
            x.llm.llm_engine.engine_core.shutdown()  # its processes exit: memory for the floor
            x.llm = "shut down"
            gc.collect()
    if cuda:
        import torch

        doc["provenance"]["device"] = torch.cuda.get_device_name()
    if "floor" in args.sections:
        run_section(x, floor, args.out)
    if "prefill" in args.sections:
        run_section(x, prefill, args.out)
    print(f"[gpu] wrote results.json, results.md, results.png in {args.out}", flush=True)
    return doc


if __name__ == "__main__":
    # `timeout` and `kill PID` end the run like Ctrl-C: the engine's processes go down with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
