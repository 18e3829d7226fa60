"""Smoke test of benchmarks/gpu.py, the GPU speed table: its tiny profile end to end on CPU.

The script runs as the GPU machine runs it (a subprocess, the random model loaded by
``load_format="dummy"``, the worker-side timers sent by reference), its engines in its own
process; the numbers are meaningless at this size, the test checks that every section is
measured and written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu
from tests.engines import IN_PROCESS_ENV

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_profile_measures_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    # Its engines run in the script's process (vLLM's single-process engine core, see
    # `tests.engines.start_engine`): on CPU each multi-process start imports vLLM twice more.
    env = {**os.environ, **IN_PROCESS_ENV}
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--shape", "tiny", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["sections"]) == list(gpu.SECTIONS)
    assert doc["provenance"]["device"] == "cpu" and doc["settings"]["shape"] == "tiny"
    for name, section in doc["sections"].items():
        assert section["rows"] and section["wall_s"] >= 0, (name, section["text"])
        if name == "prefill":  # a difference of two walls: its sign is noise at this size
            continue
        for row in section["rows"]:
            values = [v for v in row.values() if not isinstance(v, str)]
            # On CPU the floor has no CUDA-graph figure; every other number is measured.
            assert all(v > 0 for v in values if v is not None), (name, row)
            assert None not in values or row["forward"] == "bare forward, CUDA graph", row
    cache = {r["cache"]: r["forwards"] for r in doc["sections"]["cache"]["rows"]}
    assert cache == dict.fromkeys(("none", "prefix", "dual"), doc["settings"]["gen"])
    batches = [r["batch"] for r in doc["sections"]["batching"]["rows"]]
    assert batches == list(gpu.BATCHES)
    stages = {r["stage"]: r["ms"] for r in doc["sections"]["overhead"]["rows"]}
    assert sum(v for k, v in stages.items() if k != "step") == pytest.approx(stages["step"],
                                                                             abs=1e-3)
    prefill = {r["model"]: r for r in doc["sections"]["prefill"]["rows"]}
    assert list(prefill) == ["sdar", "llada2"], doc["sections"]["prefill"]
    for row in prefill.values():
        assert row["windows"] == row["prompt"] // row["block"] and row["prompt"] == 256
        assert row["wall_s"] > 0 and row["short_wall_s"] > 0 and row["forwards"] > 0
    md = (out / "results.md").read_text()
    for name in gpu.SECTIONS:
        assert f"## {name} (" in md
    assert sum(line.startswith("|---|") for line in md.splitlines()) == len(gpu.SECTIONS)
    assert "graphs: not on CPU" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
