"""Steps 2 and 3 of the denoising loop (DESIGN section 2): propose a token per masked position and
score how confident the model is in it.

Rows are masked positions (of any number of requests), columns the vocabulary. Everything is
batched over rows; per-request behaviour (temperature, seed, remasking) arrives as per-row tensors
and `RowGenerator` spans.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from vllm_dllm.sampling.noise import RowGenerator, gumbel_noise, uniform_noise

#: Largest number of logits upcast to a float32 scratch copy at once: bounds the temporary memory
#: of `propose` (256 MiB) independently of batch size, while keeping the number of chunks (and
#: kernel launches) small for realistic batches.
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def _masked_float32_chunks(
    logits: Tensor, mask_token_id: int, max_chunk_elements: int
) -> Iterator[tuple[slice, Tensor]]:
    """Yield row slices of `logits` as float32 copies whose MASK column is `-inf`.

    The copy is needed anyway (bf16/fp16 must be upcast; fp32 logits must not be modified to
    exclude MASK), so it is made chunk by chunk: the scratch memory is bounded by
    `max_chunk_elements`, not by the `[N, V]` size. The loop bound depends only on shapes.
    """
    num_rows, vocab_size = logits.shape
    rows_per_chunk = max(1, max_chunk_elements // max(1, vocab_size))
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = logits[rows].to(torch.float32, copy=True)
        chunk[:, mask_token_id] = float("-inf")
        yield rows, chunk


def propose(
    logits: Tensor,
    mask_token_id: int,
    temperature: Tensor,
    generators: Sequence[RowGenerator] = (),
    default_generator: torch.Generator | None = None,
    *,
    all_greedy: bool = False,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
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
        generators: the row spans of seeded requests with `T > 0` and their generators; see
            `vllm_dllm.sampling.noise` for why only those.
        default_generator: generator for all other rows (`None`: torch's default).
        all_greedy: the caller knows (from host-side request metadata, without a sync) that every
            row has `T = 0`: no noise is drawn and no `[N, V]` noise buffer is allocated. The
            result is the same as with `all_greedy=False`.
        max_chunk_elements: bound on the float32 scratch copy, see `DEFAULT_CHUNK_ELEMENTS`.

    Returns:
        `x0` (`[N]` int64) and `confidence` (`[N]` float32). The confidence uses the raw logits
        (no temperature), computed as `exp(logit[x0] - logsumexp(logits without MASK))` in
        float32; float64 is never used on `[N, V]` data.
    """
    num_rows, vocab_size = logits.shape
    log_normaliser = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    x0 = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    for rows, chunk in _masked_float32_chunks(logits, mask_token_id, max_chunk_elements):
        log_normaliser[rows] = torch.logsumexp(chunk, dim=-1)
        if all_greedy:
            x0[rows] = chunk.argmax(dim=-1)
    if not all_greedy:
        # One [N, V] float32 buffer holds noise, then scores, in place.
        scores = gumbel_noise(num_rows, vocab_size, logits.device, generators, default_generator)
        scores.mul_(temperature.to(torch.float32).unsqueeze(-1)).add_(logits)
        scores[:, mask_token_id] = float("-inf")
        x0 = scores.argmax(dim=-1)
    chosen_logit = logits.gather(-1, x0.unsqueeze(-1)).squeeze(-1).to(torch.float32)
    return x0, (chosen_logit - log_normaliser).exp()


def random_confidence(
    confidence: Tensor,
    use_random: Tensor,
    generators: Sequence[RowGenerator] = (),
    default_generator: torch.Generator | None = None,
) -> Tensor:
    """The `random` remasking score: rows with `use_random` get a uniform `[0, 1)` number instead
    of their confidence.

    Args:
        confidence: `[N]` float32 confidences from `propose`.
        use_random: `[N]` bool, True for rows of requests with `dllm_remasking=random`.
        generators: row spans of seeded requests *that remask randomly*, with their generators.
        default_generator: generator for all other rows.
    """
    noise = uniform_noise(confidence.shape[0], confidence.device, generators, default_generator)
    return torch.where(use_random, noise, confidence)
