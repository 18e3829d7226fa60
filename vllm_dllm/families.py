"""Model families and what their decoding loops accept.

Two kinds of diffusion LM are served by one engine:

- **bidirectional** (LLaDA, Dream): every position attends to the whole canvas; Fast-dLLM's
  approximate cache modes and three selection rules apply.
- **block diffusion** (Fast-dLLM v2, SDAR, LLaDA 2.x): blocks of `B` positions aligned to
  position 0, a query in block k attends to blocks `0..k` only, so a finished block's K/V is
  exact and final.
  Each family has its own released loop (docs/design.md, "Block-diffusion families"), its own
  parameters and its own defaults; a parameter that has no meaning for a family is rejected
  rather than ignored, so a request never silently gets something other than what it asked for.

`family_of` reads the family from the Hugging Face config, which every vLLM process holds (the
front end validating a request, the scheduler sizing its canvas, the workers decoding it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Loop(str, Enum):
    """Which decoding loop a family runs (`vllm_dllm.denoising.request`)."""

    BIDIRECTIONAL = "bidirectional"
    FAST_DLLM_V2 = "fast_dllm_v2"
    SDAR = "sdar"
    LLADA2 = "llada2"


@dataclass(frozen=True)
class Family:
    """A family's loop and the per-request parameters it accepts, with its defaults."""

    name: str
    loop: Loop
    #: Block length of the loop: the trained block for block-diffusion families.
    block_length: int
    #: Whether `dllm_block_length` may differ from `block_length`.
    block_length_overridable: bool
    #: `dllm_*` keys the family accepts (any other known key is rejected for it).
    params: frozenset[str]
    default_cache: str
    default_threshold: float
    #: Values of `dllm_remasking` the family accepts (its first is the default).
    remasking: tuple[str, ...]
    caches: tuple[str, ...] = ()

    @property
    def block_causal(self) -> bool:
        return self.loop is not Loop.BIDIRECTIONAL


_BIDIRECTIONAL_PARAMS = frozenset({
    "dllm_block_length", "dllm_cache", "dllm_threshold", "dllm_factor", "dllm_steps",
    "dllm_remasking", "dllm_eb_threshold", "dllm_alg", "dllm_alg_temp", "dllm_suffix",
})  # fmt: skip

BIDIRECTIONAL = Family(
    name="bidirectional (LLaDA, Dream)",
    loop=Loop.BIDIRECTIONAL,
    block_length=32,
    block_length_overridable=True,
    params=_BIDIRECTIONAL_PARAMS,
    default_cache="dual",
    default_threshold=0.9,
    remasking=("low_confidence", "random", "entropy_bounded"),
    caches=("none", "prefix", "dual"),
)

#: Default threshold of both block-diffusion loops: Fast-dLLM v2's `batch_sample` default and
#: SDAR's evaluation setting behind its published numbers (its generate.py says 0.85, its
#: README 0.9).
BLOCK_DIFFUSION_THRESHOLD = 0.95
#: Fast-dLLM v2's `small_block_size` default.
DEFAULT_SUB_BLOCK_LENGTH = 8
#: SDAR's block when its config does not say (the released 4B/8B configs do not).
SDAR_DEFAULT_BLOCK = 4
#: Fast-dLLM v2's block when its config does not say (`bd_size` of the releases).
FAST_DLLM_V2_DEFAULT_BLOCK = 32


def _block_diffusion(
    name: str,
    loop: Loop,
    block_length: int,
    *,
    overridable: bool,
    params: set[str],
    remasking: tuple[str, ...],
    caches: tuple[str, ...] = (),
) -> Family:
    """A block-diffusion family: every such loop takes a block length and a threshold (0.95
    unless the request says), besides its own `params`; no cache unless the request asks."""
    return Family(
        name=name,
        loop=loop,
        block_length=block_length,
        block_length_overridable=overridable,
        params=frozenset({"dllm_block_length", "dllm_threshold", *params}),
        default_cache="none",
        default_threshold=BLOCK_DIFFUSION_THRESHOLD,
        remasking=remasking,
        caches=caches,
    )


def fast_dllm_v2(block_length: int) -> Family:
    """Fast-dLLM v2: its modeling code builds the attention mask from the config's `bd_size`,
    so the block is fixed; the sub-block cache (`dllm_cache: dual`) is its approximation."""
    return _block_diffusion(
        "Fast-dLLM v2", Loop.FAST_DLLM_V2, block_length, overridable=False,
        params={"dllm_cache", "dllm_sub_block_length"},
        remasking=("low_confidence",), caches=("none", "dual"),
    )  # fmt: skip


def sdar(block_length: int) -> Family:
    """SDAR: its generate script takes the block length as an argument; its cache is exact, so
    there is no cache mode to choose."""
    return _block_diffusion(
        "SDAR", Loop.SDAR, block_length, overridable=True,
        params={"dllm_steps", "dllm_remasking", "dllm_eb_threshold"},
        remasking=("low_confidence_dynamic", "low_confidence_static", "entropy_bounded"),
    )  # fmt: skip


#: LLaDA 2.x's block (its generate's default; the config does not say).
LLADA2_DEFAULT_BLOCK = 32
#: LLaDA 2.1's `max_post_steps` default.
DEFAULT_MAX_POST_STEPS = 16


def llada2(block_length: int) -> Family:
    """LLaDA 2.x: SDAR's dynamic rule with its own defaults (threshold 0.95, one token per step
    at least: 32 steps per block of 32); its generate takes the block length as an argument.
    LLaDA 2.1's token editing is the same model with another loop: on per request (or server
    wide) with `dllm_editing_threshold`, as the 2.1 release's generate takes it as an argument
    and its checkpoint files do not say."""
    return _block_diffusion(
        "LLaDA 2", Loop.LLADA2, block_length, overridable=True,
        params={"dllm_steps", "dllm_editing_threshold", "dllm_max_post_steps"},
        remasking=("low_confidence_dynamic",),
    )  # fmt: skip


#: One of each family, at its default block (what it accepts does not depend on the block): for
#: messages about a parameter when the served model is not known yet.
FAMILIES: tuple[Family, ...] = (
    BIDIRECTIONAL,
    fast_dllm_v2(FAST_DLLM_V2_DEFAULT_BLOCK),
    sdar(SDAR_DEFAULT_BLOCK),
    llada2(LLADA2_DEFAULT_BLOCK),
)


def family_of(hf_config: Any) -> Family:
    """The family of a checkpoint, from its Hugging Face config."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "Fast_dLLM_Qwen":
        block = getattr(hf_config, "bd_size", None) or FAST_DLLM_V2_DEFAULT_BLOCK
        return fast_dllm_v2(int(block))
    if model_type == "sdar":
        return sdar(int(getattr(hf_config, "block_size", None) or SDAR_DEFAULT_BLOCK))
    if model_type == "llada2_moe":
        return llada2(LLADA2_DEFAULT_BLOCK)
    return BIDIRECTIONAL


@dataclass(frozen=True)
class SamplingConvention:
    """How a family's release samples a candidate row at temperature > 0 (docs/design.md,
    "Sampling"): which probability scores the drawn token, and the order of its filters."""

    #: The confidence is the drawn token's probability under the filtered, temperature-scaled
    #: distribution (Dream, Fast-dLLM v2, SDAR, LLaDA 2.x) rather than under the raw logits
    #: (LLaDA, whose release scores its Gumbel-max sample by `softmax(logits)`).
    tempered_confidence: bool
    #: Top-p over the full distribution, then top-k (Dream's `sample_tokens`); otherwise top-k
    #: first and top-p over what it kept (SDAR's and LLaDA 2.x's releases, vLLM's sampler).
    top_p_first: bool


def sampling_convention(hf_config: Any) -> SamplingConvention:
    """The sampling convention of a checkpoint's family, from its Hugging Face config."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "Dream":
        return SamplingConvention(tempered_confidence=True, top_p_first=True)
    return SamplingConvention(tempered_confidence=family_of(hf_config).block_causal,
                              top_p_first=False)  # fmt: skip
