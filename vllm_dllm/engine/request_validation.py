"""Front-end validation of the `dllm_*` request parameters.

vLLM runs `LogitsProcessor.validate_params` on every request before it reaches the engine, and
turns the error into an HTTP 400 naming the parameter (or a `ValueError` from `LLM.generate`).
That is the only per-request validation hook vLLM offers plugins, so the validator is a logits
processor that never edits logits; the config hook installs it for diffusion models only.
"""

from __future__ import annotations

import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vllm_dllm.param_values import DllmParamError, check_dllm_args
from vllm_dllm.structured.requests import backend_refusal

# SamplingParams fields the denoising sampler does not implement, with their neutral values.
# (`top_k`, `top_p` and `min_p` are implemented: `vllm_dllm.sampling.filtering`; so is
# `logprobs`: `vllm_dllm.sampling.logprobs`; `structured_outputs`: `vllm_dllm.structured`.)
_UNSUPPORTED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "prompt_logprobs": None,
    "logprob_token_ids": None,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
}


#: Why a field cannot be supported at all, where that is more than "not implemented".
REASONS = {
    "prompt_logprobs": (
        "a diffusion model scores no prompt tokens autoregressively: the prompt is context "
        "that is never predicted, so it has no log-probabilities"
    ),
}


def validate_request(params: SamplingParams) -> None:
    """Raise `VLLMValidationError` naming the parameter if a diffusion request is invalid."""
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(params, name, neutral)
        if value not in (neutral, None) and not (isinstance(value, list | dict) and not value):
            reason = f": {REASONS[name]}" if name in REASONS else ""
            raise VLLMValidationError(
                f"{name}={value!r} is not supported by diffusion models (vllm-dllm){reason}",
                parameter=name,
                value=value,
            )
    refusal = backend_refusal(params)
    if refusal is not None:
        raise VLLMValidationError(refusal, parameter="structured_outputs")
    # Checks that need the model's family or the prompt run right after vLLM's own input
    # processing (`vllm_dllm.engine.front_end`), which knows both; the scheduler re-checks.
    try:
        check_dllm_args(params.extra_args)
    except DllmParamError as err:
        message = str(err)
        # DllmParamError messages start with the parameter's name.
        raise VLLMValidationError(message, parameter=message.split(" ", 1)[0]) from err


class DllmParamsValidator(LogitsProcessor):
    """Validates `dllm_*` parameters in the front end; leaves logits untouched."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate_request(sampling_params)

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
