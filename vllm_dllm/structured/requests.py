"""Which constrained requests the commit rule serves, checked in the front end.

vLLM's own front end validates the constraint itself (`SamplingParams.verify`: the schema,
regex, choice or grammar, with a 400 naming the problem) and picks its backend; the denoiser's
matchers are xgrammar's (`vllm_dllm.structured.grammars`), so a constraint only another
backend can compile is refused here, as are the loops the rule cannot drive: a loop that
rewrites committed tokens (LLaDA 2.1's editing), one whose schedule fixes how many positions a
step commits (Dream's `dllm_alg` samplers, whose quota may be zero and whose last step must
empty the block), and infilling, whose suffix the grammar would have to reach from the gap.
"""

from __future__ import annotations

from vllm.sampling_params import SamplingParams

from vllm_dllm.config import DllmParams


def is_constrained(params: SamplingParams) -> bool:
    spec = params.structured_outputs
    return spec is not None and not spec.all_constraints_none()


def backend_refusal(params: SamplingParams) -> str | None:
    """Why a constraint cannot be served by xgrammar (None: it can, or there is none)."""
    if not is_constrained(params):
        return None
    backend = getattr(params.structured_outputs, "_backend", None)
    if backend in (None, "xgrammar"):
        return None
    return (
        f"structured_outputs needs the {backend!r} backend here; vllm-dllm enforces "
        "constraints at commit with xgrammar matchers, which cannot compile this one"
    )


def loop_refusal(dllm: DllmParams) -> tuple[str, str] | None:
    """(message, parameter) when the request's loop cannot run under a grammar, else None."""
    if dllm.editing_threshold is not None:
        return (
            "dllm_editing_threshold cannot be combined with structured output: editing rewrites "
            "committed tokens, the grammar holds only for a prefix that never changes",
            "dllm_editing_threshold",
        )
    if dllm.alg is not None and dllm.rule == "steps":
        return (
            "dllm_alg (Dream's schedule) cannot be combined with structured output: its steps "
            "commit a fixed number of positions; name a rule (dllm_threshold, dllm_factor) to "
            "use the alg as the score",
            "dllm_alg",
        )
    if dllm.suffix:
        return (
            "dllm_suffix cannot be combined with structured output: the grammar constrains "
            "what is generated, not a fixed suffix after it",
            "dllm_suffix",
        )
    return None
