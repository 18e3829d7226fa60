"""One request's place in its family's denoising loop, as plain host integers.

The canvas itself lives in device tensors (`vllm_dllm.denoising.canvases`); what the host needs
to plan the next step is counters: which block, which phase of it, which of its positions are
still masked, how far the output is final. The step's single device-to-host transfer reports
what each request committed in its block and where the block's first MASK now is; `advance`
turns that into the next state. Nothing here touches a tensor.

Each family's loop is a state machine (docs/design.md): `BidirectionalState` (LLaDA, Dream,
with Fast-dLLM's cache modes) here, the block-diffusion loops in `block_request.py`. Every step
of every family is described the same way: a `StepPlan` (query windows and their key ranges)
and `Targets` (the block whose masked positions may be committed, which of its columns, and by
which rule), so the device step is one mechanism for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vllm_dllm.cache.policy import CacheMode, StepPlan, plan_step
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
    #: Leading prompt positions whose K/V came from vLLM's prefix cache (block diffusion only).
    cached_prefix: int = 0
    #: End of the leading positions whose tokens are final and whose K/V a forward that saw
    #: exactly those tokens wrote: what the prefix cache may share (0 where never exact).
    kv_final_end: int = 0

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
    if params.family.loop is Loop.BIDIRECTIONAL:
        return BidirectionalState(**fields)  # type: ignore[arg-type]
    from vllm_dllm.denoising.block_request import BLOCK_STATES

    return BLOCK_STATES[params.family.loop](**fields)  # type: ignore[arg-type]


def first_step_tokens(params: DllmParams, prompt_len: int, cached_prefix: int = 0) -> int:
    """Tokens of a new request's first forward (what the scheduler budgets at admission), its
    first `cached_prefix` prompt positions taken from the prefix cache."""
    state = new_state(prompt_len=prompt_len, params=params, logits_shift=0,
                      end_token_ids=frozenset(), temperature=0.0, seed=0,
                      cached_prefix=cached_prefix)  # fmt: skip
    return state.plan().num_tokens
