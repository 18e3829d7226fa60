"""One request's place in its family's denoising loop, as plain host integers.

The canvas itself lives in device tensors (`vllm_dllm.denoising.canvases`); what the host needs
to plan the next step is counters: which block, which phase of it, which of its positions are
still masked, how far the output is final. The step's single device-to-host transfer reports
what each request committed in its block and where the block's first MASK now is; `advance`
turns that into the next state. Nothing here touches a tensor.

Each family's loop is a state machine (docs/design.md): `BidirectionalState` (LLaDA, Dream,
with Fast-dLLM's cache modes), `FastDllmV2State` and `SdarState` (block diffusion). Every step
of every family is described the same way: a `StepPlan` (query windows and their key ranges)
and `Targets` (the block whose masked positions may be committed, which of its columns, and by
which rule), so the device step is one mechanism for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from vllm_dllm.cache.policy import CacheMode, StepPlan, Window, block_windows, plan_step
from vllm_dllm.config import DllmParams
from vllm_dllm.denoising.logprobs import LogprobRecord
from vllm_dllm.families import Loop
from vllm_dllm.sampling import ScoreKind, SelectionRule, steps_quota


@dataclass(frozen=True)
class Targets:
    """What a step may commit: masked positions of block columns `[lo, hi)`, by `rule`."""

    block_start: int
    block_len: int
    lo: int
    hi: int
    num_candidates: int
    rule: SelectionRule
    quota: int = 0
    #: Take the argmax whatever the request's temperature (Fast-dLLM v2's next-block token).
    greedy: bool = False
    #: LLaDA 2.1's editing: every column of `[lo, hi)` is a candidate, and a committed one is
    #: rewritten where the proposal differs with confidence strictly above this.
    edit_threshold: float | None = None
    #: This step's own threshold (Dream's `origin` schedule), instead of the request's.
    threshold: float | None = None


@dataclass
class RequestState:
    """What every family's loop shares: the request's parameters, finality and emission."""

    prompt_len: int
    params: DllmParams
    #: The model's contract on which hidden state scores a position: 0 for LLaDA and SDAR, 1 for
    #: Dream and Fast-dLLM v2 (position j is predicted from hidden state j - 1).
    logits_shift: int
    end_token_ids: frozenset[int]
    temperature: float
    #: Seed of the request's counter-based random numbers (`vllm_dllm.sampling.noise`).
    seed: int
    #: vLLM's `top_k`, `top_p`, `min_p` (0, 1, 0: off), applied to sampled rows before the draw.
    filters: tuple[int, float, float] = (0, 1.0, 0.0)
    #: Denoising steps taken so far: the counter of the request's random numbers.
    steps: int = 0
    emitted: int = 0
    done: bool = False
    #: Stopped before decoding the whole canvas (end token, or max_tokens short of the canvas).
    early_stop: bool = False
    #: Blocks fully decoded so far.
    blocks_done: int = 0
    #: The log-probabilities of its committed tokens, for a request that asked (else None).
    logprobs: LogprobRecord | None = None

    @property
    def canvas_len(self) -> int:
        return self.params.canvas_length(self.prompt_len)

    @property
    def gap_end(self) -> int:
        """End of the decoded positions: the canvas without an infilling suffix, which is
        fixed context (never decoded, never emitted)."""
        return self.canvas_len - len(self.params.suffix)

    @property
    def remasks_randomly(self) -> bool:
        """Scored by uniform random numbers: `random` remasking, Dream's `origin`."""
        return self.params.remasking == "random" or self.params.alg == "origin"

    @property
    def threshold(self) -> float:
        """The threshold as the selection compares it (`>=` in float32)."""
        return self.params.threshold or 1.0

    @property
    def score_kind(self) -> ScoreKind:
        """What scores this request's candidates: the entropy-bounded rule and Dream's `entropy`
        score by negative entropy, Dream's `topk_margin` by the top-2 margin."""
        if self.params.remasking == "entropy_bounded" or self.params.alg == "entropy":
            return ScoreKind.NEG_ENTROPY
        if self.params.alg == "topk_margin":
            return ScoreKind.MARGIN
        return ScoreKind.PROBABILITY

    def plan(self) -> StepPlan:
        raise NotImplementedError

    def targets(self) -> Targets:
        raise NotImplementedError

    def advance(self, committed: np.ndarray, first_masked: int) -> int:
        """Account for one step; return the end of the final prefix of the canvas.

        `committed` holds the token committed at each column of the step's block (-1 where
        none); `first_masked` is the block offset of its first still-masked position after the
        commits (the block length when none is left).
        """
        raise NotImplementedError

    def newly_final(self, final_end: int) -> tuple[int, int]:
        """Canvas range `[start, stop)` of tokens that became final and are not yet emitted."""
        start = self.prompt_len + self.emitted
        return start, max(start, min(final_end, self.prompt_len + self.params.max_tokens))

    def emit(self, tokens: Sequence[int], final_end: int) -> list[int]:
        """Emit the newly final `tokens`, cut after an end token; decide whether to stop."""
        new = list(tokens)
        for i, token in enumerate(new):
            if token in self.end_token_ids:
                new = new[: i + 1]
                self.done = True
                break
        self.emitted += len(new)
        if self.emitted >= self.params.max_tokens or final_end >= self.gap_end:
            self.done = True
        self.early_stop = self.done and final_end < self.gap_end
        return new


@dataclass
class BidirectionalState(RequestState):
    """LLaDA and Dream: blocks after the prompt, Fast-dLLM's cache modes, three rules."""

    block: int = 0
    first_step: bool = True
    rule_step: int = 0
    #: Masked positions of the block when its rule started (the `steps` schedule's `M`).
    masked_at_rule_start: int = 0
    #: Masked positions left in the current block.
    num_masked: int = field(init=False)
    rule_id: SelectionRule = field(init=False)
    cache_mode: CacheMode = field(init=False)

    def __post_init__(self) -> None:
        self.num_masked = self.params.block_length
        self.rule_id = (
            SelectionRule.ENTROPY_BOUNDED
            if self.params.remasking == "entropy_bounded"
            else SelectionRule[self.params.rule.upper()]
        )
        self.cache_mode = CacheMode(self.params.cache)

    @property
    def block_start(self) -> int:
        return self.prompt_len + self.block * self.params.block_length

    def plan(self) -> StepPlan:
        block_end = self.block_start + self.params.block_length
        return plan_step(
            self.cache_mode, self.canvas_len, self.block_start, block_end, self.first_step,
            self.gap_end,
        )  # fmt: skip

    @property
    def opens_with_single_commit(self) -> bool:
        """This step is a Dream block opening: it commits the block's first position alone.

        That position is predicted from hidden state `s - 1`, which no cached step of the block
        recomputes, so it is committed by the block's full forward, without the rule.
        """
        return self.first_step and self.logits_shift > 0

    def targets(self) -> Targets:
        opening = self.opens_with_single_commit
        return Targets(
            block_start=self.block_start,
            block_len=self.params.block_length,
            lo=0,
            hi=1 if opening else self.params.block_length,
            num_candidates=1 if opening else self.num_masked,
            rule=self.rule_id,
            quota=self.quota(),
        )

    def quota(self) -> int:
        """This step's `steps`-rule quota (0 for the other rules and for a Dream opening)."""
        steps_per_block = self.params.steps_per_block
        if steps_per_block is None or self.opens_with_single_commit:
            return 0
        masked = self.params.block_length if self.first_step else self.masked_at_rule_start
        return int(steps_quota(masked, steps_per_block, self.rule_step))

    def advance(self, committed: np.ndarray, first_masked: int) -> int:
        self.steps += 1
        self.num_masked -= int((committed >= 0).sum())
        if self.opens_with_single_commit:
            # The rule starts on the next step, over what the single commit left masked.
            self.masked_at_rule_start = self.num_masked
            self.rule_step = 0
        else:
            if self.first_step:
                self.masked_at_rule_start = self.params.block_length
            self.rule_step += 1
        self.first_step = False
        final_end = self.block_start + first_masked
        if self.num_masked == 0:
            self.block += 1
            self.blocks_done += 1
            self.first_step = True
            self.rule_step = 0
            self.num_masked = self.params.block_length
        return final_end


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
        return StepPlan(block_windows(0, self.block_start, self.params.block_length))

    def _next_block(self) -> None:
        self.blocks_done += 1
        self.block_start += self.params.block_length
        self.masked = np.ones(self.params.block_length, dtype=bool)

    def _record(self, committed: np.ndarray, first_masked: int) -> int:
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


_STATES: dict[Loop, type[RequestState]] = {
    Loop.BIDIRECTIONAL: BidirectionalState,
    Loop.FAST_DLLM_V2: FastDllmV2State,
    Loop.SDAR: SdarState,
    Loop.LLADA2: Llada2State,
}


def new_state(**fields: object) -> RequestState:
    """The loop state of a new request, of its family's kind (`params.family`), or Dream's
    schedule when it asks for Dream's sampler (`dllm_alg`) without a rule: its own loop, or
    Fast-dLLM's block loop with the schedule in each block. (With a rule, the alg only names
    the score: `RequestState.score_kind`.)"""
    params = fields["params"]
    assert isinstance(params, DllmParams)
    if params.alg is not None and params.rule == "steps":
        from vllm_dllm.denoising.dream_alg import DreamAlgState, DreamBlockAlgState

        state = DreamAlgState if params.dream_loop else DreamBlockAlgState
        return state(**fields)  # type: ignore[arg-type]
    return _STATES[params.family.loop](**fields)  # type: ignore[arg-type]


def first_step_tokens(params: DllmParams, prompt_len: int) -> int:
    """Tokens of a new request's first forward (what the scheduler budgets at admission)."""
    state = new_state(prompt_len=prompt_len, params=params, logits_shift=0,
                      end_token_ids=frozenset(), temperature=0.0, seed=0)  # fmt: skip
    return state.plan().num_tokens
