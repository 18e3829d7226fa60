"""Statistics in the outputs a streamed `n > 1` request's reader receives.

A reader slower than the engine gets the outputs that arrived meanwhile merged into one
(`RequestOutputCollector`); each choice's statistics must survive that merge whichever order the
choices finish in. No engine is needed: the collector is vLLM's own.
"""

from __future__ import annotations

import pytest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.output_processor import RequestOutputCollector

from vllm_dllm.engine.outputs import install_choice_statistics, output_stats, request_stats


def child_output(index: int, token: int, stats: dict | None) -> RequestOutput:
    """One choice's streamed output, as the output processor makes it: finished ones carry
    their statistics under `dllm`."""
    completion = CompletionOutput(
        index=index, text=f"t{token}", token_ids=[token], cumulative_logprob=None,
        logprobs=None, finish_reason="length" if stats else None,
    )  # fmt: skip
    return RequestOutput(
        request_id="parent", prompt=None, prompt_token_ids=[1], prompt_logprobs=None,
        outputs=[completion], finished=False,
        kv_transfer_params={"dllm": stats} if stats else None,
    )  # fmt: skip


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
@pytest.mark.parametrize("first", [0, 1])
def test_merged_outputs_keep_every_finished_choice_statistics(kind, first):
    install_choice_statistics()
    second = 1 - first
    stats = {first: request_stats(3, 4, 1, False), second: request_stats(5, 4, 1, True)}
    collector = RequestOutputCollector(kind, "parent")

    # One choice finishes, then the other streams a token, before the reader looks: the merged
    # output's parameters are the unfinished choice's, yet the finished one keeps its statistics.
    collector.put(child_output(first, 7, stats[first]))
    collector.put(child_output(second, 8, None))
    merged = collector.get_nowait()
    assert {o.index for o in merged.outputs} == {0, 1}
    assert dict(zip((o.index for o in merged.outputs), output_stats(merged), strict=True)) == {
        first: stats[first],
        second: None,
    }

    # Both finish within one merge.
    collector.put(child_output(second, 9, None))
    collector.put(child_output(first, 10, stats[first]))
    collector.put(child_output(second, 11, stats[second]))
    merged = collector.get_nowait()
    assert dict(zip((o.index for o in merged.outputs), output_stats(merged), strict=True)) == stats
