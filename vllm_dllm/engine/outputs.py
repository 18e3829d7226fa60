"""What the diffusion worker reports to the scheduler, and the statistics users read."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.v1.outputs import ModelRunnerOutput


@dataclass
class DllmRunnerOutput(ModelRunnerOutput):
    """`ModelRunnerOutput` plus each running request's next query-window length.

    `sampled_token_ids` holds, per request, the tokens that became *final* this step (the
    committed prefix of the canvas grew), so vLLM's stop checks and streaming see only text that
    no later step can change.
    """

    next_windows: dict[str, int] = field(default_factory=dict)
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
