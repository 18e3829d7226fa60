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

import torch
from torch import Tensor

from vllm_dllm.sampling.noise import gumbel

#: Vocabulary-sized bytes per logit of a proposal chunk beyond the logits themselves. Greedy:
#: their float32 copy (4) and the two temporaries of `torch.logsumexp` (8). Sampling adds the
#: Gumbel noise first: 16 bytes of integer hash scratch and its float32 result (4), freed before
#: the normaliser; greedy rows make no noise.
GREEDY_BYTES = 12
SAMPLING_BYTES = 24


def bytes_per_logit(logits_itemsize: int, sampling: bool) -> int:
    """Peak vocabulary-sized bytes per logit of a chunk, the logits included."""
    return logits_itemsize + (SAMPLING_BYTES if sampling else GREEDY_BYTES)


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
    vocab_size: int, budget_bytes: int, logits_itemsize: int, sampling: bool
) -> int:
    """Rows proposed at once so that a chunk's vocabulary-sized memory stays within the budget.

    Where every row of a step fits, the step computes its logits in one GEMM.
    """
    return max(1, budget_bytes // (vocab_size * bytes_per_logit(logits_itemsize, sampling)))


def propose(
    logits: Tensor,
    mask_token_id: int,
    temperature: Tensor,
    noise_keys: Tensor | None = None,
    tempered_confidence: bool = False,
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
        tempered_confidence: score a sampled row by the probability of `logits / T` (what the
            block-diffusion releases compare to their thresholds) instead of `logits`'.

    Returns:
        `x0` (`[N]` int64) and `confidence` (`[N]` float32). The confidence uses the raw logits
        (no temperature, unless `tempered_confidence`), computed as
        `exp(logit[x0] - logsumexp(logits without MASK))` in float32; float64 is never used on
        `[N, V]` data.
    """
    scores = logits.to(torch.float32, copy=True)
    scores[:, mask_token_id] = float("-inf")
    if noise_keys is None:
        x0 = scores.argmax(dim=-1)
    else:
        temperature = temperature.to(torch.float32).unsqueeze(-1)
        noise = gumbel(noise_keys, scores.shape[-1])
        x0 = noise.mul_(temperature).add_(scores).argmax(dim=-1)
        del noise
        if tempered_confidence:
            scores.div_(torch.where(temperature > 0, temperature, 1.0))
    log_normaliser = torch.logsumexp(scores, dim=-1)
    chosen_logit = scores.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, (chosen_logit - log_normaliser).exp()


def propose_rows(
    hidden: Tensor,
    compute_logits: Callable[[Tensor], Tensor],
    mask_token_id: int,
    temperature: Tensor,
    noise_keys: Tensor | None,
    max_rows: int,
    tempered_confidence: bool = False,
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
            tempered_confidence,
        )  # fmt: skip
    return x0, confidence
