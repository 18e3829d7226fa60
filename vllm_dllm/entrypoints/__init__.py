"""OpenAI-server glue: `--middleware vllm_dllm.entrypoints.DllmMiddleware`.

`vllm-dllm serve` adds the middleware itself; with `vllm serve` pass the flag. It makes the
server reject request fields the denoiser does not implement (as sent, before vLLM normalises
them), answer malformed JSON with a short 400, and put the per-request statistics on the final
usage chunk of streamed responses.
"""

from vllm_dllm.entrypoints.middleware import DllmMiddleware

__all__ = ["DllmMiddleware"]
