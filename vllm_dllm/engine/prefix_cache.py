"""vLLM's automatic prefix caching for the block-diffusion families, exact.

Fast-dLLM v2, SDAR and LLaDA 2.x attend causally across blocks aligned to position 0, so the K/V
of a whole block depend only on the tokens up to its end, and once a forward that saw exactly
its final tokens wrote them (the prompt's prefill, a finished block's final write) they never
change. That is what vLLM's block hashes describe (a KV block's hash chains every token up to
its end), under three conditions this module enforces:

- **Only final K/V are committed to the cache.** vLLM caches at allocation time; the scheduler
  allocates a whole canvas at admission, so it allocates with `delay_cache_blocks` and commits
  blocks here: the prompt's whole KV blocks at admission (they lie before the first decoded
  block, and the canvas's first forward writes them), then each request's KV blocks up to the
  end of its exact K/V (`DllmRunnerOutput.kv_final`, reported by the worker). A block still
  being denoised, or written by a stale sub-block pass, is never committed.
- **A KV block ends on a diffusion-block boundary.** A KV block that ends inside a diffusion
  block has K/V that depend on tokens after it, which its hash does not cover. So a request
  takes part only when its block length divides the KV block size (vLLM's KV blocks are 128
  tokens on CPU: every released block length qualifies).
- **One block length per cache.** The K/V of the same tokens differ with the block length, which
  the hash does not cover: only requests with the server's block length take part.

A hit is cut so that the prompt's last whole diffusion block is always computed: the request's
first forward (its prefill) still runs, so forwards and tokens are the same with the cache on
and off. LLaDA and Dream never take part (vLLM's prefix caching is off for them): their prompt's
K/V depend on the canvas after it, and the DualCache rewrites K/V in place.
"""

from __future__ import annotations

from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.request import Request

from vllm_dllm.config import DllmParams
from vllm_dllm.engine.compat import record_prefix_cache_hit
from vllm_dllm.families import Family


class PrefixCache:
    """The scheduler's side: which requests read and write the cache, and when."""

    def __init__(
        self,
        manager: KVCacheManager,
        family: Family,
        defaults: dict,
        kv_block_size: int,
        enabled: bool,
    ) -> None:
        self.manager = manager
        self.kv_block_size = kv_block_size
        self.block_length: int = defaults.get("dllm_block_length", family.block_length)
        self.enabled = (
            enabled and family.block_causal and kv_block_size % self.block_length == 0
        )

    def takes_part(self, params: DllmParams) -> bool:
        """Whether a request reads and writes the cache (the conditions in the module doc)."""
        return self.enabled and params.block_length == self.block_length and not params.suffix

    def lookup(
        self, request: Request, params: DllmParams
    ) -> tuple[KVCacheBlocks | None, int]:
        """The cached KV blocks a waiting request may reuse and the prompt tokens they cover.

        The hit ends on a KV block boundary (a diffusion-block boundary too) before the prompt's
        last whole diffusion block, which the request's first forward computes.
        """
        if not self.takes_part(params):
            return None, 0
        blocks, hit = self.manager.get_computed_blocks(request)[:2]
        first_decoded = request.num_prompt_tokens // params.block_length * params.block_length
        usable = max(first_decoded - 1, 0) // self.kv_block_size
        num_blocks = min(hit // self.kv_block_size, usable)
        if num_blocks == 0:
            return None, 0
        kept = KVCacheBlocks(tuple(group[:num_blocks] for group in blocks.blocks))
        return kept, num_blocks * self.kv_block_size

    def admitted(self, request: Request, params: DllmParams, hit: int) -> None:
        """A request was admitted with `hit` cached prompt tokens: count the hit in vLLM's
        prefix-cache statistics and commit the prompt's whole KV blocks, which this step's
        forward writes (they all lie before the first decoded block)."""
        if not self.takes_part(params):
            return
        record_prefix_cache_hit(self.manager, request, hit)
        first_decoded = request.num_prompt_tokens // params.block_length * params.block_length
        self.manager.cache_blocks(request, first_decoded)

    def final(self, request: Request, kv_final_end: int) -> None:
        """Commit a running request's KV blocks up to the end of its exact K/V, and of its
        output tokens (the hashes cover only tokens vLLM has: the final ones)."""
        self.manager.cache_blocks(request, min(kv_final_end, request.num_tokens))
