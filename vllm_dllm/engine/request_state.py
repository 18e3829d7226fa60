"""One request's denoising state, kept by the worker between steps.

The canvas lives here (not in the scheduler's token lists), so a request's tokens can change
position by position while vLLM only ever sees the final prefix. Everything here is host-side
bookkeeping on small tensors; the vocabulary-sized math is batched in `sampling/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_dllm.cache.policy import CacheMode, StepPlan, plan_step
from vllm_dllm.config import DllmParams
from vllm_dllm.sampling import SelectionRule, steps_quota


@dataclass
class RequestState:
    req_id: str
    prompt_len: int
    params: DllmParams
    canvas: torch.Tensor  # [L] int64, CPU
    slots: torch.Tensor  # [L] int64, KV slot of each canvas position
    block_ids: list[int]
    mask_token_id: int
    #: Dream's shifted logits (1) need the block's first forward to commit exactly one token.
    logits_shift: int
    temperature: float
    end_token_ids: frozenset[int]
    generator: torch.Generator | None
    block: int = 0
    first_step: bool = True
    rule_step: int = 0
    masked_at_rule_start: int = 0
    emitted: int = 0
    done: bool = False
    #: Stopped before decoding the whole canvas (end token, or max_tokens short of the canvas).
    early_stop: bool = False
    forwards: int = 0
    rule_id: SelectionRule = field(init=False)
    cache_mode: CacheMode = field(init=False)

    def __post_init__(self) -> None:
        self.rule_id = SelectionRule[self.params.rule.upper()]
        self.cache_mode = CacheMode(self.params.cache)

    @property
    def canvas_len(self) -> int:
        return self.canvas.shape[0]

    @property
    def block_start(self) -> int:
        return self.prompt_len + self.block * self.params.block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    def plan(self) -> StepPlan:
        return plan_step(
            self.cache_mode, self.canvas_len, self.block_start, self.block_end, self.first_step
        )

    @property
    def opens_with_single_commit(self) -> bool:
        """This step is a Dream block opening: it commits position s alone, no rule."""
        return self.first_step and self.logits_shift > 0

    def quota(self) -> int:
        """This step's `steps`-rule quota (0 for the other rules)."""
        steps_per_block = self.params.steps_per_block
        if steps_per_block is None:
            return 0
        masked = self.params.block_length if self.first_step else self.masked_at_rule_start
        return int(steps_quota(masked, steps_per_block, self.rule_step))

    def commit(self, positions: list[int], tokens: list[int]) -> list[int]:
        """Write the committed tokens, advance the block, and return the newly final tokens."""
        self.forwards += 1
        if positions:
            self.canvas[positions] = torch.tensor(tokens, dtype=self.canvas.dtype)
        block = self.canvas[self.block_start : self.block_end]
        masked = block.eq(self.mask_token_id)
        num_masked = int(masked.sum())
        if self.opens_with_single_commit:
            # The rule starts on the next step, over what the single commit left masked.
            self.masked_at_rule_start = num_masked
            self.rule_step = 0
        else:
            if self.first_step:
                self.masked_at_rule_start = self.params.block_length
            self.rule_step += 1
        self.first_step = False
        if num_masked == 0:
            final_end = self.block_end
            self.block += 1
            self.first_step = True
            self.rule_step = 0
        else:
            final_end = self.block_start + int(masked.to(torch.uint8).argmax())
        return self._emit(final_end)

    def _emit(self, final_end: int) -> list[int]:
        """Tokens of `[P + emitted, final_end)`, cut after an end token or at `max_tokens`."""
        start = self.prompt_len + self.emitted
        stop = min(final_end, self.prompt_len + self.params.max_tokens)
        new = self.canvas[start:stop].tolist() if stop > start else []
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
