"""Shared real vLLM engines for the tests (one per checkpoint, started once per session).

A vLLM engine takes 20-30 s to start on 2 cores, so the session fixtures in `conftest.py` build
each one once; tests that share an engine never depend on its earlier traffic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# vLLM's CPU platform reads these at start-up; tests run on 2-core machines. An explicit KV-cache
# size also skips vLLM's CPU start-up check that 92% of the machine's memory be free, which fails
# while the session's other engines are alive.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Lets tests send functions to the worker (`LLM.collective_rpc(tests.worker_probes...)`) to
# inspect the process where the denoising step runs; vLLM refuses pickled callables otherwise.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

MAX_MODEL_LEN = 512


def start_engine(checkpoint: Path, **kwargs):
    """A real `vllm.LLM` on `checkpoint` in fp32 (exact comparisons with the oracle)."""
    from vllm import LLM

    options = dict(
        model=str(checkpoint),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=32,
        seed=0,
    )
    options.update(kwargs)
    return LLM(**options)


def server_args(served_model_name: str) -> list[str]:
    """`vllm serve` flags for the settings of `start_engine` that decide tokens (fp32, eager,
    the same context length and seed), so a server answers like the offline engines."""
    return [
        "--served-model-name",
        served_model_name,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--seed",
        "0",
    ]


def end_token_ids(checkpoint: Path) -> list[int]:
    """The ids vLLM stops at by default: the config's EOS plus generation_config's eos list."""
    ids = {json.loads((checkpoint / "config.json").read_text())["eos_token_id"]}
    generation = checkpoint / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return sorted(ids)
