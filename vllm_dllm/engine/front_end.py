"""Front-end checks that need the prompt: the canvas must fit, and errors must precede streams.

A diffusion request's canvas is `prompt ++ [MASK] * G`, `G` = `max_tokens` rounded up to a
multiple of `dllm_block_length`, and the scheduler admits a canvas only whole and only when it
fits `max_model_len` and the token budget (a block's first step is one forward over all of it).
vLLM's front end checks `prompt + max_tokens` and knows nothing of blocks, and the logits-processor
validation hook sees the sampling parameters without the prompt. A canvas that fits only before
rounding therefore reached the engine core, which can fail a request only as an internal error:
users got a 500 without a reason, e.g. for every chat request without `max_tokens` (vLLM then
resolves `max_tokens` to `max_model_len - prompt`, rarely a multiple of the block length).

`fit_canvas` runs on every request right after vLLM's own input processing (offline `LLM` and the
server alike). Where the rounded canvas does not fit, `max_tokens` is lowered to the largest
multiple of the block length that does: the counterpart of vLLM lowering `max_tokens` to fit
the prompt, and of an autoregressive sequence ending at `max_model_len`. Where not even one
block fits, or the lowered budget breaks another parameter (`dllm_steps` must divide into the
blocks), the request fails with a `VLLMValidationError` (HTTP 400) naming the parameter.

The server runs vLLM's input processing, and with it every parameter check, only once a
response has started; a streamed request with a bad parameter then got HTTP 200 and an error
event. So the server's `AsyncLLM.generate` runs the same checks first, when it is called, which
is before any response exists: the error becomes the HTTP 400 of a non-streamed request.

Infilling (`vllm_dllm.infill`): both wrappers turn a request's `dllm_suffix` into the canvas's
tail of token ids first, since the tokenizer lives here (text: its tokens, then EOS), so the
canvas that must fit includes it. `process_inputs` stores the ids in the request's own copy of
the parameters, which is what the engine core receives.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.input_processor import InputProcessor

from vllm_dllm.config import parse_dllm_params
from vllm_dllm.defaults import request_defaults, server_defaults
from vllm_dllm.engine.request_validation import validate_request
from vllm_dllm.families import BIDIRECTIONAL, Family, family_of
from vllm_dllm.infill import SUFFIX_KEY, DllmSuffixError, with_canvas_suffix
from vllm_dllm.param_values import DllmParamError, check_extra_args
from vllm_dllm.structured.requests import is_constrained, loop_refusal


def fitted_max_tokens(
    params: SamplingParams,
    prompt_len: int,
    max_canvas_len: int,
    family: Family = BIDIRECTIONAL,
    other_readers: bool = False,
    defaults: Mapping[str, Any] | None = None,
) -> int | None:
    """`max_tokens` lowered so the canvas fits `max_canvas_len` (None if unset); or raise.

    `defaults`: the model's request defaults (`vllm_dllm.defaults.request_defaults`); the
    server's alone when not given.

    This is also where every check that needs the model's family or the prompt runs, and where
    `extra_args` keys that nothing reads are refused (`check_extra_args`; `other_readers`:
    another logits processor is configured, which may read any key).
    """
    try:
        check_extra_args(params.extra_args, family, other_readers)
    except DllmParamError as err:
        message = str(err)
        raise VLLMValidationError(message, parameter=message.split(" ", 1)[0]) from err
    if params.max_tokens is None:
        return None
    if defaults is None:
        defaults = server_defaults()
    try:
        dllm = parse_dllm_params(params.extra_args, params.max_tokens, defaults, family)
        refusal = loop_refusal(dllm) if is_constrained(params) else None
        if refusal is not None:
            raise VLLMValidationError(refusal[0], parameter=refusal[1])
        if dllm.canvas_length(prompt_len) <= max_canvas_len:
            return params.max_tokens
        block = dllm.block_length
        fitting = dllm.fitting_max_tokens(prompt_len, max_canvas_len)
        if fitting < 1:
            suffix = f" and the dllm_suffix ({len(dllm.suffix)} tokens)" if dllm.suffix else ""
            raise VLLMValidationError(
                f"dllm_block_length ({block}) does not fit the context: the prompt "
                f"({prompt_len} tokens){suffix} plus one block exceeds {max_canvas_len} tokens "
                f"(max_model_len, or max_num_batched_tokens if smaller)",
                parameter="dllm_block_length",
                value=block,
            )
        parse_dllm_params(params.extra_args, fitting, defaults, family)
    except DllmParamError as err:
        message = str(err)
        raise VLLMValidationError(message, parameter=message.split(" ", 1)[0]) from err
    return fitting


@functools.cache
def _other_logits_processors(configured: tuple[Any, ...]) -> bool:
    """Whether a logits processor besides the plugin's validator is configured: one given to
    the engine (`logits_processors`) or installed as a `vllm.logits_processors` plugin. It
    could read any `extra_args` key."""
    from vllm.v1.sample.logits_processor import cached_load_custom_logitsprocs

    from vllm_dllm.engine.request_validation import DllmParamsValidator

    loaded = cached_load_custom_logitsprocs(configured or None)
    return any(cls is not DllmParamsValidator for cls in loaded)


def _other_readers(processor: InputProcessor) -> bool:
    return _other_logits_processors(tuple(processor.model_config.logits_processors or ()))


def with_suffix_ids(processor: InputProcessor, params: SamplingParams) -> SamplingParams:
    """`params` whose `dllm_suffix` is the canvas's tail of token ids (`vllm_dllm.infill`):
    a shallow copy when it changes (the caller's may be shared), else `params` itself."""
    if not params.extra_args or params.extra_args.get(SUFFIX_KEY) is None:
        return params  # no suffix: the tokenizer and vocabulary are not looked up
    try:
        extra_args = with_canvas_suffix(
            params.extra_args,
            processor.tokenizer,
            processor.renderer.get_eos_token_id(),
            processor.model_config.get_vocab_size(),
        )
    except DllmSuffixError as err:
        raise VLLMValidationError(str(err), parameter="dllm_suffix") from err
    if extra_args is None:
        return params
    params = copy.copy(params)
    params.extra_args = extra_args
    return params




def _max_canvas_len(processor: InputProcessor) -> int:
    budget = processor.scheduler_config.max_num_scheduled_tokens
    if budget is None:
        budget = processor.scheduler_config.max_num_batched_tokens
    return min(processor.model_config.max_model_len, budget)


def install(scheduler_cls: str) -> None:
    """Wrap `InputProcessor.process_inputs` and `AsyncLLM.generate` (once per process).

    The wrappers act only for engines that run `scheduler_cls` (diffusion models). vLLM builds
    `process_inputs_async` from the bound method when an `InputProcessor` is created, so this
    runs from the config hook, before any is created.
    """
    process_inputs = InputProcessor.process_inputs
    if getattr(process_inputs, "_vllm_dllm", False):
        return

    def is_diffusion(processor: InputProcessor) -> bool:
        return processor.scheduler_config.scheduler_cls == scheduler_cls

    @functools.wraps(process_inputs)
    def fitting_process_inputs(self: InputProcessor, *args: Any, **kwargs: Any):
        request = process_inputs(self, *args, **kwargs)
        params = request.sampling_params
        if params is not None and is_diffusion(self):
            # The request's own parameters (vLLM cloned them), so they may be replaced.
            request.sampling_params = params = with_suffix_ids(self, params)
            prompt_len = len(request.prompt_token_ids or ())
            family = family_of(self.model_config.hf_config)
            params.max_tokens = fitted_max_tokens(
                params,
                prompt_len,
                _max_canvas_len(self),
                family,
                _other_readers(self),
                request_defaults(self.model_config, family),
            )
        return request

    generate = AsyncLLM.generate

    @functools.wraps(generate)
    def checked_generate(self: AsyncLLM, prompt: Any, sampling_params: Any, *args, **kwargs):
        processor = self.input_processor
        if (
            isinstance(sampling_params, SamplingParams)
            and is_diffusion(processor)
            and isinstance(prompt, dict)
            and prompt.get("prompt_token_ids") is not None
        ):
            validate_request(sampling_params)
            prompt_len = len(prompt["prompt_token_ids"])
            family = family_of(processor.model_config.hf_config)
            fitted_max_tokens(
                with_suffix_ids(processor, sampling_params),
                prompt_len,
                _max_canvas_len(processor),
                family,
                _other_readers(processor),
                request_defaults(processor.model_config, family),
            )
        return generate(self, prompt, sampling_params, *args, **kwargs)

    fitting_process_inputs._vllm_dllm = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = fitting_process_inputs  # type: ignore[method-assign]
    AsyncLLM.generate = checked_generate  # type: ignore[method-assign]
