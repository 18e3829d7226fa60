"""The weight loader names the tensor when a checkpoint has a stray or a missing one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

import vllm_dllm
from vllm_dllm.model_executor.models.dream import DreamModel
from vllm_dllm.model_executor.models.llada import LLaDAModelLM


def bare_model(cls, checkpoint):
    """The model class without its vLLM layers: enough to run load_weights' name checks."""
    vllm_dllm.register()
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    model.config = AutoConfig.from_pretrained(checkpoint)
    return model


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_misnamed_tensor_is_named(family, request):
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    cls = LLaDAModelLM if family == "llada" else DreamModel
    tensors = load_file(checkpoint / "model.safetensors")
    assert all(cls.checkpoint_to_vllm_name(name) for name in tensors)
    assert set(tensors) == cls.expected_checkpoint_names(bare_model(cls, checkpoint).config)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.bogus\.weight'"):
        bare_model(cls, checkpoint).load_weights([("model.bogus.weight", torch.zeros(1))])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_missing_tensors_are_named(family, request):
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    cls = LLaDAModelLM if family == "llada" else DreamModel
    model = bare_model(cls, checkpoint)
    expected = sorted(cls.expected_checkpoint_names(model.config))
    with pytest.raises(ValueError) as err:
        model.load_weights([])
    message = str(err.value)
    assert f"missing {len(expected)} tensor(s)" in message
    assert all(name in message for name in expected[:5])
