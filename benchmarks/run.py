"""Run the vllm-dllm benchmarks end to end and write results.json, results.md and results.png.

    python benchmarks/run.py [--quick] [--out benchmarks/out]

benchmarks/README.md lists the six sections, their sizes and how each is measured. Every engine
runs in its own process (``python -m benchmarks.engine_job``), one at a time. The checkpoints are
written here with fixed seeds (no downloads): random LLaDAs in the released layout, and a random
Hugging Face Llama of the cache model's sizes and tokenizer for vLLM's own ``LlamaForCausalLM``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import report  # noqa: E402
from vllm_dllm.testing import checkpoints as tc  # noqa: E402

#: The cache benchmark's model: hidden 256, 4 layers, 4 heads, MLP 704, 3.4 M parameters. One
#: full fp32 forward over the 768-token canvas costs ~200 ms on one core of our CPUs, tens of
#: times the engine's per-step overhead (~6 ms, the overhead section's
#: ``full_forward_over_step_overhead``), so the cache modes are compared on model compute, not on
#: overhead; yet `none` at one token per step (256 full forwards) still fits in about a minute.
BENCH_MODEL = tc.LLADA_MID
#: The engine-overhead model: compute is negligible next to the per-step overhead.
TINY_MODEL = tc.LLADA_TINY
#: The step benchmark's model: mid-size layers with the real LLaDA vocabulary and token ids, so
#: the LM head over a block (32 x 126464 logits) weighs what it weighs in the released model.
STEP_MODEL = replace(tc.LLADA_REAL, shape=replace(
    tc.LLADA_REAL.shape, hidden_size=512, num_heads=8, num_kv_heads=8, num_layers=8,
    intermediate_size=1536))
SEEDS = {"bench": 1234, "tiny": 0, "llama": 4321, "step": 99}
BLOCK = 32
#: The trained model's block length: its 16-token answers in two blocks, as in
#: examples/eval_llada_arith.py.
TRAINED_BLOCK = 8
PARALLEL_RULES = (("one token/step", "steps"), ("threshold 0.9", "threshold"),
                  ("factor 1.0", "factor"))
#: A job still running after this many seconds is killed and recorded as failed.
JOB_TIMEOUT_S = 1800


#: The sizes of a run by profile: (full, --quick, the smoke test's).
SIZES: dict[str, tuple[Any, Any, Any]] = {
    "prompt_len": (512, 256, 32),
    "cache_gens": ([256, 512, 1024], [64], [32, 64]),
    # Longer generations run `none` one step per block and extrapolate: every `none` forward is
    # the same full forward over the canvas, whatever the step commits.
    "none_measured_max": (256, 256, 32),
    # PrefixCache's later steps recompute the block and the masked suffix, so its cost grows with
    # the square of the generation length: longer ones are not run.
    "prefix_max_gen": (512, 512, 512),
    # Interleaved rounds of the first generation length (`none`, the slowest, gets fewer).
    "rounds": (3, 2, 1),
    "none_rounds": (2, 1, 1),
    "long_rounds": (1, 1, 1),
    "ar_batches": ([1, 16], [1, 4], [1, 2]),
    "parallel_problems": (100, 24, 3),
    "batching": ([1, 4, 16, 64], [1, 4, 16], [1, 2]),
    "batching_problems": (64, 16, 2),
    "overhead_prompt": (64, 64, 16),
    "overhead_gen": (128, 64, 32),
    "overhead_mp": (True, True, False),
    # The step benchmark. Off in --quick (`--step` turns it on): each of its two engines loads a
    # 0.5 GB checkpoint with a 126464-token tokenizer, minutes on a small CPU.
    "run_step": (True, False, True),
    "step_prompt": (256, 64, 256),
    "step_gen": (128, 32, 128),
    "threads": (1, 1, 1),
    "kv_space_gib": (1, 1, 1),
    # The smoke test: every dLLM case on the tiny model in one engine; no AR or step engines.
    "single_engine": (False, False, True),
    "trained_model_dir": (None, None, None),
}
PROFILES = ("full", "quick", "smoke")


# ---- checkpoints and problems ----------------------------------------------------------------


def write_llama_like(path: Path, ckpt: tc.TinyCheckpoint, seed: int, tokenizer_from: Path) -> Path:
    """A random HF Llama checkpoint with ``ckpt``'s sizes, for vLLM's ``LlamaForCausalLM``.

    The tokenizer files are copied from ``tokenizer_from`` (a LLaDA checkpoint of the same
    vocabulary), so both models read the same prompt ids.
    """
    from transformers import LlamaConfig

    sh, eos = ckpt.shape, ckpt.token_ids["<|endoftext|>"]
    LlamaConfig(vocab_size=sh.vocab_size, hidden_size=sh.hidden_size,
                intermediate_size=sh.intermediate_size, num_hidden_layers=sh.num_layers,
                num_attention_heads=sh.num_heads, num_key_value_heads=sh.num_kv_heads,
                max_position_embeddings=sh.max_position, rms_norm_eps=sh.rms_norm_eps,
                rope_theta=sh.rope_theta, bos_token_id=ckpt.token_ids["<|startoftext|>"],
                eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
                torch_dtype="float32").save_pretrained(path)
    # Llama's tensor names are Dream's (Qwen2's), without the q/k/v biases.
    tc.write_weights(path / "model.safetensors", replace(sh, qkv_bias=False),
                     tc.DREAM_NAMES, seed=seed)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, path / name)
    return path


def model_info(path: Path, ckpt: tc.TinyCheckpoint, seed: int) -> dict[str, Any]:
    """What results.json records of a random model: its sizes and parameter count (untied
    head, no biases)."""
    sh = ckpt.shape
    h, i, v = sh.hidden_size, sh.intermediate_size, sh.vocab_size
    layer = 2 * h * h + 2 * h * sh.kv_size + 3 * h * i + 2 * h
    return {"path": str(path), "shape": shape_dict(ckpt),
            "params": sh.num_layers * layer + 2 * v * h + h, "seed": seed}


def shape_dict(ckpt: tc.TinyCheckpoint) -> dict[str, int]:
    keys = ("hidden_size", "num_heads", "num_kv_heads", "num_layers", "intermediate_size",
            "vocab_size")
    return {k: v for k, v in asdict(ckpt.shape).items() if k in keys}


def heldout_problems(n: int) -> dict[str, Any]:
    """``n`` held-out problems of the trained model, made by its training script itself.

    examples/train_tiny_llada.py's ``heldout_set`` (the shipped run's task mix, its held-out
    seed) and ``example_ids`` (completion style ``[BOS] prompt``), so the benchmark scores
    exactly the set that the training script and examples/eval_llada_arith.py score.
    """
    sys.path.insert(0, str(REPO_ROOT / "examples"))  # as examples/eval_llada_arith.py imports it
    import train_tiny_llada as m

    cfg = m.TrainConfig()
    problems = m.heldout_set(n, m.EVAL_SEED, cfg)
    return {"prompts": [m.example_ids(ex, cfg.gen_len)[0] for ex in problems],
            "expected": [m.encode_text(ex.answer) for ex in problems],
            "tasks": [ex.task for ex in problems], "end_ids": list(m.END_IDS),
            "gen_len": cfg.gen_len, "eval_seed": m.EVAL_SEED}


# ---- cases (one per-request configuration each) and jobs (one engine each) -------------------


def byte_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` deterministic prompts of byte tokens (ids below every special token)."""
    rngs = [random.Random(seed + i) for i in range(n)]
    return [[rng.randrange(256) for _ in range(length)] for rng in rngs]


def case(name: str, group: str, prompts: list[list[int]], gen: int, extra: dict | None,
         meta: dict, *, rounds: int = 1, block: int = BLOCK, **more: Any) -> dict[str, Any]:
    """A case: greedy requests with dllm ``extra`` args (None: an autoregressive request)."""
    params: dict[str, Any] = {"max_tokens": gen, "ignore_eos": "expected" not in more}
    if extra is not None:
        params["extra_args"] = {"dllm_block_length": block, **extra}
    return {"name": name, "group": group, "prompts": prompts, "params": params, "meta": meta,
            "rounds": rounds, **more}


def engine(model: Path, max_model_len: int, max_num_seqs: int, batched: int,
           **extra: Any) -> dict[str, Any]:
    return {"model": str(model), "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": batched, **extra}


def build_jobs(s: SimpleNamespace, ckpt_dir: Path) -> tuple[list[dict], dict]:
    """The jobs of a run, and what the report records beyond them (models, problems, skips).

    Every run writes its checkpoints afresh: even the step model's 0.6 GB take about 4 s here,
    next to minutes of engine start-up.
    """
    tiny = tc.write_llada_checkpoint(ckpt_dir / "llada-tiny", TINY_MODEL, seed=SEEDS["tiny"])
    models = {"tiny_model": model_info(tiny, TINY_MODEL, SEEDS["tiny"])}
    bench, models["bench_model"] = tiny, models["tiny_model"]
    if not s.single_engine:  # the smoke test runs its cache cases on the tiny model
        bench = tc.write_llada_checkpoint(ckpt_dir / "llada-bench", BENCH_MODEL,
                                          seed=SEEDS["bench"])
        models["bench_model"] = model_info(bench, BENCH_MODEL, SEEDS["bench"])
    info: dict[str, Any] = {"models": models, "skipped": {}}
    # Cache modes per generation length, then our side of the AR comparison at batch > 1.
    cases, gen0, prompt = [], s.cache_gens[0], byte_prompts(1, s.prompt_len, 0)
    for gen in s.cache_gens:
        for mode in (m for m in report.MODES if m != "prefix" or gen <= s.prefix_max_gen):
            rounds = s.none_rounds if mode == "none" else s.rounds
            rounds = rounds if gen == gen0 else s.long_rounds
            meta = {"gen": gen, "mode": mode, "prompt": s.prompt_len, "measured": True}
            steps = gen
            if mode == "none" and gen > s.none_measured_max:
                steps = gen // BLOCK
                meta.update(measured=False, probe_steps=steps)
            cases.append(case(f"cache-g{gen}-{mode}", "cache", prompt, gen,
                              {"dllm_cache": mode, "dllm_steps": steps}, meta, rounds=rounds))
    cases += [case(f"ar-dllm-b{b}", "ar_dllm", byte_prompts(b, s.prompt_len, 0), gen0,
                   {"dllm_cache": "dual", "dllm_steps": gen0},
                   {"batch": b, "gen": gen0, "prompt": s.prompt_len}) for b in s.ar_batches[1:]]
    longest = _round_up(s.prompt_len + max(s.cache_gens), 512)
    widest = max(s.ar_batches) * (s.prompt_len + gen0)
    jobs = [{"name": "cache", "cases": cases, "engine": engine(
        bench, longest, max(64, *s.ar_batches), max(widest, longest, 2048))}]

    # Parallel rules and batching, scored on the trained model's held-out problems.
    problems = heldout_problems(max(s.parallel_problems, s.batching_problems))
    n, m, gen = s.parallel_problems, s.batching_problems, problems["gen_len"]
    info["problems"] = {"gen_len": gen, "eval_seed": problems["eval_seed"],
                        "tasks": problems["tasks"][:n]}
    model = "tiny random (smoke)" if s.single_engine else "trained"
    rule_args = {"steps": {"dllm_steps": _round_up(gen, TRAINED_BLOCK)},
                 "threshold": {"dllm_threshold": 0.9}, "factor": {"dllm_factor": 1.0}}
    scored = {"block": TRAINED_BLOCK, "end_ids": problems["end_ids"]}
    trained_cases = [case(f"parallel-{mode}-{rule}", "parallel", problems["prompts"][:n], gen,
                          {"dllm_cache": mode, **rule_args[rule]},
                          {"mode": mode, "rule": label, "gen": gen, "problems": n,
                           "model": model, "block": TRAINED_BLOCK}, rounds=s.rounds,
                          concurrency=1, expected=problems["expected"][:n], **scored)
                     for mode in ("dual", "none") for label, rule in PARALLEL_RULES]
    trained_cases += [case(f"batching-c{c}", "batching", problems["prompts"][:m], gen,
                           {"dllm_cache": "dual", "dllm_threshold": 0.9},
                           {"concurrency": c, "gen": gen, "requests": m, "model": model},
                           rounds=s.rounds, concurrency=c, expected=problems["expected"][:m],
                           **scored) for c in s.batching]
    overhead = case("overhead-dual-1tok", "overhead", byte_prompts(1, s.overhead_prompt, 7),
                    s.overhead_gen, {"dllm_cache": "dual", "dllm_steps": s.overhead_gen},
                    {"prompt": s.overhead_prompt, "gen": s.overhead_gen}, rounds=s.rounds)
    profile = dict(overhead, name="overhead-profile")
    if s.single_engine:  # the smoke test: every dLLM case in one engine, no AR or step engines
        jobs[0]["cases"] += [*trained_cases, overhead]
        jobs[0].update(profile=profile, inproc=True)
        info["skipped"].update(ar="the smoke profile starts no autoregressive engine",
                               step="the smoke profile starts no step engines")
        return jobs, info

    trained = Path(s.trained_model_dir or REPO_ROOT / "models" / "llada-arith")
    if (trained / "config.json").exists():
        cfg = json.loads((trained / "config.json").read_text())
        models["trained_model"] = {"path": str(trained), **{k: cfg.get(k) for k in (
            "d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size")}}
        jobs.append({"name": "trained", "cases": trained_cases,
                     "engine": engine(trained, 512, max(s.batching), 8192)})
    else:
        info["skipped"]["parallel"] = info["skipped"]["batching"] = (
            f"{trained} not found: train it with `python examples/train_tiny_llada.py --out "
            "models/llada-arith`, then rerun.")
    llama = write_llama_like(ckpt_dir / "llama-bench", BENCH_MODEL, SEEDS["llama"],
                             tokenizer_from=bench)
    models["ar_model"] = {"path": str(llama), "architecture": "LlamaForCausalLM",
                          "shape": shape_dict(BENCH_MODEL), "seed": SEEDS["llama"]}
    ar_cases = [case(f"ar-llama-b{b}", "ar", byte_prompts(b, s.prompt_len, 0), gen0, None,
                     {"batch": b, "gen": gen0, "prompt": s.prompt_len},
                     rounds=s.rounds if b == 1 else 1) for b in s.ar_batches]
    jobs.append({"name": "ar", "cases": ar_cases, "engine": engine(
        llama, longest, max(s.ar_batches), max(widest, 2048), enable_prefix_caching=False)})
    jobs.append({"name": "overhead", "inproc": True, "cases": [overhead], "profile": profile,
                 "engine": engine(tiny, 1024, 16, 2048)})
    if s.overhead_mp:
        jobs.append({"name": "overhead-mp", "engine": engine(tiny, 1024, 16, 2048),
                     "cases": [dict(overhead, name="overhead-dual-1tok-mp",
                                    group="overhead_mp")]})
    if not s.run_step:
        info["skipped"]["step"] = "off in this profile (`--step` runs it)"
        return jobs, info
    step = tc.write_llada_checkpoint(ckpt_dir / "llada-step", STEP_MODEL, seed=SEEDS["step"])
    models["step_model"] = model_info(step, STEP_MODEL, SEEDS["step"])
    step_len = _round_up(s.step_prompt + s.step_gen, 512)
    for label, eager in (("eager", True), ("compiled", False)):
        jobs.append({"name": f"step-{label}", "cases": [
            case(f"step-{mode}-{label}", "step", byte_prompts(1, s.step_prompt, 11), s.step_gen,
                 {"dllm_cache": mode, "dllm_steps": s.step_gen},
                 {"mode": mode, "engine": label, "prompt": s.step_prompt, "gen": s.step_gen},
                 rounds=1 if mode == "none" else 2) for mode in report.MODES],
            "engine": engine(step, step_len, 4, step_len, enforce_eager=eager)})
    return jobs, info


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- running -----------------------------------------------------------------------------------


def run_job_process(s: SimpleNamespace, job: dict, out: Path) -> dict:
    """Run one job in a fresh process; its result, or an error record with the log's tail."""
    for sub in ("jobs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    job_file, log_file = out / "jobs" / f"{job['name']}.json", out / "logs" / f"{job['name']}.log"
    result_file = out / "jobs" / f"{job['name']}.result.json"
    job_file.write_text(json.dumps(job) + "\n")
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(s.kv_space_gib),
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(s.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.getenv("PYTHONPATH")])),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if job.get("inproc") else "1"}
    load_before, t0 = _loadavg(), time.perf_counter()
    with log_file.open("w") as log:
        # A session of its own, so the engine's processes go down with it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.engine_job", str(job_file), str(result_file)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    record = {"process_wall_s": round(time.perf_counter() - t0, 2), "log": str(log_file),
              "loadavg": {"before": load_before, "after": _loadavg()}}
    if rc == 0 and result_file.exists():
        return {**json.loads(result_file.read_text()), **record}
    return {"job": job["name"], "error": f"exit status {rc}",
            "log_tail": log_file.read_text(errors="replace").splitlines()[-40:], **record}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment(s: SimpleNamespace) -> dict[str, Any]:
    """The run's provenance: machine, versions, commit, load."""

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
    return {"cpu": models[0] if models else platform.processor(), "cpus": os.cpu_count(),
            "threads_per_engine": s.threads, "dtype": "float32",
            "python": platform.python_version(),
            "vllm": package("vllm-cpu") or package("vllm"), "torch": package("torch"),
            "git_commit": git("rev-parse", "--short", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": _loadavg()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "out")
    # These override the SIZES entry of their dest.
    p.add_argument("--threads", type=int, help="OpenMP threads per engine (default 1)")
    p.add_argument("--gens", dest="cache_gens", type=int, nargs="+",
                   help="generation lengths of the cache section (first one: the targets)")
    p.add_argument("--none-measured-max", type=int,
                   help="longest generation whose `none` is measured one token per step")
    p.add_argument("--prefix-max-gen", type=int, help="longest generation run with prefix")
    p.add_argument("--trained-model", dest="trained_model_dir", type=os.path.abspath,
                   help="default models/llada-arith")
    p.add_argument("--step", dest="run_step", action="store_const", const=True,
                   help="run the step benchmark in --quick too")
    p.add_argument("--only", nargs="+", help="run only these jobs (cache, trained, ar, "
                   "overhead, overhead-mp, step-eager, step-compiled)")
    args = p.parse_args(argv)

    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = {k: v[PROFILES.index(profile)] for k, v in SIZES.items()}
    s = SimpleNamespace(profile=profile, **sizes)
    vars(s).update({k: v for k, v in vars(args).items() if k in SIZES and v is not None})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0, env = time.perf_counter(), environment(s)
    jobs, info = build_jobs(s, out / "checkpoints")
    results = []
    for job in (j for j in jobs if not args.only or j["name"] in args.only):
        print(f"[bench] job {job['name']}: {len(job['cases'])} cases", flush=True)
        results.append(run_job_process(s, job, out))
        print(f"[bench] job {job['name']}: {results[-1].get('error') or 'ok'} in "
              f"{results[-1]['process_wall_s']:.0f} s", flush=True)
    env.update(loadavg_end=_loadavg(), total_wall_s=round(time.perf_counter() - t0, 1),
               command="python benchmarks/run.py " + " ".join(
                   sys.argv[1:] if argv is None else argv))
    doc = report.assemble({**vars(s), "run_ar": not s.single_engine}, env, info, results)
    report.write_all(doc, out)
    print(report.step_table(doc["step"]))
    print(f"[bench] wrote {out / 'results.json'}, results.md, results.png in "
          f"{env['total_wall_s']:.0f} s", flush=True)
    return doc


if __name__ == "__main__":
    # `kill PID` ends the run like Ctrl-C: the running job's engine is shut down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
