"""Shared fixtures: tiny random checkpoints in the released on-disk layouts, engines on them.

Checkpoints are session-scoped, written once per test run; engines come from a session pool
that keeps a few alive (`EnginePool`).
``tests/`` is a package, so test modules import the oracle as ``from tests.reference import ...``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Under pytest-xdist the workers share the machine's cores: one worker's torch (its oracles, its
# in-process engines, the servers it starts) running a thread per core beside the other's
# oversubscribes them, and OpenMP's spinning threads then run several times slower. Each worker
# gets its share of the cores (read by torch when it is imported, and by the processes it starts).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault(
        "OMP_NUM_THREADS",
        str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))),
    )

from tests.engines import stop_engine  # noqa: E402 (after the thread count)
from vllm_dllm.testing.block_checkpoints import (
    write_fast_dllm_v2_checkpoint,
    write_sdar_checkpoint,
)
from vllm_dllm.testing.checkpoints import write_dream_checkpoint, write_llada_checkpoint

if TYPE_CHECKING:  # vLLM is imported lazily: a test run that starts no model never loads it
    from vllm_dllm.model_executor.models.bidirectional_transformer import DiffusionLM

# A scale that makes top-1 probabilities close to 1: every rule commits many tokens per step.
PEAKED_LM_HEAD_SCALE = 30.0


#: Files that run on one worker under pytest-xdist (`make test` runs two), because they share
#: engines or servers that would otherwise start on both workers, or because they start
#: multi-rank engines (tensor parallel, Ray) whose memory must not meet another such file's.
SHARED_WORKER = {
    "test_block_engine.py": "block engines",
    "test_block_prefix_cache.py": "block engines",
    "test_block_models.py": "block engines",
    "test_llada2_model.py": "block engines",
    "test_abuse.py": "llada server",
    "test_server.py": "llada server",
    "test_infill.py": "llada server",
    "test_logprobs.py": "llada server",
    "test_structured_server.py": "llada server",
    "test_parallel.py": "multi-rank",
    "test_block_parallel.py": "multi-rank",
    "test_ray.py": "multi-rank",
}

#: Work units (groups, else files) slowest first, from a serial run's per-file times on the
#: 2-core machine (minutes: multi-rank 9.6, compiled 5.9, block engines 5.5, llada server 4.8,
#: block server 4.6, ...; test_shutdown.py 3.6-5.2, timed alone). xdist hands units out in
#: this order, so the long ones start first and the two workers finish together; units not
#: listed take under half a minute and go last.
SLOWEST_FIRST = (
    "multi-rank",
    "test_compiled_step.py",
    "block engines",
    "llada server",
    "test_block_server.py",
    "test_llada_moe.py",
    "test_structured_output.py",
    "test_shutdown.py",
    "test_gpu_benchmark_smoke.py",
    "test_cli.py",
    "test_defaults.py",
    "test_quantization.py",
    "test_readme_server.py",
    "test_engine_oracle.py",
    "test_model_cards.py",
    "test_engine_behaviour.py",
    "test_trained_model_engine.py",
    "test_benchmarks_smoke.py",
    "test_dream_alg.py",
    "test_weight_loading.py",
)


def work_unit(path: str) -> str:
    """The unit of work of a test file under xdist: its shared group, else the file."""
    name = path.rsplit("/", 1)[-1]
    return SHARED_WORKER.get(name, name)


#: Checkpoint families that tests are parametrized over (`[sdar]`, ...).
FAMILY_PARAMS = frozenset({"llada", "dream", "fast_dllm_v2", "sdar", "llada2"})


def engine_key(item: pytest.Item) -> str:
    """The engine a test uses, as far as collection tells: the pooled `{name}_engine` fixture
    it names, else the family it is parametrized with (which picks `{family}_engine`), else ''."""
    named = [n.removesuffix("_engine") for n in item.fixturenames if n.endswith("_engine")]
    callspec = getattr(item, "callspec", None)
    values = callspec.params.values() if callspec is not None else ()
    families = [v for v in values if isinstance(v, str) and v in FAMILY_PARAMS]
    return (named or families or [""])[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker, order the tests by unit of work, slowest first (the scheduler hands
    units out in collection order); within a file, the tests of one engine run together.

    A file's parametrized tests cycle through the families (`test_a[sdar]`, `test_a[llada2]`,
    `test_b[sdar]`, ...); with two pooled engines per worker, three families in turn would
    restart an engine for every test. Files stay whole, so module-scoped fixtures start once.
    """
    if not hasattr(config, "workerinput"):
        return
    rank = {unit: i for i, unit in enumerate(SLOWEST_FIRST)}
    files: dict[str, int] = {}
    engines: dict[tuple[str, str], int] = {}
    keys = {}
    for i, item in enumerate(items):
        path = item.nodeid.split("::")[0]
        file = files.setdefault(path, len(files))
        engine = engines.setdefault((path, engine_key(item)), len(engines))
        keys[item.nodeid] = (rank.get(work_unit(path), len(rank)), file, engine, i)
    items.sort(key=lambda item: keys[item.nodeid])


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduler with `work_unit` as the scope: each unit runs on one worker, so
    its module-scoped engines and servers start once, in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid.split("::")[0])

    config.option.loadscopereorder = False
    return WorkUnitScheduling(config, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands what its comparisons relied on to the controller."""
    from tests.tolerances import OBSERVED

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["dllm_observed"] = dict(OBSERVED)


def pytest_testnodedown(node: object, error: object) -> None:
    """The controller keeps the worst of its workers' observations (`pytest_sessionfinish`)."""
    from tests.tolerances import OBSERVED, merge_observed

    merge_observed(OBSERVED, getattr(node, "workeroutput", {}).get("dllm_observed", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the fp32 comparisons relied on (tests/tolerances.py), so that a run on another CPU
    shows how close it came: the largest engine-against-oracle difference and the smallest
    decision margin of an oracle run compared token for token, in rounding bounds."""
    from tests.tolerances import DECISION_SAFETY, OBSERVED, SAFETY

    forward, where_forward = OBSERVED["forward"]
    decision, where_decision = OBSERVED["decision"]
    if where_forward == where_decision == "none":
        return
    terminalreporter.write_sep("-", "fp32 rounding: what the comparisons relied on")
    if where_forward != "none":
        terminalreporter.write_line(
            f"largest fp32 forward difference: {forward:.2f} rounding bounds "
            f"(tolerance {SAFETY}) in {where_forward}"
        )
    if where_decision != "none":
        terminalreporter.write_line(
            f"smallest decision margin: {decision:.2f} rounding bounds "
            f"(required {DECISION_SAFETY}) in {where_decision}"
        )


@pytest.fixture(scope="session")
def llada_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA TINY checkpoint, seed 0."""
    return write_llada_checkpoint(tmp_path_factory.mktemp("llada_tiny"), seed=0)


@pytest.fixture(scope="session")
def dream_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dream TINY checkpoint, seed 0."""
    return write_dream_checkpoint(tmp_path_factory.mktemp("dream_tiny"), seed=0)


@pytest.fixture(scope="session")
def fast_dllm_v2_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fast-dLLM v2 tiny checkpoint, seed 0, with the 1.5B release's tied LM head."""
    return write_fast_dllm_v2_checkpoint(tmp_path_factory.mktemp("fast_dllm_v2_tiny"), seed=0)


@pytest.fixture(scope="session")
def sdar_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDAR tiny checkpoint, seed 0: untied LM head, head_dim not hidden / heads."""
    return write_sdar_checkpoint(tmp_path_factory.mktemp("sdar_tiny"), seed=0)


@pytest.fixture(scope="session")
def llada_peaked_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA TINY checkpoint whose LM head is scaled up: peaked, high-confidence logits."""
    return write_llada_checkpoint(
        tmp_path_factory.mktemp("llada_peaked"), seed=0, lm_head_scale=PEAKED_LM_HEAD_SCALE
    )


@pytest.fixture(scope="session")
def llada_server(llada_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The OpenAI-compatible server (`vllm-dllm serve`) on the tiny LLaDA checkpoint.

    Started with server-wide defaults (block length 8, PrefixCache); the tests that compare with
    the offline engine pass every parameter explicitly. Its structured output has no free
    whitespace in JSON (vLLM's `disable_any_whitespace`): a random model would pad with it.
    """
    from tests.engines import NO_FREE_WHITESPACE, server_args
    from tests.server import Server

    server = Server(
        llada_tiny_dir,
        [
            *server_args("tiny-llada"),
            "--dllm-defaults",
            '{"dllm_block_length": 8, "dllm_cache": "prefix"}',
            "--structured-outputs-config",
            json.dumps(NO_FREE_WHITESPACE),
        ],
        tmp_path_factory.mktemp("server") / "server.log",
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(llada_server):  # noqa: ANN201  (openai.OpenAI; the import stays lazy)
    """The official `openai` client of the LLaDA server (no retries: a test sees every error)."""
    import openai

    return openai.OpenAI(base_url=f"{llada_server.url}/v1", api_key="unused", max_retries=0)


#: Builds the plugin's model class for a checkpoint directory (`build_model`).
BuildModel = Callable[[Path], "DiffusionLM"]


@pytest.fixture(scope="module")
def build_model() -> Iterator[BuildModel]:
    """Builds the plugin's model for a checkpoint directory, as vLLM's loader would.

    In this process, with vLLM's own config and layers (a one-rank gloo group stands in for
    tensor parallelism); no weights are loaded. Module-scoped: the process-wide distributed
    state lives only while the module that builds models runs.
    """
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        cleanup_dist_env_and_memory,
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import get_model_architecture

    from vllm_dllm import register

    register()
    initialised = False

    def build(checkpoint: Path) -> DiffusionLM:
        nonlocal initialised
        config = EngineArgs(
            model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=512
        ).create_engine_config()
        with set_current_vllm_config(config):
            if not initialised:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                init_distributed_environment(
                    world_size=1,
                    rank=0,
                    local_rank=0,
                    distributed_init_method=f"tcp://127.0.0.1:{port}",
                    backend="gloo",
                )
                ensure_model_parallel_initialized(1, 1)
                initialised = True
            model_cls, _ = get_model_architecture(config.model_config)
            return model_cls(vllm_config=config)

    yield build
    if initialised:
        cleanup_dist_env_and_memory()

@pytest.fixture(scope="session")
def llada2_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA 2.x tiny MoE checkpoint (released layout), seed 0."""
    from vllm_dllm.testing.llada2_checkpoints import write_llada2_checkpoint

    return write_llada2_checkpoint(tmp_path_factory.mktemp("llada2_tiny"), seed=0)


@pytest.fixture(scope="session")
def llada_moe_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA-MoE tiny checkpoint (released layout), seed 0, logits scaled 3x: confident enough
    that the threshold and factor rules commit several tokens in some steps."""
    from vllm_dllm.testing.llada_moe_checkpoints import write_llada_moe_checkpoint

    return write_llada_moe_checkpoint(
        tmp_path_factory.mktemp("llada_moe_tiny"), seed=0, logit_scale=3.0
    )


@pytest.fixture(scope="session")
def llada_moe_variant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA-MoE tiny checkpoint with the release's optional parts: an expert bias and a
    shared expert."""
    from vllm_dllm.testing.llada_moe_checkpoints import MoeShape, write_llada_moe_checkpoint

    shape = MoeShape(shared_expert_intermediate_size=96, expert_bias=True)
    return write_llada_moe_checkpoint(
        tmp_path_factory.mktemp("llada_moe_variant"), shape, seed=1, logit_scale=3.0
    )


class EnginePool:
    """The session's offline engines, at most `capacity` alive at once.

    An engine holds about a gigabyte (its KV cache); with every family's engines alive the
    suite's later tests (Ray, TP=2) ran out of memory on 24 GB machines. Tests use engines in
    runs (one file after another), so the least recently used one is shut down when another is
    needed, and started again if a later test asks for it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.engines: dict[str, object] = {}

    def get(self, name: str, start: Callable[[], object]) -> object:
        if name in self.engines:
            self.engines[name] = self.engines.pop(name)  # most recently used last
            return self.engines[name]
        while len(self.engines) >= self.capacity:
            oldest = next(iter(self.engines))
            stop_engine(self.engines.pop(oldest))
        self.engines[name] = start()
        return self.engines[name]

    def engine(self, name: str, checkpoint: Path, **options: object):
        """The engine `name` on `checkpoint` (`tests.engines.start_engine` options)."""
        from tests.engines import start_engine

        return self.get(name, lambda: start_engine(checkpoint, **options))

    def close(self) -> None:
        for llm in self.engines.values():
            stop_engine(llm)
        self.engines.clear()


@pytest.fixture(scope="session")
def engine_pool() -> Iterator[EnginePool]:
    # Under xdist two workers hold pools side by side: three engines each (a file's tests may
    # use an eager and a compiled engine of one family beside the other family's).
    pool = EnginePool(capacity=3 if os.environ.get("PYTEST_XDIST_WORKER") else 4)
    yield pool
    pool.close()


def pooled_engine(name: str, checkpoint_fixture: str, **options: object):
    """A fixture `{name}_engine`: the pool's real vLLM engine `name` (plugin active, fp32) on
    the checkpoint of `checkpoint_fixture`, started with `tests.engines.start_engine`'s
    `options`."""

    @pytest.fixture(name=f"{name}_engine")
    def engine(engine_pool: EnginePool, request: pytest.FixtureRequest):
        return engine_pool.engine(name, request.getfixturevalue(checkpoint_fixture), **options)

    return engine


llada_engine = pooled_engine("llada", "llada_tiny_dir")
dream_engine = pooled_engine("dream", "dream_tiny_dir")
fast_dllm_v2_engine = pooled_engine("fast_dllm_v2", "fast_dllm_v2_tiny_dir")
sdar_engine = pooled_engine("sdar", "sdar_tiny_dir")
# Fewer running requests than the attention sequences of one long prompt's block prefill.
sdar_few_seqs_engine = pooled_engine("sdar_few_seqs", "sdar_tiny_dir", max_num_seqs=8)
llada2_engine = pooled_engine("llada2", "llada2_tiny_dir")
llada_moe_engine = pooled_engine("llada_moe", "llada_moe_tiny_dir")
llada_moe_variant_engine = pooled_engine("llada_moe_variant", "llada_moe_variant_dir")
# vLLM's compilation on: on CPU the model runs through the inductor build, on a GPU through the
# captured CUDA graphs.
llada_compiled_engine = pooled_engine("llada_compiled", "llada_tiny_dir", enforce_eager=False)
dream_compiled_engine = pooled_engine("dream_compiled", "dream_tiny_dir", enforce_eager=False)
# The peaked checkpoint with a KV cache of only a few 128-token blocks; vLLM's priority
# scheduling (requests without a priority are served first come, first served, as by default).
llada_peaked_engine = pooled_engine(
    "llada_peaked", "llada_peaked_dir", max_model_len=256, num_gpu_blocks_override=4,
    scheduling_policy="priority",
)
