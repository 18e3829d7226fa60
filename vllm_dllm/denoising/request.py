"""One request's place in the denoising loop, as plain host integers.

The canvas itself lives in device tensors (`vllm_dllm.denoising.canvases`); what the host needs
to plan the next step is only counters: which block, whether this is the block's first step,
how many of its positions are still masked, how far the output is final. The step's single
device-to-host transfer reports how many positions each request committed and where its block's
first MASK now is; `advance` turns that into the next state. Nothing here touches a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_dllm.cache.policy import CacheMode, StepPlan, plan_step
from vllm_dllm.config import DllmParams
from vllm_dllm.sampling import SelectionRule, steps_quota


@dataclass
class RequestState:
    """The loop state of one request (docs/design.md, "The algorithm")."""

    prompt_len: int
    params: DllmParams
    #: The model's contract on which hidden state scores a position: 0 for LLaDA, 1 for Dream
    #: (position j is predicted from hidden state j - 1).
    logits_shift: int
    end_token_ids: frozenset[int]
    temperature: float
    #: Seed of the request's counter-based random numbers (`vllm_dllm.sampling.noise`).
    seed: int
    block: int = 0
    first_step: bool = True
    rule_step: int = 0
    #: Masked positions of the block when its rule started (the `steps` schedule's `M`).
    masked_at_rule_start: int = 0
    #: Masked positions left in the current block.
    num_masked: int = field(init=False)
    #: Denoising steps taken so far: the counter of the request's random numbers.
    steps: int = 0
    emitted: int = 0
    done: bool = False
    #: Stopped before decoding the whole canvas (end token, or max_tokens short of the canvas).
    early_stop: bool = False
    rule_id: SelectionRule = field(init=False)
    cache_mode: CacheMode = field(init=False)

    def __post_init__(self) -> None:
        self.num_masked = self.params.block_length
        self.rule_id = SelectionRule[self.params.rule.upper()]
        self.cache_mode = CacheMode(self.params.cache)

    @property
    def canvas_len(self) -> int:
        return self.params.canvas_length(self.prompt_len)

    @property
    def block_start(self) -> int:
        return self.prompt_len + self.block * self.params.block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    @property
    def samples(self) -> bool:
        """The request draws Gumbel noise (temperature > 0)."""
        return self.temperature > 0

    @property
    def remasks_randomly(self) -> bool:
        return self.params.remasking == "random"

    def plan(self) -> StepPlan:
        return plan_step(
            self.cache_mode, self.canvas_len, self.block_start, self.block_end, self.first_step
        )

    @property
    def opens_with_single_commit(self) -> bool:
        """This step is a Dream block opening: it commits the block's first position alone.

        That position is predicted from hidden state `s - 1`, which no cached step of the block
        recomputes, so it is committed by the block's full forward, without the rule.
        """
        return self.first_step and self.logits_shift > 0

    @property
    def num_candidates(self) -> int:
        """Positions this step may commit, i.e. the rows that need logits."""
        return 1 if self.opens_with_single_commit else self.num_masked

    def quota(self) -> int:
        """This step's `steps`-rule quota (0 for the other rules and for a Dream opening)."""
        steps_per_block = self.params.steps_per_block
        if steps_per_block is None or self.opens_with_single_commit:
            return 0
        masked = self.params.block_length if self.first_step else self.masked_at_rule_start
        return int(steps_quota(masked, steps_per_block, self.rule_step))

    def advance(self, num_committed: int, first_masked: int) -> int:
        """Account for one step's commits; return the end of the final prefix of the canvas.

        `first_masked` is the offset in the block of its first still-masked position after the
        commits (`block_length` when none is left).
        """
        self.steps += 1
        self.num_masked -= num_committed
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
            self.first_step = True
            self.rule_step = 0
            self.num_masked = self.params.block_length
        return final_end

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
        if self.emitted >= self.params.max_tokens or final_end >= self.canvas_len:
            self.done = True
        self.early_stop = self.done and final_end < self.canvas_len
        return new
