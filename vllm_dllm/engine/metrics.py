"""Prometheus metrics of the denoising loop, recorded by the scheduler (engine-core process).

The engine core is not the process that serves `/metrics`. vLLM merges the metrics of several
processes through prometheus_client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`); it turns
that on itself with `--api-server-count > 1`, and our `vllm-dllm serve` always turns it on, so
these series appear on the server's `/metrics` beside vLLM's own.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Histogram

_TOKENS_PER_FORWARD_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0)


@functools.cache
def _collectors() -> dict[str, Counter | Histogram]:
    """The metric families, registered once per process (schedulers may be built repeatedly)."""
    labels = ["model_name"]
    return {
        "forwards": Counter(
            "vllm_dllm:forwards", "Model forwards run by the denoising loop.", labels
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
        "tokens_per_forward": Histogram(
            "vllm_dllm:tokens_per_forward",
            "Output tokens per model forward of each finished diffusion request.",
            labels,
            buckets=_TOKENS_PER_FORWARD_BUCKETS,
        ),
    }


class DllmMetrics:
    """Counters of forwards, output tokens, blocks and early stops; tokens/forward histogram."""

    def __init__(self, model_name: str) -> None:
        collectors = _collectors()
        self.forwards = collectors["forwards"].labels(model_name)
        self.output_tokens = collectors["output_tokens"].labels(model_name)
        self.blocks = collectors["blocks"].labels(model_name)
        self.early_stops = collectors["early_stops"].labels(model_name)
        self.tokens_per_forward = collectors["tokens_per_forward"].labels(model_name)
