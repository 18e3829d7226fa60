"""What the diffusion worker reports to the scheduler, and the statistics users read: each
finished request's, and those of several choices or prompts together (`merge_stats`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.outputs import ModelRunnerOutput


@dataclass
class DllmRunnerOutput(ModelRunnerOutput):
    """`ModelRunnerOutput` plus each running request's next query-window length.

    `sampled_token_ids` holds, per request, the tokens that became *final* this step (the
    committed prefix of the canvas grew), so vLLM's stop checks and streaming see only text that
    no later step can change.
    """

    next_windows: dict[str, int] = field(default_factory=dict)
    #: Requests whose exact K/V grew this step: the end of the leading positions whose tokens
    #: are final and whose K/V were written by a forward that saw exactly them (block diffusion).
    kv_final: dict[str, int] = field(default_factory=dict)
    #: Requests whose canvas is final this step: (blocks fully decoded, stopped early).
    finished: dict[str, tuple[int, bool]] = field(default_factory=dict)


def request_stats(
    forwards: int, output_tokens: int, blocks: int | None, early_stop: bool | None
) -> dict[str, float | int | bool | None]:
    """Per-request statistics, returned as `RequestOutput.kv_transfer_params["dllm"]`.

    `blocks` and `early_stop` are None when the request ended outside the denoising loop (a stop
    string matched in the front end, or an abort).
    """
    return {
        "forwards": forwards,
        "output_tokens": output_tokens,
        "tokens_per_forward": round(output_tokens / forwards, 4) if forwards else 0.0,
        "blocks": blocks,
        "early_stop": early_stop,
    }


#: `RequestOutput.kv_transfer_params` key of the per-choice statistics of an `n > 1` request.
CHOICES_KEY = "dllm_choices"


def merge_stats(stats: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The statistics of several choices (or prompts) together; None if none has any.

    `forwards`, `output_tokens` and `blocks` add up, `tokens_per_forward` is their ratio, and
    `early_stop` is true when every choice stopped early. Choices without statistics (ended
    outside the denoising loop) are left out.
    """
    known = [s for s in stats if s]
    if not known:
        return None
    blocks = [s["blocks"] for s in known if s.get("blocks") is not None]
    early = [s.get("early_stop") for s in known]
    return request_stats(
        sum(s["forwards"] for s in known),
        sum(s["output_tokens"] for s in known),
        sum(blocks) if blocks else None,
        None if None in early else all(early),
    )


def output_stats(request_output: Any) -> list[dict[str, Any] | None]:
    """The statistics of each of a `RequestOutput`'s completions, in the order of `outputs`.

    An `n > 1` request's aggregated output carries them under `CHOICES_KEY`
    (`install_choice_statistics`); a single completion (`n = 1`, or one choice of a streamed
    `n > 1` request) has them under `dllm` once it has finished.
    """
    params = getattr(request_output, "kv_transfer_params", None) or {}
    outputs = request_output.outputs
    if CHOICES_KEY in params and len(params[CHOICES_KEY]) == len(outputs):
        return list(params[CHOICES_KEY])
    if len(outputs) == 1 and outputs[0].finish_reason is not None:
        return [params.get("dllm")]
    return [None] * len(outputs)


def install_choice_statistics() -> None:
    """Keep each choice's statistics for a non-streamed `n > 1` request (front-end process).

    vLLM runs such a request as `n` child requests and returns one `RequestOutput` once all
    have finished, whose `kv_transfer_params` are the last child's. Each child's are recorded
    as it finishes; the aggregated output gets their total under `dllm` and the list, in the
    order of its `outputs`, under `CHOICES_KEY`. (Streamed, each choice's finishing output
    carries its own, kept when outputs are merged for a slow reader.)
    """
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import RequestState

    original = RequestState.make_request_output
    if getattr(original, "_vllm_dllm", False):
        return

    @functools.wraps(original)
    def make_request_output(
        self: Any, new_token_ids: Any, pooling_output: Any, finish_reason: Any,
        stop_reason: Any, *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        parent = self.parent_req
        if parent is None or self.output_kind != RequestOutputKind.FINAL_ONLY:
            return original(
                self, new_token_ids, pooling_output, finish_reason, stop_reason, *args, **kwargs
            )
        per_choice = parent.__dict__.setdefault("_vllm_dllm_choices", {})
        if finish_reason is not None:
            params = args[0] if args else kwargs.get("kv_transfer_params")
            per_choice[self.request_index] = (params or {}).get("dllm")
        output = original(
            self, new_token_ids, pooling_output, finish_reason, stop_reason, *args, **kwargs
        )
        if output is not None and output.finished and hasattr(output, "outputs"):
            stats = [per_choice.get(o.index) for o in output.outputs]
            if any(s is not None for s in stats):  # a diffusion request
                output.kv_transfer_params = {"dllm": merge_stats(stats), CHOICES_KEY: stats}
        return output

    make_request_output._vllm_dllm = True  # type: ignore[attr-defined]
    RequestState.make_request_output = make_request_output  # type: ignore[method-assign]
    _keep_statistics_when_merged()


def _keep_statistics_when_merged() -> None:
    """A streamed request's outputs that wait for a slow reader are merged into one
    (`RequestOutputCollector.put` -> `RequestOutput.add`), which keeps only the last output's
    `kv_transfer_params`: a choice of an `n > 1` request that finished in an earlier output
    would lose its statistics. The merge keeps every choice's, by index, under `CHOICES_KEY`.
    """
    from vllm.outputs import RequestOutput

    original = RequestOutput.add
    if getattr(original, "_vllm_dllm", False):
        return

    @functools.wraps(original)
    def add(self: Any, next_output: Any, aggregate: bool) -> None:
        known = {**_stats_by_index(self), **_stats_by_index(next_output)}
        original(self, next_output, aggregate)
        if known:
            params = dict(self.kv_transfer_params or {})
            params[CHOICES_KEY] = [known.get(o.index) for o in self.outputs]
            self.kv_transfer_params = params

    add._vllm_dllm = True  # type: ignore[attr-defined]
    RequestOutput.add = add  # type: ignore[method-assign]


def _stats_by_index(request_output: Any) -> dict[int, dict[str, Any]]:
    """The known statistics of a `RequestOutput`'s completions, by choice index."""
    return {
        completion.index: stats
        for completion, stats in zip(
            request_output.outputs, output_stats(request_output), strict=True
        )
        if stats is not None
    }
