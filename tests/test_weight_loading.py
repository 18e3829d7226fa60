"""The real model classes: the weight loader names a stray or missing checkpoint tensor, and the
model's sizes come from the config classes, also for configs that omit optional keys.

The models are built in this process (`build_model` in conftest.py) with vLLM's own config and
layers, so the names and shapes checked are the ones the engine uses.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_dllm.model_executor.models.bidirectional_transformer import DiffusionLM


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_misnamed_tensor_is_named(family, request, build_model):
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    model = build_model(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    assert set(tensors) == model.expected_checkpoint_names()
    # Every checkpoint tensor maps onto a parameter: the whole checkpoint loads.
    assert model.load_weights(tensors.items()) == {name for name, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.bogus\.weight'"):
        model.load_weights([("model.bogus.weight", torch.zeros(1))])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_missing_tensors_are_named(family, request, build_model):
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    model = build_model(checkpoint)
    expected = sorted(model.expected_checkpoint_names())
    with pytest.raises(ValueError) as err:
        model.load_weights([])
    message = str(err.value)
    assert f"missing {len(expected)} tensor(s)" in message
    assert all(name in message for name in expected[:5])


def test_stray_bias_is_named(llada_tiny_dir, build_model):
    """vLLM's loader skips unexpected `.bias` tensors (for GPTQ); a LLaDA without q/k/v biases
    must not silently drop a checkpoint's bias."""
    model = build_model(llada_tiny_dir)
    bias = "model.transformer.blocks.0.q_proj.bias"
    with pytest.raises(ValueError, match=rf"unexpected tensor '{bias}'"):
        model.load_weights([(bias, torch.zeros(128))])


def test_one_missing_shard_is_named(dream_tiny_dir, build_model):
    """A checkpoint without one k_proj: the fused qkv parameter still gets its q and v shards,
    so only a check by checkpoint name sees the gap."""
    model = build_model(dream_tiny_dir)
    tensors = load_file(dream_tiny_dir / "model.safetensors")
    gone = "model.layers.1.self_attn.k_proj.weight"
    del tensors[gone]
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\): {gone}$"):
        model.load_weights(tensors.items())


def _edited_checkpoint(source: Path, out: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _kv_heads(model: DiffusionLM) -> int:
    return model.model.layers[0].self_attn.num_kv_heads


def _rope_theta(model: DiffusionLM) -> float:
    return model.model.layers[0].self_attn.rotary_emb.base


def test_llada_multi_query_attention_builds_one_kv_head(llada_tiny_dir, tmp_path, build_model):
    def mqa(config: dict) -> None:
        del config["n_kv_heads"]
        config["multi_query_attention"] = True

    model = build_model(_edited_checkpoint(llada_tiny_dir, tmp_path / "mqa", mqa))
    attn = model.model.layers[0].self_attn
    assert _kv_heads(model) == 1
    assert attn.qkv_proj.weight.shape[0] == attn.q_size + 2 * attn.head_dim


def test_llada_optional_keys_take_upstream_defaults(llada_tiny_dir, tmp_path, build_model):
    """No rope_theta, n_kv_heads or mlp_hidden_size, and a null embedding_size: upstream's
    ModelConfig defaults (theta 10000, one KV head per head, mlp_ratio * d_model) and its
    `embedding_size or vocab_size` rule."""

    def omit(config: dict) -> None:
        for key in ("rope_theta", "n_kv_heads", "mlp_hidden_size"):
            del config[key]
        config["multi_query_attention"] = None
        config["embedding_size"] = None

    model = build_model(_edited_checkpoint(llada_tiny_dir, tmp_path / "omit", omit))
    hidden, heads = model.shape.hidden_size, model.shape.num_heads
    assert _rope_theta(model) == 10000.0
    assert _kv_heads(model) == heads
    assert model.model.layers[0].mlp.down_proj.input_size == 4 * hidden
    assert (
        model.lm_head.org_vocab_size
        == json.loads((llada_tiny_dir / "config.json").read_text())["vocab_size"]
    )


def test_dream_optional_keys_take_upstream_defaults(dream_tiny_dir, tmp_path, build_model):
    """No rope_theta and no num_key_value_heads: theta 10000 and plain multi-head attention,
    as upstream's configuration_dream.py has it."""

    def omit(config: dict) -> None:
        del config["rope_theta"]
        config["num_key_value_heads"] = None

    model = build_model(_edited_checkpoint(dream_tiny_dir, tmp_path / "omit", omit))
    assert _rope_theta(model) == 10000.0
    assert _kv_heads(model) == model.shape.num_heads


def test_released_rope_theta_is_read(llada_tiny_dir, dream_tiny_dir, build_model):
    """The tiny checkpoints carry the released values, 500000 (LLaDA) and 1e6 (Dream)."""
    assert _rope_theta(build_model(llada_tiny_dir)) == 500000.0
    assert _rope_theta(build_model(dream_tiny_dir)) == 1000000.0
