"""Confidence-aware parallel unmasking: pure torch, batched over requests, no host syncs.

One denoising step of a batch is `propose` (token and confidence per masked position),
optionally `random_confidence` (the `random` remasking score), then `select` (which positions
to commit, by each request's rule; `steps_quota` gives the `steps` rule's quota).
"""

from vllm_dllm.sampling.noise import RowGenerator, gumbel_noise, uniform_noise
from vllm_dllm.sampling.proposal import propose, random_confidence
from vllm_dllm.sampling.schedule import steps_quota
from vllm_dllm.sampling.selection import SelectionRule, select

__all__ = [
    "RowGenerator",
    "SelectionRule",
    "gumbel_noise",
    "propose",
    "random_confidence",
    "select",
    "steps_quota",
    "uniform_noise",
]
