"""The front end fits each canvas into the context, or rejects the request naming why."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_dllm.engine.front_end import fitted_max_tokens


def params(max_tokens: int | None, **xargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, extra_args=xargs)


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "xargs", "expected"),
    [
        (10, 16, {"dllm_block_length": 8}, 16),  # fits as asked
        (10, 502, {"dllm_block_length": 8}, 496),  # 10 + 504 > 512: the largest fitting multiple
        (36, 476, {"dllm_block_length": 32}, 448),  # a chat request without max_tokens
        (10, 502, {"dllm_block_length": 1}, 502),  # no rounding, no change
        (1, 511, {"dllm_block_length": 511}, 511),
        (10, None, {}, None),  # resolved later by vLLM
    ],
)
def test_canvas_is_fitted(prompt_len, max_tokens, xargs, expected):
    assert fitted_max_tokens(params(max_tokens, **xargs), prompt_len, 512) == expected


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "xargs", "parameter"),
    [
        (10, 8, {"dllm_block_length": 503}, "dllm_block_length"),  # not one block fits
        (2, 8, {"dllm_block_length": 2**62}, "dllm_block_length"),
        # 63 steps suit 63 blocks of 8, not the 62 left after lowering 500 to 496.
        (10, 500, {"dllm_block_length": 8, "dllm_steps": 63}, "dllm_steps"),
    ],
)
def test_canvas_that_cannot_fit_names_the_parameter(prompt_len, max_tokens, xargs, parameter):
    with pytest.raises(VLLMValidationError) as err:
        fitted_max_tokens(params(max_tokens, **xargs), prompt_len, 512)
    assert parameter in str(err.value)
