"""Where a denoising step's wall time goes: wall-clock timers around the engine's stages.

Used by the engine-overhead job, which runs vLLM fully in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: front end, engine core and worker in one process, one
thread of Python), so timers patched onto the classes see every stage of every step:

    LLM.generate
      LLMEngine.step                         front end: get_output + process_outputs (detokenize)
        EngineCore.step
          DllmScheduler.schedule             scheduler
          executor.execute_model -> worker   (in-process: a direct call)
            Denoiser.step
              Denoiser._add_request          new request: canvas, slots, generator
              Denoiser._forward              input preparation (ids, positions, slots,
                model.forward                  attention metadata) + the model forward
              Denoiser._block_rows           which hidden rows score the block
              model.compute_logits           LM head over those rows
              Denoiser._sample               propose / score / select + the host transfer
              RequestState.commit            canvas update, next window, newly final tokens
          DllmScheduler.update_from_output   scheduler: append tokens, stop checks, stats

The patches wrap methods only (no engine file is edited) and cost ~1 us per call. Nothing here
is imported by the engine unless a benchmark job asks for it.
"""

from __future__ import annotations

import cProfile
import functools
import io
import pstats
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

_TIMERS: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
_PATCHED = False
_PATH_PREFIX = re.compile(
    r"/\S*?/site-packages/|" + re.escape(str(Path(__file__).resolve().parent.parent)) + "/"
)


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = _TIMERS[name]
            entry[0] += time.perf_counter() - t
            entry[1] += 1

    wrapper.__bench_timed__ = True  # type: ignore[attr-defined]
    return wrapper


def _patch(cls: type, method: str, name: str) -> None:
    fn = getattr(cls, method)
    if not getattr(fn, "__bench_timed__", False):
        setattr(cls, method, _timed(name, fn))


def patch_all() -> None:
    """Wrap the stages listed in the module docstring with timers (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.llm_engine import LLMEngine

    from vllm_dllm.engine.denoiser import Denoiser
    from vllm_dllm.engine.request_state import RequestState
    from vllm_dllm.engine.scheduler import DllmScheduler
    from vllm_dllm.model_executor.models.bidirectional_transformer import DiffusionLM

    _patch(LLMEngine, "step", "frontend_step")
    _patch(EngineCore, "step", "core_step")
    _patch(DllmScheduler, "schedule", "schedule")
    _patch(DllmScheduler, "update_from_output", "update_from_output")
    _patch(Denoiser, "step", "worker_step")
    _patch(Denoiser, "_add_request", "add_request")
    _patch(Denoiser, "_forward", "forward")
    _patch(DiffusionLM, "forward", "model")
    _patch(Denoiser, "_block_rows", "block_rows")
    _patch(DiffusionLM, "compute_logits", "logits")
    _patch(Denoiser, "_sample", "sampler")
    _patch(RequestState, "commit", "commit")
    _PATCHED = True


def reset() -> None:
    _TIMERS.clear()


def snapshot() -> dict[str, tuple[float, int]]:
    return {k: (v[0], int(v[1])) for k, v in _TIMERS.items()}


def breakdown(timers: dict[str, tuple[float, int]], wall: float, steps: int) -> dict[str, Any]:
    """Mean milliseconds per engine step of each stage; the stages add up to the wall time."""

    def total(name: str) -> float:
        return timers.get(name, (0.0, 0))[0]

    stages = {
        "scheduler (schedule + update_from_output)": total("schedule")
        + total("update_from_output"),
        "input preparation (batch + attention metadata)": total("forward") - total("model"),
        "model forward": total("model"),
        "LM head (compute_logits)": total("logits"),
        "sampler (propose/score/select + D2H)": total("sampler"),
        "request bookkeeping (add_request, block rows, commit)": total("add_request")
        + total("block_rows")
        + total("commit"),
        "denoiser step, rest (plans, output object)": total("worker_step")
        - total("add_request")
        - total("forward")
        - total("block_rows")
        - total("logits")
        - total("sampler")
        - total("commit"),
        "executor / engine-core rest": total("core_step")
        - total("schedule")
        - total("update_from_output")
        - total("worker_step"),
        "front end (process_outputs, detokenize, RequestOutput)": total("frontend_step")
        - total("core_step"),
        "LLM.generate rest (add requests, loop)": wall - total("frontend_step"),
    }
    per_step = {k: round(1000 * v / steps, 4) for k, v in stages.items()}
    return {
        "steps": steps,
        "wall_s": round(wall, 4),
        "ms_per_step": round(1000 * wall / steps, 4),
        "stages_ms_per_step": per_step,
        "stage_share": {k: round(v / wall, 4) for k, v in stages.items()},
        "calls": {k: v[1] for k, v in timers.items()},
    }


def profile_steps(llm, spec: dict[str, Any]) -> dict[str, Any]:
    """Time one case stage by stage, then once more under cProfile (top functions)."""
    from benchmarks.engine_job import run_case_once

    case = spec["case"]
    patch_all()
    run_case_once(llm, case)  # warm the patched paths
    best = None
    for _ in range(spec.get("repeats", 3)):  # keep the least disturbed of a few timed runs
        reset()
        run = run_case_once(llm, case)
        if best is None or run["wall_s"] < best[0]["wall_s"]:
            best = (run, snapshot())
    run, timers = best
    steps = timers.get("core_step", (0.0, 0))[1]
    result = breakdown(timers, run["wall_s"], max(steps, 1))
    result["forwards"] = run["forwards"]
    result["output_tokens"] = run["output_tokens"]

    prof = cProfile.Profile()
    prof.enable()
    prof_run = run_case_once(llm, case)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(spec.get("top", 25))
    result["cprofile_wall_s"] = round(prof_run["wall_s"], 4)
    result["cprofile_top_tottime"] = _trim_pstats(buf.getvalue())
    return result


def _trim_pstats(text: str) -> str:
    """pstats output without the header noise, paths shortened to their package."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(_PATH_PREFIX.sub("", ln) for ln in lines[start:])
