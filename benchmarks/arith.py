"""Held-out problems for the trained ``models/llada-arith`` model, made as its training script does.

The problems, their prompt ids and the expected answer ids come from
``examples/train_tiny_llada.py`` itself (``heldout_set`` with the shipped run's task mix and the
held-out seed, ``example_ids`` in completion style ``[BOS] prompt``), so the benchmark scores
exactly the held-out set that the training script and ``examples/eval_llada_arith.py`` score,
never a training problem.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from types import ModuleType

from benchmarks.checkpoints import REPO_ROOT

TRAIN_SCRIPT = REPO_ROOT / "examples" / "train_tiny_llada.py"


@cache
def train_module() -> ModuleType:
    """The training script as a module (it needs torch only)."""
    spec = importlib.util.spec_from_file_location("_bench_train_tiny_llada", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def heldout_problems(n: int) -> dict:
    """``n`` held-out problems: prompt ids, expected answer ids, end ids, gen length, tasks."""
    m = train_module()
    cfg = m.TrainConfig()
    problems = m.heldout_set(n, m.EVAL_SEED, cfg)
    prompts, expected = [], []
    for ex in problems:
        prompt, _ = m.example_ids(ex, cfg.gen_len)
        prompts.append(prompt)
        expected.append(m.encode_text(ex.answer))
    return {
        "prompts": prompts,
        "expected": expected,
        "tasks": [ex.task for ex in problems],
        "end_ids": list(m.END_IDS),
        "gen_len": cfg.gen_len,
        "eval_seed": m.EVAL_SEED,
    }
