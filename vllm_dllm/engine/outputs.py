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


def request_stats(forwards: int, output_tokens: int) -> dict[str, float | int]:
    """Per-request statistics, returned as `RequestOutput.kv_transfer_params["dllm"]`."""
    return {
        "forwards": forwards,
        "output_tokens": output_tokens,
        "tokens_per_forward": round(output_tokens / forwards, 4) if forwards else 0.0,
    }
