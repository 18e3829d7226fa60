"""Diffusion defaults carried by the checkpoint (`generation_config.json`), under the server's.

No engine starts here: vLLM builds its configuration (`EngineArgs.create_engine_config`), which
is where the plugin reads and checks the defaults, and the CLI refuses before any engine exists.
The served bundled model answering with its own defaults is checked in `test_readme_server.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.scripts import load_example
from tests.test_cli import engine_config, plugin_log, refusal, serve_refusal
from vllm_dllm.config import parse_dllm_params
from vllm_dllm.defaults import (
    checkpoint_defaults,
    layered,
    request_defaults,
    server_defaults,
)
from vllm_dllm.families import BIDIRECTIONAL, sdar

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "llada-arith"


def with_generation_config(source: Path, destination: Path, values: dict) -> Path:
    """A copy of the checkpoint `source` whose generation_config.json also holds `values`."""
    shutil.copytree(source, destination)
    path = destination / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, **values}))
    return destination


@pytest.fixture
def server_default(monkeypatch):
    """Set `VLLM_DLLM_DEFAULTS` for one test (later engines never see it)."""

    def set_defaults(values: dict) -> None:
        monkeypatch.setenv("VLLM_DLLM_DEFAULTS", json.dumps(values))
        server_defaults.cache_clear()

    yield set_defaults
    monkeypatch.delenv("VLLM_DLLM_DEFAULTS", raising=False)
    server_defaults.cache_clear()


def test_a_higher_level_s_rule_replaces_a_lower_level_s_for_llada_and_dream() -> None:
    checkpoint = {"dllm_block_length": 8, "dllm_threshold": 0.9}
    assert layered(checkpoint, {"dllm_steps": 16}, BIDIRECTIONAL) == {
        "dllm_block_length": 8, "dllm_steps": 16,
    }  # fmt: skip
    assert layered(checkpoint, {"dllm_cache": "dual"}, BIDIRECTIONAL) == {
        **checkpoint, "dllm_cache": "dual",
    }  # fmt: skip
    # Block diffusion: the threshold and the steps form one rule, merged key by key.
    assert layered({"dllm_threshold": 0.9}, {"dllm_steps": 4}, sdar(4)) == {
        "dllm_threshold": 0.9, "dllm_steps": 4,
    }  # fmt: skip


def test_the_bundled_model_carries_the_defaults_it_was_trained_for() -> None:
    """The shipped files hold what the training script writes, and vLLM's configuration of the
    model hands them to every request (`--generation-config vllm` ignores them, as it ignores
    the file's sampling defaults; `--override-generation-config` replaces keys)."""
    trained = load_example("train_tiny_llada").TRAINED_DEFAULTS
    config = engine_config(MODEL_DIR).model_config
    assert checkpoint_defaults(config, BIDIRECTIONAL) == trained
    plain = parse_dllm_params(None, 16, request_defaults(config, BIDIRECTIONAL))
    assert (plain.block_length, plain.cache, plain.rule, plain.threshold) == (8, "dual",
                                                                              "threshold", 0.9)
    assert checkpoint_defaults(
        engine_config(MODEL_DIR, generation_config="vllm").model_config, BIDIRECTIONAL
    ) == {}
    overridden = engine_config(MODEL_DIR, override_generation_config={"dllm_steps": 16})
    assert checkpoint_defaults(overridden.model_config, BIDIRECTIONAL) == {
        "dllm_block_length": 8, "dllm_cache": "dual", "dllm_steps": 16,
    }  # fmt: skip


def test_request_over_server_over_checkpoint_over_plugin(server_default) -> None:
    config = engine_config(MODEL_DIR).model_config
    server_default({"dllm_threshold": 0.5})
    defaults = request_defaults(config, BIDIRECTIONAL)
    served = parse_dllm_params(None, 16, defaults)
    assert (served.block_length, served.cache, served.threshold) == (8, "dual", 0.5)
    own = parse_dllm_params({"dllm_factor": 1.0, "dllm_cache": "none"}, 16, defaults)
    assert (own.block_length, own.cache, own.rule, own.factor) == (8, "none", "factor", 1.0)
    # The plugin's own defaults where no level sets a key.
    assert parse_dllm_params(None, 64, {}).block_length == 32


def test_a_marked_derived_file_keeps_its_keys(llada_tiny_dir, tmp_path) -> None:
    """transformers drops unknown keys from a generation config marked `_from_model_config`
    (as many releases' are); the plugin reads the file itself, so its keys count."""
    checkpoint = with_generation_config(
        llada_tiny_dir, tmp_path / "ckpt", {"_from_model_config": True, "dllm_block_length": 4}
    )
    config = engine_config(checkpoint).model_config
    assert checkpoint_defaults(config, BIDIRECTIONAL) == {"dllm_block_length": 4}


def test_checkpoint_defaults_that_do_not_suit_the_family_are_refused(sdar_tiny_dir, tmp_path):
    checkpoint = with_generation_config(sdar_tiny_dir, tmp_path / "ckpt", {"dllm_cache": "dual"})
    assert refusal(checkpoint) == (
        f'{checkpoint}/generation_config.json={{"dllm_cache": "dual"}}: dllm_cache does not '
        "apply to SDAR models (they accept dllm_block_length, dllm_threshold, dllm_steps, "
        "dllm_remasking, dllm_eb_threshold)"
    )


def test_an_override_that_does_not_suit_the_model_is_one_line_on_the_command_line(
    llada_tiny_dir,
) -> None:
    assert serve_refusal(
        llada_tiny_dir, "--override-generation-config", '{"dllm_threshold": 2}'
    ) == [
        "vllm-dllm serve: error: --override-generation-config '{\"dllm_threshold\": 2}': "
        "dllm_threshold must be in (0, 1], got 2.0"
    ]


def test_start_up_line_says_where_each_default_comes_from(server_default, caplog) -> None:
    from vllm_dllm.logger import ROOT

    server_default({"dllm_threshold": 0.7})
    with plugin_log(caplog):
        engine_config(MODEL_DIR)
    (line,) = [r.getMessage() for r in caplog.records
               if r.name.startswith(ROOT) and r.levelno == logging.INFO]  # fmt: skip
    assert line.endswith(
        "request defaults: dllm_block_length=8 (generation_config.json), dllm_cache=dual "
        "(generation_config.json), dllm_threshold=0.7 (--dllm-defaults)"
    ), line
