"""Per-request diffusion parameters: parsing, defaults, server defaults and error messages."""

from __future__ import annotations

import dataclasses
import math

import pytest

from vllm_dllm.config import DllmParams, parse_dllm_params
from vllm_dllm.defaults import server_defaults
from vllm_dllm.families import BIDIRECTIONAL, fast_dllm_v2, llada2, sdar
from vllm_dllm.param_docs import DLLM_PARAM_DOCS, DLLM_PARAM_NAMES
from vllm_dllm.param_values import DllmParamError, check_dllm_args, check_extra_args


def test_defaults() -> None:
    params = parse_dllm_params(None, max_tokens=100)
    assert params == DllmParams(
        max_tokens=100,
        block_length=32,
        cache="dual",
        rule="threshold",
        threshold=0.9,
        factor=None,
        steps=None,
        remasking="low_confidence",
    )
    assert (params.num_blocks, params.gen_length, params.steps_per_block) == (4, 128, None)
    assert parse_dllm_params({}, max_tokens=100) == params


def test_doc_table_matches_parser_defaults() -> None:
    assert tuple(DLLM_PARAM_DOCS) == DLLM_PARAM_NAMES
    assert set(DLLM_PARAM_NAMES) == {
        "dllm_block_length",
        "dllm_cache",
        "dllm_threshold",
        "dllm_factor",
        "dllm_steps",
        "dllm_remasking",
        "dllm_sub_block_length",
        "dllm_editing_threshold",
        "dllm_max_post_steps",
        "dllm_eb_threshold",
        "dllm_alg",
        "dllm_alg_temp",
        "dllm_suffix",
    }
    params = parse_dllm_params(None, max_tokens=7)
    for name, (default, description) in DLLM_PARAM_DOCS.items():
        value = getattr(params, name.removeprefix("dllm_"))
        assert (None if value == () else value) == default, name  # no suffix: ()
        assert description.strip(), name


@pytest.mark.parametrize(
    ("max_tokens", "block_length", "num_blocks", "gen_length"),
    [
        (1, 32, 1, 32),
        (32, 32, 1, 32),
        (33, 32, 2, 64),
        (100, 32, 4, 128),
        (5, 1, 5, 5),
        (7, 4, 2, 8),
    ],
)
def test_canvas_rounds_up_to_blocks(
    max_tokens: int, block_length: int, num_blocks: int, gen_length: int
) -> None:
    params = parse_dllm_params({"dllm_block_length": block_length}, max_tokens)
    assert (params.num_blocks, params.gen_length) == (num_blocks, gen_length)


def test_every_parameter_is_read() -> None:
    params = parse_dllm_params(
        {
            "dllm_block_length": 16,
            "dllm_cache": "prefix",
            "dllm_steps": 12,
            "dllm_remasking": "random",
        },
        max_tokens=48,
    )
    assert (params.block_length, params.cache, params.remasking) == (16, "prefix", "random")
    assert (params.rule, params.steps, params.threshold, params.factor) == ("steps", 12, None, None)
    assert params.steps_per_block == 4
    params = parse_dllm_params({"dllm_factor": 1.5, "dllm_cache": "none"}, max_tokens=8)
    assert (params.rule, params.factor, params.threshold, params.cache) == (
        "factor",
        1.5,
        None,
        "none",
    )
    assert parse_dllm_params({"dllm_threshold": 1}, max_tokens=8).threshold == 1.0


def test_numeric_strings_and_integral_floats_are_accepted() -> None:
    """`vllm_xargs` values may arrive as strings or as JSON floats."""
    params = parse_dllm_params({"dllm_block_length": "16", "dllm_threshold": " 0.75 "}, 32)
    assert (params.block_length, params.threshold) == (16, 0.75)
    assert parse_dllm_params({"dllm_block_length": 16.0}, 32).block_length == 16
    assert parse_dllm_params({"dllm_steps": "+4"}, 128).steps == 4
    assert parse_dllm_params({"dllm_factor": "1e0"}, 32).factor == 1.0
    assert parse_dllm_params({"dllm_threshold": ".5"}, 32).threshold == 0.5


def test_parsing_ignores_other_keys_and_none_is_absent() -> None:
    """Keys that are not `dllm_*` are not the parser's (`check_extra_args` refuses those that
    nothing reads)."""
    args = {"kv_transfer_params": {"a": 1}, "session_id": "x", "diffusion_steps": 3}
    assert parse_dllm_params(args, 64) == parse_dllm_params(None, 64)
    args = {"dllm_factor": None, "dllm_threshold": 0.5, "dllm_cache": None}
    params = parse_dllm_params(args, 64)
    assert (params.rule, params.threshold, params.cache) == ("threshold", 0.5, "dual")


@pytest.mark.parametrize(
    ("args", "max_tokens", "message"),
    [
        ({"dllm_threshold": 1.5}, 64, "dllm_threshold must be in (0, 1], got 1.5"),
        ({"dllm_threshold": 0}, 64, "dllm_threshold must be in (0, 1], got 0.0"),
        ({"dllm_threshold": -0.1}, 64, "dllm_threshold must be in (0, 1], got -0.1"),
        ({"dllm_factor": 0.0}, 64, "dllm_factor must be > 0, got 0.0"),
        ({"dllm_factor": -1}, 64, "dllm_factor must be > 0, got -1.0"),
        ({"dllm_steps": 0}, 64, "dllm_steps must be >= 1, got 0"),
        ({"dllm_block_length": 0}, 64, "dllm_block_length must be >= 1, got 0"),
        ({"dllm_block_length": -32}, 64, "dllm_block_length must be >= 1, got -32"),
        (
            {"dllm_cache": "full"},
            64,
            "dllm_cache must be one of none, prefix, dual for bidirectional (LLaDA, Dream) "
            "models, got 'full'",
        ),
        ({"dllm_cache": "Dual"}, 64, "dllm_cache must be one of none, prefix, dual"),
        ({"dllm_remasking": "entropy"}, 64, "dllm_remasking must be one of low_confidence, random"),
        (
            {"dllm_threshold": 0.9, "dllm_factor": 1.0},
            64,
            "dllm_threshold and dllm_factor are mutually exclusive: pick one selection rule",
        ),
        (
            {"dllm_steps": 8, "dllm_factor": 1.0},
            64,
            "dllm_factor and dllm_steps are mutually exclusive",
        ),
        (
            {"dllm_steps": 8, "dllm_factor": 1.0, "dllm_threshold": 0.5},
            64,
            "dllm_threshold, dllm_factor and dllm_steps are mutually exclusive",
        ),
        (
            {"dllm_steps": 10},
            128,
            "dllm_steps (10) must be a multiple of the number of blocks "
            "(4 = ceil(max_tokens / dllm_block_length))",
        ),
        (
            {"dllm_steps": 7, "dllm_block_length": 8},
            20,
            "dllm_steps (7) must be a multiple of the number of blocks (3 = ",
        ),
        ({}, 0, "max_tokens must be >= 1, got 0"),
    ],
)
def test_invalid_values_name_the_parameter(args: dict, max_tokens: int, message: str) -> None:
    with pytest.raises(DllmParamError) as info:
        parse_dllm_params(args, max_tokens)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("dllm_block_length", True, "an integer"),
        ("dllm_block_length", 32.5, "an integer"),
        ("dllm_block_length", "32.0", "an integer"),
        ("dllm_block_length", "thirty", "an integer"),
        ("dllm_block_length", [32], "an integer"),
        ("dllm_block_length", math.inf, "an integer"),
        ("dllm_steps", "", "an integer"),
        ("dllm_steps", "٣", "an integer"),
        ("dllm_threshold", True, "a finite number"),
        ("dllm_threshold", math.nan, "a finite number"),
        ("dllm_threshold", math.inf, "a finite number"),
        ("dllm_threshold", "nan", "a finite number"),
        ("dllm_threshold", "inf", "a finite number"),
        ("dllm_factor", "1e400", "a finite number"),
        ("dllm_factor", 10**400, "a finite number"),
        ("dllm_factor", "0x10", "a finite number"),
        ("dllm_factor", "1_0", "a finite number"),
        ("dllm_factor", [1.0], "a finite number"),
        ("dllm_factor", {"v": 1}, "a finite number"),
        ("dllm_cache", 1, "a string"),
        ("dllm_remasking", ["random"], "a string"),
    ],
)
def test_wrong_types_name_the_parameter(key: str, value: object, kind: str) -> None:
    with pytest.raises(DllmParamError, match=f"^{key} must be {kind}, got "):
        parse_dllm_params({key: value}, 64)


def test_unknown_dllm_keys_are_errors_with_a_hint() -> None:
    with pytest.raises(DllmParamError) as info:
        parse_dllm_params({"dllm_treshold": 0.5}, 64)
    assert str(info.value).startswith("dllm_treshold is not a known parameter")
    assert "did you mean dllm_threshold?" in str(info.value)
    with pytest.raises(DllmParamError) as info:
        parse_dllm_params({"dllm_xyzzyqwv": 1}, 64)
    assert str(info.value).startswith("dllm_xyzzyqwv is not a known parameter")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "family", "meant"),
    [
        ("alg", BIDIRECTIONAL, "dllm_alg"),
        ("block_length", BIDIRECTIONAL, "dllm_block_length"),
        ("threshold", sdar(4), "dllm_threshold"),
        ("diffusion_steps", sdar(4), "dllm_steps"),
        ("dllm_treshold", BIDIRECTIONAL, "dllm_threshold"),
        ("Block-Length", llada2(32), "dllm_block_length"),
        ("alg", sdar(4), None),  # Dream's sampler is not SDAR's: nothing close that applies
        ("session_id", BIDIRECTIONAL, None),
    ],
)
def test_keys_nothing_reads_are_refused_naming_the_parameter_meant(key, family, meant) -> None:
    with pytest.raises(DllmParamError) as info:
        check_extra_args({key: 1}, family)
    message = str(info.value)
    assert message.startswith(f"{key} is not a known parameter"), message
    if meant is None:
        assert "did you mean" not in message
    else:
        assert f"; did you mean {meant}?" in message
    assert "\n" not in message


def test_keys_vllm_or_another_logits_processor_reads_pass() -> None:
    vllm_keys = {"kv_transfer_params": {"do_remote_prefill": False}, "ec_transfer_params": {},
                 "kv_cache_report_mode": "incremental"}  # fmt: skip
    check_extra_args({**vllm_keys, "dllm_steps": 8}, BIDIRECTIONAL)
    # Another logits processor may read any key; `dllm_*` keys are still checked.
    check_extra_args({"target_token": 5}, BIDIRECTIONAL, other_readers=True)
    with pytest.raises(DllmParamError, match="^dllm_treshold is not a known parameter"):
        check_extra_args({"dllm_treshold": 0.5}, BIDIRECTIONAL, other_readers=True)
    check_extra_args(None, BIDIRECTIONAL)


@pytest.mark.parametrize(
    ("family", "args", "message"),
    [
        (
            BIDIRECTIONAL,
            {"dllm_remasking": "low_confidence_static"},
            "dllm_remasking must be one of low_confidence, random, entropy_bounded for "
            "bidirectional (LLaDA, Dream) models, got 'low_confidence_static'",
        ),
        (
            sdar(4),
            {"dllm_remasking": "random"},
            "dllm_remasking must be one of low_confidence_dynamic, low_confidence_static, "
            "entropy_bounded for SDAR models, got 'random'",
        ),
        (
            fast_dllm_v2(32),
            {"dllm_cache": "prefix"},
            "dllm_cache must be one of none, dual for Fast-dLLM v2 models, got 'prefix'",
        ),
    ],
)
def test_value_lists_in_errors_are_the_family_s(family, args, message) -> None:
    """Where the model is known, an error lists only the values its family takes (the request
    check and the parser alike); the front end's first check, which has no model, leaves these
    values to it."""
    with pytest.raises(DllmParamError) as info:
        check_extra_args(args, family)
    assert str(info.value) == message
    with pytest.raises(DllmParamError) as info:
        parse_dllm_params(args, 32, family=family)
    assert str(info.value) == message
    check_dllm_args(args)


def test_server_defaults_hold_dllm_keys_only(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_DLLM_DEFAULTS", '{"block_length": 8}')
    server_defaults.cache_clear()
    try:
        with pytest.raises(DllmParamError) as info:
            server_defaults()
    finally:
        monkeypatch.delenv("VLLM_DLLM_DEFAULTS")
        server_defaults.cache_clear()
    assert str(info.value) == (
        "server default block_length is not a known parameter; did you mean dllm_block_length? "
        "(the defaults are dllm_* parameters)"
    )


def test_server_defaults_apply_and_requests_win() -> None:
    defaults = {"dllm_block_length": 16, "dllm_cache": "prefix", "dllm_threshold": 0.7}
    params = parse_dllm_params(None, 64, defaults)
    assert (params.block_length, params.cache, params.threshold) == (16, "prefix", 0.7)
    params = parse_dllm_params({"dllm_block_length": "8", "dllm_threshold": 0.95}, 64, defaults)
    assert (params.block_length, params.cache, params.threshold) == (8, "prefix", 0.95)


def test_a_request_rule_replaces_a_default_rule_of_another_kind() -> None:
    defaults = {"dllm_factor": 1.0, "dllm_remasking": "random"}
    assert parse_dllm_params(None, 64, defaults).rule == "factor"
    params = parse_dllm_params({"dllm_threshold": 0.8}, 64, defaults)
    assert (params.rule, params.threshold, params.factor) == ("threshold", 0.8, None)
    assert params.remasking == "random"
    params = parse_dllm_params({"dllm_steps": 4}, 128, {"dllm_threshold": 0.5})
    assert (params.rule, params.steps, params.threshold) == ("steps", 4, None)


def test_server_default_errors_are_labelled() -> None:
    with pytest.raises(DllmParamError, match="^server default dllm_threshold must be in"):
        parse_dllm_params(None, 64, {"dllm_threshold": 2.0})
    with pytest.raises(DllmParamError, match="^server default dllm_blocklength is not a known"):
        parse_dllm_params(None, 64, {"dllm_blocklength": 16})
    with pytest.raises(
        DllmParamError, match="^server default dllm_threshold and dllm_steps are mutually"
    ):
        parse_dllm_params({}, 64, {"dllm_threshold": 0.5, "dllm_steps": 2})
    # The request's rule does not rescue a server configuration that names two rules.
    with pytest.raises(DllmParamError, match="^server default"):
        parse_dllm_params({"dllm_factor": 1.0}, 64, {"dllm_threshold": 0.5, "dllm_steps": 2})


def test_params_are_frozen_and_validated_on_direct_construction() -> None:
    params = DllmParams(max_tokens=64)
    assert (params.rule, params.threshold) == ("threshold", 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.block_length = 8  # type: ignore[misc]
    with pytest.raises(DllmParamError, match="^dllm_threshold and dllm_factor are mutually"):
        DllmParams(max_tokens=64, rule="factor", factor=1.0, threshold=0.9)
    with pytest.raises(DllmParamError, match="^dllm_steps must be set"):
        DllmParams(max_tokens=64, rule="steps")
    with pytest.raises(DllmParamError, match="^rule must be one of"):
        DllmParams(max_tokens=64, rule="topk")
    with pytest.raises(DllmParamError, match="^max_tokens must be an int"):
        DllmParams(max_tokens=True)  # type: ignore[arg-type]
    assert DllmParams(max_tokens=64, rule="steps", steps=8).steps_per_block == 4


def test_param_error_is_a_value_error() -> None:
    """vLLM's OpenAI server maps ValueError to HTTP 400."""
    assert issubclass(DllmParamError, ValueError)


def test_entropy_bounded_takes_its_bound_and_replaces_the_rules() -> None:
    params = parse_dllm_params({"dllm_remasking": "entropy_bounded"}, max_tokens=32)
    assert (params.remasking, params.eb_threshold) == ("entropy_bounded", 0.35)
    bound = {"dllm_remasking": "entropy_bounded", "dllm_eb_threshold": "0.5"}
    assert parse_dllm_params(bound, max_tokens=32).eb_threshold == 0.5
    # A server's default rule gives way to it, as to any rule the request names.
    assert parse_dllm_params(
        {"dllm_remasking": "entropy_bounded"}, 32, defaults={"dllm_steps": 32}
    ).steps is None
    for extra, name in (
        ({"dllm_remasking": "entropy_bounded", "dllm_steps": 32}, "dllm_steps"),
        ({"dllm_remasking": "entropy_bounded", "dllm_threshold": 0.5}, "dllm_threshold"),
        ({"dllm_eb_threshold": 0.5}, "dllm_eb_threshold"),
        ({"dllm_remasking": "entropy_bounded", "dllm_eb_threshold": 0}, "dllm_eb_threshold"),
    ):
        with pytest.raises(DllmParamError, match=f"^{name}"):
            parse_dllm_params(extra, max_tokens=32)
