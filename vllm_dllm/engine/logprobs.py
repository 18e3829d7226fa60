"""The step's reported log-probabilities in vLLM's structure (`LogprobsLists`).

vLLM's scheduler slices each request's rows out by `cu_num_generated_tokens` for as many tokens
as it keeps of the step's (a stop token may cut them), and its front end renders them (the
completions and chat `logprobs` fields) as it does for autoregressive models.
"""

from __future__ import annotations

import numpy as np
from vllm.v1.outputs import LogprobsLists


def logprobs_lists(
    reported: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None],
) -> LogprobsLists | None:
    """One `LogprobsLists` for the step's requests, in batch order; None when none reports.

    `reported[i]` holds request `i`'s emitted tokens' ids `[T, k + 1]`, log-probabilities and
    ranks `[T]`, or None. Requests asking for fewer alternatives are padded to the widest (the
    front end reads only the columns a request asked for).
    """
    present = [r for r in reported if r is not None]
    if not present:
        return None
    width = max(ids.shape[1] for ids, _, _ in present)
    counts = [0 if r is None else len(r[2]) for r in reported]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    ids = np.zeros((starts[-1], width), dtype=np.int32)
    values = np.zeros((starts[-1], width), dtype=np.float32)
    ranks = np.zeros(starts[-1], dtype=np.int32)
    for start, r in zip(starts, reported, strict=False):
        if r is not None:
            rows = slice(start, start + len(r[2]))
            ids[rows, : r[0].shape[1]], values[rows, : r[1].shape[1]], ranks[rows] = r
    return LogprobsLists(ids, values, ranks, starts[:-1].tolist())
