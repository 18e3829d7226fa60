"""Turn the per-job results into results.json, results.md (tables) and results.png (bar charts).

Every row of a section is a dict (its results.json form); the tables and the charts read those
rows, so the three files cannot disagree. The PNG is drawn with matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODES = ("none", "prefix", "dual")
TARGETS = (
    ("dual >= 5x none (cache, first generation length)", "cache_dual", 5.0),
    ("prefix >= 2.5x none (cache, first generation length)", "cache_prefix", 2.5),
    ("threshold 0.9 + dual >= 2x one token/step + dual (trained model)", "parallel_dual", 2.0),
)
#: Columns of the step table (header, row key), also printed at the end of a run.
STEP_COLUMNS = ("cache=cache|eager ms/step=eager_ms_per_step|compiled ms/step=compiled_ms_per_step"
                "|compiled / eager=compiled_over_eager|eager / none=eager_over_none"
                "|compiled / none=compiled_over_none")


def _ratio(a: float | None, b: float | None, nd: int = 3) -> float | None:
    return round(a / b, nd) if a and b else None


def _pick(case: dict, spec: str, **values: Any) -> dict[str, Any]:
    """A row with the keys of ``spec`` in order: ``key`` or ``key=source`` (``meta.x`` reads the
    case's meta) copies a case value, unless ``values`` gives the key's value."""
    row = {}
    for item in spec.split():
        key, _, source = item.partition("=")
        value: Any = case
        for part in (source or key).split("."):
            value = value.get(part)
        row[key] = values.get(key, value)
    return row


def assemble(settings: dict, env: dict, info: dict, results: list[dict]) -> dict[str, Any]:
    """One document with every section's rows, the targets and the run's provenance.

    ``info`` is what run.py knows beyond the jobs: ``models``, ``skipped`` and ``problems``.
    """
    cases = {c["name"]: c for r in results for c in r.get("cases", [])}
    profile = next((r["profile"] for r in results if r.get("profile")), None)
    doc: dict[str, Any] = {
        "settings": settings, "environment": env, **info,
        # A job's record without its cases and profile: the sections below hold them.
        "jobs": [{k: v for k, v in r.items() if k not in ("cases", "profile")} for r in results],
        "cache": _cache_section(settings, cases), "parallel": _parallel_section(cases),
    }
    batching = sorted((c for c in cases.values() if c["group"] == "batching"),
                      key=lambda c: c["meta"]["concurrency"])
    doc["batching"] = [_pick(c, "concurrency=meta.concurrency requests model=meta.model "
                                "tokens_per_s requests_per_s scaling_vs_1 tokens_per_forward "
                                "accuracy output_tokens forwards wall_s=best_wall_s",
                             requests_per_s=round(c["requests"] / c["best_wall_s"], 2),
                             scaling_vs_1=_ratio(c["tokens_per_s"], batching[0]["tokens_per_s"], 2))
                       for c in batching]
    doc["ar"] = _ar_section(settings, cases)
    doc["overhead"] = _overhead_section(cases, profile, doc["cache"])
    doc["step"] = _step_section(cases)
    doc["targets"] = _targets(doc)
    doc["raw_cases"] = cases
    return doc


def _cache_section(settings: dict, cases: dict) -> list[dict]:
    """Cache modes per generation length; an unmeasured `none` is extrapolated from its probe."""
    rows = []
    for gen in settings["cache_gens"]:
        base = None
        for c in filter(None, (cases.get(f"cache-g{gen}-{mode}") for mode in MODES)):
            measured, ms = c["meta"]["measured"], 1000 * c["best_wall_s"] / c["forwards"]
            forwards, wall, tps = c["forwards"], c["best_wall_s"], c["tokens_per_s"]
            if not measured:  # one forward per block ran; one token per step is gen of them
                forwards, wall = gen, gen * ms / 1000
                tps = gen / wall
            row = _pick(c, "gen=meta.gen prompt=meta.prompt mode=meta.mode forwards tokens_per_s "
                           "ms_per_forward wall_s measured runs median_tokens_per_s",
                        forwards=forwards, tokens_per_s=round(tps, 3), ms_per_forward=round(ms, 3),
                        wall_s=round(wall, 3), measured=measured,
                        median_tokens_per_s=c["median_tokens_per_s"] if measured else None)
            if not measured:
                row["probe"] = f"{c['forwards']} forwards measured (one per block), x{gen}"
            base = tps if row["mode"] == "none" else base
            rows.append({**row, "speedup_vs_none": _ratio(tps, base, 2)})
    return rows


def _parallel_section(cases: dict) -> list[dict]:
    """Each rule's tokens/s against one token per step, with the same cache and with `none`."""
    parallel = [c for c in cases.values() if c["group"] == "parallel"]
    ref = {c["meta"]["mode"]: c["tokens_per_s"] for c in parallel
           if c["meta"]["rule"] == "one token/step"}
    return [_pick(c, "mode=meta.mode rule=meta.rule problems=requests tokens_per_s "
                     "tokens_per_forward forwards_per_request output_tokens accuracy "
                     "wall_s=best_wall_s name model=meta.model block=meta.block "
                     "speedup_vs_one_per_step speedup_vs_none_one_per_step",
                  forwards_per_request=_ratio(c["forwards"], c["requests"], 2),
                  speedup_vs_one_per_step=_ratio(c["tokens_per_s"], ref.get(c["meta"]["mode"]), 2),
                  speedup_vs_none_one_per_step=_ratio(c["tokens_per_s"], ref.get("none"), 2))
            for c in parallel]


def _ar_section(settings: dict, cases: dict) -> list[dict]:
    """Our dual one token per step against vLLM's Llama, per batch size."""
    rows, gen = [], settings["cache_gens"][0]
    for batch in settings["ar_batches"]:
        ar = cases.get(f"ar-llama-b{batch}")
        ours = cases.get(f"cache-g{gen}-dual" if batch == 1 else f"ar-dllm-b{batch}")
        if ar or ours:
            ours_tps, ar_tps = (x and x["tokens_per_s"] for x in (ours, ar))
            rows.append({"batch": batch, "gen": gen, "prompt": settings["prompt_len"],
                         "dllm_config": "dual, one token/step", "dllm_tokens_per_s": ours_tps,
                         "ar_tokens_per_s": ar_tps, "ratio_dllm_over_ar": _ratio(ours_tps, ar_tps)})
    return rows


def _overhead_section(cases: dict, profile: dict | None, cache_rows: list[dict]) -> dict:
    """The per-step overhead, its stages, and how far the cache model's full forward is above."""
    inproc, mp = cases.get("overhead-dual-1tok") or {}, cases.get("overhead-dual-1tok-mp") or {}
    out: dict[str, Any] = {
        "ms_per_step_inproc": (profile or {}).get("ms_per_step") or inproc.get("ms_per_forward"),
        "ms_per_step_multiprocess": mp.get("ms_per_forward"),
        "cpu_per_wall_multiprocess": mp.get("cpu_per_wall"),
    }
    if profile:
        out["profile"] = profile
        stages = profile["stages_ms_per_step"]
        out["biggest_stage"] = max(stages, key=stages.get)
        out["biggest_non_model_stage"] = max((k for k in stages if k != "model forward"),
                                             key=stages.get)
    per_step = out["ms_per_step_multiprocess"] or out["ms_per_step_inproc"]
    full = next((r for r in cache_rows if r["mode"] == "none"), None)
    if per_step and full:
        out["bench_full_forward_ms"] = full["ms_per_forward"]
        out["full_forward_over_step_overhead"] = round(full["ms_per_forward"] / per_step, 1)
    return out


def _step_section(cases: dict) -> dict:
    """ms per denoising step by cache mode and engine; dual/none and compiled/eager ratios."""
    step = [c for c in cases.values() if c["group"] == "step"]
    ms = {(c["meta"]["mode"], c["meta"]["engine"]): c.get("ms_per_forward") for c in step}
    engines, rows = ("eager", "compiled"), []
    for mode in MODES:
        row: dict[str, Any] = {"cache": mode}
        for engine in engines:
            row[f"{engine}_ms_per_step"] = ms.get((mode, engine))
            row[f"{engine}_over_none"] = _ratio(ms.get((mode, engine)), ms.get(("none", engine)))
        rows.append({**row, "compiled_over_eager": _ratio(row["compiled_ms_per_step"],
                                                          row["eager_ms_per_step"])})
    meta = step[0]["meta"] if step else {}
    return {"prompt": meta.get("prompt"), "gen": meta.get("gen"), "rows": rows,
            "dual_over_none": {e: _ratio(ms.get(("dual", e)), ms.get(("none", e)))
                               for e in engines}}


def _step_rows(step: dict) -> list[dict]:
    """The step section's rows; none when no step job ran."""
    ran = any(r["eager_ms_per_step"] or r["compiled_ms_per_step"] for r in step["rows"])
    return step["rows"] if ran else []


def step_table(step: dict) -> str:
    """The step benchmark as a Markdown table (also printed at the end of a run)."""
    return _table(STEP_COLUMNS, _step_rows(step))


def _targets(doc: dict) -> list[dict]:
    first = doc["cache"][0]["gen"] if doc["cache"] else None
    values = {f"cache_{r['mode']}": r["speedup_vs_none"] for r in doc["cache"]
              if r["gen"] == first and r["mode"] != "none"}
    for r in doc["parallel"]:
        if (r["mode"], r["rule"]) == ("dual", "threshold 0.9"):
            values["parallel_dual"] = r["speedup_vs_one_per_step"]
    return [{"target": label, "required": need, "measured": values.get(key),
             "met": None if values.get(key) is None else values[key] >= need}
            for label, key, need in TARGETS]


def _table(columns: str, rows: list[dict]) -> str:
    """A Markdown table of ``rows`` by ``columns``, "header=key|...": a key ending in ":x" is
    written as a ratio ("1.5x"), one ending in ":%" as a percentage."""
    def cell(row: dict, key: str) -> str:
        key, _, unit = key.partition(":")
        x = row.get(key)
        if isinstance(x, bool) or x is None:
            return {True: "yes", False: "no", None: "-"}[x]
        if unit:
            return f"{x}x" if unit == "x" else f"{100 * x:.1f}%"
        return (f"{x:,.2f}" if abs(x) >= 10 else f"{x:.3g}") if isinstance(x, float) else str(x)

    heads, keys = zip(*(c.split("=") for c in columns.split("|")), strict=True)
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    return "\n".join(lines + ["| " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows])


def markdown(doc: dict) -> str:
    """results.md: provenance, then one table per section."""
    env, s, ov, st, skipped = (doc[k] for k in ("environment", "settings", "overhead", "step",
                                                "skipped"))
    pr, prof = doc.get("problems", {}), ov.get("profile") or {}

    def sizes(name: str) -> str:
        m = doc["models"].get(name, {})
        sh = m.get("shape", {})
        return (f"hidden {sh.get('hidden_size')}, {sh.get('num_layers')} layers, "
                f"{sh.get('num_heads')} heads, MLP {sh.get('intermediate_size')}, vocabulary "
                f"{sh.get('vocab_size')} ({m.get('params', 0) / 1e6:.1f} M parameters, seed "
                f"{m.get('seed')})")

    sections = [  # title, text, columns, rows, why a section without rows did not run
        ("Targets", "", "target=target|required=required:x|measured=measured|met=met",
         doc["targets"], None),
        ("1. Cache speed-up (random LLaDA, one token per step)",
         f"Random LLaDA, {sizes('bench_model')}. Block 32, `dllm_steps` = generation length, "
         "ignore_eos. * `none` ran one step per block and is extrapolated: every `none` forward "
         "is the same full forward whatever it commits.",
         "prompt=prompt|gen=gen|cache=mode|forwards=forwards|tokens/s=tokens_per_s|"
         "ms/forward=ms_per_forward|wall s=wall_s|speed-up=speedup_vs_none:x",
         [{**r, "mode": r["mode"] + ("" if r["measured"] else "*")} for r in doc["cache"]], None),
        ("2. Parallel decoding (trained models/llada-arith)",
         f"Held-out problems (examples/train_tiny_llada.py, seed {pr.get('eval_seed')}), "
         f"max_tokens {pr.get('gen_len')}, one request at a time, stops at EOS.",
         "cache=mode|rule=rule|tokens/s=tokens_per_s|tokens/forward=tokens_per_forward|"
         "forwards/request=forwards_per_request|accuracy=accuracy|"
         "vs one/step=speedup_vs_one_per_step:x|vs none one/step=speedup_vs_none_one_per_step:x",
         doc["parallel"], skipped.get("parallel", "no cases ran")),
        ("3. Batching (dual + threshold 0.9)",
         "Requests submitted `concurrency` at a time to offline `LLM.generate`.",
         "concurrent=concurrency|requests=requests|tokens/s=tokens_per_s|"
         "requests/s=requests_per_s|scaling vs 1=scaling_vs_1:x|"
         "tokens/forward=tokens_per_forward|accuracy=accuracy|wall s=wall_s",
         doc["batching"], skipped.get("batching", "no cases ran")),
        ("4. Autoregressive reference (vLLM LlamaForCausalLM, same sizes)",
         f"Prompt {s['prompt_len']}, ignore_eos, random weights on both sides; ours: dual cache, "
         "one token per step (random weights are never confident).",
         "batch=batch|new tokens=gen|ours tokens/s=dllm_tokens_per_s|AR tokens/s=ar_tokens_per_s"
         "|ours / AR=ratio_dllm_over_ar", doc["ar"], skipped.get("ar")),
        ("5. Engine overhead per denoising step (tiny LLaDA)",
         f"Dual cache, one token per step, batch 1, prompt {s['overhead_prompt']}, "
         f"{prof.get('steps')} steps in one process: {prof.get('ms_per_step')} ms per step (best "
         "of 3; model forward and LM head timed by forward hooks); vLLM's normal multi-process "
         f"mode: {ov.get('ms_per_step_multiprocess')} ms per step, CPU seconds per wall second "
         f"{ov.get('cpu_per_wall_multiprocess')}.", "stage=stage|ms / step=ms|share=share:%",
         [{"stage": k, "ms": v, "share": prof["stage_share"][k]}
          for k, v in prof.get("stages_ms_per_step", {}).items()], None),
        ("6. Denoising step (random LLaDA, real vocabulary)",
         f"Random LLaDA, {sizes('step_model')}; prompt {st['prompt']}, generation {st['gen']}, "
         "block 32, one token per step, batch 1. Compiled: `enforce_eager=False`.",
         STEP_COLUMNS, _step_rows(st), skipped.get("step", "no cases ran")),
        ("Jobs", "", "job=job|engine start s=startup_s|job s=process_wall_s|load before=before|"
         "load after=after|error=error",
         [{**j, "before": j["loadavg"]["before"][0], "after": j["loadavg"]["after"][0]}
          for j in doc["jobs"]], None),
    ]
    md = ["# vllm-dllm benchmark results", "",
          f"Command: `{env.get('command')}`, {env.get('total_wall_s', 0) / 60:.1f} min, "
          f"{env.get('started')}. Machine: {env['cpu']}, {env['cpus']} CPUs; engines fp32, "
          f"{env['threads_per_engine']} OpenMP thread(s) each, one engine at a time; vLLM "
          f"{env['vllm']}, torch {env['torch']}, commit {env['git_commit']}"
          f"{' (dirty tree)' if env.get('git_dirty') else ''}. Load average at start "
          f"{env['loadavg_start'][0]}, at end {env.get('loadavg_end', ['?'])[0]}. Tokens/s: "
          "best of the rounds (median in results.json); greedy decoding; ratios are within one "
          "engine.", ""]
    for title, text, columns, rows, why in sections:
        body = [*([text, ""] if text else []), _table(columns, rows)] if rows else [
            f"Skipped: {why}"]
        md += [f"## {title}", "", *body, ""]
        if title.startswith("5."):
            md += ["<details><summary>torch.profiler, top operators by own CPU time</summary>\n",
                   "```\n" + prof.get("torch_profiler_top_ops", "") + "\n```\n</details>", ""]
    return "\n".join([*md, "![results](results.png)"]) + "\n"


def chart(doc: dict, path: Path) -> None:
    """Four bar charts (tokens/s): cache, parallel, batching, against AR.

    Drawn on a bare ``Figure``: no pyplot state, so no backend to choose and no window to close.
    """
    from matplotlib.figure import Figure

    panels = [  # title, bars (label, tokens/s, colour)
        ("1. Cache, one token per step (random LLaDA; * extrapolated)",
         [(f"g{r['gen']} {r['mode']}{'' if r['measured'] else '*'}\n{r['speedup_vs_none']}x",
           r["tokens_per_s"], f"C{MODES.index(r['mode'])}") for r in doc["cache"]]),
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
    fig = Figure(figsize=(14, 9))
    for ax, (title, bars) in zip(fig.subplots(2, 2).flat, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("tokens/s")
        if not bars:
            ax.text(0.5, 0.5, "(not run)", ha="center", transform=ax.transAxes)
            continue
        labels, values, colors = zip(*bars, strict=True)
        ax.bar_label(ax.bar(range(len(bars)), values, color=colors), fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(bars)), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_all(doc: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(markdown(doc))
    chart(doc, out / "results.png")
