"""Log-probabilities of proposed tokens under the distribution each was drawn from (pure torch).

A denoising step draws each candidate position's token from that position's own distribution:
the softmax of its logits with MASK excluded, after the request's top-k / top-p / min-p filters,
divided by its temperature (a greedy row, temperature 0, takes the plain softmax of the logits,
which the filters never touch). A request asking for `logprobs` gets, for each token it
receives, that distribution's log-probability of the token, its rank, and the most likely
alternatives. It is not an autoregressive likelihood: the distribution is conditioned on the
whole canvas of the step that committed the token, on both sides of the position.

The results reach the host inside the step's single device-to-host transfer, which is int32, so
a row is packed into int32 columns (the float32 log-probabilities as their bit patterns):
`[token, top ids..., logprob(token), top logprobs..., rank]`, the layout of vLLM's
`LogprobsLists` (the sampled token first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def logprob_columns(num_logprobs: int) -> int:
    """int32 columns of a packed row with `num_logprobs` alternatives: the token and its
    alternatives' ids, then their log-probabilities, then the token's rank."""
    return 2 * (num_logprobs + 1) + 1


def token_logprobs(scores: Tensor, tokens: Tensor, num_logprobs: int) -> Tensor:
    """Packed log-probabilities of `tokens` and the top `num_logprobs` tokens of each row.

    Args:
        scores: `[R, V]` float32 logits of each row's distribution, already filtered (`-inf`
            outside it) and divided by the temperature.
        tokens: `[R]` int64, the token proposed in each row (always inside its distribution).
        num_logprobs: how many alternatives, most likely first.

    Returns:
        `[R, logprob_columns(num_logprobs)]` int32. The rank is vLLM's: the number of tokens at
        least as likely as the proposed one (1 for the most likely).
    """
    # Only the reported entries are normalised: no vocabulary-sized log-softmax is written.
    log_normaliser = torch.logsumexp(scores, dim=-1, keepdim=True)
    chosen = scores.gather(-1, tokens.unsqueeze(-1))
    rank = (scores >= chosen).sum(dim=-1, keepdim=True)
    top = scores.topk(min(num_logprobs, scores.shape[-1]), dim=-1)
    ids = torch.cat([tokens.unsqueeze(-1), top.indices], dim=-1).to(torch.int32)
    values = torch.cat([chosen, top.values], dim=-1).sub_(log_normaliser).to(torch.float32)
    return torch.cat([ids, values.view(torch.int32), rank.to(torch.int32)], dim=-1)


@dataclass(frozen=True)
class LogprobRows:
    """The candidate rows of a step whose log-probabilities are reported.

    Only the rows of requests that asked are computed: nothing vocabulary-sized is spent on the
    others. `propose` writes row `rows[j]`'s packed result into `out[j]`.
    """

    rows: Tensor  # [K] int64 indices of the rows, ascending
    #: The same indices on the host: they bound each chunk's share without reading the device.
    host_rows: np.ndarray
    num_logprobs: int
    out: Tensor  # [K, logprob_columns(num_logprobs)] int32

    def chunk(self, start: int, stop: int) -> LogprobRows | None:
        """The entries for rows `[start, stop)`, as indices into that chunk (None if none)."""
        lo, hi = np.searchsorted(self.host_rows, (start, stop))
        if lo == hi:
            return None
        return LogprobRows(
            self.rows[lo:hi] - start, self.host_rows[lo:hi] - start, self.num_logprobs,
            self.out[lo:hi],
        )  # fmt: skip


def unpack(packed: np.ndarray, num_logprobs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids `[R, k + 1]` int32, log-probabilities `[R, k + 1]` float32 and ranks `[R]`
    int32 of packed rows (host side)."""
    width = num_logprobs + 1
    ids = packed[:, :width]
    values = np.ascontiguousarray(packed[:, width : 2 * width]).view(np.float32)
    return ids, values, packed[:, 2 * width]
