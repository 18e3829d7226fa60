"""Per-request statistics on the final usage chunk of streamed responses.

A finished request's statistics reach the front end as `RequestOutput.kv_transfer_params`
(`engine/outputs.py`); vLLM 0.32 copies that field into non-streamed responses only. Its stream
generators are methods that take the engine's `RequestOutput` iterator and yield SSE lines, so
the narrowest hook is to wrap the two of them: the wrapper watches the outputs go by and adds
`kv_transfer_params` to the final usage chunk (`stream_options.include_usage`), the chunk that
carries vLLM's own per-request totals. Nothing else in the stream changes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

_INSTALLED = "_vllm_dllm_statistics"


def install_stream_statistics() -> None:
    """Wrap the completion and chat stream generators (idempotent)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    # The position of the `result_generator` argument in each generator's signature.
    for cls, name, position in (
        (OpenAIServingCompletion, "completion_stream_generator", 2),
        (OpenAIServingChat, "chat_completion_stream_generator", 1),
    ):
        original = getattr(cls, name)
        if not getattr(original, _INSTALLED, False):
            setattr(cls, name, _with_statistics(original, position))


def _with_statistics(original: Callable[..., AsyncGenerator[str, None]], position: int):
    @functools.wraps(original)
    async def generator(self: Any, *args: Any, **kwargs: Any) -> AsyncGenerator[str, None]:
        seen: dict[str, Any] = {}
        args = list(args)
        args[position] = _watch(args[position], seen)
        async for line in original(self, *args, **kwargs):
            yield _with_params(line, seen.get("params"))

    setattr(generator, _INSTALLED, True)
    return generator


async def _watch(outputs: AsyncIterator[Any], seen: dict[str, Any]) -> AsyncIterator[Any]:
    """Pass the engine's outputs through; keep the first finished one's `kv_transfer_params`
    (the non-streamed response reports the first prompt's, too)."""
    async for item in outputs:
        output = item[1] if isinstance(item, tuple) else item  # completions: (prompt index, out)
        if output.finished and "params" not in seen and output.kv_transfer_params:
            seen["params"] = output.kv_transfer_params
        yield item


def _with_params(line: str, params: dict[str, Any] | None) -> str:
    """`line` with `kv_transfer_params` added if it is the final usage chunk."""
    if params is None or not line.startswith("data: {") or '"choices":[]' not in line:
        return line
    chunk = json.loads(line[len("data: ") :])
    if chunk.get("usage") is None:
        return line
    chunk["kv_transfer_params"] = params
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
