"""The offline progress bar (`dllm_progress`) on a real engine."""

from __future__ import annotations

import re

from vllm import SamplingParams

from vllm_dllm.entrypoints.progress import dllm_progress


def test_progress_bar_shows_tokens_per_forward(llada_engine, capsys):
    """vLLM's own bar line, with the batch's tokens per forward appended; the engine's `step`
    is its own again afterwards."""
    params = SamplingParams(
        max_tokens=8,
        temperature=0,
        ignore_eos=True,
        extra_args={"dllm_block_length": 8, "dllm_steps": 4},
    )
    bar_factory = dllm_progress(llada_engine)
    outputs = llada_engine.generate(["a b c", "d e f"], params, use_tqdm=bar_factory)
    assert [o.kv_transfer_params["dllm"]["tokens_per_forward"] for o in outputs] == [2.0, 2.0]
    bar = capsys.readouterr().err
    assert re.search(r"Processed prompts: 100%.*output: [0-9.]+ toks/s, 2\.00 tokens/forward", bar)
    assert "step" not in vars(llada_engine.llm_engine)
