"""Per-choice statistics in the server's responses, and their totals.

A finished request's statistics reach the front end as `RequestOutput.kv_transfer_params["dllm"]`
(`engine/outputs.py`; an `n > 1` request's aggregated output has each choice's as well). vLLM
0.32 copies that field into the response of a non-streamed request only, and only the first
prompt's. So the response builders are wrapped:

- each choice carries its own `dllm` statistics: in a non-streamed response as a field of the
  choice, in a stream on the chunk that carries the choice's `finish_reason`;
- the response's `kv_transfer_params.dllm` (non-streamed) and the final usage chunk's
  (`stream_options.include_usage`) are the totals over all choices (`merge_stats`): its
  `output_tokens` is the usage's `completion_tokens`.

The stream generators are methods that take the engine's `RequestOutput` iterator and yield SSE
lines: the wrapper watches the outputs go by and edits the lines it concerns. Nothing else in a
response changes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from vllm_dllm.engine.outputs import CHOICES_KEY, merge_stats, output_stats

_INSTALLED = "_vllm_dllm_statistics"


def install_response_statistics() -> None:
    """Wrap the completion and chat response builders (idempotent)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    wrappers = (
        # (class, method, wrapper, position of the engine-output argument after `self`)
        (OpenAIServingCompletion, "completion_stream_generator", _stream, 2),
        (OpenAIServingChat, "chat_completion_stream_generator", _stream, 1),
        (OpenAIServingCompletion, "request_output_to_completion_response", _completion, 0),
        (OpenAIServingChat, "chat_completion_full_generator", _chat, 1),
    )
    for cls, name, wrap, position in wrappers:
        original = getattr(cls, name)
        if not getattr(original, _INSTALLED, False):
            wrapped = wrap(original, position)
            setattr(wrapped, _INSTALLED, True)
            setattr(cls, name, wrapped)


def _annotate(response: Any, stats: dict[int, dict[str, Any] | None]) -> None:
    """Give each choice of `response` its statistics (by choice index) and the response the
    totals."""
    for choice in getattr(response, "choices", None) or ():
        if stats.get(choice.index) is not None:
            choice.dllm = stats[choice.index]  # an extra field: vLLM's models allow them
    totals = merge_stats([stats[i] for i in sorted(stats)])
    if totals is not None:
        params = dict(response.kv_transfer_params or {})
        params.pop(CHOICES_KEY, None)
        params["dllm"] = totals
        response.kv_transfer_params = params


def _completion(original: Callable[..., Any], position: int) -> Callable[..., Any]:
    """`request_output_to_completion_response(final_res_batch, ...)`: choices are numbered
    prompt by prompt, completion by completion."""

    @functools.wraps(original)
    def build(self: Any, *args: Any, **kwargs: Any) -> Any:
        response = original(self, *args, **kwargs)
        batch = args[position] if len(args) > position else kwargs["final_res_batch"]
        flat = [s for output in batch for s in output_stats(output)]
        _annotate(response, dict(enumerate(flat)))
        return response

    return build


def _chat(original: Callable[..., Any], position: int) -> Callable[..., Any]:
    """`chat_completion_full_generator(request, result_generator, ...)`: one prompt, choices
    numbered as the outputs."""

    @functools.wraps(original)
    async def build(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen: dict[str, Any] = {}
        args = list(args)  # type: ignore[assignment]
        args[position] = _last(args[position], seen)  # type: ignore[index]
        response = await original(self, *args, **kwargs)
        final = seen.get("output")
        if final is not None and hasattr(response, "choices"):
            stats = output_stats(final)
            _annotate(response, {o.index: s for o, s in zip(final.outputs, stats, strict=True)})
        return response

    return build


async def _last(outputs: AsyncIterator[Any], seen: dict[str, Any]) -> AsyncIterator[Any]:
    async for output in outputs:
        seen["output"] = output
        yield output


def _stream(original: Callable[..., AsyncGenerator[str, None]], position: int):
    """A stream generator: the request is its first argument, the engine's outputs (for
    completions `(prompt index, output)` pairs) the one at `position`."""

    @functools.wraps(original)
    async def generator(self: Any, *args: Any, **kwargs: Any) -> AsyncGenerator[str, None]:
        choices: dict[int, dict[str, Any] | None] = {}
        args = list(args)  # type: ignore[assignment]
        n = getattr(args[0], "n", None) or 1
        args[position] = _watch(args[position], choices, n)  # type: ignore[index]
        async for line in original(self, *args, **kwargs):
            yield _with_statistics(line, choices)

    return generator


async def _watch(
    outputs: AsyncIterator[Any], choices: dict[int, dict[str, Any] | None], n: int
) -> AsyncIterator[Any]:
    """Pass the engine's outputs through; record each choice's statistics as it finishes."""
    async for item in outputs:
        prompt, output = item if isinstance(item, tuple) else (0, item)
        for completion, stats in zip(output.outputs, output_stats(output), strict=True):
            if completion.finish_reason is not None:
                choices[prompt * n + completion.index] = stats
        yield item


def _with_statistics(line: str, choices: dict[int, dict[str, Any] | None]) -> str:
    """`line` with the statistics added: to each choice it finishes, and the totals to the final
    usage chunk."""
    if not choices or not line.startswith("data: {"):
        return line
    final_usage = '"choices":[]' in line
    if not final_usage and '"finish_reason":"' not in line:
        return line
    chunk = json.loads(line[len("data: ") :])
    if final_usage:
        if chunk.get("usage") is None:
            return line
        totals = merge_stats([choices[i] for i in sorted(choices)])
        if totals is None:
            return line
        chunk["kv_transfer_params"] = {"dllm": totals}
    else:
        for choice in chunk.get("choices") or ():
            stats = choices.get(choice.get("index"))
            if choice.get("finish_reason") is not None and stats is not None:
                choice["dllm"] = stats
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
