"""One engine, one process: run a job's cases through `vllm.LLM` and write their timings.

    python -m benchmarks.engine_job JOB.json RESULT.json

A job is one engine configuration (model + engine options) and the request-level cases run on
it (cache mode, selection rule, batch size: per-request parameters, so they share the engine).
The parent (`benchmarks/run.py`) starts one such process per job, one at a time, so engines
never share memory or CPU. The cases run in ``rounds`` interleaved rounds (case A, B, C, A, B,
C, ...) after one warm-up request per case; each case reports its best and median wall time, so
a burst of background load hits every case alike instead of one.

The environment (``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_ENABLE_V1_MULTIPROCESSING``...) is set by
the parent before this process imports vLLM.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def build_engine(engine: dict[str, Any]):
    """`vllm.LLM` for a job's engine options (fp32, eager, fixed seed)."""
    from vllm import LLM

    options = dict(
        model=engine["model"],
        dtype=engine.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=engine["max_model_len"],
        max_num_seqs=engine.get("max_num_seqs", 64),
        seed=0,
    )
    if engine.get("max_num_batched_tokens"):
        options["max_num_batched_tokens"] = engine["max_num_batched_tokens"]
    return LLM(**options)


def sampling_params(params: dict[str, Any]):
    """`SamplingParams` from a case's JSON parameters (greedy unless told otherwise)."""
    from vllm import SamplingParams

    p = dict(params)
    return SamplingParams(
        max_tokens=p.pop("max_tokens"),
        temperature=p.pop("temperature", 0.0),
        ignore_eos=p.pop("ignore_eos", False),
        extra_args=p.pop("extra_args", None),
        detokenize=p.pop("detokenize", True),
        **p,
    )


def run_case_once(llm, case: dict[str, Any]) -> dict[str, Any]:
    """One timed pass over the case's prompts; counts tokens, forwards, exact matches.

    All prompts go to one `generate` call (they run concurrently), or, with ``concurrency``
    c, in consecutive `generate` calls of c prompts each (c = 1: one request at a time).
    """
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in case["prompts"]]
    params = sampling_params(case["params"])
    step = case.get("concurrency") or len(prompts)
    outputs = []
    cpu_before = process_cpu_times()
    start = time.perf_counter()
    for i in range(0, len(prompts), step):
        outputs += llm.generate(prompts[i : i + step], params, use_tqdm=False)
    wall = time.perf_counter() - start
    cpu_after = process_cpu_times()
    tokens = forwards = 0
    early = 0
    correct = None
    expected = case.get("expected")
    end_ids = set(case.get("end_ids", ()))
    if expected is not None:
        correct = 0
    for i, out in enumerate(outputs):
        ids = list(out.outputs[0].token_ids)
        tokens += len(ids)
        stats = (out.kv_transfer_params or {}).get("dllm")
        if stats is not None:
            forwards += stats["forwards"]
            early += bool(stats.get("early_stop"))
        if expected is not None:
            cut = next((k for k, t in enumerate(ids) if t in end_ids), len(ids))
            correct += ids[:cut] == list(expected[i])
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "forwards": forwards,
        "early_stops": early,
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
    if extra:
        params["extra_args"] = extra
    return {"name": case["name"] + "-warmup", "prompts": case["prompts"][:1], "params": params}


def summarise(case: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best and median timings of a case's runs (token counts must agree between runs)."""
    walls = [r["wall_s"] for r in runs]
    best = min(walls)
    best_run = runs[walls.index(best)]
    first = runs[0]
    n = len(case["prompts"])
    result = {
        "name": case["name"],
        "group": case.get("group"),
        "meta": case.get("meta", {}),
        "requests": n,
        "runs": len(runs),
        "wall_s": [round(w, 4) for w in walls],
        "best_wall_s": round(best, 4),
        "median_wall_s": round(statistics.median(walls), 4),
        "output_tokens": first["output_tokens"],
        "tokens_per_s": round(first["output_tokens"] / best, 3),
        "median_tokens_per_s": round(first["output_tokens"] / statistics.median(walls), 3),
        "forwards": first["forwards"] or None,
        "tokens_per_forward": (
            round(first["output_tokens"] / first["forwards"], 4) if first["forwards"] else None
        ),
        "early_stops": first["early_stops"],
        "cpu_s": best_run["cpu_s"],
        "cpu_per_wall": {k: round(v / best, 3) for k, v in best_run["cpu_s"].items()},
        "deterministic": all(
            (r["output_tokens"], r["forwards"]) == (first["output_tokens"], first["forwards"])
            for r in runs
        ),
    }
    if n == 1 and first["forwards"]:
        # Batch 1: every engine step is one forward of this request.
        result["ms_per_forward"] = round(1000 * best / first["forwards"], 3)
    if first["correct"] is not None:
        result["correct"] = first["correct"]
        result["accuracy"] = round(first["correct"] / n, 4)
    return result


def run_job(job: dict[str, Any], llm=None) -> dict[str, Any]:
    """Run every case of ``job`` (on ``llm``, or on a new engine) and return the results."""
    t0 = time.perf_counter()
    own = llm is None
    if own:
        if job.get("profile"):
            from benchmarks.timing import patch_all

            patch_all()  # before the engine binds its step function
        llm = build_engine(job["engine"])
    startup = time.perf_counter() - t0
    _log(f"engine ready in {startup:.1f} s")
    cases = job["cases"]
    for case in cases:  # warm-up: one short request per case (allocator, kernels, code paths)
        run_case_once(llm, warmup_case(case))
    runs: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in cases}
    for r in range(job.get("rounds", 1)):  # interleaved: A B C, A B C, ...
        for case in cases:
            if r < case.get("rounds", 1):
                runs[case["name"]].append(run_case_once(llm, case))
                _log(f"round {r}: {case['name']}: {runs[case['name']][-1]['wall_s']:.2f} s")
    results = [summarise(c, runs[c["name"]]) for c in cases]
    profile = None
    if job.get("profile"):
        from benchmarks.timing import profile_steps

        profile = profile_steps(llm, job["profile"])
    if own:
        llm.llm_engine.engine_core.shutdown()
    return {
        "job": job["name"],
        "engine": job["engine"],
        "startup_s": round(startup, 2),
        "job_wall_s": round(time.perf_counter() - t0, 2),
        "cases": results,
        "profile": profile,
    }


def _log(msg: str) -> None:
    print(f"[bench-job] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    job_file, result_file = Path(argv[0]), Path(argv[1])
    job = json.loads(job_file.read_text())
    result = run_job(job)
    result_file.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
