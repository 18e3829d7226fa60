"""Confidence-aware parallel unmasking: pure torch, batched over requests, no host syncs.

One denoising step of a batch is `propose_rows` (token and confidence per masked position, from
logits computed chunk by chunk, after each row's top-k / top-p / min-p `filtering`), optionally
`uniform` scores for `random` remasking, then `select` (which positions to commit, by each
request's rule; `steps_quota` gives the `steps` rule's quota). Random numbers are
counter-based (`noise`): a row's noise depends on its own request's seed, step and position.
"""

from vllm_dllm.sampling.filtering import FILTER_BYTES_PER_LOGIT, Filters, apply_filters_, keep_from
from vllm_dllm.sampling.noise import GUMBEL_STREAM, REMASK_STREAM, gumbel, row_keys, uniform
from vllm_dllm.sampling.proposal import (
    ScoreKind,
    bytes_per_logit,
    propose,
    propose_rows,
    rows_per_chunk,
    sampler_profile_bytes,
)
from vllm_dllm.sampling.schedule import steps_quota
from vllm_dllm.sampling.selection import SelectionRule, select

__all__ = [
    "FILTER_BYTES_PER_LOGIT",
    "Filters",
    "GUMBEL_STREAM",
    "REMASK_STREAM",
    "ScoreKind",
    "SelectionRule",
    "apply_filters_",
    "bytes_per_logit",
    "gumbel",
    "keep_from",
    "propose",
    "propose_rows",
    "row_keys",
    "rows_per_chunk",
    "sampler_profile_bytes",
    "select",
    "steps_quota",
    "uniform",
]
