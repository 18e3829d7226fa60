"""Oracle runs computed once per test session.

The same oracle case (checkpoint, prompt, parameters) is compared with several engines: eager,
compiled, tensor-parallel, through the server, in a mixed batch and alone. The oracle is plain
torch and deterministic, so its answer for a case is computed once and reused; a dense fp32
oracle run costs about as much as the engine's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

Run = TypeVar("Run", bound=Callable[..., tuple[list[int], int]])


def _frozen(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def memoized(run: Run) -> Run:
    """``run(model, checkpoint, prompt, extra, ...)`` computed once per distinct arguments; the
    model is identified by its checkpoint directory (a fresh copy of the same files gives the
    same answers)."""
    results: dict[Hashable, tuple[list[int], int]] = {}

    @functools.wraps(run)
    def cached(model, checkpoint, *args: Any, **kwargs: Any) -> tuple[list[int], int]:
        key = (str(checkpoint), _frozen(args), _frozen(kwargs))
        if key not in results:
            results[key] = run(model, checkpoint, *args, **kwargs)
        tokens, forwards = results[key]
        return list(tokens), forwards

    return cached  # type: ignore[return-value]
