"""Model families: which parameters each accepts, their defaults, canvas lengths, the rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_dllm.config import DllmParamError, parse_dllm_params
from vllm_dllm.defaults import check_server_defaults
from vllm_dllm.families import BIDIRECTIONAL, Loop, family_of, fast_dllm_v2, llada2, sdar
from vllm_dllm.sampling import SelectionRule, select


@pytest.mark.parametrize(
    ("config", "loop", "block"),
    [
        (SimpleNamespace(model_type="llada"), Loop.BIDIRECTIONAL, 32),
        (SimpleNamespace(model_type="Dream"), Loop.BIDIRECTIONAL, 32),
        (SimpleNamespace(model_type="Fast_dLLM_Qwen", bd_size=16), Loop.FAST_DLLM_V2, 16),
        (SimpleNamespace(model_type="Fast_dLLM_Qwen"), Loop.FAST_DLLM_V2, 32),
        (SimpleNamespace(model_type="sdar", block_size=8), Loop.SDAR, 8),
        (SimpleNamespace(model_type="sdar", block_size=None), Loop.SDAR, 4),
        (SimpleNamespace(model_type="llada2_moe"), Loop.LLADA2, 32),
    ],
)
def test_family_from_config(config, loop, block):
    family = family_of(config)
    assert (family.loop, family.block_length) == (loop, block)


def test_fast_dllm_v2_defaults_and_canvas():
    params = parse_dllm_params(None, 40, family=fast_dllm_v2(32))
    assert (params.block_length, params.cache, params.threshold) == (32, "none", 0.95)
    assert params.sub_block_length == 8
    # Blocks are aligned to position 0: prompt 45 + 40 tokens end in block 2 (positions 64-95).
    assert params.canvas_length(45) == 96
    assert params.fitting_max_tokens(45, 100) == 96 - 45
    dual = parse_dllm_params({"dllm_cache": "dual", "dllm_sub_block_length": 16}, 40,
                             family=fast_dllm_v2(32))  # fmt: skip
    assert (dual.cache, dual.sub_block_length) == ("dual", 16)


@pytest.mark.parametrize(
    ("family", "args", "name"),
    [
        (fast_dllm_v2(32), {"dllm_cache": "prefix"}, "dllm_cache"),
        (fast_dllm_v2(32), {"dllm_factor": 1.0}, "dllm_factor"),
        (fast_dllm_v2(32), {"dllm_steps": 4}, "dllm_steps"),
        (fast_dllm_v2(32), {"dllm_block_length": 16}, "dllm_block_length"),
        (fast_dllm_v2(32), {"dllm_sub_block_length": 5}, "dllm_sub_block_length"),
        (fast_dllm_v2(32), {"dllm_remasking": "random"}, "dllm_remasking"),
        (sdar(4), {"dllm_cache": "none"}, "dllm_cache"),
        (sdar(4), {"dllm_remasking": "low_confidence"}, "dllm_remasking"),
        (sdar(4), {"dllm_sub_block_length": 2}, "dllm_sub_block_length"),
        (llada2(32), {"dllm_remasking": "low_confidence_static"}, "dllm_remasking"),
        (BIDIRECTIONAL, {"dllm_sub_block_length": 8}, "dllm_sub_block_length"),
        (BIDIRECTIONAL, {"dllm_remasking": "low_confidence_dynamic"}, "dllm_remasking"),
    ],
)
def test_parameters_a_family_does_not_accept_are_named(family, args, name):
    with pytest.raises(DllmParamError, match=f"^{name}"):
        parse_dllm_params(args, 32, family=family)


@pytest.mark.parametrize("family", [sdar(4), llada2(32)], ids=["sdar", "llada2"])
def test_block_diffusion_steps_are_per_block_whatever_the_prompt(family):
    params = parse_dllm_params({"dllm_threshold": 0.5, "dllm_steps": 3}, 40, family=family)
    assert (params.threshold, params.steps, params.steps_per_block) == (0.5, 3, 3)
    # No divisibility by the blocks a prompt decodes; more steps than positions are capped.
    assert parse_dllm_params({"dllm_steps": 55}, 7, family=family).steps_per_block == min(
        55, family.block_length
    )
    # The bidirectional meaning is unchanged: steps over the generation, split over blocks.
    assert parse_dllm_params({"dllm_steps": 8}, 64).steps_per_block == 4


def test_server_defaults_are_checked_for_the_family(monkeypatch):
    from vllm_dllm import defaults as config

    monkeypatch.setenv(config.DEFAULTS_ENV, '{"dllm_cache": "prefix"}')
    config.server_defaults.cache_clear()
    try:
        check_server_defaults(BIDIRECTIONAL)
        with pytest.raises(DllmParamError, match="^server default dllm_cache"):
            check_server_defaults(sdar(4))
    finally:
        monkeypatch.delenv(config.DEFAULTS_ENV)
        config.server_defaults.cache_clear()


def test_dynamic_rule_commits_all_above_threshold_only_when_they_meet_the_quota():
    confidence = torch.tensor([[0.9, 0.2, 0.8, 0.1], [0.9, 0.2, 0.3, 0.1], [0.5, 0.95, 0.97, 0.1]])
    mask = torch.tensor([[True, True, True, True]] * 2 + [[True, False, True, True]])
    chosen = select(
        confidence,
        mask,
        torch.full((3,), SelectionRule.DYNAMIC),
        threshold=torch.full((3,), 0.7),
        factor=torch.ones(3),
        quota=torch.tensor([2, 2, 1]),
    )
    assert chosen.tolist() == [
        [True, False, True, False],  # two above 0.7 meet the quota of 2
        [True, False, True, False],  # one above: the quota's two most confident instead
        [False, False, True, False],  # position 1 (0.95) is not a candidate
    ]
