"""What the server's ASGI wrappers share: the ASGI types and an OpenAI-style error response.

The middleware (400s for request fields the denoiser does not implement) and the drain (503s
while the server stops) answer before vLLM's app sees a request, in the error shape vLLM's own
responses have, so clients parse them as any other error from the server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(
    send: Send,
    status: int,
    error_type: str,
    message: str,
    param: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """A JSON error response `{"error": {"message", "type", "param", "code"}}`."""
    payload = json.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
