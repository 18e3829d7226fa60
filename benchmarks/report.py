"""Turn the per-job results into results.json, results.md (tables) and results.png (bar charts).

The PNG is drawn with matplotlib (the ``bench`` extra).
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
    doc["step"] = _step_section(cases)
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
                                                  "stage_share", "torch_profiler_top_ops")
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


def _step_section(cases: dict) -> dict:
    """ms per denoising step by cache mode and engine; dual/none and compiled/eager ratios."""
    ms = {(c["meta"]["mode"], c["meta"]["engine"]): c.get("ms_per_forward")
          for c in cases.values() if c.get("group") == "step"}
    engines = ("eager", "compiled")
    rows = []
    for mode in ("none", "prefix", "dual"):
        row: dict[str, Any] = {"cache": mode}
        for engine in engines:
            row[f"{engine}_ms_per_step"] = ms.get((mode, engine))
            none = ms.get(("none", engine))
            row[f"{engine}_over_none"] = _ratio(ms.get((mode, engine)), none)
        row["compiled_over_eager"] = _ratio(row["compiled_ms_per_step"], row["eager_ms_per_step"])
        rows.append(row)
    meta = next((c["meta"] for c in cases.values() if c.get("group") == "step"), {})
    return {"prompt": meta.get("prompt"), "gen": meta.get("gen"), "rows": rows,
            "dual_over_none": {e: _ratio(ms.get(("dual", e)), ms.get(("none", e)))
                               for e in engines}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return _r(a / b, 3) if a and b else None


STEP_HEADERS = ["cache", "eager ms/step", "compiled ms/step", "compiled / eager",
                "eager / none", "compiled / none"]


def _step_rows(step: dict) -> list[list[Any]]:
    """Table rows of the step benchmark; none when no step job ran."""
    rows = [[r["cache"], r["eager_ms_per_step"], r["compiled_ms_per_step"],
             r["compiled_over_eager"], r["eager_over_none"], r["compiled_over_none"]]
            for r in step["rows"]]
    return rows if any(r[1] or r[2] for r in rows) else []


def step_table(step: dict) -> str:
    """The step benchmark as a Markdown table (also printed at the end of a run)."""
    return _table(STEP_HEADERS, _step_rows(step))


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
    """results.md: provenance, then one table per section."""
    env, s, ov, st = doc["environment"], doc["settings"], doc["overhead"], doc["step"]
    models = doc["models"]

    def sizes(name: str) -> str:
        m = models.get(name, {})
        sh = m.get("shape", {})
        return (f"hidden {sh.get('hidden_size')}, {sh.get('num_layers')} layers, "
                f"{sh.get('num_heads')} heads, MLP {sh.get('intermediate_size')}, vocabulary "
                f"{sh.get('vocab_size')} ({m.get('params', 0) / 1e6:.1f} M parameters, seed "
                f"{m.get('seed')})")

    def section(title: str, text: str, headers: list[str], rows: list[list[Any]],
                skipped: str | None = None) -> list[str]:
        intro = [text, ""] if text else []
        body = [*intro, _table(headers, rows)] if rows else [f"Skipped: {skipped}"]
        return [f"## {title}", "", *body, ""]

    pr = doc.get("problems", {})
    prof = ov.get("profile") or {}
    md = [
        "# vllm-dllm benchmark results", "",
        f"Command: `{env.get('command')}`, {env.get('total_wall_s', 0) / 60:.1f} min, "
        f"{env.get('started')}. Machine: {env['cpu']}, {env['cpus']} CPUs; engines fp32, "
        f"{env['threads_per_engine']} OpenMP thread(s) each, one engine at a time; vLLM "
        f"{env['vllm']}, torch {env['torch']}, commit {env['git_commit']}"
        f"{' (dirty tree)' if env.get('git_dirty') else ''}. Load average at start "
        f"{env['loadavg_start'][0]}, at end {env.get('loadavg_end', ['?'])[0]}. Tokens/s: best "
        "of the rounds (median in results.json); greedy decoding; ratios are within one engine.",
        "",
        *section("Targets", "", ["target", "required", "measured", "met"],
                 [[t["target"], f"{t['required']}x", t["measured"], t["met"]]
                  for t in doc["targets"]]),
        *section("1. Cache speed-up (random LLaDA, one token per step)",
                 f"Random LLaDA, {sizes('bench_model')}. Block 32, `dllm_steps` = generation "
                 "length, ignore_eos. * `none` ran one step per block and is extrapolated: "
                 "every `none` forward is the same full forward whatever it commits.",
                 ["prompt", "gen", "cache", "forwards", "tokens/s", "ms/forward", "wall s",
                  "speed-up"],
                 [[r["prompt"], r["gen"], r["mode"] + ("" if r["measured"] else "*"),
                   r["forwards"], r["tokens_per_s"], r["ms_per_forward"], r["wall_s"],
                   f"{r['speedup_vs_none']}x"] for r in doc["cache"]]),
        *section("2. Parallel decoding (trained models/llada-arith)",
                 f"Held-out problems (examples/train_tiny_llada.py, seed {pr.get('eval_seed')}), "
                 f"max_tokens {pr.get('gen_len')}, one request at a time, stops at EOS.",
                 ["cache", "rule", "tokens/s", "tokens/forward", "forwards/request", "accuracy",
                  "vs one/step", "vs none one/step"],
                 [[r["mode"], r["rule"], r["tokens_per_s"], r["tokens_per_forward"],
                   r["forwards_per_request"], r["accuracy"], f"{r['speedup_vs_one_per_step']}x",
                   f"{r['speedup_vs_none_one_per_step']}x"] for r in doc["parallel"]],
                 doc["skipped"].get("parallel", "no cases ran")),
        *section("3. Batching (dual + threshold 0.9)",
                 "Requests submitted `concurrency` at a time to offline `LLM.generate`.",
                 ["concurrent", "requests", "tokens/s", "requests/s", "scaling vs 1",
                  "tokens/forward", "accuracy", "wall s"],
                 [[r["concurrency"], r["requests"], r["tokens_per_s"], r["requests_per_s"],
                   f"{r['scaling_vs_1']}x", r["tokens_per_forward"], r["accuracy"], r["wall_s"]]
                  for r in doc["batching"]]),
        *section("4. Autoregressive reference (vLLM LlamaForCausalLM, same sizes)",
                 f"Prompt {s['prompt_len']}, ignore_eos, random weights on both sides; ours: "
                 "dual cache, one token per step (random weights are never confident).",
                 ["batch", "new tokens", "ours tokens/s", "AR tokens/s", "ours / AR"],
                 [[r["batch"], r["gen"], r["dllm_tokens_per_s"], r["ar_tokens_per_s"],
                   r["ratio_dllm_over_ar"]] for r in doc["ar"]],
                 doc["skipped"].get("ar")),
        *section("5. Engine overhead per denoising step (tiny LLaDA)",
                 f"Dual cache, one token per step, batch 1, prompt {s['overhead_prompt']}, "
                 f"{prof.get('steps')} steps in one process: {prof.get('ms_per_step')} ms per "
                 f"step (best of 3; model forward and LM head timed by forward hooks); vLLM's "
                 f"normal multi-process mode: {ov.get('ms_per_step_multiprocess')} ms per step, "
                 f"CPU seconds per wall second {ov.get('cpu_per_wall_multiprocess')}.",
                 ["stage", "ms / step", "share"],
                 [[k, v, f"{100 * prof['stage_share'][k]:.1f}%"]
                  for k, v in prof.get("stages_ms_per_step", {}).items()]),
        "<details><summary>torch.profiler, top operators by own CPU time</summary>\n",
        "```\n" + prof.get("torch_profiler_top_ops", "") + "\n```\n</details>", "",
        *section("6. Denoising step (random LLaDA, real vocabulary)",
                 f"Random LLaDA, {sizes('step_model')}; prompt {st['prompt']}, generation "
                 f"{st['gen']}, block 32, one token per step, batch 1. Compiled: "
                 "`enforce_eager=False`.",
                 STEP_HEADERS, _step_rows(st),
                 doc["skipped"].get("step", "no cases ran")),
        *section("Jobs", "", ["job", "engine start s", "job s", "load before", "load after",
                              "error"],
                 [[j.get("job"), j.get("startup_s"), j.get("process_wall_s"),
                   (j.get("loadavg") or {}).get("before", [None])[0],
                   (j.get("loadavg") or {}).get("after", [None])[0], j.get("error")]
                  for j in doc["jobs"]]),
        "![results](results.png)",
    ]
    return "\n".join(md) + "\n"


# ---- PNG -----------------------------------------------------------------------------------------


def chart(doc: dict, path: Path) -> None:
    """Four bar charts (tokens/s): cache, parallel, batching, against AR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("1. Cache, one token per step (random LLaDA; * extrapolated)",
         [(f"g{r['gen']} {r['mode']}{'' if r['measured'] else '*'}\n{r['speedup_vs_none']}x",
           r["tokens_per_s"], f"C{['none', 'prefix', 'dual'].index(r['mode'])}")
          for r in doc["cache"]]),
        ("2. Parallel decoding, trained llada-arith, batch 1",
         [(f"{r['mode']}\n{r['rule']}\nacc {r['accuracy']}", r["tokens_per_s"],
           "C3" if r["mode"] == "dual" else "C0") for r in doc["parallel"]]),
        ("3. Batching: dual + threshold 0.9",
         [(f"{r['concurrency']} req\n{r['scaling_vs_1']}x", r["tokens_per_s"], "C2")
          for r in doc["batching"]]),
        ("4. Against autoregressive Llama (same sizes), dual one token/step",
         [(f"{who}\nbatch {r['batch']}", r[key], color) for r in doc["ar"]
          for who, key, color in (("ours", "dllm_tokens_per_s", "C2"),
                                  ("AR", "ar_tokens_per_s", "C4")) if r[key] is not None]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, (title, bars) in zip(axes.flat, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("tokens/s")
        if not bars:
            ax.text(0.5, 0.5, "(not run)", ha="center", transform=ax.transAxes)
            continue
        labels, values, colors = zip(*bars, strict=True)
        drawn = ax.bar(range(len(bars)), values, color=colors)
        ax.bar_label(drawn, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(bars)), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(doc: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(markdown(doc))
    chart(doc, out / "results.png")
