"""The LLaDA 2.x vLLM model (`LLaDA2MoeModelLM`) against its checkpoint and the oracle.

The strict loader is checked on a model built in this process (as `test_weight_loading` does);
the logits through the real engine (`dllm_score`: paged KV cache, non-causal metadata, FusedMoE
on CPU) against the oracle's dense block-causal forward, which routes every token by hand.
A block-causal forward is one window per block, in order: block k's window `(kB, (k+1)B)`
sees keys `[0, (k+1)B)`, the earlier blocks' K/V as the earlier windows wrote them into the
cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engines import dllm_score
from tests.reference.llada2_model import LLaDA2ReferenceModel
from tests.tolerances import assert_forward_close
from tests.worker_probes import model_contract
from vllm_dllm.model_executor.models.block_diffusion import resolve_mask_token_id
from vllm_dllm.model_executor.models.llada2_moe import LLaDA2MoeModelLM
from vllm_dllm.testing.llada2_checkpoints import MASK

PROMPT = list(b"Hello, world")  # 12 tokens


def _canvas(length: int) -> list[int]:
    """A prompt, then masks with a few committed tokens among them, `length` tokens in all."""
    canvas = PROMPT + [MASK] * (length - len(PROMPT))
    canvas[20:23] = [7, 8, 9]
    return canvas


def _block_windows(length: int, block: int) -> list[tuple[int, int, int]]:
    return [(s, min(s + block, length), min(s + block, length)) for s in range(0, length, block)]


def _score(llm, canvas: list[int], windows: list[tuple[int, ...]]) -> torch.Tensor:
    """The windows' logits from every rank (identical), concatenated in window order."""
    ranks = dllm_score(llm, canvas, windows)
    assert all(rank == ranks[0] for rank in ranks)
    return torch.cat([torch.tensor(logits) for logits in ranks[0]])


@pytest.fixture(scope="module")
def oracle(llada2_tiny_dir: Path) -> LLaDA2ReferenceModel:
    return LLaDA2ReferenceModel(llada2_tiny_dir)


# ---- strict loading -------------------------------------------------------------------------


def test_checkpoint_names_are_the_released_ones(llada2_tiny_dir, build_model):
    model = build_model(llada2_tiny_dir)
    tensors = load_file(llada2_tiny_dir / "model.safetensors")
    assert set(tensors) == model.expected_checkpoint_names()
    # Every checkpoint tensor maps onto a parameter: the whole checkpoint loads.
    assert model.load_weights(tensors.items()) == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize(
    "stray",
    [
        "model.layers.1.mlp.experts.4.gate_proj.weight",  # one expert more than the config's
        "model.layers.0.attention.query_key_value.bias",  # use_qkv_bias is false
        "model.layers.0.mlp.gate.expert_bias",  # layer 0 is dense
    ],
)
def test_stray_tensor_is_named(stray, llada2_tiny_dir, build_model):  # noqa: F811
    model = build_model(llada2_tiny_dir)
    tensors = load_file(llada2_tiny_dir / "model.safetensors")
    tensors[stray] = torch.zeros(4)
    with pytest.raises(ValueError, match=rf"unexpected tensor '{stray}'"):
        model.load_weights(tensors.items())


@pytest.mark.parametrize(
    "gone",
    [
        # FusedMoE stacks the experts: one absent expert projection leaves no parameter
        # uninitialised as a whole, so only a check by checkpoint name sees it.
        "model.layers.2.mlp.experts.3.up_proj.weight",
        "model.layers.1.mlp.gate.expert_bias",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.0.attention.key_layernorm.weight",
    ],
)
def test_missing_tensor_is_named(gone, llada2_tiny_dir, build_model):  # noqa: F811
    model = build_model(llada2_tiny_dir)
    tensors = load_file(llada2_tiny_dir / "model.safetensors")
    del tensors[gone]
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\): {gone}$"):
        model.load_weights(tensors.items())


# ---- the mask id ----------------------------------------------------------------------------


def test_mask_id_is_the_tokenizers(llada2_tiny_dir, build_model):
    """The released config has no mask_token_id: the tokenizer's `<|mask|>` is the MASK."""
    assert build_model(llada2_tiny_dir).mask_token_id == MASK


def test_mask_id_order(llada2_tiny_dir, tmp_path):
    """Config `mask_token_id` first, then the tokenizer's mask token, then the release's id."""
    no_mask = SimpleNamespace(mask_token_id=None)

    def resolve(config, directory):
        fallback = LLaDA2MoeModelLM.release_mask_token_id
        return resolve_mask_token_id(config, str(directory), None, None, fallback)

    assert resolve(SimpleNamespace(mask_token_id=5), llada2_tiny_dir) == 5
    assert resolve(no_mask, llada2_tiny_dir) == MASK
    shutil.copy(llada2_tiny_dir / "tokenizer_config.json", tmp_path)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del tokenizer_config["mask_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert resolve(no_mask, tmp_path) == LLaDA2MoeModelLM.release_mask_token_id


# ---- logits through the engine --------------------------------------------------------------


def test_engine_attends_without_a_window(llada2_engine):
    """vLLM sizes the KV cache and the attention for the whole context, not the release's
    switched-off 4096-token window."""
    assert llada2_engine.llm_engine.vllm_config.model_config.get_sliding_window() is None


def test_engine_runs_the_plugin_model(llada2_engine):
    """The worker's model is ours, with the tokenizer's mask id and unshifted logits."""
    (contract,) = llada2_engine.collective_rpc(model_contract)
    assert contract == ("LLaDA2MoeModelLM", MASK, 0)


@pytest.mark.parametrize(("length", "block"), [(32, 8), (64, 32), (27, 8)])
def test_block_causal_logits_equal_oracle(length, block, llada2_engine, oracle):
    """One window per block, each on the K/V the earlier blocks' windows cached."""
    canvas = _canvas(length)
    got = _score(llada2_engine, canvas, _block_windows(length, block))
    expected = oracle.forward(torch.tensor(canvas), 0, block_size=block)
    assert_forward_close(got, expected, oracle)


def test_full_canvas_logits_equal_oracle(llada2_engine, oracle):
    """One window over the whole canvas: every position attends to every other."""
    canvas = _canvas(40)
    got = _score(llada2_engine, canvas, [(0, 40)])
    expected = oracle.forward(torch.tensor(canvas), 0, block_size=40)
    assert_forward_close(got, expected, oracle)


def test_routing_matters(llada2_tiny_dir, oracle, tmp_path):
    """The comparisons above see the routing: zeroing the expert bias changes the oracle's
    logits, so a model that ignored it (or any routing argument it feeds) would fail them."""
    shutil.copytree(llada2_tiny_dir, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    for name in [n for n in tensors if n.endswith("expert_bias")]:
        tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    canvas = torch.tensor(_canvas(32))
    unbiased = LLaDA2ReferenceModel(tmp_path / "ckpt").forward(canvas, 0, block_size=8)
    assert (unbiased - oracle.forward(canvas, 0, block_size=8)).abs().max() > 1e-2
