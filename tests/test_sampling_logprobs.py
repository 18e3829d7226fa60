"""The log-probability math of `vllm_dllm.sampling.logprobs` and its place in the proposal
(pure torch, no engine): what is reported is the drawn-from distribution, and asking for it
changes no proposal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_dllm.sampling import Filters, apply_filters_, propose, propose_rows, row_keys
from vllm_dllm.sampling.logprobs import LogprobRows, logprob_columns, token_logprobs, unpack

ROWS, VOCAB, MASK = 6, 50, 3


def _inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, generator=generator) * 3
    temperature = torch.tensor([0.0, 0.7, 0.7, 0.0, 1.3, 0.7])
    keys = row_keys(torch.arange(ROWS), torch.zeros(ROWS, dtype=torch.int64), torch.arange(ROWS), 1)
    filters = Filters(torch.tensor([0, 5, 0, 0, 3, 0]), torch.tensor([1, 1, 0.8, 1, 1, 1.0]),
                      torch.tensor([0, 0, 0, 0, 0, 0.1]))  # fmt: skip
    return logits, temperature, keys, filters


def _rows(indices: list[int], num_logprobs: int) -> LogprobRows:
    rows = torch.tensor(indices, dtype=torch.int64)
    out = torch.empty(len(indices), logprob_columns(num_logprobs), dtype=torch.int32)
    return LogprobRows(rows, rows.numpy(), num_logprobs, out)


def test_token_logprobs_pack_the_token_the_top_and_the_rank():
    scores = torch.tensor([[0.0, 2.0, 1.0, float("-inf")], [3.0, 1.0, 1.0, 0.0]])
    packed = token_logprobs(scores, torch.tensor([2, 0]), 2)
    ids, values, ranks = unpack(packed.numpy(), 2)
    expected = torch.log_softmax(scores, dim=-1)
    assert ids.tolist() == [[2, 1, 2], [0, 0, 1]] or ids.tolist() == [[2, 1, 2], [0, 0, 2]]
    assert values[:, 0] == pytest.approx([expected[0, 2].item(), expected[1, 0].item()])
    assert ranks.tolist() == [2, 1]
    assert np.all(np.diff(values[:, 1:], axis=-1) <= 0)


@pytest.mark.parametrize("tempered_confidence", [False, True])
def test_reported_distribution_is_the_filtered_tempered_one(tempered_confidence):
    logits, temperature, keys, filters = _inputs()
    plain = propose(logits, MASK, temperature, keys, tempered_confidence, filters)
    asked = _rows([0, 1, 2, 4, 5], 4)
    x0, confidence = propose(logits, MASK, temperature, keys, tempered_confidence, filters,
                             logprobs=asked)  # fmt: skip
    assert torch.equal(x0, plain[0]) and torch.equal(confidence, plain[1])
    scores = logits.clone()
    scores[:, MASK] = float("-inf")
    apply_filters_(scores, temperature, filters)
    expected = torch.log_softmax(scores / torch.where(temperature > 0, temperature, 1.0)[:, None],
                                 dim=-1)[asked.rows]  # fmt: skip
    ids, values, ranks = unpack(asked.out.numpy(), 4)
    assert ids[:, 0].tolist() == x0[asked.rows].tolist()
    assert values[:, 0] == pytest.approx(expected.gather(-1, x0[asked.rows, None])[:, 0].numpy(),
                                         abs=1e-6)  # fmt: skip
    assert values[:, 1:] == pytest.approx(expected.topk(4).values.numpy(), abs=1e-6)
    assert ranks[0] == 1  # a greedy row takes the most likely token


def test_chunked_rows_report_what_one_chunk_reports():
    logits, temperature, keys, filters = _inputs()
    head = torch.randn(ROWS, 8, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(2))

    def run(max_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        asked = _rows([1, 2, 5], 3)
        propose_rows(head, lambda h: h @ weight.T, MASK, temperature, keys, max_rows,
                     filters=filters, logprobs=asked)  # fmt: skip
        return unpack(asked.out.numpy(), 3)

    (ids, values, ranks), (chunked_ids, chunked_values, chunked_ranks) = run(ROWS), run(2)
    assert np.array_equal(ids, chunked_ids) and np.array_equal(ranks, chunked_ranks)
    # The logits GEMM of fewer rows may round differently.
    assert chunked_values == pytest.approx(values, abs=1e-5)
