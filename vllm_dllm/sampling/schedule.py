"""The `steps` rule's per-step quota (the original LLaDA schedule, docs/design.md)."""

from __future__ import annotations

from torch import Tensor


def steps_quota(
    num_masked_at_block_start: Tensor | int,
    steps_per_block: Tensor | int,
    step_index: Tensor | int,
) -> Tensor | int:
    """Tokens to commit at rule-step `i` of a block: `M // m`, plus one for the first `M % m` steps.

    `M` is the number of masked positions of the block when the rule starts (the block length
    for LLaDA; one fewer for Dream, whose block-opening forward commits one position first) and
    `m` the steps per block (`dllm_steps / num_blocks`). Over steps `0..m-1` the quotas sum to
    `M`. Works element-wise on tensors (a batch of requests) and on plain ints (returns an int),
    with the usual broadcasting; it never reads tensor values on the host.
    """
    base = num_masked_at_block_start // steps_per_block
    remainder = num_masked_at_block_start % steps_per_block
    return base + (step_index < remainder)
