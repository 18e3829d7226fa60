"""One engine, one process: run a job's cases through `vllm.LLM` and write their timings.

    python -m benchmarks.engine_job JOB.json RESULT.json

A job is one engine configuration (model + engine options) and the request-level cases run on
it (cache mode, selection rule, batch size: per-request parameters, so they share the engine).
`benchmarks/run.py` starts one such process per job, one at a time, so engines never share
memory or CPU. The cases run in ``rounds`` interleaved rounds (A B C, A B C, ...) after one
warm-up request each; each case reports its best and median wall time, so a burst of background
load hits every case alike. Timing is wall-clock around `LLM.generate`; forwards come from each
request's own statistics (``kv_transfer_params["dllm"]``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def build_engine(engine: dict[str, Any]):
    """`vllm.LLM` for a job's engine options (fp32, eager unless told otherwise, seed 0)."""
    from vllm import LLM

    return LLM(**{"dtype": "float32", "enforce_eager": True, "seed": 0, **engine})


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
    cpu_before = process_cpu_times()
    start = time.perf_counter()
    outputs = [out for i in range(0, len(prompts), step)
               for out in llm.generate(prompts[i : i + step], params, use_tqdm=False)]
    wall = time.perf_counter() - start
    cpu_after = process_cpu_times()
    ids = [list(out.outputs[0].token_ids) for out in outputs]
    stats = [(out.kv_transfer_params or {}).get("dllm") or {} for out in outputs]
    correct = None
    if "expected" in case:
        end_ids = set(case["end_ids"])
        cuts = [next((k for k, t in enumerate(x) if t in end_ids), len(x)) for x in ids]
        correct = sum(x[:c] == list(e) for x, c, e in zip(ids, cuts, case["expected"], strict=True))
    return {
        "wall_s": wall,
        "output_tokens": sum(map(len, ids)),
        "forwards": sum(s.get("forwards", 0) for s in stats),
        "early_stops": sum(bool(s.get("early_stop")) for s in stats),
        "correct": correct,
        # CPU seconds each engine process burned during the pass (user + system).
        "cpu_s": {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 3) for k in cpu_after},
    }


def process_cpu_times() -> dict[str, float]:
    """CPU time (user + system) of this process and each engine process it started, by role."""
    import psutil

    me = psutil.Process()
    out: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            title = (proc.cmdline() or [proc.name()])[0]
        except psutil.Error:
            continue
        role = "front end" if proc.pid == me.pid else title.split("/")[-1]
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def warmup_case(case: dict[str, Any], cap: int = 32) -> dict[str, Any]:
    """The case cut to its first prompt and at most ``cap`` tokens (steps scaled alike)."""
    params = dict(case["params"])
    gen = params["max_tokens"]
    params["max_tokens"] = min(gen, cap)
    extra = dict(params.get("extra_args") or {})
    if "dllm_steps" in extra:
        extra["dllm_steps"] = max(1, extra["dllm_steps"] * params["max_tokens"] // gen)
        params["extra_args"] = extra
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
        "early_stops": first["early_stops"], "cpu_s": best_run["cpu_s"],
        "cpu_per_wall": {k: round(v / best, 3) for k, v in best_run["cpu_s"].items()},
        "deterministic": all((r["output_tokens"], r["forwards"]) == (tokens, forwards)
                             for r in runs),
    }
    if n == 1 and forwards:  # batch 1: every engine step is one forward of this request
        result["ms_per_forward"] = round(1000 * best / forwards, 3)
    if first["correct"] is not None:
        result["correct"] = first["correct"]
        result["accuracy"] = round(first["correct"] / n, 4)
    return result


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run every case of ``job`` on a new engine and return the results."""
    t0 = time.perf_counter()
    llm = build_engine(job["engine"])
    startup = time.perf_counter() - t0
    _log(f"engine ready in {startup:.1f} s")
    cases = job["cases"]
    for case in cases:  # warm-up: one short request per case (allocator, kernels, code paths)
        run_case_once(llm, warmup_case(case))
    runs: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in cases}
    for r in range(max(c.get("rounds", 1) for c in cases)):  # interleaved: A B C, A B C, ...
        for case in cases:
            if r < case.get("rounds", 1):
                runs[case["name"]].append(run_case_once(llm, case))
                _log(f"round {r}: {case['name']}: {runs[case['name']][-1]['wall_s']:.2f} s")
    profile = None
    if job.get("profile"):
        from benchmarks.profiling import profile_steps

        case = job["profile"]
        run_case_once(llm, case)  # warm the profiled path
        profile = profile_steps(llm, lambda: run_case_once(llm, case))
    llm.llm_engine.engine_core.shutdown()
    return {
        "job": job["name"], "engine": job["engine"], "startup_s": round(startup, 2),
        "job_wall_s": round(time.perf_counter() - t0, 2),
        "cases": [summarise(c, runs[c["name"]]) for c in cases], "profile": profile,
    }


def _log(msg: str) -> None:
    print(f"[bench-job] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    job_file, result_file = map(Path, sys.argv[1:3])
    result = run_job(json.loads(job_file.read_text()))
    result_file.write_text(json.dumps(result, indent=2) + "\n")
