"""Graceful drain of the OpenAI server on SIGTERM / SIGINT: stopping it loses nothing.

vLLM 0.32's own stop, on the first signal, shuts the engine client down at once: the renderer's
thread pool goes first (a new request gets `500 cannot schedule new futures after shutdown`),
the engine core drains with no deadline of its own and is killed after `--shutdown-timeout`
(leaked shared memory and semaphores), the output handler is cancelled (open streams wait for
tokens that never come, or get `EngineCore encountered an issue`), and uvicorn then waits for
those open connections without a limit.

`Drain` takes the signals over instead, once per API-server process, from the lifespan start
of the app (the middleware is in every server, `vllm serve --middleware` included):

1. From the first signal on, every new HTTP request, `/health` included, gets 503 with an
   OpenAI-style error body and `Retry-After`; requests already in flight keep being served.
2. When they have all been answered, or at `--shutdown-timeout`, or at a second signal, every
   request still in the engine is aborted through the engine client. vLLM's output processor
   then ends each one as it ends a client's abort: a stream gets its last committed text, a
   chunk with `finish_reason: "abort"` and `data: [DONE]`; a non-streaming request gets its
   committed text with `finish_reason: "abort"` (status 200).
3. Once those answers are sent, the engine client is shut down with an idle engine core, which
   exits by itself within what is left of the stop's budget (`EXIT_BUDGET_S` after the
   timeout), and uvicorn is told to exit, with a bound on how long it may still wait for a
   connection. The process exits within the timeout + `EXIT_BUDGET_S` whatever connections are
   open; an engine core that needs longer (its teardown collects its whole heap, seconds on a
   loaded machine) is killed by vLLM's process manager at the end of the budget.

`vllm-dllm serve` adds what a plugin cannot do from the app (`cli.py`): the engine processes
leave a terminal's Ctrl-C to the API server, and workers get 1 s, not 5, to exit.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from functools import partial
from typing import Any

from vllm_dllm.entrypoints.asgi import ASGIApp, Receive, Scope, Send, send_error
from vllm_dllm.logger import init_logger

logger = init_logger(__name__)

#: How long the answers of aborted requests may take to be sent before the engine stops.
FLUSH_S = 1.0
#: The whole stop takes at most `--shutdown-timeout` plus this, from the first signal.
EXIT_BUDGET_S = 5.0
#: What the budget keeps back for the end of the HTTP server and of the process.
PROCESS_EXIT_S = 1.0
#: The least time the engine core, idle by then, has to exit by itself before vLLM kills it
#: (after a second signal late in the budget, say).
ENGINE_EXIT_MIN_S = 2.0
#: How long uvicorn may still wait for a connection (one stuck mid-upload, say) at the end.
HTTP_EXIT_S = 0.5
#: How often the drain checks whether the in-flight requests are done.
POLL_S = 0.05

#: The signals that stop the server: `kill PID` and Ctrl-C.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """The stop of one API-server process: refuses new requests, then ends the others.

    `server` is vLLM's uvicorn server (`app.state.server`), `engine_client` its `AsyncLLM`
    (`app.state.engine_client`); `timeout` is `--shutdown-timeout`, in seconds.
    """

    def __init__(self, server: Any, engine_client: Any, timeout: float) -> None:
        self.server = server
        self.engine_client = engine_client
        self.timeout = timeout
        #: monotonic time of the first signal; None while serving.
        self.started: float | None = None
        self.in_flight = 0
        self._skip = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def arm(cls, app: Any) -> Drain | None:
        """Take SIGTERM and SIGINT over from vLLM's handlers in this event loop.

        None where the app is not served by vLLM's `serve_http` (no uvicorn server or engine
        client on its state, as in a test client) or the loop cannot take signals (not the main
        thread): vLLM's own stop then applies.
        """
        state = getattr(app, "state", None)
        server = getattr(state, "server", None)
        engine_client = getattr(state, "engine_client", None)
        if server is None or engine_client is None:
            return None
        drain = cls(server, engine_client, float(engine_client.vllm_config.shutdown_timeout))
        loop = asyncio.get_running_loop()
        try:
            for signum in SIGNALS:
                loop.add_signal_handler(signum, drain.on_signal, signum)
        except (RuntimeError, ValueError):
            return None
        return drain

    @property
    def draining(self) -> bool:
        return self.started is not None

    def on_signal(self, signum: int) -> None:
        """First signal: start the drain. Second: end the in-flight requests now."""
        name = signal.Signals(signum).name
        if self._task is not None:
            logger.info("[shutdown] vllm-dllm: %s again, ending in-flight requests now", name)
            self._skip.set()
            return
        self.started = time.monotonic()
        logger.info(
            "[shutdown] vllm-dllm: %s, draining up to %gs (new requests get 503; "
            "a second signal ends the in-flight requests now)",
            name,
            self.timeout,
        )
        self._task = asyncio.get_running_loop().create_task(self._stop())

    async def _stop(self) -> None:
        """The drain, then the engine's stop; the HTTP server exits after them in any case (an
        engine that died meanwhile must not keep the process up)."""
        try:
            await self._end_requests()
            await self._stop_engine()
        except Exception:
            logger.exception("[shutdown] vllm-dllm: the drain failed; stopping the server")
        finally:
            self.server.config.timeout_graceful_shutdown = HTTP_EXIT_S
            self.server.should_exit = True

    async def _end_requests(self) -> None:
        """Wait for the in-flight requests until the deadline or a second signal; end the rest."""
        assert self.started is not None
        drained = await self._wait_idle(self.started + self.timeout, self._skip)
        if not drained:
            await self._abort_all()
            await self._wait_idle(time.monotonic() + FLUSH_S, None, abort_stragglers=True)

    async def _stop_engine(self) -> None:
        """Stop the engine client, idle by now, within what is left of the stop's budget."""
        assert self.started is not None
        logger.info("[shutdown] vllm-dllm: requests done, stopping the engine")
        # All of the budget is left after a drain that ended early.
        end = self.started + self.timeout + EXIT_BUDGET_S - PROCESS_EXIT_S
        engine_timeout = max(ENGINE_EXIT_MIN_S, end - time.monotonic())
        # Nothing waits for engine outputs any more. Stopped first, the output handler does not
        # see the engine core's sockets close (vLLM logs that as `EngineDeadError`).
        handler = self.engine_client.output_handler
        if handler is not None:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, partial(self.engine_client.shutdown, engine_timeout))

    async def _wait_idle(
        self, deadline: float, skip: asyncio.Event | None, abort_stragglers: bool = False
    ) -> bool:
        """Whether every in-flight HTTP request was answered before `deadline` (or `skip`).

        With `abort_stragglers`, a request that reaches the engine meanwhile (it was being
        rendered at the abort) is aborted as well.
        """
        while self.in_flight:
            if time.monotonic() >= deadline or (skip is not None and skip.is_set()):
                return False
            if abort_stragglers:
                await self._abort_all()
            await asyncio.sleep(POLL_S)
        return True

    async def _abort_all(self) -> None:
        """Abort every request in the engine, as a client disconnect would.

        The output processor puts each request's final output (`finish_reason` abort) on its
        queue at once, so the HTTP handlers answer; the engine core learns of it by message.
        """
        if self.engine_client.errored:
            return
        ids = list(self.engine_client.output_processor.request_states)
        if not ids:
            return
        logger.info("[shutdown] vllm-dllm: ending %d unfinished request(s) (abort)", len(ids))
        await self.engine_client.abort(ids, internal=True)

    def retry_after(self) -> int:
        """Seconds until this server is gone: when to retry (elsewhere, or once restarted)."""
        assert self.started is not None
        left = self.started + self.timeout - time.monotonic()
        return max(1, math.ceil(left))

    async def refuse(self, send: Send) -> None:
        """The 503 of a request that arrives during the drain (OpenAI's error shape)."""
        await send_error(
            send,
            503,
            "ServiceUnavailableError",
            "The server is shutting down and accepts no new requests; retry on another instance "
            "or after it restarts",
            headers=[
                (b"retry-after", str(self.retry_after()).encode()),
                (b"connection", b"close"),
            ],
        )


class DrainGate:
    """ASGI wrapper of the app: arms the drain at the lifespan start, refuses new requests while
    it runs, and counts the requests it waits for."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.drain: Drain | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.drain is None:
            self.drain = Drain.arm(scope.get("app"))
        if scope["type"] != "http" or self.drain is None:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self.drain.refuse(send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
