"""ASGI middleware for the OpenAI server: checks request bodies as the client sent them.

vLLM turns a request into `SamplingParams`, which normalise some fields (`echo` with `logprobs`
becomes `prompt_logprobs`); by then a field the denoiser does not implement can no longer be told
from one the client never sent. (`top_p`, `top_k`, `min_p` and `logprobs` are implemented.) So
the fields are checked here, on the JSON body, whatever the temperature, and the 400 names the
field with the value the client sent. Malformed JSON gets a one-line 400 instead of vLLM's
pydantic dump.

Infilling: vLLM refuses the completions API's `suffix` for every model without a
fill-in-the-middle prompt format (its renderer's `render_completion_suffix`), which would
render prefix and suffix into one prompt text. A diffusion model instead decodes a gap between
them, so a completion's `suffix` moves into `vllm_xargs` as `dllm_suffix`, which the front end
tokenizes and the denoiser places after the gap (`vllm_dllm.infill`); an empty one is dropped
(no suffix), and `echo` with a suffix is refused, as vLLM and OpenAI refuse it. Everything
else passes through untouched, body included.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_dllm.engine.request_validation import REASONS
from vllm_dllm.entrypoints.asgi import ASGIApp, Message, Receive, Scope, Send, send_error
from vllm_dllm.entrypoints.drain import DrainGate
from vllm_dllm.entrypoints.statistics import install_response_statistics
from vllm_dllm.infill import SUFFIX_KEY

#: The generation endpoints whose bodies are checked.
CHECKED_PATHS = ("/v1/completions", "/v1/chat/completions")
#: The endpoint whose `suffix` is served by infilling.
COMPLETIONS_PATH = "/v1/completions"

#: Request fields the denoiser does not implement -> the values that leave them unused (what
#: clients send by default). Any other value is rejected.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "prompt_logprobs": (None,),
    "logprob_token_ids": (None,),
    "min_tokens": (None, 0),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "kv_transfer_params": (None,),
}


def unsupported_field(body: dict[str, Any]) -> tuple[str, Any] | None:
    """The first field of `body` that the denoiser does not implement, with its value."""
    for name, neutral in UNSUPPORTED_FIELDS.items():
        if name in body and not any(_same(body[name], n) for n in neutral):
            return name, body[name]
    return None


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality in which booleans are not numbers (`"logprobs": 0` asks for logprobs in a
    completion, `"logprobs": false` does not ask in a chat)."""
    if isinstance(value, bool) or isinstance(neutral, bool) or value is None or neutral is None:
        return value is neutral
    return value == neutral


def _rejection(body: dict[str, Any]) -> tuple[str, str | None] | None:
    """(message, parameter) for a body that must be refused, or None."""
    found = unsupported_field(body)
    if found is None:
        return _echo_with_logprobs(body)
    name, value = found
    reason = REASONS.get(name, "the denoiser does not implement it, at any temperature")
    message = (
        f"{name}={json.dumps(value)} is not supported by diffusion models (vllm-dllm): "
        f"{reason}; remove the field"
    )
    return message, name


def _echo_with_logprobs(body: dict[str, Any]) -> tuple[str, str] | None:
    """`echo` with `logprobs` asks vLLM for the echoed prompt's log-probabilities (its
    `prompt_logprobs`), which a diffusion model does not have."""
    logprobs = body.get("logprobs")
    asks = not (logprobs is None or logprobs is False) or body.get("top_logprobs") is not None
    if not body.get("echo") or not asks:
        return None
    return (
        f"echo is not supported with logprobs by diffusion models (vllm-dllm): the echoed "
        f"prompt would need log-probabilities, and {REASONS['prompt_logprobs']}; drop echo "
        f"or logprobs",
        "echo",
    )


def move_suffix(body: dict[str, Any]) -> tuple[str, str] | bool:
    """Move a completion body's `suffix` into `vllm_xargs` as `dllm_suffix`, in place.

    Returns whether the body changed, or (message, parameter) when it must be refused.
    """
    if "suffix" not in body:
        return False
    suffix = body.pop("suffix")
    if suffix is None or suffix == "":
        return True  # no suffix (vLLM would refuse even an empty one)
    if not isinstance(suffix, str):
        return f"suffix must be a string, got {json.dumps(suffix)}", "suffix"
    if body.get("echo"):
        return (
            "echo is not supported with suffix: the completion is the text between the prompt "
            "and the suffix (vLLM and OpenAI refuse echo with suffix too)",
            "echo",
        )
    xargs = body.get("vllm_xargs")
    if xargs is None:
        xargs = body["vllm_xargs"] = {}
    if not isinstance(xargs, dict):
        return f"vllm_xargs must be an object, got {json.dumps(xargs)}", "vllm_xargs"
    if xargs.get(SUFFIX_KEY) is not None:
        return f"give suffix or vllm_xargs.{SUFFIX_KEY}, not both", "suffix"
    xargs[SUFFIX_KEY] = suffix
    return True


class DllmMiddleware:
    """Refuses unsupported fields and malformed JSON on the generation endpoints."""

    def __init__(self, app: ASGIApp) -> None:
        # The graceful stop on SIGTERM / SIGINT (503 to new requests, then explicit ends).
        self.app = DrainGate(app)
        # Built once, in the API-server process, when the server builds its middleware stack.
        install_response_statistics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in CHECKED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        refused: tuple[str, str | None] | None
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as err:
            # ValueError covers bad syntax, bad UTF-8 and integers past Python's digit limit;
            # RecursionError, nesting deeper than the parser's recursion limit.
            refused = (f"the request body is not valid JSON: {err}", None)
        else:
            refused = _rejection(parsed) if isinstance(parsed, dict) else None
        if refused is None and isinstance(parsed, dict) and scope["path"] == COMPLETIONS_PATH:
            moved = move_suffix(parsed)
            if isinstance(moved, tuple):
                refused = moved
            elif moved:
                messages, scope = _rewritten(messages, scope, json.dumps(parsed).encode())
        if refused is not None:
            await _send_400(send, *refused)
            return
        await self.app(scope, _replay(messages, receive), send)


async def _read_body(receive: Receive) -> tuple[list[Message], bytes]:
    """All `http.request` messages of the body, and the body."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # a disconnect: the app sees it too
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return messages, b"".join(chunks)


def _rewritten(messages: list[Message], scope: Scope, body: bytes) -> tuple[list[Message], Scope]:
    """The messages and scope of a request whose body is replaced by `body`: one
    `http.request` message (a disconnect read after it kept), and the `content-length` header
    updated."""
    rest = [m for m in messages if m["type"] != "http.request"]
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    request = {"type": "http.request", "body": body, "more_body": False}
    return [request, *rest], {**scope, "headers": headers}


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives the app the body read here, then the client's later messages
    (a disconnect mid-stream still reaches vLLM, which aborts the request)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _send_400(send: Send, message: str, param: str | None) -> None:
    """An OpenAI-style error body, the shape vLLM's own 400s have."""
    await send_error(send, 400, "BadRequestError", message, param)
