"""Shared real vLLM engines for the tests (one per checkpoint, started once per session).

A vLLM engine takes 20-30 s to start on 2 cores, so the session fixtures in `conftest.py` build
each one once; tests that share an engine never depend on its earlier traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
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
#: vLLM's single-process engine: the engine core in the process that starts the engine, and with
#: one rank its worker too (see `start_engine`).
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
#: vLLM's structured-output options for the tests: JSON without free whitespace, with which a
#: random model would pad a constrained answer forever.
NO_FREE_WHITESPACE = {"backend": "xgrammar", "disable_any_whitespace": True}


def start_engine(checkpoint: Path, *, in_process: bool = True, **kwargs):
    """A real `vllm.LLM` on `checkpoint` in fp32 (exact comparisons with the oracle).

    `in_process` runs vLLM's engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
    as vLLM's own tests do), and with one rank its worker too (vLLM's single-process executor;
    tensor parallelism keeps a process per rank). On CPU the default start spawns an
    engine-core process and a worker process, each of which imports vLLM again: about 40 s on
    2 cores, against under 10 s in process. The scheduler, worker, model and step are the same
    objects either way; the servers, the Ray engines and the multi-rank workers keep processes
    of their own, and the server-against-offline comparisons check that the hand-over between
    processes changes nothing.
    """
    import gc

    from vllm import LLM

    gc.collect()  # the memory of engines stopped before (`stop_engine`)
    options = dict(
        model=str(checkpoint),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=32,
        seed=0,
    )
    options.update(kwargs)
    if not in_process:
        with _environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}):
            return LLM(**options)
    import vllm.envs

    try:
        with _environment(IN_PROCESS_ENV):
            return LLM(**options)
    finally:
        # The in-process engine core froze vLLM's view of the environment
        # (`enable_envs_cache`); later engines in this process read theirs afresh.
        vllm.envs.disable_envs_cache()
        # vLLM's CPU worker names its shared-memory group in the environment, read once at its
        # start; the servers and commands started later would inherit a variable vLLM itself
        # reports as unknown.
        os.environ.pop("VLLM_DIST_IDENT", None)


def dllm_score(llm, canvas: list[int], windows: list[tuple[int, ...]]) -> list:
    """The worker diagnostic `dllm_score` on every rank (`collective_rpc`'s list).

    It runs only on an idle engine. An engine in this process hands the requests that finished
    to its worker at the next step, which `LLM.generate` does not take (vLLM's engine-core
    process takes it by itself), so that step is taken here first.
    """
    engine_core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # in process only
    if engine_core is not None and engine_core.scheduler.has_finished_requests():
        llm.llm_engine.step()
    return llm.collective_rpc("dllm_score", args=(canvas, windows))


def stop_engine(llm) -> None:
    """Shuts `llm` down. An engine in this process holds its model and KV cache until the
    garbage collector frees them, once nothing refers to `llm`: vLLM froze its start-up heap out
    of the collector's reach (`gc.freeze`), so that is undone here, and `start_engine` collects
    before it starts the next engine."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.unfreeze()


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


class CanvasRecorder:
    """Worker extension (test only): a digest of every in-flight canvas after every step."""

    def dllm_test_record_canvases(self) -> None:
        import torch

        log: dict[str, list[int]] = {}
        self._dllm_test_canvas_log = log
        plugin_step = type(self).execute_model  # the plugin worker's denoising step

        def execute_model(scheduler_output):
            output = plugin_step(self, scheduler_output)
            canvases = self.denoiser.canvases
            for req_id, state in self.denoiser.states.items():
                positions = torch.arange(state.canvas_len, device=canvases.tokens.device)
                slot = self.denoiser.slots[req_id]
                canvas = canvases.tokens[canvases.index(slot, positions)]
                log.setdefault(req_id, []).append(zlib.crc32(canvas.cpu().numpy().tobytes()))
            return output

        self.execute_model = execute_model

    def dllm_test_canvas_log(self) -> dict[str, list[int]]:
        return self._dllm_test_canvas_log


# Set while a TP engine starts (its processes read them when they start; this one keeps its
# own). OMP_NUM_THREADS: vLLM's CPU worker with VLLM_CPU_OMP_THREADS_BIND=nobind leaves torch at
# one thread per core, so two ranks on two cores would run four spinning threads (steps about 4x
# slower here). The execute-model timeout turns a rank divergence into an error, not a hang.
TP_ENGINE_ENV = {"OMP_NUM_THREADS": "1", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "120"}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_tp2_engine(checkpoint: Path, **kwargs):
    """`start_engine` with tensor parallelism 2 on CPU (multiprocess backend: a process per
    rank; the engine core in this process), its workers extended with `CanvasRecorder`, under
    `TP_ENGINE_ENV`. Start it after the previous TP engine is shut down: two ranks already fill
    the two cores."""
    with _environment(TP_ENGINE_ENV):
        return start_engine(
            checkpoint,
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            worker_extension_cls=f"{__name__}.CanvasRecorder",
            **kwargs,
        )
