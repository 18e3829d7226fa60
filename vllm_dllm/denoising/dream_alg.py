"""Dream's own sampler (`dllm_alg`), for one request: its release's loop, or inside Fast-dLLM's.

Selected with `dllm_alg` (docs/design.md, "Dream's sampler"). Dream's schedule runs `S` steps
over timesteps `linspace(1, eps, S + 1)` (`eps` 1e-3): step `i`, from time `t` to `s`, commits

- `origin`: each masked position independently with probability `1 - s / t` (all at the last
  step), its token drawn as usual: a uniform random score and the BERNOULLI rule;
- `maskgit_plus`, `topk_margin`, `entropy`: the `int(masked * (1 - s / t))` best-scored
  positions (all that are left at the last step; a step may commit none), scored by the
  proposal's probability, the top-1 minus top-2 probability, or the negative entropy; with
  `dllm_alg_temp` > 0 drawn in proportion to `softmax(score / alg_temp)` instead.

`DreamAlgState` is Dream's `diffusion_generate`: the whole generation is one block, `S` =
`dllm_steps`, and every step is a full forward over the canvas (no cache: each step's logits see
every commit). `DreamBlockAlgState` is Fast-dLLM's Dream block loop (its `generation_utils_block`)
with the request's score: the bidirectional block loop (`BidirectionalState`, any cache mode),
`S` = `dllm_steps / blocks` steps per block, step 0 the block's full forward (for Dream it
commits the block's first position alone, as the release does; for LLaDA, which has no such
opening, it is the schedule's first step), steps `1 .. S - 1` Dream's schedule over the block's
masked positions.

The schedule's numbers are computed as the release computes them: its timesteps (a CPU
`torch.linspace`, made once per request) and float32 arithmetic on them (NumPy float32 scalars,
which round as torch's float32 ops do; no tensor is read during a step), so the quotas are the
release's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_dllm.cache.policy import StepPlan, Window
from vllm_dllm.denoising.request import BidirectionalState, RequestState, Targets
from vllm_dllm.sampling import SelectionRule

#: Dream's `eps`: the schedule's last timestep.
EPS = 1e-3


@dataclass
class DreamAlgState(RequestState):
    """Dream's `diffusion_generate` loop (see the module docstring)."""

    step: int = 0
    num_masked: int = field(init=False)
    timesteps: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        assert self.params.steps is not None and self.params.alg is not None
        self.num_masked = self.params.gen_length
        self.timesteps = torch.linspace(1, EPS, self.params.steps + 1).numpy()

    @property
    def _last(self) -> bool:
        return self.step >= self.params.steps - 1  # type: ignore[operator]

    def _keep_ratio(self) -> np.float32:
        """`s / t` of this step, as the release divides them (float32)."""
        return self.timesteps[self.step + 1] / self.timesteps[self.step]

    def plan(self) -> StepPlan:
        return StepPlan((Window(0, self.canvas_len, self.canvas_len),))

    def targets(self) -> Targets:
        block = self.params.gen_length
        if self.params.alg == "origin":
            # Commit where a uniform draw is >= 1 - p_transfer: probability p_transfer.
            threshold = 0.0 if self._last else float(1 - (1 - self._keep_ratio()))
            return Targets(self.prompt_len, block, 0, block, self.num_masked,
                           SelectionRule.BERNOULLI, threshold=threshold)  # fmt: skip
        quota = schedule_quota(self.timesteps, self.step, self.num_masked)
        return Targets(self.prompt_len, block, 0, block, self.num_masked, SelectionRule.QUOTA,
                       quota=quota)  # fmt: skip

    def advance(self, committed: np.ndarray, first_masked: int) -> int:
        self.steps += 1
        self.step += 1
        self.num_masked -= int((committed >= 0).sum())
        if self.num_masked == 0:
            self.blocks_done = 1
        return self.prompt_len + first_masked


def schedule_quota(timesteps: np.ndarray, step: int, num_masked: int) -> int:
    """Dream's quota at `step` of `len(timesteps) - 1` steps: `int(masked * (1 - s / t))`, in
    float32 as the release computes it, and every masked position at the last step."""
    if step >= len(timesteps) - 2:
        return num_masked
    # The release's mask count is a float32 tensor (a sum over the batch, divided by 1).
    keep_ratio = timesteps[step + 1] / timesteps[step]
    return int(np.float32(num_masked) * (1 - keep_ratio))


@dataclass
class DreamBlockAlgState(BidirectionalState):
    """Fast-dLLM's Dream block loop with Dream's schedule in each block (module docstring).

    Plans and the block bookkeeping are the bidirectional loop's; only the quota differs: every
    step after the block's opening commits the schedule's quota of the block's best-scored
    masked positions (the QUOTA rule, drawn with `dllm_alg_temp`), the request's alg giving the
    score.
    """

    timesteps: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.params.alg is not None and self.params.steps_per_block is not None
        self.rule_id = SelectionRule.QUOTA
        self.timesteps = torch.linspace(1, EPS, self.params.steps_per_block + 1).numpy()

    def quota(self) -> int:
        if self.opens_with_single_commit:
            return 1
        # Dream's opening is the block's step 0; LLaDA's step 0 is the first rule step.
        step = self.rule_step + (1 if self.logits_shift > 0 else 0)
        return schedule_quota(self.timesteps, step, self.num_masked)
