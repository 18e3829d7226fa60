"""Steps 2 and 3 of the denoising loop (docs/design.md): propose a token per masked position and
score how confident the model is in it.

Rows are masked positions (of any number of requests), columns the vocabulary. Everything is
batched over rows; per-request behaviour (temperature, seed, remasking) arrives as per-row
tensors. `propose_rows` also computes the logits, chunk by chunk, so that the vocabulary-sized
memory of a step stays within the budget that vLLM profiled for its own sampler
(`sampler_profile_bytes`) whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

import torch
from torch import Tensor

from vllm_dllm.sampling.filtering import FILTER_BYTES_PER_LOGIT, Filters, apply_filters_
from vllm_dllm.sampling.logprobs import LogprobRows, token_logprobs
from vllm_dllm.sampling.noise import gumbel
from vllm_dllm.structured.commit_rule import FrontierMasks, apply_token_bitmask_


class ScoreKind(IntEnum):
    """What scores a candidate row for selection (the `score_kinds` of `propose`)."""

    #: The proposal's probability (`low_confidence`, Dream's `maskgit_plus`).
    PROBABILITY = 0
    #: Top-1 minus top-2 probability (Dream's `topk_margin`).
    MARGIN = 1
    #: Negative entropy of the distribution (Dream's `entropy`, the entropy-bounded rule).
    NEG_ENTROPY = 2


#: Vocabulary-sized bytes per logit of a proposal chunk beyond the logits themselves. Greedy:
#: their float32 copy (4) and the two temporaries of `torch.logsumexp` (8). Sampling adds the
#: Gumbel noise first: 16 bytes of integer hash scratch and its float32 result (4), freed before
#: the normaliser; greedy rows make no noise.
GREEDY_BYTES = 12
SAMPLING_BYTES = 24
#: Reporting log-probabilities (`vllm_dllm.sampling.logprobs`), after the draw's temporaries
#: are freed: the float32 scores (4), a float32 copy of the reporting rows (4), `logsumexp`'s
#: temporaries (8) and the rank's comparison mask (1). Above a greedy chunk's peak, below a
#: sampling one's.
LOGPROB_BYTES = 17


def bytes_per_logit(
    logits_itemsize: int, sampling: bool, filtering: bool = False, logprobs: bool = False
) -> int:
    """Peak vocabulary-sized bytes per logit of a chunk, the logits included; a chunk that
    filters (top-k / top-p / min-p) or scores by margin or entropy holds the filters'
    temporaries too (`FILTER_BYTES_PER_LOGIT`), one that reports log-probabilities at least
    `LOGPROB_BYTES`."""
    extra = FILTER_BYTES_PER_LOGIT if filtering else 0
    own = SAMPLING_BYTES if sampling else GREEDY_BYTES
    return logits_itemsize + (max(own, LOGPROB_BYTES) if logprobs else own) + extra


def sampler_profile_bytes(rows: int, vocab_size: int, logits_itemsize: int) -> int:
    """Vocabulary-sized memory that vLLM's start-up profile held for its own sampler, at least.

    The model runner's profile run ends with a dummy sampler run over `rows` requests (its
    largest batch), once more with a seeded generator, which takes the sampler's plain-torch
    random-sampling path: while it draws, the logits `[rows, vocab]` in the LM head's dtype, the
    sampler's float32 copy of them (the same tensor when already float32), their float32
    probabilities and the float32 exponential noise are alive together. The KV cache was sized
    to leave that memory free, so a denoising step may use as much for its proposal chunks.
    (Top-k / top-p temporaries come on top; they are not counted, as a margin.)
    """
    copy = 0 if logits_itemsize == 4 else 4
    return rows * vocab_size * (logits_itemsize + copy + 8)


def rows_per_chunk(
    vocab_size: int, budget_bytes: int, logits_itemsize: int, sampling: bool,
    filtering: bool = False, logprobs: bool = False,
) -> int:
    """Rows proposed at once so that a chunk's vocabulary-sized memory stays within the budget.

    Where every row of a step fits, the step computes its logits in one GEMM.
    """
    per_logit = bytes_per_logit(logits_itemsize, sampling, filtering, logprobs)
    return max(1, budget_bytes // (vocab_size * per_logit))


def propose(
    logits: Tensor,
    mask_token_id: int,
    temperature: Tensor,
    noise_keys: Tensor | None = None,
    tempered_confidence: bool = False,
    filters: Filters | None = None,
    score_kinds: Tensor | None = None,
    logprobs: LogprobRows | None = None,
    token_masks: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Propose `x0` for every row and its confidence `softmax(logits)[x0]`.

    Args:
        logits: `[N, V]` raw logits (any float dtype), one row per masked position.
        mask_token_id: the MASK token, excluded (treated as logit `-inf`) from the proposal and
            from the softmax normaliser: MASK is never proposed, and its probability mass does not
            dilute the confidence of real tokens.
        temperature: `[N]` per-row temperature. Rows with 0 take the plain argmax; rows with
            `T > 0` take the Gumbel-max sample `argmax(logits + T * G)`, which has the same argmax
            as `logits / T + G` and as the reference's `exp(logits) / (-log U) ** T`, and gives
            exactly `argmax(logits)` for `T = 0` because `G` is always finite.
        noise_keys: `[N]` int64 keys of the rows' Gumbel noise (`vllm_dllm.sampling.noise`), or
            None when the caller knows from host-side request metadata that every row is greedy:
            then no noise is made at all.
        tempered_confidence: score a sampled row by the probability of `logits / T` after the
            filters (what Dream and the block-diffusion releases compare to their thresholds)
            instead of by the probability under the raw, unfiltered logits (LLaDA's).
        filters: per-row top-k / top-p / min-p (`vllm_dllm.sampling.filtering`), applied before
            the draw, or None when no row filters. Only sampled rows may filter (greedy rows
            carry neutral values): the argmax is never filtered out anyway.
        score_kinds: `[N]` int64 `ScoreKind` per row, or None when every row is scored by
            probability. The other kinds score a row by its distribution (after temperature
            and filters, at temperature 0 the raw softmax): Dream's `topk_margin` (top-1 minus
            top-2 probability) and its `entropy` (negative entropy, also the entropy-bounded
            rule's score).
        logprobs: rows whose log-probabilities to report (`vllm_dllm.sampling.logprobs`),
            written into `logprobs.out`: under the distribution the row's token was drawn from,
            the filtered logits divided by the temperature (greedy rows: the raw logits). The
            proposal itself does not depend on them.
        token_masks: (rows, bitmasks) of rows whose tokens a grammar restricts
            (`vllm_dllm.structured`): forbidden tokens get logit `-inf` before anything else,
            so the draw, the confidence and the log-probabilities are those of the allowed
            tokens. None when no row is constrained.

    Returns:
        `x0` (`[N]` int64) and `confidence` (`[N]` float32), computed as
        `exp(logit[x0] - logsumexp(logits without MASK))` in float32 over the raw logits, or
        over the filtered, tempered ones with `tempered_confidence`; float64 is never used on
        `[N, V]` data.
    """
    scores = logits.to(torch.float32, copy=True)
    scores[:, mask_token_id] = float("-inf")
    if token_masks is not None:
        apply_token_bitmask_(scores, *token_masks)
    log_normaliser: Tensor | None = None
    if noise_keys is None:
        x0 = scores.argmax(dim=-1)
    else:
        if filters is not None:
            if not tempered_confidence:
                log_normaliser = torch.logsumexp(scores, dim=-1)
            # The draw's tokens keep their logits, so the chosen logit is the raw one.
            apply_filters_(scores, temperature, filters)
        temperature = temperature.to(torch.float32).unsqueeze(-1)
        noise = gumbel(noise_keys, scores.shape[-1])
        x0 = noise.mul_(temperature).add_(scores).argmax(dim=-1)
        del noise
        if tempered_confidence:
            scores.div_(torch.where(temperature > 0, temperature, 1.0))
    if log_normaliser is None:
        log_normaliser = torch.logsumexp(scores, dim=-1)
    chosen_logit = scores.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    confidence = (chosen_logit - log_normaliser).exp()
    if logprobs is not None:
        distribution = scores[logprobs.rows]
        if noise_keys is not None and not tempered_confidence:
            row_temperature = temperature[logprobs.rows]
            distribution.div_(torch.where(row_temperature > 0, row_temperature, 1.0))
        logprobs.out.copy_(token_logprobs(distribution, x0[logprobs.rows], logprobs.num_logprobs))
    if score_kinds is not None:
        tempered = scores if tempered_confidence or noise_keys is None else scores.div(
            torch.where(temperature > 0, temperature, 1.0))  # fmt: skip
        confidence = torch.where(score_kinds == ScoreKind.MARGIN, margin(tempered), confidence)
        confidence = torch.where(score_kinds == ScoreKind.NEG_ENTROPY, -entropy(tempered),
                                 confidence)  # fmt: skip
    return x0, confidence


def entropy(scores: Tensor) -> Tensor:
    """Entropy of `softmax(scores)` per row, in float32 (`-inf` scores have probability 0)."""
    log_normaliser = torch.logsumexp(scores, dim=-1, keepdim=True)
    log_probs = scores - log_normaliser
    weighted = log_probs.exp().mul_(log_probs).nan_to_num_(nan=0.0)
    return -weighted.sum(dim=-1)


def margin(scores: Tensor) -> Tensor:
    """Top-1 minus top-2 probability of `softmax(scores)` per row (Dream's `topk_margin`)."""
    top = scores.topk(2, dim=-1).values
    return (top - torch.logsumexp(scores, dim=-1, keepdim=True)).exp().diff(dim=-1).neg()[:, 0]


def propose_rows(
    hidden: Tensor,
    compute_logits: Callable[[Tensor], Tensor],
    mask_token_id: int,
    temperature: Tensor,
    noise_keys: Tensor | None,
    max_rows: int,
    tempered_confidence: bool = False,
    filters: Filters | None = None,
    score_kinds: Tensor | None = None,
    logprobs: LogprobRows | None = None,
    token_masks: FrontierMasks | None = None,
) -> tuple[Tensor, Tensor]:
    """`propose` over the logits of `hidden` rows, computed and consumed `max_rows` at a time.

    The loop bound depends only on shapes (known on the host), so it adds no host sync; the
    result does not depend on the chunking (each row's noise is a function of its own key).
    """
    num_rows = hidden.shape[0]
    x0 = torch.empty(num_rows, dtype=torch.int64, device=hidden.device)
    confidence = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    for start in range(0, num_rows, max_rows):
        rows = slice(start, start + max_rows)
        keys = None if noise_keys is None else noise_keys[rows]
        x0[rows], confidence[rows] = propose(
            compute_logits(hidden[rows]), mask_token_id, temperature[rows], keys,
            tempered_confidence, None if filters is None else filters.rows(rows),
            None if score_kinds is None else score_kinds[rows],
            None if logprobs is None else logprobs.chunk(start, start + max_rows),
            None if token_masks is None else token_masks.chunk(start, start + max_rows),
        )  # fmt: skip
    return x0, confidence
