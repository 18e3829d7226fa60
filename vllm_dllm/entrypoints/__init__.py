"""OpenAI-server glue: `--middleware vllm_dllm.entrypoints.DllmMiddleware`.

`vllm-dllm serve` adds the middleware itself; with `vllm serve` pass the flag. It makes the
server reject request fields the denoiser does not implement (as sent, before vLLM normalises
them), answer malformed JSON with a short 400, give each choice of a response its own
statistics, and the response their totals, streamed or not (`statistics.py`), and stop
gracefully on SIGTERM / SIGINT: 503 to new requests, explicit ends for the others (`drain.py`).
"""

from vllm_dllm.entrypoints.middleware import DllmMiddleware

__all__ = ["DllmMiddleware"]
