"""The block-diffusion families' loops (Fast-dLLM v2, SDAR, LLaDA 2.x) as plain host integers.

Blocks are aligned to position 0 and attention across blocks is causal, so the K/V of a finished
block are exact once a forward that saw exactly its final tokens wrote them (the prompt's
prefill, Fast-dLLM v2's finished-block forward, SDAR's and LLaDA 2.x's extra window in the next
block's first step). Each state tracks how far that holds (`kv_final_end`): what vLLM's prefix
cache may share with later requests. A request whose prompt starts with cached blocks
(`cached_prefix`) prefills only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from vllm_dllm.cache.policy import StepPlan, Window, block_windows
from vllm_dllm.denoising.request import RequestState, Targets
from vllm_dllm.families import Loop
from vllm_dllm.sampling import SelectionRule, steps_quota


class _Phase(Enum):
    #: One forward over the prompt's whole blocks, writing their K/V.
    PREFILL = "prefill"
    #: Denoising steps of the current block.
    DECODE = "decode"
    #: Fast-dLLM v2: the finished block's K/V write, whose last row gives the next block's first
    #: token.
    NEXT_TOKEN = "next_token"


@dataclass
class _BlockDiffusionState(RequestState):
    """Blocks aligned to position 0; decoding starts at the block holding the prompt's end."""

    phase: _Phase = field(init=False)
    block_start: int = field(init=False)
    #: Which columns of the current block still hold MASK.
    masked: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        block = self.params.block_length
        self.block_start = self.prompt_len // block * block
        self.masked = self.block_start + np.arange(block) >= self.prompt_len
        self.phase = _Phase.PREFILL if self.block_start else _Phase.DECODE

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    @property
    def threshold(self) -> float:
        """Both releases commit confidences *strictly* above the threshold: in float32 that is
        `>=` the next float32 up."""
        return float(np.nextafter(np.float32(self.params.threshold), np.float32(np.inf)))

    def _prefill(self) -> StepPlan:
        """The prompt's whole blocks that the prefix cache did not supply (never none: the
        scheduler leaves at least the last whole block to compute, so the forward counts agree
        with and without the cache)."""
        return StepPlan(
            block_windows(self.cached_prefix, self.block_start, self.params.block_length)
        )

    def _next_block(self) -> None:
        self.blocks_done += 1
        self.block_start += self.params.block_length
        self.masked = np.ones(self.params.block_length, dtype=bool)

    def _record(self, committed: np.ndarray, first_masked: int) -> int:
        """Account for the step just run (called before the state moves on)."""
        # The step's windows that end at or before the current block are final writes: the
        # prefill, a finished block's exact K/V. Windows of the current block never are (its
        # tokens are not all final; Fast-dLLM v2's sub-block cache writes stale K/V there).
        for window in self.plan().windows:
            if window.end <= self.block_start:
                self.kv_final_end = max(self.kv_final_end, window.end)
        self.steps += 1
        self.masked &= committed[: self.params.block_length] < 0
        return self.block_start + first_masked


@dataclass
class FastDllmV2State(_BlockDiffusionState):
    """Fast-dLLM v2's `batch_sample` for one request (docs/design.md).

    Sub-blocks are decoded left to right inside each block; a step forwards the whole block
    against the finished blocks' K/V and commits, in the current sub-block, every masked
    position strictly above the threshold and always the most confident one. A finished block
    gets one more forward that writes its exact K/V; its last row's argmax is the next block's
    first token. With the sub-block cache (`dllm_cache: dual`) a step recomputes only the
    sub-block, against the K/V of the block's last full pass, whenever that pass is current
    enough (the sub-block's first position is committed).
    """

    #: A full-block pass has run in the current block (the sub-block cache may reuse it).
    full_pass_done: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # A prompt that ends on a block boundary gets its first token from the prefill.
        self._prefill_gives_token = self.phase is _Phase.PREFILL and (
            self.block_start == self.prompt_len
        )

    @property
    def _sub_block(self) -> tuple[int, int]:
        """Columns `[a, b)` of the current sub-block: the first with a masked position."""
        size = self.params.sub_block_length or self.params.block_length
        first = int(np.argmax(self.masked))
        start = first // size * size
        return start, start + size

    def _sub_block_only(self) -> bool:
        a, _ = self._sub_block
        return self.params.cache == "dual" and self.full_pass_done and not self.masked[a]

    def plan(self) -> StepPlan:
        if self.phase is _Phase.PREFILL:
            return self._prefill()
        if self.phase is _Phase.NEXT_TOKEN:
            return StepPlan((Window(self.block_start - self.params.block_length,
                                    self.block_start, self.block_start),))  # fmt: skip
        if self._sub_block_only():
            a, b = self._sub_block
            return StepPlan((Window(self.block_start + a, self.block_start + b, self.block_end),))
        return StepPlan((Window(self.block_start, self.block_end, self.block_end),))

    def targets(self) -> Targets:
        block = self.params.block_length
        if self.phase is _Phase.NEXT_TOKEN or (
            self.phase is _Phase.PREFILL and self._prefill_gives_token
        ):
            return Targets(self.block_start, block, 0, 1, 1, SelectionRule.THRESHOLD, greedy=True)
        if self.phase is _Phase.PREFILL:
            return Targets(self.block_start, block, 0, 0, 0, SelectionRule.THRESHOLD)
        a, b = self._sub_block
        return Targets(self.block_start, block, a, b, int(self.masked[a:b].sum()),
                       SelectionRule.THRESHOLD)  # fmt: skip

    def advance(self, committed: np.ndarray, first_masked: int) -> int:
        if self.phase is _Phase.DECODE and not self._sub_block_only():
            self.full_pass_done = True
        final_end = self._record(committed, first_masked)
        if self.phase is not _Phase.DECODE:
            self.phase = _Phase.DECODE
        elif not self.masked.any():
            self._next_block()
            self.full_pass_done = False
            self.phase = _Phase.NEXT_TOKEN
        return final_end


@dataclass
class SdarState(_BlockDiffusionState):
    """SDAR's block loop (its evaluation code's greedy path; docs/design.md).

    Step `i` of a block has the quota `k = B // m + (i < B % m)` (`m` = `dllm_steps`, steps per
    block as released, default `B`); `low_confidence_dynamic` commits every masked position
    strictly above the threshold if there are at least `k` of them, else the `k` most
    confident; `low_confidence_static` the `k` most confident. A finished block's exact K/V
    are written by the next block's first step, as a second window of the same forward (the
    same logits as a separate forward, one forward fewer per block).
    """

    rule_step: int = 0
    #: The previous block is finished but its final K/V are not written yet.
    unwritten: bool = False

    @property
    def _steps_per_block(self) -> int:
        return self.params.steps_per_block or self.params.block_length

    @property
    def _dynamic(self) -> bool:
        return self.params.remasking == "low_confidence_dynamic"

    def plan(self) -> StepPlan:
        if self.phase is _Phase.PREFILL:
            return self._prefill()
        current = Window(self.block_start, self.block_end, self.block_end)
        if self.unwritten:
            previous = self.block_start - self.params.block_length
            return StepPlan((Window(previous, self.block_start, self.block_start), current))
        return StepPlan((current,))

    def targets(self) -> Targets:
        block = self.params.block_length
        if self.phase is _Phase.PREFILL:
            return Targets(self.block_start, block, 0, 0, 0, SelectionRule.THRESHOLD)
        quota = int(steps_quota(block, self._steps_per_block, self.rule_step))
        return Targets(
            self.block_start, block, 0, block, int(self.masked.sum()), self._rule, quota,
        )  # fmt: skip

    @property
    def _rule(self) -> SelectionRule:
        if self.params.remasking == "entropy_bounded":
            return SelectionRule.ENTROPY_BOUNDED
        return SelectionRule.DYNAMIC if self._dynamic else SelectionRule.STEPS

    def advance(self, committed: np.ndarray, first_masked: int) -> int:
        final_end = self._record(committed, first_masked)
        if self.phase is _Phase.PREFILL:
            self.phase = _Phase.DECODE
            return final_end
        self.rule_step += 1
        self.unwritten = False
        if not self.masked.any():
            self._next_block()
            self.rule_step = 0
            self.unwritten = True
        return final_end


@dataclass
class Llada2State(SdarState):
    """LLaDA 2.x's `generate` (docs/design.md): SDAR's dynamic rule and block loop, with the
    release's step cap: steps per block at most `max_tokens` (its
    `min(steps, gen_length // minimal_topk)`).

    With `dllm_editing_threshold` it is LLaDA 2.1's loop: every step proposes a token for each
    non-prompt position of the block, commits masked ones by the dynamic rule with a quota of
    one, and rewrites decoded ones whose proposal differs with confidence strictly above the
    editing threshold. Once the block holds no MASK, up to `dllm_max_post_steps` more steps run,
    ending after the first that edits nothing. A block's tokens become final only when it ends.
    """

    #: Steps of the current block that began with no MASK left.
    post_steps: int = 0

    @property
    def _editing(self) -> bool:
        return self.params.editing_threshold is not None

    @property
    def _steps_per_block(self) -> int:
        return min(super()._steps_per_block, self.params.max_tokens)

    @property
    def _dynamic(self) -> bool:
        return True

    def targets(self) -> Targets:
        if not self._editing or self.phase is _Phase.PREFILL:
            return super().targets()
        lo = max(self.prompt_len - self.block_start, 0)
        block = self.params.block_length
        return Targets(self.block_start, block, lo, block, block - lo, SelectionRule.DYNAMIC,
                       quota=1, edit_threshold=self._edit_threshold)  # fmt: skip

    @property
    def _edit_threshold(self) -> float:
        """Compared strictly (`>`) in float32 on the device, as the release compares."""
        assert self.params.editing_threshold is not None
        return self.params.editing_threshold

    def advance(self, committed: np.ndarray, first_masked: int) -> int:
        if not self._editing or self.phase is _Phase.PREFILL:
            return super().advance(committed, first_masked)
        block = self.params.block_length
        was_masked = self.masked.copy()
        edited = bool(((committed[:block] >= 0) & ~was_masked).any())
        self._record(committed, first_masked)
        self.unwritten = False
        done = False
        if not was_masked.any():
            self.post_steps += 1
            done = not edited
        if not self.masked.any() and self.post_steps >= (self.params.max_post_steps or 0):
            done = True
        if not done:
            return self.block_start
        block_end = self.block_end
        self._next_block()
        self.post_steps = 0
        self.unwritten = True
        return block_end


BLOCK_STATES: dict[Loop, type[RequestState]] = {
    Loop.FAST_DLLM_V2: FastDllmV2State,
    Loop.SDAR: SdarState,
    Loop.LLADA2: Llada2State,
}
