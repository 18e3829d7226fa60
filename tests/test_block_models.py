"""Fast-dLLM v2 and SDAR on vLLM: the config classes read the released config.json keys, the
strict loader names a stray or missing tensor, the MASK id resolves as the oracle resolves it, and
the engine's logits equal the oracle's dense forward.

The engine's diagnostic `dllm_score` lets every query see the whole canvas, while these models
attend block-causally. Inside one block the two are the same, so the logits are compared on
canvases that the oracle treats as exactly one block.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from tests.engines import dllm_score
from tests.reference.block_model import BlockModelSpec, BlockReferenceModel
from tests.tolerances import assert_forward_close
from vllm_dllm.model_executor.models.block_diffusion import resolve_mask_token_id
from vllm_dllm.model_executor.models.fast_dllm_v2 import Fast_dLLM_QwenForCausalLM
from vllm_dllm.model_executor.models.sdar import SDARForCausalLM
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape
from vllm_dllm.testing.block_checkpoints import (
    MASK,
    BlockShape,
    fast_dllm_v2_config_dict,
    sdar_config_dict,
    write_fast_dllm_v2_checkpoint,
)
from vllm_dllm.transformers_utils import register_configs
from vllm_dllm.transformers_utils.configs import FastDLLMV2Config, SDARConfig

FAMILIES = ["fast_dllm_v2", "sdar"]
# The released ids: <|endoftext|>, <|im_end|>, and each family's MASK.
ENDOFTEXT_ID, IM_END_ID = 151643, 151645
V2_MASK_ID, SDAR_MASK_ID = 151665, 151669


# --- the config classes --------------------------------------------------------------------------


def _released_fast_dllm_v2_1_5b() -> dict:
    """config.json shaped like Efficient-Large-Model/Fast_dLLM_v2_1.5B (Qwen2.5-1.5B sizes)."""
    shape = BlockShape(hidden_size=1536, num_heads=12, num_kv_heads=2, head_dim=128,
                       num_layers=28, intermediate_size=8960, block_size=32,
                       tie_word_embeddings=True)  # fmt: skip
    config = fast_dllm_v2_config_dict(shape)
    config.update(vocab_size=151936, bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID,
                  pad_token_id=IM_END_ID, max_window_layers=21, torch_dtype="bfloat16")  # fmt: skip
    return config


def _released_sdar_1_7b_chat() -> dict:
    """config.json shaped like JetLM/SDAR-1.7B-Chat (Qwen3-1.7B sizes, 16 heads of 128)."""
    shape = BlockShape(hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                       num_layers=28, intermediate_size=6144, block_size=4,
                       tie_word_embeddings=False)  # fmt: skip
    config = sdar_config_dict(shape)
    config.update(vocab_size=151936, bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID,
                  mask_token_id=SDAR_MASK_ID, torch_dtype="bfloat16")  # fmt: skip
    return config


def _read_config(directory: Path, config: dict):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    register_configs()
    return AutoConfig.from_pretrained(directory)


def test_fast_dllm_v2_config_reads_the_release(tmp_path: Path) -> None:
    config = _read_config(tmp_path / "v2", _released_fast_dllm_v2_1_5b())
    assert isinstance(config, FastDLLMV2Config)
    assert (config.bd_size, config.mask_token_id, config.eos_token_id) == (32, None, IM_END_ID)
    assert Fast_dLLM_QwenForCausalLM.shape_from_config(config) == TransformerShape(
        hidden_size=1536, num_heads=12, num_kv_heads=2, num_layers=28, intermediate_size=8960,
        vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position=32768,
        qkv_bias=True, qk_norm=False, tie_word_embeddings=True,
    )  # fmt: skip
    # The release has no mask id anywhere in config.json; without a tokenizer that names
    # |<MASK>|, the id is the release code's constant.
    mask = resolve_mask_token_id(config, str(tmp_path / "v2"), None, "|<MASK>|", V2_MASK_ID)
    assert mask == V2_MASK_ID


def test_sdar_config_reads_the_release(tmp_path: Path) -> None:
    config = _read_config(tmp_path / "sdar", _released_sdar_1_7b_chat())
    assert isinstance(config, SDARConfig)
    assert (config.block_size, config.mask_token_id, config.head_dim) == (4, SDAR_MASK_ID, 128)
    shape = SDARForCausalLM.shape_from_config(config)
    assert shape == TransformerShape(
        hidden_size=2048, num_heads=16, num_kv_heads=8, num_layers=28, intermediate_size=6144,
        vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position=32768,
        qkv_bias=False, qk_norm=True, tie_word_embeddings=False, explicit_head_dim=128,
    )  # fmt: skip
    assert (shape.head_dim, shape.q_size, shape.kv_size) == (128, 2048, 1024)
    mask = resolve_mask_token_id(config, str(tmp_path / "sdar"), None, "<|MASK|>", SDAR_MASK_ID)
    assert mask == SDAR_MASK_ID


def test_optional_keys_take_the_release_defaults(tmp_path: Path) -> None:
    """SDAR's 4B / 8B configs have no block_size or mask_token_id; a Fast-dLLM v2 config
    without bd_size, rope_theta or num_key_value_heads means upstream's defaults."""
    sdar = _released_sdar_1_7b_chat()
    del sdar["block_size"], sdar["mask_token_id"]
    config = _read_config(tmp_path / "sdar", sdar)
    assert (config.block_size, config.mask_token_id) == (4, None)
    v2 = _released_fast_dllm_v2_1_5b()
    del v2["bd_size"], v2["rope_theta"], v2["num_key_value_heads"]
    config = _read_config(tmp_path / "v2", v2)
    shape = Fast_dLLM_QwenForCausalLM.shape_from_config(config)
    assert (config.bd_size, shape.rope_theta, shape.num_kv_heads) == (32, 10000.0, 32)


# --- the model classes: MASK id, logits shift, strict loading ------------------------------------


def test_mask_id_and_logits_shift(fast_dllm_v2_tiny_dir, sdar_tiny_dir, build_model) -> None:
    """Fast-dLLM v2 reads the MASK id from its tokenizer, SDAR from its config; both as the
    oracle does. Fast-dLLM v2 scores position j from hidden state j - 1, SDAR from j."""
    v2, sdar = build_model(fast_dllm_v2_tiny_dir), build_model(sdar_tiny_dir)
    assert (v2.mask_token_id, v2.logits_shift) == (MASK, 1)
    assert (sdar.mask_token_id, sdar.logits_shift) == (MASK, 0)
    assert BlockModelSpec.from_dir(fast_dllm_v2_tiny_dir).mask_token_id == MASK
    assert BlockModelSpec.from_dir(sdar_tiny_dir).mask_token_id == MASK


def test_sdar_without_config_mask_id_takes_the_tokenizers(sdar_tiny_dir, tmp_path, build_model):
    checkpoint = shutil.copytree(sdar_tiny_dir, tmp_path / "sdar")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["mask_token_id"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert build_model(checkpoint).mask_token_id == MASK
    assert BlockModelSpec.from_dir(checkpoint).mask_token_id == MASK


@pytest.mark.parametrize(
    ("family", "stray"),
    [
        ("fast_dllm_v2", "model.layers.0.self_attn.q_norm.weight"),  # Qwen3's, not Qwen2's
        ("fast_dllm_v2", "lm_head.weight"),  # a tied model must not drop a separate head
        ("sdar", "model.layers.0.self_attn.q_proj.bias"),
    ],
)
def test_complete_checkpoint_loads_and_a_stray_tensor_is_named(family, stray, request,
                                                                build_model) -> None:  # fmt: skip
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    model = build_model(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    assert set(tensors) == model.expected_checkpoint_names()
    assert model.load_weights(tensors.items()) == {name for name, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"unexpected tensor '{stray}'"):
        model.load_weights([*tensors.items(), (stray, torch.zeros(1))])


@pytest.mark.parametrize(
    ("family", "gone"),
    [
        ("fast_dllm_v2", "model.layers.1.self_attn.k_proj.bias"),  # one shard of fused qkv
        ("sdar", "model.layers.1.self_attn.k_norm.weight"),
    ],
)
def test_a_missing_tensor_is_named(family, gone, request, build_model) -> None:
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    model = build_model(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors[gone]
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\): {gone}$"):
        model.load_weights(tensors.items())


def test_tied_head_is_the_embedding(fast_dllm_v2_tiny_dir, build_model) -> None:
    model = build_model(fast_dllm_v2_tiny_dir)
    tensors = load_file(fast_dllm_v2_tiny_dir / "model.safetensors")
    model.load_weights(tensors.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight.data, tensors["model.embed_tokens.weight"])


def test_untied_fast_dllm_v2_loads_its_own_head(tmp_path, build_model) -> None:
    """The 7B release: an untied head, its own `lm_head.weight`."""
    shape = dataclasses.replace(BlockShape.FAST_DLLM_V2, tie_word_embeddings=False)
    checkpoint = write_fast_dllm_v2_checkpoint(tmp_path / "untied", shape)
    model = build_model(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    assert model.expected_checkpoint_names() == set(tensors)
    assert "lm_head.weight" in tensors
    model.load_weights(tensors.items())
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight.data, tensors["lm_head.weight"])


# --- the engine against the oracle ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_logits_equal_oracle_within_one_block(family, request) -> None:
    """fp32 logits through vLLM's paged-KV path equal the oracle's dense forward, for a canvas
    of the model's own block size and a longer one treated as a single block."""
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    llm = request.getfixturevalue(f"{family}_engine")
    oracle = BlockReferenceModel(checkpoint)
    mask = oracle.spec.mask_token_id
    tokens = [17, 101, 42, 5, 9, 200, 13, 77, 64, 33, 120, 2, 250, 31]
    for length in (oracle.spec.block_size, 27):
        canvas = (tokens + [mask] * 8 + [7, 8, 9] + [mask] * length)[:length]
        canvas[1] = mask  # a MASK inside even the shortest canvas
        (logits,) = dllm_score(llm, canvas, [(0, length)])[0]
        expected = oracle.forward(torch.tensor(canvas), 0, block_size=length)
        assert_forward_close(torch.tensor(logits), expected, oracle)
