"""The per-request diffusion parameters: their names, values, defaults and descriptions.

The table that `vllm_dllm.config` parses and validates against, and that the README's parameter
table is checked against (`tests/test_docs.py`). `vllm_dllm.config` re-exports every name.
"""

from __future__ import annotations

from typing import Any

#: Cache modes (docs/design.md, step 1).
CACHE_MODES = ("none", "prefix", "dual")
#: Selection rules (docs/design.md, step 4); each has the parameter `dllm_<rule>`.
RULES = ("threshold", "factor", "steps")
#: Confidence scores for selection (docs/design.md, step 3), and SDAR's two schedules.
REMASKING_MODES = (
    "low_confidence", "random", "low_confidence_dynamic", "low_confidence_static",
    "entropy_bounded",
)  # fmt: skip

DEFAULT_BLOCK_LENGTH = 32
DEFAULT_CACHE = "dual"
DEFAULT_THRESHOLD = 0.9
DEFAULT_REMASKING = "low_confidence"
#: The EB-sampler's bound (SDAR's release default `eb_threshold`).
DEFAULT_EB_THRESHOLD = 0.35
#: Dream's `diffusion_generate` samplers (its `alg`).
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

#: Parameter name -> (default for LLaDA and Dream, description). The README's parameter table
#: is checked against it; `vllm_dllm.families` says which keys each family accepts.
DLLM_PARAM_DOCS: dict[str, tuple[Any, str]] = {
    "dllm_block_length": (
        DEFAULT_BLOCK_LENGTH,
        "Tokens per block (int >= 1). The canvas is max_tokens rounded up to a multiple of it; "
        "blocks are decoded left to right.",
    ),
    "dllm_cache": (
        DEFAULT_CACHE,
        "KV cache mode: none (recompute everything each step), prefix (Fast-dLLM PrefixCache) "
        "or dual (Fast-dLLM DualCache). Fast-dLLM v2: none (default) or dual (its sub-block "
        "cache); SDAR: not accepted (its cache of finished blocks is exact).",
    ),
    "dllm_threshold": (
        DEFAULT_THRESHOLD,
        "Threshold rule (the default rule), float in (0, 1]: commit every masked position with "
        "confidence >= threshold, and always the most confident one. Fast-dLLM v2 and SDAR "
        "(default 0.95): strictly above the threshold, as their releases compare.",
    ),
    "dllm_factor": (
        None,
        "Factor rule, float > 0: commit the longest run of most-confident positions whose i-th "
        "confidence is >= 1 - factor / (i + 1). Excludes dllm_threshold and dllm_steps.",
    ),
    "dllm_steps": (
        None,
        "Steps rule (original LLaDA schedule), int >= 1, a multiple of the number of blocks: "
        "steps over the whole generation, split evenly over the blocks. Excludes "
        "dllm_threshold and dllm_factor. With dllm_alg: the steps of Dream's schedule, over the "
        "whole generation (Dream's own loop, default max_tokens) or, in the block loop, a "
        "multiple of the number of blocks giving each at least 2, the block's first forward "
        "counting as its step 0 (default: the generated length). SDAR and LLaDA 2.x: steps per "
        "block, as their releases' steps (default: the block length, one token per step), "
        "giving each step a quota that the threshold rule combines with.",
    ),
    "dllm_remasking": (
        DEFAULT_REMASKING,
        "Score used by the rule: low_confidence (the model's probability of its proposal) or "
        "random (uniform random scores). SDAR: low_confidence_dynamic (default: every masked "
        "position above dllm_threshold if there are at least the step's quota, else the quota's "
        "most confident) or low_confidence_static (the quota's most confident). LLaDA, Dream "
        "and SDAR: entropy_bounded (the EB-sampler: commit the lowest-entropy positions while "
        "their summed entropy stays within dllm_eb_threshold, at least one; replaces the "
        "threshold, factor and steps rules).",
    ),
    "dllm_alg": (
        None,
        "LLaDA and Dream: Dream's sampler, one of origin, maskgit_plus, topk_margin, entropy. "
        "Alone (dllm_block_length defaults to max_tokens, dllm_cache to none): Dream's "
        "diffusion_generate loop, the generation one block and every step a full forward, "
        "dllm_steps steps on Dream's schedule. With dllm_block_length < max_tokens or dllm_cache "
        "prefix/dual (not origin): Fast-dLLM's Dream block loop, Dream's schedule in each block "
        "scored by the alg. With dllm_threshold (topk_margin, maskgit_plus) or dllm_factor "
        "(maskgit_plus): that rule, comparing the alg's score.",
    ),
    "dllm_alg_temp": (
        None,
        "With dllm_alg's schedule (not origin, no threshold or factor), float >= 0 (Dream's "
        "alg_temp): > 0 draws each step's positions in proportion to softmax(score / alg_temp) "
        "instead of taking the top scores.",
    ),
    "dllm_suffix": (
        None,
        "LLaDA and Dream: infilling, the text (or token ids) after the generated gap: the "
        "canvas is prompt, max_tokens MASK positions (rounded up to whole blocks), then the "
        "suffix (text: its tokens then EOS). Fixed context, never generated or returned; the "
        "server's completions suffix. Block-diffusion families refuse it (block-causal).",
    ),
    "dllm_eb_threshold": (
        None,
        "With dllm_remasking entropy_bounded (default 0.35), float > 0: the bound on the summed "
        "entropy (nats) of a step's commits, each position's entropy taken over its "
        "distribution after temperature and top-k / top-p / min-p.",
    ),
    "dllm_sub_block_length": (
        None,
        "Fast-dLLM v2 only (default 8): sub-blocks decoded left to right inside each block; "
        "must divide the block length.",
    ),
    "dllm_editing_threshold": (
        None,
        "LLaDA 2.x only: LLaDA 2.1's token editing (its release uses 0.9), float in (0, 1]: "
        "decoded tokens of the current block are rewritten where the model proposes another "
        "token with confidence strictly above it; one MASK committed per step at least.",
    ),
    "dllm_max_post_steps": (
        None,
        "LLaDA 2.x with dllm_editing_threshold (default 16): extra editing steps after a block "
        "has no MASK left, ending after the first that edits nothing.",
    ),
}
DLLM_PARAM_NAMES: tuple[str, ...] = tuple(DLLM_PARAM_DOCS)
