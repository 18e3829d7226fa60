"""Shared fixtures: tiny random checkpoints in the released on-disk layouts.

Session-scoped, so each checkpoint is written once per test run. ``tests/`` is a package, so
test modules import the oracle as ``from tests.reference import ...``.
"""

from pathlib import Path

import pytest

from vllm_dllm.testing.checkpoints import write_dream_checkpoint, write_llada_checkpoint

# A scale that makes top-1 probabilities close to 1: every rule commits many tokens per step.
PEAKED_LM_HEAD_SCALE = 30.0


@pytest.fixture(scope="session")
def llada_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA TINY checkpoint, seed 0."""
    return write_llada_checkpoint(tmp_path_factory.mktemp("llada_tiny"), seed=0)


@pytest.fixture(scope="session")
def dream_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dream TINY checkpoint, seed 0."""
    return write_dream_checkpoint(tmp_path_factory.mktemp("dream_tiny"), seed=0)


@pytest.fixture(scope="session")
def llada_peaked_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA TINY checkpoint whose LM head is scaled up: peaked, high-confidence logits."""
    return write_llada_checkpoint(
        tmp_path_factory.mktemp("llada_peaked"), seed=0, lm_head_scale=PEAKED_LM_HEAD_SCALE
    )


@pytest.fixture(scope="session")
def llada_engine(llada_tiny_dir: Path):
    """A real vLLM engine (plugin active, fp32) on the tiny LLaDA checkpoint."""
    from tests.engines import start_engine

    llm = start_engine(llada_tiny_dir)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def dream_engine(dream_tiny_dir: Path):
    """A real vLLM engine (plugin active, fp32) on the tiny Dream checkpoint."""
    from tests.engines import start_engine

    llm = start_engine(dream_tiny_dir)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def llada_compiled_engine(llada_tiny_dir: Path):
    """The LLaDA engine with vLLM's compilation on (`enforce_eager=False`): on CPU the model
    runs through the inductor build, on a GPU through the captured CUDA graphs."""
    from tests.engines import start_engine

    llm = start_engine(llada_tiny_dir, enforce_eager=False)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def dream_compiled_engine(dream_tiny_dir: Path):
    """The Dream engine with vLLM's compilation on (`enforce_eager=False`)."""
    from tests.engines import start_engine

    llm = start_engine(dream_tiny_dir, enforce_eager=False)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def llada_server(llada_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The OpenAI-compatible server (`vllm-dllm serve`) on the tiny LLaDA checkpoint.

    Started with server-wide defaults (block length 8, PrefixCache); the tests that compare with
    the offline engine pass every parameter explicitly.
    """
    from tests.engines import server_args
    from tests.server import Server

    server = Server(
        llada_tiny_dir,
        [
            *server_args("tiny-llada"),
            "--dllm-defaults",
            '{"dllm_block_length": 8, "dllm_cache": "prefix"}',
        ],
        tmp_path_factory.mktemp("server") / "server.log",
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llada_peaked_engine(llada_peaked_dir: Path):
    """An engine on the peaked checkpoint with a KV cache of only a few 128-token blocks."""
    from tests.engines import start_engine

    llm = start_engine(llada_peaked_dir, max_model_len=256, num_gpu_blocks_override=4)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def llada2_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaDA 2.x tiny MoE checkpoint (released layout), seed 0."""
    from vllm_dllm.testing.llada2_checkpoints import write_llada2_checkpoint

    return write_llada2_checkpoint(tmp_path_factory.mktemp("llada2_tiny"), seed=0)


@pytest.fixture(scope="session")
def llada2_engine(llada2_tiny_dir: Path):
    """A real vLLM engine (plugin active, fp32) on the tiny LLaDA 2.x checkpoint."""
    from tests.engines import start_engine

    llm = start_engine(llada2_tiny_dir)
    yield llm
    llm.llm_engine.engine_core.shutdown()
