"""The GPU speed table: one engine on a random LLaDA-8B-shaped model, four sections.

    python benchmarks/gpu.py [--shape 8b|tiny] [--out docs/gpu] [--commit SHA] [--sections ...]

The model has the released LLaDA-8B shape and token ids in bf16, built by vLLM from a
config-only directory with ``load_format="dummy"`` (random weights: nothing to download or
write). One engine, in vLLM's normal multi-process mode with CUDA graphs where there are any,
serves every case, since cache mode and batch size are per-request parameters: ``cache`` (none /
prefix / dual, batch 1), ``batching`` (dual, batch 1 to 64 in one ``generate`` call each),
``overhead`` (the share of a batch-1 dual step outside the model forward and LM head, which
forward hooks sent with vLLM's public ``LLM.apply_model`` time inside the worker), then
``floor``: the same shape's bare forward of one 32-token window in plain torch, eager and
CUDA-graphed, in this process once the engine is gone. The files are rewritten after every
section, so a run cut short keeps what it measured. ``--shape tiny`` is the CPU smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import engine_job, report, run  # noqa: E402
from vllm_dllm.testing import checkpoints as tc  # noqa: E402

SECTIONS = ("cache", "batching", "overhead", "floor")
BATCHES = (1, 8, 32, 64)
BLOCK = 32
#: Per shape: best-of rounds (after a warm-up per case) for batch 1 and for batching; the
#: floor's window attends to prompt + generation cached tokens plus itself.
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {"ckpt": tc.LLADA_REAL, "dtype": "bfloat16", "prompt": 512, "gen": 256,
           "rounds": 3, "batch_rounds": 2, "replays": 50},
    "tiny": {"ckpt": tc.LLADA_TINY, "dtype": "float32", "prompt": 64, "gen": 64,
             "rounds": 2, "batch_rounds": 1, "replays": 20},
}
REST = "rest (scheduler, IPC, inputs, sampler)"
#: Each section's table (report._table's columns) and chart (label key, value key, unit).
COLUMNS = {"cache": "cache=cache|ms/step=ms_per_step|tokens/s=tokens_per_s|vs none=vs_none:x|"
                    "forwards=forwards|wall s=wall_s",
           "batching": "batch=batch|tokens/s=tokens_per_s|ms/step=ms_per_step|"
                       "vs batch 1=vs_batch_1:x|engine steps=steps|wall s=wall_s",
           "overhead": "stage=stage|ms/step=ms|share=share:%", "floor": "forward=forward|ms=ms"}
CHARTS = {"cache": ("cache", "ms_per_step", "ms per step"),
          "batching": ("batch", "tokens_per_s", "tokens/s"),
          "overhead": ("stage", "ms", "ms per step"), "floor": ("forward", "ms", "ms")}


def measure(llm, s: dict, mode: str, batch: int, rounds: int) -> dict:
    """One case (dual etc., one token per step): a warm-up of its whole batch over one block,
    then the best of ``rounds`` (engine_job.summarise)."""
    case = run.case(f"{mode}-b{batch}", mode, run.byte_prompts(batch, s["prompt"], 0),
                    s["gen"], {"dllm_cache": mode, "dllm_steps": s["gen"]}, {}, block=BLOCK)
    engine_job.run_case_once(llm, dict(engine_job.warmup_case(case), prompts=case["prompts"]))
    return engine_job.summarise(case, [engine_job.run_case_once(llm, case)
                                       for _ in range(rounds)])


def overhead(llm, s: dict) -> list[dict]:
    """A batch-1 dual request's steps split into model forward, LM head and the rest."""
    measure(llm, s, "dual", 1, 1)  # warm, before any hook exists
    llm.apply_model(engine_job.attach_timers)
    case = run.case("overhead", "overhead", run.byte_prompts(1, s["prompt"], 0), s["gen"],
                    {"dllm_cache": "dual", "dllm_steps": s["gen"]}, {}, block=BLOCK)
    runs = []
    for _ in range(s["rounds"]):
        llm.apply_model(engine_job.take_timings)  # drops what the previous round left
        runs.append((engine_job.run_case_once(llm, case),
                     llm.apply_model(engine_job.take_timings)[0]))
    result, stages = min(runs, key=lambda r: r[0]["wall_s"])
    wall, steps = result["wall_s"], result["forwards"]
    stages[REST] = wall - sum(stages.values())
    return [{"stage": k, "ms": round(1000 * v / steps, 4), "share": round(v / wall, 4)}
            for k, v in (("step", wall), *stages.items())]


def floor(sh, dtype: str, context: int, replays: int, cuda: bool) -> dict[str, float | None]:
    """Median ms of a bare forward of one window over ``context`` cached tokens plus itself.

    Random weights, q/k/v and gate/up fused as in vLLM's layers; the window's K/V are written
    after the context's (random) K/V in a preallocated cache, as a cached step writes its own.
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dev, h, nh, d, w, m = ("cuda" if cuda else "cpu", sh.hidden_size, sh.num_heads,
                           sh.head_dim, BLOCK, sh.intermediate_size)
    kw = {"device": dev, "dtype": getattr(torch, dtype)}
    layers = [(torch.randn(3 * h, h, **kw) * h**-0.5, torch.randn(h, h, **kw) * h**-0.5,
               torch.randn(2 * m, h, **kw) * h**-0.5, torch.randn(h, m, **kw) * m**-0.5,
               torch.randn(2, nh, context + w, d, **kw)) for _ in range(sh.num_layers)]
    norm, x0 = torch.ones(h, **kw), torch.randn(w, h, **kw)
    head = torch.randn(sh.vocab_size, h, **kw) * h**-0.5
    angle = (torch.arange(context, context + w, device=dev)[:, None, None]
             * sh.rope_theta ** (-torch.arange(0, d, 2, device=dev) / d)).repeat(1, 1, 2)
    cos, sin = angle.cos().to(kw["dtype"]), angle.sin().to(kw["dtype"])

    def rms(x):
        return x * (x.float().pow(2).mean(-1, keepdim=True) + sh.rms_norm_eps).rsqrt().to(x) * norm

    def rope(x):  # [w, heads, d], rotate-half
        return x * cos + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * sin

    def forward():
        x = x0
        for qkv, o, gate_up, down, kv in layers:
            q, k, v = F.linear(rms(x), qkv).view(w, 3, nh, d).unbind(1)
            kv[0, :, context:], kv[1, :, context:] = rope(k).transpose(0, 1), v.transpose(0, 1)
            att = F.scaled_dot_product_attention(rope(q).transpose(0, 1), kv[0], kv[1])
            x = x + F.linear(att.transpose(0, 1).reshape(w, h), o)
            gate, up = F.linear(rms(x), gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, down)
        return F.linear(rms(x), head)

    def timed(fn) -> float:
        ms = []
        for _ in range(replays + 3):  # the first 3 are warm-up
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(), fn(), b.record(), b.synchronize()
                ms.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                ms.append(1000 * (time.perf_counter() - t))
        return round(statistics.median(ms[3:]), 4)

    with torch.inference_mode():
        out = {"eager": timed(forward), "graphed": None}
        if cuda:  # capture after warm-up on a side stream, as torch's CUDA-graph docs do
            (side := torch.cuda.Stream()).wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                [forward() for _ in range(3)]
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph := torch.cuda.CUDAGraph()):
                forward()
            out["graphed"] = timed(graph.replay)
    return out


def provenance(commit: str | None, argv: list[str], cuda: bool) -> dict[str, Any]:
    """Versions, device, driver and commit (the GPU machine's copy of the tree may lack .git).

    The device name comes from nvidia-smi: torch.cuda would initialise CUDA here before vLLM
    starts its processes; main() puts torch's name in once the engine is gone.
    """
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
            "python": platform.python_version(), "commit": commit,
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
               report._table(COLUMNS[name], sec["rows"]), ""]
    (out / "results.md").write_text("\n".join(md))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return print("[gpu] matplotlib is not installed: no results.png", flush=True)
    fig = Figure(figsize=(14, 8))
    for i, (ax, name) in enumerate(zip(fig.subplots(2, 2).flat, SECTIONS, strict=True)):
        label, value, unit = CHARTS[name]
        rows = [r for r in doc["sections"].get(name, {}).get("rows", []) if r[value] is not None]
        ax.set_title(f"{name} ({p['device']}, {s['shape']})", fontsize=10)
        ax.set_ylabel(unit)
        ax.bar_label(ax.bar(range(len(rows)), [r[value] for r in rows], color=f"C{i}"),
                     fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(rows)), [str(r[label])[:26] for r in rows], fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="8b", help="tiny: the CPU smoke run")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "gpu")
    p.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = p.parse_args(argv)
    # Before vLLM starts: LLM.apply_model may send engine_job's timers, which the engine's
    # processes import from this tree.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                             os.getenv("PYTHONPATH")]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # CPU only: else 92 % of RAM free
    from vllm.platforms import current_platform

    s, cuda = SHAPES[args.shape], current_platform.is_cuda()
    if not cuda:  # one OpenMP thread per process, as run.py: more thrash on a small shared CPU
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    sh, canvas, top = s["ckpt"].shape, s["prompt"] + s["gen"], max(BATCHES)
    # The scheduler charges each request its window: a batch's block-opening full forwards
    # (top x canvas tokens) fit one step. CPU: eager, no minutes of inductor compilation.
    options = run.engine("", -(-canvas // 256) * 256, top, top * canvas, dtype=s["dtype"],
                         load_format="dummy", seed=0, gpu_memory_utilization=0.85,
                         enforce_eager=not cuda)
    model = {k: getattr(sh, k) for k in ("hidden_size", "num_layers", "num_heads",
                                         "intermediate_size", "vocab_size")}
    doc = {"provenance": provenance(args.commit, argv, cuda), "sections": {}, "settings": {
        "shape": args.shape, "model": model, "batches": BATCHES, "block": BLOCK,
        "engine": options, **{k: v for k, v in s.items() if k != "ckpt"}}}
    args.out.mkdir(parents=True, exist_ok=True)

    def section(name: str, t0: float, text: str, rows: list[dict]) -> None:
        doc["sections"][name] = {"wall_s": round(time.perf_counter() - t0, 1), "text": text,
                                 "rows": rows}
        write(doc, args.out)
        print(f"\n## {name}\n{text}\n{report._table(COLUMNS[name], rows)}", flush=True)

    ratio = report._ratio
    with tempfile.TemporaryDirectory() as model_dir:
        if set(args.sections) - {"floor"}:
            from vllm import LLM

            t0 = time.perf_counter()
            options["model"] = str(tc.write_llada_config_files(model_dir, s["ckpt"]))
            llm = LLM(**options)
            doc["settings"]["engine_start_s"] = round(time.perf_counter() - t0, 1)
        if "cache" in args.sections:
            t0 = time.perf_counter()
            got = {m: measure(llm, s, m, 1, s["rounds"]) for m in report.MODES}
            section("cache", t0, f"Batch 1, best of {s['rounds']}; ms/step: wall time over the "
                    "request's forwards.", [
                        {"cache": m, "ms_per_step": c["ms_per_forward"], "wall_s": c["best_wall_s"],
                         "tokens_per_s": c["tokens_per_s"], "forwards": c["forwards"],
                         "vs_none": ratio(c["tokens_per_s"], got["none"]["tokens_per_s"], 2)}
                        for m, c in got.items()])
        if "batching" in args.sections:
            t0 = time.perf_counter()
            got = {b: measure(llm, s, "dual", b, s["batch_rounds"]) for b in BATCHES}
            section("batching", t0, f"Dual, all prompts in one `generate` call, best of "
                    f"{s['batch_rounds']}; ms/step: wall time over the engine steps (the most "
                    "forwards of a request).", [
                        {"batch": b, "tokens_per_s": c["tokens_per_s"], "steps": c["max_forwards"],
                         "ms_per_step": round(1000 * c["best_wall_s"] / c["max_forwards"], 3),
                         "vs_batch_1": ratio(c["tokens_per_s"], got[1]["tokens_per_s"], 2),
                         "wall_s": c["best_wall_s"]} for b, c in got.items()])
        if "overhead" in args.sections:
            t0 = time.perf_counter()
            section("overhead", t0, f"Batch-1 dual, best of {s['rounds']}; model forward and "
                    "LM head timed in the worker by forward hooks "
                    f"({'CUDA events' if cuda else 'host clock'}), the rest is the step minus "
                    "both.", overhead(llm, s))
        if set(args.sections) - {"floor"}:
            llm.llm_engine.engine_core.shutdown()  # its processes exit: memory for the floor
            del llm
            gc.collect()
    if cuda:
        import torch

        doc["provenance"]["device"] = torch.cuda.get_device_name()
    if "floor" in args.sections:
        t0 = time.perf_counter()
        ms = floor(sh, s["dtype"], canvas, s["replays"], cuda)
        dual = next((r["ms_per_step"] for r in doc["sections"].get("cache", {}).get("rows", [])
                     if r["cache"] == "dual"), None)
        section("floor", t0, f"Plain torch, one {BLOCK}-token window over {canvas} cached tokens "
                f"plus itself, median of {s['replays']}{'' if cuda else '; graphs: not on CPU'}. "
                f"Engine dual batch-1 step over the {'graphed' if cuda else 'eager'} floor: "
                f"{ratio(dual, ms['graphed'] or ms['eager'], 2)}x.", [
                    {"forward": "bare forward, eager", "ms": ms["eager"]},
                    {"forward": "bare forward, CUDA graph", "ms": ms["graphed"]},
                    {"forward": "engine dual step, batch 1", "ms": dual}])
    print(f"[gpu] wrote results.json, results.md, results.png in {args.out}", flush=True)
    return doc


if __name__ == "__main__":
    main()
