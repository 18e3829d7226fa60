"""Turn the per-job results into results.json, results.md (tables) and results.png (bar charts).

The PNG is drawn with Pillow (vLLM already depends on it), so the benchmarks need no plotting
package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = (
    ("dual >= 5x none (cache, first generation length)", "cache_dual", 5.0),
    ("prefix >= 2.5x none (cache, first generation length)", "cache_prefix", 2.5),
    ("threshold 0.9 + dual >= 2x one token/step + dual (trained model)", "parallel_dual", 2.0),
)


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def assemble(settings: dict, env: dict, info: dict, results: list[dict]) -> dict[str, Any]:
    """One document with every section's rows, the targets and the run's provenance."""
    cases = {c["name"]: c for r in results for c in r.get("cases", [])}
    profile = next((r["profile"] for r in results if r.get("profile")), None)
    doc: dict[str, Any] = {
        "settings": settings,
        "environment": env,
        "models": {k: v for k, v in info.items() if k.endswith("_model")},
        "skipped": dict(info.get("skipped", {})),
        "jobs": [
            {k: r.get(k) for k in ("job", "startup_s", "job_wall_s", "process_wall_s",
                                   "loadavg", "error", "log", "log_tail") if k in r}
            for r in results
        ],
    }
    doc["cache"] = _cache_section(settings, cases)
    doc["parallel"] = _parallel_section(cases)
    doc["batching"] = _batching_section(cases)
    doc["ar"] = _ar_section(settings, cases)
    doc["overhead"] = _overhead_section(cases, profile, doc["cache"])
    if "problems" in info:
        doc["problems"] = info["problems"]
    doc["targets"] = _targets(doc)
    doc["raw_cases"] = cases
    return doc


def _cache_section(settings: dict, cases: dict) -> list[dict]:
    rows = []
    for gen in settings["cache_gens"]:
        base = None
        for mode in ("none", "prefix", "dual"):
            c = cases.get(f"cache-g{gen}-{mode}")
            if c is None:
                continue
            measured = c["meta"].get("measured", True)
            ms = 1000 * c["best_wall_s"] / c["forwards"]
            if measured:
                forwards, wall, tps = c["forwards"], c["best_wall_s"], c["tokens_per_s"]
            else:  # one forward per block measured; one token per step is gen such forwards
                forwards, wall = gen, gen * ms / 1000
                tps = gen / wall
            row = {"gen": gen, "prompt": c["meta"]["prompt"], "mode": mode,
                   "forwards": forwards, "tokens_per_s": _r(tps, 3), "ms_per_forward": _r(ms, 3),
                   "wall_s": _r(wall, 3), "measured": measured, "runs": c["runs"],
                   "median_tokens_per_s": c["median_tokens_per_s"] if measured else None}
            if not measured:
                row["probe"] = f"{c['forwards']} forwards measured (one per block), x{gen}"
            if mode == "none":
                base = tps
            row["speedup_vs_none"] = _r(tps / base, 2) if base else None
            rows.append(row)
    return rows


def _parallel_section(cases: dict) -> list[dict]:
    rows = []
    ref: dict[str, float] = {}
    for name, c in cases.items():
        if c.get("group") != "parallel":
            continue
        m = c["meta"]
        row = {"mode": m["mode"], "rule": m["rule"], "problems": c["requests"],
               "tokens_per_s": c["tokens_per_s"], "tokens_per_forward": c["tokens_per_forward"],
               "forwards_per_request": _r(c["forwards"] / c["requests"], 2)
               if c["forwards"] else None,
               "output_tokens": c["output_tokens"], "accuracy": c.get("accuracy"),
               "wall_s": c["best_wall_s"], "name": name, "model": m.get("model"),
               "block": m.get("block")}
        if m["rule"] == "one token/step":
            ref[m["mode"]] = c["tokens_per_s"]
        rows.append(row)
    for row in rows:
        own = ref.get(row["mode"])
        row["speedup_vs_one_per_step"] = _r(row["tokens_per_s"] / own, 2) if own else None
        base = ref.get("none")
        row["speedup_vs_none_one_per_step"] = _r(row["tokens_per_s"] / base, 2) if base else None
    return rows


def _batching_section(cases: dict) -> list[dict]:
    rows = [c for c in cases.values() if c.get("group") == "batching"]
    rows.sort(key=lambda c: c["meta"]["concurrency"])
    out = []
    base = rows[0]["tokens_per_s"] if rows else None
    for c in rows:
        out.append({"concurrency": c["meta"]["concurrency"], "requests": c["requests"],
                    "model": c["meta"]["model"], "tokens_per_s": c["tokens_per_s"],
                    "requests_per_s": _r(c["requests"] / c["best_wall_s"], 2),
                    "scaling_vs_1": _r(c["tokens_per_s"] / base, 2) if base else None,
                    "tokens_per_forward": c["tokens_per_forward"],
                    "accuracy": c.get("accuracy"), "output_tokens": c["output_tokens"],
                    "forwards": c["forwards"], "wall_s": c["best_wall_s"]})
    return out


def _ar_section(settings: dict, cases: dict) -> list[dict]:
    rows = []
    gen = settings["cache_gens"][0]
    for batch in settings["ar_batches"]:
        ar = cases.get(f"ar-llama-b{batch}")
        ours = cases.get(f"cache-g{gen}-dual" if batch == 1 else f"ar-dllm-b{batch}")
        if ar is None and ours is None:
            continue
        row = {"batch": batch, "gen": gen, "prompt": settings["prompt_len"],
               "dllm_config": "dual, one token/step",
               "dllm_tokens_per_s": ours["tokens_per_s"] if ours else None,
               "ar_tokens_per_s": ar["tokens_per_s"] if ar else None}
        row["ratio_dllm_over_ar"] = (
            _r(row["dllm_tokens_per_s"] / row["ar_tokens_per_s"], 3)
            if ours and ar else None)
        rows.append(row)
    return rows


def _overhead_section(cases: dict, profile: dict | None, cache_rows: list[dict]) -> dict:
    inproc = cases.get("overhead-dual-1tok")
    mp = cases.get("overhead-dual-1tok-mp")
    out: dict[str, Any] = {
        "ms_per_step_inproc": (profile or {}).get("ms_per_step")
        or (inproc.get("ms_per_forward") if inproc else None),
        "ms_per_step_multiprocess": mp.get("ms_per_forward") if mp else None,
        "cpu_per_wall_multiprocess": mp.get("cpu_per_wall") if mp else None,
    }
    if profile:
        out["profile"] = {k: profile[k] for k in ("steps", "ms_per_step", "stages_ms_per_step",
                                                  "stage_share", "cprofile_top_tottime")
                          if k in profile}
        stages = profile["stages_ms_per_step"]
        non_model = {k: v for k, v in stages.items() if k != "model forward"}
        out["biggest_stage"] = max(stages, key=stages.get)
        out["biggest_non_model_stage"] = max(non_model, key=non_model.get)
    # How far a full forward of the benchmark model is above the per-step overhead.
    per_step = out["ms_per_step_multiprocess"] or out["ms_per_step_inproc"]
    full = next((r for r in cache_rows if r["mode"] == "none"), None)
    if per_step and full:
        out["bench_full_forward_ms"] = full["ms_per_forward"]
        out["full_forward_over_step_overhead"] = _r(full["ms_per_forward"] / per_step, 1)
    return out


def _targets(doc: dict) -> list[dict]:
    values: dict[str, float | None] = {"cache_dual": None, "cache_prefix": None,
                                       "parallel_dual": None}
    if doc["cache"]:
        first = doc["cache"][0]["gen"]
        for row in doc["cache"]:
            if row["gen"] == first and row["mode"] in ("dual", "prefix"):
                values[f"cache_{row['mode']}"] = row["speedup_vs_none"]
    for row in doc["parallel"]:
        if row["mode"] == "dual" and row["rule"] == "threshold 0.9":
            values["parallel_dual"] = row["speedup_vs_one_per_step"]
    out = []
    for label, key, need in TARGETS:
        v = values[key]
        out.append({"target": label, "required": need, "measured": v,
                    "met": None if v is None else v >= need})
    return out


# ---- Markdown ------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(x: Any) -> str:
        if x is None:
            return "-"
        if isinstance(x, bool):
            return "yes" if x else "no"
        if isinstance(x, float):
            return f"{x:,.2f}" if abs(x) >= 10 else f"{x:.3g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    env, s = doc["environment"], doc["settings"]
    bench = doc["models"].get("bench_model", {})
    shape = bench.get("shape", {})
    md = [
        "# vllm-dllm benchmark results",
        "",
        f"Command: `{env.get('command', 'python benchmarks/run.py')}`, total "
        f"{env.get('total_wall_s', 0) / 60:.1f} min, {env.get('started')}.",
        f"Machine: {env['cpu']}, {env['cpus']} CPUs; engines fp32, "
        f"{env['threads_per_engine']} OpenMP thread(s) each, one engine at a time; "
        f"vLLM {env['vllm']}, torch {env['torch']}, commit {env['git_commit']}"
        f"{' (dirty tree)' if env.get('git_dirty') else ''}.",
        f"Load average (1 min) at start {env['loadavg_start'][0]}, at end "
        f"{env.get('loadavg_end', ['?'])[0]} (other jobs on the machine slow every case alike "
        f"within one engine's interleaved rounds; ratios are within one engine).",
        "Tokens/s: best of the rounds (median in results.json). Greedy decoding.",
        "",
    ]
    md += ["## Targets", ""]
    md.append(_table(["target", "required", "measured", "met"],
                     [[t["target"], f"{t['required']}x", t["measured"], t["met"]]
                      for t in doc["targets"]]))
    md.append("")

    md += ["## 1. Cache speed-up (random LLaDA, one token per step)", ""]
    if shape:
        md.append(
            f"Model: random LLaDA, hidden {shape['hidden_size']}, {shape['num_layers']} layers, "
            f"{shape['num_heads']} heads, MLP {shape['intermediate_size']}, vocab "
            f"{shape['vocab_size']} ({bench['params'] / 1e6:.1f} M parameters, seed "
            f"{bench['seed']}). Block 32, `dllm_steps` = generation length, ignore_eos.")
    ov = doc["overhead"]
    if ov.get("full_forward_over_step_overhead"):
        md.append(
            f"One full forward over the canvas costs {ov['bench_full_forward_ms']:.0f} ms, "
            f"{ov['full_forward_over_step_overhead']:.0f}x the engine's per-step overhead "
            f"({ov.get('ms_per_step_multiprocess') or ov.get('ms_per_step_inproc'):.1f} ms, "
            "section 5).")
    md.append("")
    md.append(_table(
        ["prompt", "gen", "cache", "forwards", "tokens/s", "ms/forward", "wall s", "speed-up"],
        [[r["prompt"], r["gen"], r["mode"] + ("" if r["measured"] else " (extrapolated*)"),
          r["forwards"], r["tokens_per_s"], r["ms_per_forward"], r["wall_s"],
          f"{r['speedup_vs_none']}x" if r["speedup_vs_none"] else None]
         for r in doc["cache"]]))
    skipped_prefix = [g for g in s["cache_gens"] if g > s.get("prefix_max_gen", 10**9)]
    if skipped_prefix:
        md.append("")
        md.append(f"`prefix` was not run at generation {', '.join(map(str, skipped_prefix))}: "
                  "its later steps recompute the block and the whole masked suffix, so it costs "
                  "about gen/2 full forwards per block (`--prefix-max-gen` runs it).")
    if any(not r["measured"] for r in doc["cache"]):
        md.append("")
        md.append("\\* `none` at this length ran with one step per block (each forward is the "
                  "same full forward over the canvas whatever it commits); its "
                  "one-token-per-step time is gen x the measured ms/forward.")
    md.append("")

    md += ["## 2. Parallel decoding (trained models/llada-arith)", ""]
    if doc["parallel"]:
        tm = doc["models"].get("trained_model", {})
        pr = doc.get("problems", {})
        model = (f"{tm['path']} (d_model {tm.get('d_model')}, {tm.get('n_layers')} layers)"
                 if doc["parallel"][0].get("model") == "trained" and tm
                 else f"the {doc['parallel'][0].get('model')} model")
        md.append(
            f"Model: {model}. {doc['parallel'][0]['problems']} held-out problems "
            f"(examples/train_tiny_llada.py, seed {pr.get('eval_seed')}), completion prompts, "
            f"max_tokens {pr.get('gen_len')}, block {doc['parallel'][0].get('block')}, one "
            "request at a time, stops at EOS. "
            "Tokens = answer + end token as returned.")
        md.append("")
        md.append(_table(
            ["cache", "rule", "tokens/s", "tokens/forward", "forwards/request", "accuracy",
             "vs one/step", "vs none one/step"],
            [[r["mode"], r["rule"], r["tokens_per_s"], r["tokens_per_forward"],
              r["forwards_per_request"], r["accuracy"],
              f"{r['speedup_vs_one_per_step']}x", f"{r['speedup_vs_none_one_per_step']}x"]
             for r in doc["parallel"]]))
    else:
        md.append(f"Skipped: {doc['skipped'].get('parallel', 'no cases ran')}")
    md.append("")

    md += ["## 3. Batching (dual + threshold 0.9)", ""]
    if doc["batching"]:
        b0 = doc["batching"][0]
        md.append(f"{b0['requests']} requests on the {b0['model']} model, submitted "
                  "`concurrency` at a time to offline `LLM.generate`.")
        md.append("")
        md.append(_table(
            ["concurrent", "tokens/s", "requests/s", "scaling vs 1", "tokens/forward",
             "accuracy", "wall s"],
            [[r["concurrency"], r["tokens_per_s"], r["requests_per_s"],
              f"{r['scaling_vs_1']}x", r["tokens_per_forward"], r["accuracy"], r["wall_s"]]
             for r in doc["batching"]]))
    md.append("")

    md += ["## 4. Autoregressive reference (vLLM LlamaForCausalLM, same sizes)", ""]
    if doc["ar"]:
        md.append(f"Prompt {s['prompt_len']}, {doc['ar'][0]['gen']} new tokens per request, "
                  "ignore_eos, random weights on both sides; ours: dual cache, one token per "
                  "step (no parallel commits: random weights are never confident).")
        md.append("")
        md.append(_table(
            ["batch", "ours tokens/s", "AR tokens/s", "ours / AR"],
            [[r["batch"], r["dllm_tokens_per_s"], r["ar_tokens_per_s"], r["ratio_dllm_over_ar"]]
             for r in doc["ar"]]))
    if "ar" in doc["skipped"]:
        md.append(f"Skipped: {doc['skipped']['ar']}")
    md.append("")

    md += ["## 5. Engine overhead per denoising step (tiny LLaDA)", ""]
    if ov.get("profile"):
        p = ov["profile"]
        md.append(
            f"Dual cache, one token per step, batch 1, prompt {s.get('overhead_prompt')}; "
            f"{p['steps']} steps timed in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, front "
            f"end, engine core and worker in one process): {p['ms_per_step']:.2f} ms per step "
            "(best of 3 runs).")
        if ov.get("ms_per_step_multiprocess"):
            cpu = ov.get("cpu_per_wall_multiprocess") or {}
            busy = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if v >= 0.01)
            md.append(
                f"The same case in vLLM's normal multi-process mode (front end, engine core and "
                f"worker processes): {ov['ms_per_step_multiprocess']:.2f} ms per step; CPU "
                f"seconds per wall second: {busy}.")
        md.append("")
        md.append(_table(["stage", "ms / step", "share"],
                         [[k, v, f"{100 * p['stage_share'][k]:.1f}%"]
                          for k, v in p["stages_ms_per_step"].items()]))
        md.append("")
        md.append("<details><summary>cProfile, top functions by own time</summary>\n")
        md.append("```\n" + p.get("cprofile_top_tottime", "") + "\n```\n</details>")
    md.append("")

    md += ["## Jobs", ""]
    md.append(_table(["job", "engine start s", "job s", "load before", "load after", "error"],
                     [[j.get("job"), j.get("startup_s"), j.get("process_wall_s"),
                       (j.get("loadavg") or {}).get("before", [None])[0],
                       (j.get("loadavg") or {}).get("after", [None])[0], j.get("error")]
                      for j in doc["jobs"]]))
    md.append("")
    if doc["skipped"]:
        md += ["## Skipped", ""]
        md += [f"- {k}: {v}" for k, v in doc["skipped"].items()]
        md.append("")
    md.append("![results](results.png)")
    return "\n".join(md) + "\n"


# ---- PNG -----------------------------------------------------------------------------------------

_COLORS = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179),
           (147, 120, 96)]


def _panel(draw, font, box, title: str, bars: list[tuple[str, float, int]], unit: str) -> None:
    """A bar chart in ``box`` = (x0, y0, x1, y1); bars are (label, value, colour index)."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(200, 200, 200))
    draw.text((x0 + 10, y0 + 8), title, fill=(0, 0, 0), font=font)
    if not bars:
        draw.text((x0 + 10, y0 + 40), "(not run)", fill=(120, 120, 120), font=font)
        return
    top, bottom = y0 + 40, y1 - 60
    vmax = max(v for _, v, _ in bars) or 1.0
    n = len(bars)
    slot = (x1 - x0 - 40) / n
    width = max(6, slot * 0.6)
    draw.line((x0 + 20, bottom, x1 - 20, bottom), fill=(0, 0, 0))
    for i, (label, value, color) in enumerate(bars):
        cx = x0 + 20 + slot * (i + 0.5)
        h = (bottom - top) * value / vmax
        draw.rectangle((cx - width / 2, bottom - h, cx + width / 2, bottom),
                       fill=_COLORS[color % len(_COLORS)])
        text = f"{value:.3g}" if value < 100 else f"{value:.0f}"
        draw.text((cx - 3 * len(text), bottom - h - 14), text, fill=(0, 0, 0), font=font)
        for k, part in enumerate(label.split("\n")[:3]):
            draw.text((cx - 3 * len(part), bottom + 6 + 13 * k), part, fill=(0, 0, 0), font=font)
    draw.text((x0 + 10, y0 + 22), unit, fill=(90, 90, 90), font=font)


def chart(doc: dict, path: Path) -> None:
    """Four bar charts: cache, parallel, batching, AR (tokens/s)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = 1400, 900
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    cache = doc["cache"]
    gens = sorted({r["gen"] for r in cache})
    modes = {"none": 0, "prefix": 1, "dual": 2}
    cache_bars = [(f"g{r['gen']}\n{r['mode']}{'' if r['measured'] else '*'}\n"
                   f"{r['speedup_vs_none']}x", r["tokens_per_s"], modes[r["mode"]])
                  for g in gens for r in cache if r["gen"] == g]
    par_bars = [(f"{r['mode']}\n{r['rule']}\nacc {r['accuracy']}", r["tokens_per_s"],
                 3 if r["mode"] == "dual" else 0) for r in doc["parallel"]]
    bat_bars = [(f"{r['concurrency']} req\n{r['scaling_vs_1']}x", r["tokens_per_s"], 2)
                for r in doc["batching"]]
    ar_bars = []
    for r in doc["ar"]:
        if r["dllm_tokens_per_s"] is not None:
            ar_bars.append((f"ours\nbatch {r['batch']}", r["dllm_tokens_per_s"], 2))
        if r["ar_tokens_per_s"] is not None:
            ar_bars.append((f"AR\nbatch {r['batch']}", r["ar_tokens_per_s"], 4))
    half_w, half_h = w // 2, h // 2
    _panel(draw, font, (10, 10, half_w - 5, half_h - 5),
           "1. Cache: none / prefix / dual, one token per step (random LLaDA)", cache_bars,
           "tokens/s (* extrapolated)")
    _panel(draw, font, (half_w + 5, 10, w - 10, half_h - 5),
           "2. Parallel decoding, trained llada-arith, batch 1", par_bars, "tokens/s")
    _panel(draw, font, (10, half_h + 5, half_w - 5, h - 10),
           "3. Batching: dual + threshold 0.9", bat_bars, "tokens/s")
    _panel(draw, font, (half_w + 5, half_h + 5, w - 10, h - 10),
           "4. vs autoregressive Llama (same sizes), dual one token/step", ar_bars, "tokens/s")
    img.save(path)


def write_all(doc: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(markdown(doc))
    chart(doc, out / "results.png")


def rebuild(out: Path) -> dict:
    """Re-assemble OUT/results.* from OUT/jobs/*.result.json (after editing this module)."""
    old = json.loads((out / "results.json").read_text())
    info = dict(old["models"], skipped=old.get("skipped", {}))
    if "problems" in old:
        info["problems"] = old["problems"]
    results = []
    for job in old["jobs"]:
        f = out / "jobs" / f"{job['job']}.result.json"
        results.append(dict(json.loads(f.read_text()), **{k: job[k] for k in
                                                            ("process_wall_s", "loadavg")
                                                            if k in job})
                       if f.exists() else job)
    doc = assemble(old["settings"], old["environment"], info, results)
    write_all(doc, out)
    return doc


if __name__ == "__main__":
    import sys

    rebuild(Path(sys.argv[1]))
