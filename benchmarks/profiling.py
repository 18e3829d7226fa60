"""Where a denoising step's wall time goes, measured from outside the engine.

The overhead job runs vLLM in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the model
the worker runs is reachable through vLLM's public ``LLM.apply_model``. Forward hooks on the
model and on its logits processor time the model forward and the LM head; the rest of each step
(scheduler, input preparation, sampler, request bookkeeping, front end) is the wall time of
``LLM.generate`` minus those two. A ``torch.profiler`` pass then lists the operators that take
the time. Nothing here touches an engine method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Stage names as they appear in results.json.
MODEL, LM_HEAD = "model forward", "LM head (compute_logits)"
REST = "rest of the step (scheduler, inputs, sampler, bookkeeping, front end)"


class _ModuleTimer:
    """Wall-clock seconds spent inside one module's forward, summed over calls."""

    def __init__(self, module: nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit)

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start


def profile_steps(llm, run: Callable[[], dict[str, Any]], repeats: int = 3,
                  top: int = 25) -> dict[str, Any]:
    """Split the best of ``repeats`` runs of ``run`` (one pass over a batch-1 case) by stage."""
    timers: dict[str, _ModuleTimer] = {}

    def attach(model: nn.Module) -> None:
        timers[MODEL] = _ModuleTimer(model)
        timers[LM_HEAD] = _ModuleTimer(model.logits_processor)

    llm.apply_model(attach)
    best: tuple[dict[str, Any], dict[str, float]] | None = None
    for _ in range(repeats):
        before = {k: t.total for k, t in timers.items()}
        result = run()
        spent = {k: t.total - before[k] for k, t in timers.items()}
        if best is None or result["wall_s"] < best[0]["wall_s"]:
            best = (result, spent)
    assert best is not None
    result, spent = best
    steps, wall = max(result["forwards"], 1), result["wall_s"]
    stages = {**spent, REST: wall - sum(spent.values())}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {
        "steps": steps,
        "wall_s": round(wall, 4),
        "ms_per_step": round(1000 * wall / steps, 4),
        "stages_ms_per_step": {k: round(1000 * v / steps, 4) for k, v in stages.items()},
        "stage_share": {k: round(v / wall, 4) for k, v in stages.items()},
        "forwards": result["forwards"],
        "output_tokens": result["output_tokens"],
        "torch_profiler_top_ops": prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48
        ),
    }
