"""One engine, one process: run a job's cases through `vllm.LLM` and write their timings.

    python -m benchmarks.engine_job JOB.json RESULT.json

A job is one engine and the cases that share it (cache mode, rule and batch size are per-request
parameters). The cases run in interleaved rounds (A B C, A B C, ...) after one warm-up request
each, so a burst of background load hits every case alike. Timing is wall-clock around
`LLM.generate`; forwards come from each request's own ``kv_transfer_params["dllm"]``. A job's
``profile`` case is split by stage with forward hooks that vLLM's public ``LLM.apply_model``
attaches (in-process engine only), plus one ``torch.profiler`` pass; no engine method is patched.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Stage names as they appear in results.json.
MODEL, LM_HEAD = "model forward", "LM head (compute_logits)"
REST = "rest of the step (scheduler, inputs, sampler, bookkeeping, front end)"


def run_case_once(llm, case: dict[str, Any]) -> dict[str, Any]:
    """One timed pass over the case's prompts; counts tokens, forwards, exact matches.

    All prompts go to one `generate` call (they run concurrently), or, with ``concurrency``
    c, in consecutive calls of c prompts each (c = 1: one request at a time).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in case["prompts"]]
    params = SamplingParams(temperature=0.0, **case["params"])
    step = case.get("concurrency") or len(prompts)
    cpu_before, start = process_cpu_times(), time.perf_counter()
    outputs = [o for i in range(0, len(prompts), step)
               for o in llm.generate(prompts[i : i + step], params, use_tqdm=False)]
    wall = time.perf_counter() - start
    cpu_after = process_cpu_times()
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    stats = [(o.kv_transfer_params or {}).get("dllm") or {} for o in outputs]
    correct = None
    if "expected" in case:  # the answer is what precedes the first end token
        ends = set(case["end_ids"])
        cuts = [next((k for k, t in enumerate(x) if t in ends), len(x)) for x in ids]
        correct = sum(x[:c] == list(e) for x, c, e in zip(ids, cuts, case["expected"], strict=True))
    return {
        "wall_s": wall, "output_tokens": sum(map(len, ids)),
        "forwards": sum(s.get("forwards", 0) for s in stats),
        # A batch sent in one call runs one forward of every request per engine step, so its
        # longest request counts the engine steps.
        "max_forwards": max((s.get("forwards", 0) for s in stats), default=0),
        "early_stops": sum(bool(s.get("early_stop")) for s in stats), "correct": correct,
        # CPU seconds each engine process burned during the pass (user + system).
        "cpu_s": {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 3) for k in cpu_after},
    }


def process_cpu_times() -> dict[str, float]:
    """CPU time (user + system) of this process and each engine process it started, by role."""
    import psutil

    me, out = psutil.Process(), {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t, title = proc.cpu_times(), (proc.cmdline() or [proc.name()])[0]
        except psutil.Error:
            continue
        role = "front end" if proc.pid == me.pid else title.split("/")[-1]
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def warmup_case(case: dict[str, Any], cap: int = 32) -> dict[str, Any]:
    """The case cut to its first prompt and at most ``cap`` tokens (steps scaled alike)."""
    gen = case["params"]["max_tokens"]
    params = {**case["params"], "max_tokens": min(gen, cap)}
    extra = params.get("extra_args") or {}
    if "dllm_steps" in extra:
        steps = max(1, extra["dllm_steps"] * params["max_tokens"] // gen)
        params["extra_args"] = {**extra, "dllm_steps": steps}
    return {"prompts": case["prompts"][:1], "params": params}


def summarise(case: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best and median timings of a case's runs (token counts must agree between runs)."""
    walls = [r["wall_s"] for r in runs]
    best, median = min(walls), statistics.median(walls)
    best_run, first = runs[walls.index(best)], runs[0]
    n, tokens, forwards = len(case["prompts"]), first["output_tokens"], first["forwards"]
    result = {
        "name": case["name"], "group": case.get("group"), "meta": case.get("meta", {}),
        "requests": n, "runs": len(runs), "wall_s": [round(w, 4) for w in walls],
        "best_wall_s": round(best, 4), "median_wall_s": round(median, 4),
        "output_tokens": tokens, "tokens_per_s": round(tokens / best, 3),
        "median_tokens_per_s": round(tokens / median, 3), "forwards": forwards or None,
        "tokens_per_forward": round(tokens / forwards, 4) if forwards else None,
        "max_forwards": first["max_forwards"] or None,
        "early_stops": first["early_stops"], "cpu_s": best_run["cpu_s"],
        "cpu_per_wall": {k: round(v / best, 3) for k, v in best_run["cpu_s"].items()},
        "deterministic": all((r["output_tokens"], r["forwards"]) == (tokens, forwards)
                             for r in runs),
    }
    if n == 1 and forwards:  # batch 1: every engine step is one forward of this request
        result["ms_per_forward"] = round(1000 * best / forwards, 3)
    if first["correct"] is not None:
        result.update(correct=first["correct"], accuracy=round(first["correct"] / n, 4))
    return result


def profile_steps(llm, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Split the best of 3 runs of ``run`` (one pass over a batch-1 case) by stage."""
    import torch

    spent, entered = {MODEL: 0.0, LM_HEAD: 0.0}, {}

    def attach(model: torch.nn.Module) -> None:
        for stage, module in ((MODEL, model), (LM_HEAD, model.logits_processor)):

            def enter(*_: Any, stage: str = stage) -> None:
                entered[stage] = time.perf_counter()

            def leave(*_: Any, stage: str = stage) -> None:
                spent[stage] += time.perf_counter() - entered[stage]

            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)

    llm.apply_model(attach)
    runs = []
    for _ in range(3):
        before = dict(spent)
        runs.append((run(), {k: spent[k] - before[k] for k in spent}))
    result, stages = min(runs, key=lambda r: r[0]["wall_s"])
    steps, wall = max(result["forwards"], 1), result["wall_s"]
    stages[REST] = wall - sum(stages.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {
        "steps": steps, "ms_per_step": round(1000 * wall / steps, 4),
        "stages_ms_per_step": {k: round(1000 * v / steps, 4) for k, v in stages.items()},
        "stage_share": {k: round(v / wall, 4) for k, v in stages.items()},
        "torch_profiler_top_ops": prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48),
    }


def attach_timers(model) -> None:
    """Forward hooks around the model forward and its LM head (the logits processor that
    ``compute_logits`` calls) that stamp CUDA events on the running stream (the host clock on
    CPU). ``LLM.apply_model`` runs it in the worker of a multi-process engine, by reference
    (an engine process re-pickles what it forwards, so the function must be importable); send
    it after the warm-up, so that no CUDA-graph capture runs the hooks."""
    import torch

    model.bench_marks, cuda = {MODEL: [], LM_HEAD: []}, next(model.parameters()).is_cuda

    def stamp():
        if not cuda:
            return time.perf_counter()
        (event := torch.cuda.Event(enable_timing=True)).record()
        return event

    for stage, module in ((MODEL, model), (LM_HEAD, model.logits_processor)):
        marks = model.bench_marks[stage]
        module.register_forward_pre_hook(lambda *_, m=marks: m.append([stamp()]))
        module.register_forward_hook(lambda *_, m=marks: m[-1].append(stamp()))


def take_timings(model) -> dict[str, float]:
    """Seconds spent in each stage `attach_timers` times since the last call (in the worker,
    by ``LLM.apply_model``)."""
    import torch

    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    out = {stage: sum(b - a if isinstance(a, float) else a.elapsed_time(b) / 1000
                      for a, b in marks) for stage, marks in model.bench_marks.items()}
    for marks in model.bench_marks.values():
        marks.clear()
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run every case of ``job`` on a new engine (fp32, eager unless told otherwise, seed 0)."""
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**{"dtype": "float32", "enforce_eager": True, "seed": 0, **job["engine"]})
    startup = time.perf_counter() - t0
    print(f"[bench-job] engine ready in {startup:.1f} s", file=sys.stderr, flush=True)
    cases = job["cases"]
    for case in cases:  # warm-up: one short request per case (allocator, kernels, code paths)
        run_case_once(llm, warmup_case(case))
    runs: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in cases}
    for r in range(max(c.get("rounds", 1) for c in cases)):  # interleaved: A B C, A B C, ...
        for case in (c for c in cases if r < c.get("rounds", 1)):
            runs[case["name"]].append(run_case_once(llm, case))
            print(f"[bench-job] round {r}: {case['name']}: "
                  f"{runs[case['name']][-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    profile = None
    if profiled := job.get("profile"):  # a copy of one of the cases above: its path is warm
        profile = profile_steps(llm, lambda: run_case_once(llm, profiled))
    llm.llm_engine.engine_core.shutdown()
    return {"job": job["name"], "startup_s": round(startup, 2),
            "job_wall_s": round(time.perf_counter() - t0, 2),
            "cases": [summarise(c, runs[c["name"]]) for c in cases], "profile": profile}


if __name__ == "__main__":
    job_file, result_file = map(Path, sys.argv[1:3])
    result = run_job(json.loads(job_file.read_text()))
    result_file.write_text(json.dumps(result, indent=2) + "\n")
