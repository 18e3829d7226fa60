"""Per-request random numbers for a batch of requests.

A seeded request must draw the same numbers alone or in any batch (batch independence, DESIGN
section 2). A `torch.Generator` produces one stream per call, so the only way to give each
seeded request its own reproducible stream with torch's generators is one draw per seeded
request: `fill_per_request` is that single, isolated loop. Its length is the number of *seeded*
requests in the batch (not rows, not positions) and it never reads tensor values, so it adds no
host synchronisation. All unseeded rows are filled by one batched draw first (vLLM's own sampler
uses the same pattern).

Callers pass a request's generator only for draws the request itself needs (its Gumbel noise
only when its temperature is > 0, its uniform scores only when it remasks randomly). A generator
that also drew because of *other* requests in the batch would advance by a batch-dependent amount
and lose reproducibility.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class RowGenerator(NamedTuple):
    """The contiguous rows `[start, stop)` of one seeded request and the generator they use."""

    start: int
    stop: int
    generator: torch.Generator


def fill_per_request(
    out: Tensor,
    draw: Callable[[Tensor, torch.Generator | None], object],
    generators: Sequence[RowGenerator] = (),
    default_generator: torch.Generator | None = None,
) -> Tensor:
    """Fill `out` in place with `draw(view, generator)`, row spans of seeded requests separately.

    Every row is first drawn from `default_generator` in one call, then each seeded span is
    redrawn from its own generator: overdrawing the seeded rows costs a little RNG throughput
    and keeps the unseeded path a single kernel whatever the row layout.
    """
    draw(out, default_generator)
    for span in generators:
        draw(out[span.start : span.stop], span.generator)
    return out


def gumbel_noise(
    num_rows: int,
    vocab_size: int,
    device: torch.device | str,
    generators: Sequence[RowGenerator] = (),
    default_generator: torch.Generator | None = None,
) -> Tensor:
    """Standard Gumbel noise `-log(E)`, `E ~ Exp(1)`, as a float32 `[num_rows, vocab_size]` tensor.

    `E` is clamped away from 0 so the noise is always finite: a greedy row multiplies its noise by
    temperature 0 and must get exactly 0, never `0 * inf = nan`.
    """
    noise = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=device)
    fill_per_request(noise, lambda t, g: t.exponential_(generator=g), generators, default_generator)
    return noise.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_()


def uniform_noise(
    num_rows: int,
    device: torch.device | str,
    generators: Sequence[RowGenerator] = (),
    default_generator: torch.Generator | None = None,
) -> Tensor:
    """One float32 number uniform in `[0, 1)` per row (the `random` remasking score)."""
    out = torch.empty(num_rows, dtype=torch.float32, device=device)
    return fill_per_request(
        out, lambda t, g: t.uniform_(generator=g), generators, default_generator
    )
