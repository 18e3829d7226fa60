"""Prometheus metrics and the periodic log line of the denoising loop (engine-core process).

Two counts that are easy to confuse are kept apart: a *model forward* is one batched forward of
the engine (one per engine step that ran the model, whatever the batch), a *denoising step* is
one request's share of it (a forward over a batch of 8 requests is 8 denoising steps). Per
request, "forwards" means its denoising steps: the forwards it took part in.

The engine core is not the process that serves `/metrics`. vLLM merges the metrics of several
processes through prometheus_client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`); it turns
that on itself with `--api-server-count > 1`, and our `vllm-dllm serve` always turns it on, so
these series appear on the server's `/metrics` beside vLLM's own.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from vllm_dllm.logger import init_logger

logger = init_logger(__name__)

_TOKENS_PER_FORWARD_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0)
_FORWARDS_PER_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@functools.cache
def _collectors() -> dict[str, Counter | Histogram]:
    """The metric families, registered once per process (schedulers may be built repeatedly)."""
    labels = ["model_name"]
    return {
        "model_forwards": Counter(
            "vllm_dllm:model_forwards",
            "Batched model forwards run by the engine (one per engine step, whatever the batch).",
            labels,
        ),
        "denoising_steps": Counter(
            "vllm_dllm:denoising_steps",
            "Denoising steps summed over requests (a forward over N requests counts N).",
            labels,
        ),
        "output_tokens": Counter(
            "vllm_dllm:output_tokens", "Final tokens emitted by diffusion requests.", labels
        ),
        "blocks": Counter(
            "vllm_dllm:blocks", "Canvas blocks fully decoded by diffusion requests.", labels
        ),
        "early_stops": Counter(
            "vllm_dllm:early_stops",
            "Requests that stopped before decoding their whole canvas (end token or max_tokens).",
            labels,
        ),
        "request_forwards": Histogram(
            "vllm_dllm:request_forwards",
            "Forwards (denoising steps) each finished diffusion request took.",
            labels,
            buckets=_FORWARDS_PER_REQUEST_BUCKETS,
        ),
        "request_tokens_per_forward": Histogram(
            "vllm_dllm:request_tokens_per_forward",
            "Output tokens per forward of each finished diffusion request.",
            labels,
            buckets=_TOKENS_PER_FORWARD_BUCKETS,
        ),
    }


@dataclass
class _Interval:
    """What happened since the last periodic log line."""

    start: float
    model_forwards: int = 0
    denoising_steps: int = 0
    output_tokens: int = 0
    finished: int = 0
    finished_forwards: int = 0


class DllmMetrics:
    """Records the denoising loop's metrics and logs one summary line per interval."""

    def __init__(self, model_name: str, log_interval_s: float | None) -> None:
        """`log_interval_s` None: no log line (offline engines, which do not log stats)."""
        collectors = _collectors()
        self._model_forwards = collectors["model_forwards"].labels(model_name)
        self._denoising_steps = collectors["denoising_steps"].labels(model_name)
        self._output_tokens = collectors["output_tokens"].labels(model_name)
        self._blocks = collectors["blocks"].labels(model_name)
        self._early_stops = collectors["early_stops"].labels(model_name)
        self._request_forwards = collectors["request_forwards"].labels(model_name)
        self._tokens_per_forward = collectors["request_tokens_per_forward"].labels(model_name)
        self._log_interval_s = log_interval_s
        self._interval = _Interval(time.monotonic())

    def step(self, num_requests: int) -> None:
        """One batched forward over `num_requests` requests (one denoising step each)."""
        if num_requests:
            self._model_forwards.inc()
            self._denoising_steps.inc(num_requests)
            self._interval.model_forwards += 1
            self._interval.denoising_steps += num_requests

    def output_tokens(self, n: int) -> None:
        self._output_tokens.inc(n)
        self._interval.output_tokens += n

    def finished(self, stats: dict) -> None:
        """A finished request's statistics (`outputs.request_stats`)."""
        self._request_forwards.observe(stats["forwards"])
        self._tokens_per_forward.observe(stats["tokens_per_forward"])
        if stats["blocks"] is not None:
            self._blocks.inc(stats["blocks"])
        if stats["early_stop"]:
            self._early_stops.inc()
        self._interval.finished += 1
        self._interval.finished_forwards += stats["forwards"]

    def maybe_log(self, num_running: int) -> None:
        """Log the interval's summary once `log_interval_s` has passed, if anything ran."""
        if self._log_interval_s is None:
            return
        now = time.monotonic()
        interval = self._interval
        elapsed = now - interval.start
        if elapsed < self._log_interval_s:
            return
        self._interval = _Interval(now)
        if not interval.model_forwards:
            return  # an idle engine stays quiet, like vLLM's own periodic line
        logger.info("vllm-dllm: %s", summary_line(interval, elapsed, num_running))


def summary_line(interval: _Interval, elapsed: float, num_running: int) -> str:
    """`3 running, 412.5 tokens/s, 4.85 tokens per forward, 1.0 forwards per request, ...`."""
    steps = interval.denoising_steps
    per_request = (
        f"{interval.finished_forwards / interval.finished:.1f} forwards per finished request"
        if interval.finished
        else "no request finished"
    )
    return (
        f"{num_running} requests running, "
        f"{interval.output_tokens / elapsed:.1f} output tokens/s, "
        f"{interval.output_tokens / steps if steps else 0.0:.2f} tokens per forward, "
        f"{per_request}, "
        f"{interval.model_forwards} model forwards of {steps / interval.model_forwards:.1f} "
        f"requests on average"
    )
