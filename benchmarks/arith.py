"""Held-out problems for the trained ``models/llada-arith`` model, made as its training script does.

The problems, their prompt ids and the expected answer ids come from
``examples/train_tiny_llada.py`` itself (``heldout_set`` with the training run's default task mix
and held-out seed, ``example_ids`` in completion style ``[BOS] prompt``), so the benchmark scores
exactly the held-out set the training script evaluates, never a training problem.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import re
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

from benchmarks.checkpoints import REPO_ROOT

TRAIN_SCRIPT = REPO_ROOT / "examples" / "train_tiny_llada.py"


@cache
def train_module() -> ModuleType | None:
    """The training script as a module (None when the file is missing)."""
    if not TRAIN_SCRIPT.exists():
        return None
    spec = importlib.util.spec_from_file_location("_bench_train_tiny_llada", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def heldout_problems(n: int, model_dir: Path | None = None) -> dict:
    """``n`` held-out problems: prompt ids, expected answer ids, end ids, gen length, tasks.

    The task settings are the training run's: the ``TrainConfig`` saved beside the model
    (any JSON file there holding its fields, e.g. the script's ``--metrics-json`` output) where
    present, else the script's defaults, which are documented to be what shipped.
    """
    m = train_module()
    if m is None:
        raise FileNotFoundError(f"{TRAIN_SCRIPT} is missing")
    cfg, source = _train_config(m, model_dir)
    eval_seed = _default_of(m, "--eval-seed", 12345)
    # heldout_set(n, seed, cfg) in current versions, heldout_set(n, seed, weights) before.
    third = list(inspect.signature(m.heldout_set).parameters)[2]
    problems = m.heldout_set(n, eval_seed, cfg.weights if third == "weights" else cfg)
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
        "eval_seed": eval_seed,
        "train_config_source": source,
    }


def _train_config(m: ModuleType, model_dir: Path | None) -> tuple[object, str]:
    """The model's saved ``TrainConfig`` (unknown keys dropped) and its file, else defaults."""
    fields = {f.name for f in dataclasses.fields(m.TrainConfig)}
    skip = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "bench_stamp.json"}
    files = sorted(model_dir.glob("*.json")) if model_dir is not None else []
    for f in files:
        if f.name in skip:
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for candidate in (data.get("train"), data.get("train_config"), data):
            if isinstance(candidate, dict) and "gen_len" in candidate:
                return m.TrainConfig(**{k: v for k, v in candidate.items() if k in fields}), f.name
    return m.TrainConfig(), "script defaults"


def _default_of(module: ModuleType, flag: str, fallback: int) -> int:
    """The default of one of the script's integer CLI flags, read from its source."""
    source = Path(module.__file__ or TRAIN_SCRIPT).read_text()
    found = re.search(rf'"{re.escape(flag)}",\s*type=int,\s*default=(\d+)', source)
    return int(found.group(1)) if found else fallback
