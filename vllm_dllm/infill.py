"""Infilling: a fixed suffix after the generated gap, for the bidirectional families.

A request with a suffix decodes the canvas `prompt ++ [MASK] * G ++ suffix`: the gap of `G`
positions (`max_tokens` rounded up to whole blocks) is decoded block by block, left to right, as
any generation is; the suffix is fixed context like the prompt, never a candidate, never
returned. LLaDA and Dream attend bidirectionally, so every gap position sees the suffix. The
block-diffusion families attend block-causally (a block sees only the blocks before it), so a
suffix after the gap could not inform it: they refuse it.

The request carries the suffix in `extra_args["dllm_suffix"]` (the server moves the completions
API's `suffix` there). Text is tokenized in the front end, where the tokenizer is, as the
releases' infilling code builds its canvas (DreamOn's `process_infilling_prompt` and its
evaluation's `infilling`: the suffix encoded without special tokens, then the end-of-text token):
`tokens(text) ++ [EOS]`. A list of token ids is taken as the canvas's tail exactly as given (no
EOS appended), for callers who build it themselves. From the front end on, the value is that
list of ids, so the scheduler and the workers never need the tokenizer.

Nothing here imports vLLM: `vllm_dllm.config` converts and checks the value with these helpers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

SUFFIX_KEY = "dllm_suffix"


class DllmSuffixError(ValueError):
    """An invalid suffix; the message starts with `dllm_suffix` (`DllmParamError` wraps it)."""


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def to_suffix(raw: Any, source: str = "") -> str | tuple[int, ...]:
    """The wire value of `dllm_suffix` as text or a tuple of token ids (`()`: no suffix).

    Text stays text until the front end tokenizes it; ids must be non-negative integers (the
    front end checks them against the vocabulary, which only it knows).
    """
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list | tuple) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in raw
    ):
        return tuple(raw)
    raise DllmSuffixError(
        f"{source}{SUFFIX_KEY} must be a string or a list of token ids (integers >= 0), got {raw!r}"
    )


def block_causal_refusal(family_name: str) -> str:
    """Why a block-diffusion family refuses a suffix (the 400's message)."""
    return (
        f"{SUFFIX_KEY} (infilling, the completions API's suffix) is not supported by "
        f"{family_name} models: their attention is block-causal (a block attends only to the "
        f"blocks before it), so a suffix after the generated blocks could not inform them; "
        f"LLaDA and Dream models, which attend bidirectionally, serve it"
    )


def canvas_suffix(
    raw: Any, tokenizer: _Tokenizer | None, eos_token_id: int | None, vocab_size: int
) -> tuple[int, ...]:
    """The canvas tokens after the gap for the request value `raw` (module docstring).

    Text: its tokens without special tokens, then `eos_token_id` (when the tokenizer has one);
    `""` is no suffix. Token ids: as given, each checked against `vocab_size`.
    """
    value = to_suffix(raw)
    if isinstance(value, str):
        if not value:
            return ()
        if tokenizer is None:
            raise DllmSuffixError(
                f"{SUFFIX_KEY} as text needs the tokenizer (the engine runs without one: "
                f"skip_tokenizer_init); pass token ids"
            )
        ids = list(tokenizer.encode(value, add_special_tokens=False))
        return (*ids, *(() if eos_token_id is None else (eos_token_id,)))
    too_large = [t for t in value if t >= vocab_size]
    if too_large:
        raise DllmSuffixError(
            f"{SUFFIX_KEY} holds token ids outside the vocabulary (size {vocab_size}): "
            f"{too_large[:5]}"
        )
    return value


def with_canvas_suffix(
    extra_args: Mapping[str, Any] | None,
    tokenizer: _Tokenizer | None,
    eos_token_id: int | None,
    vocab_size: int,
) -> dict[str, Any] | None:
    """`extra_args` with `dllm_suffix` replaced by the canvas suffix's ids (dropped when empty),
    or None when the request has no `dllm_suffix`. A new dict: the caller's may be shared."""
    if not extra_args or extra_args.get(SUFFIX_KEY) is None:
        return None
    resolved = dict(extra_args)
    ids = canvas_suffix(resolved.pop(SUFFIX_KEY), tokenizer, eos_token_id, vocab_size)
    if ids:
        resolved[SUFFIX_KEY] = list(ids)
    return resolved


def suffix_ids(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """The parsed suffix of a request whose text the front end has tokenized already.

    Text here means a request that did not pass the front end (it would have become ids): a
    programming error rather than a user's, reported as a parameter error all the same.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        if value:
            raise DllmSuffixError(
                f"{SUFFIX_KEY} arrived as text where token ids were expected: the front end "
                f"tokenizes it (vllm.LLM and the OpenAI server do)"
            )
        return ()
    return tuple(value)
