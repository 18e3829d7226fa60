"""Tolerances derived from the dtype and the magnitudes compared, so that a comparison claims the
same thing on every CPU.

Two evaluations of one forward that differ in the order of their floating-point operations (a
matrix product blocked differently, another vector width or math library, a fused kernel, a
window computed apart from the rest of its sequence) differ by rounding. A sum of ``K`` terms is
off by about ``sqrt(K)`` units of rounding of its magnitude (randomly signed rounding errors add
like a random walk; ``K`` units is the worst case), and a forward chains ``depth`` reductions
whose errors add up in the residual stream. Hence the **rounding bound**

    rb = depth * sqrt(REDUCTION) * eps(dtype) * scale,

``scale`` the largest magnitude of the result. For fp32 logits of a tiny checkpoint (depth 3-4,
``scale`` 3-10) it is 4e-5 to 1.1e-4; measured on an AMD EPYC (Zen 3) machine, the engine's fp32
logits differ from the fp32 oracle's by 0.1 to 1.4 rb, and from a float64 oracle's by 0.2 to
1.7 rb: fp32 rounding is that large, and the bound's estimate of it right.

- **Exact up to rounding** between two computations the test controls (a cached window against
  a full forward of the oracle, the oracle against an independent implementation): compared in
  float64, within ``SAFETY * rb``, about 1e-12: far above any CPU's float64 rounding and far
  below any real difference (1e-3 and more). Comparisons with transformers stay in fp32
  (its RMSNorm and RoPE compute in fp32 whatever the model's dtype).
- **Engine against oracle** logits: within ``SAFETY * rb`` in fp32, still small enough to catch
  any wrong computation.
- **Decisions.** The oracle's decisions (which token, which positions) flip only on a CPU whose
  logits move by half a decision's margin (`tests.reference.margins`). Every oracle run that the
  engine is compared with token for token asserts that its smallest margin exceeds
  ``DECISION_SAFETY * rb``: its decisions then survive any engine logits within ``1.5 rb`` of
  the oracle's, above the 1.4 rb measured for Dream and three times the 0.5 rb of the block
  families, so equal tokens on one CPU mean equal tokens on another.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from tests.reference.margins import Margins

# No tiny checkpoint sums more than this many terms in one reduction: hidden sizes <= 256, MLP
# widths <= 704, canvases <= 512 positions.
REDUCTION = 1024
SAFETY = 4
DECISION_SAFETY = 3


def rounding_bound(scale: float, dtype: torch.dtype, depth: int) -> float:
    """How far two orderings of a ``depth``-layer forward may differ, results of magnitude at
    most ``scale``."""
    return depth * math.sqrt(REDUCTION) * torch.finfo(dtype).eps * scale


def depth(model: object) -> int:
    """Chained reductions in a forward of an oracle ``model``: one per layer, the LM head."""
    return model.spec.num_layers + 1  # type: ignore[attr-defined]


#: What the passing comparisons of this session relied on, in rounding bounds, for the summary
#: printed at the end of the run (tests/conftest.py): (largest fp32 forward difference, test)
#: and (smallest decision margin, test).
OBSERVED: dict[str, tuple[float, str]] = {
    "forward": (0.0, "none"),
    "decision": (math.inf, "none"),
}


def merge_observed(into: dict[str, tuple[float, str]], other: dict) -> None:
    """Keep in `into` the worse of each observation of `into` and `other` (another process's
    `OBSERVED`, as xdist workers hand theirs over)."""
    for kind, (value, where) in other.items():
        if (value > into[kind][0]) if kind == "forward" else (value < into[kind][0]):
            into[kind] = (value, where)


def _observe(kind: str, value: float, worse: bool) -> None:
    if worse:
        OBSERVED[kind] = (value, os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])


def forward_tolerance(expected: Tensor, model: object) -> dict:
    """``assert_close`` keywords for a forward of ``model``'s checkpoint against ``expected``,
    the same forward computed in another order: ``atol = SAFETY * rounding_bound`` at
    ``expected``'s magnitude and dtype, no rtol."""
    bound = rounding_bound(float(expected.abs().max()), expected.dtype, depth(model))
    return {"atol": SAFETY * bound, "rtol": 0.0}


def assert_forward_close(actual: Tensor, expected: Tensor, model: object) -> None:
    """``actual`` equals ``expected``, the same forward of ``model``'s checkpoint computed in
    another order, within ``SAFETY * rounding_bound`` at ``expected``'s magnitude and dtype."""
    bound = rounding_bound(float(expected.abs().max()), expected.dtype, depth(model))
    ratio = float((actual.to(expected.dtype) - expected).abs().max()) / bound
    torch.testing.assert_close(actual, expected, atol=SAFETY * bound, rtol=0.0)
    _observe("forward", ratio, ratio > OBSERVED["forward"][0] and expected.dtype == torch.float32)


def assert_decisive(margins: Margins, model: object) -> None:
    """The oracle run behind a token-for-token comparison took no decision within rounding of
    its tipping point (fp32 logits of ``model``'s forward)."""
    bound = DECISION_SAFETY * rounding_bound(margins.scale, torch.float32, depth(model))
    assert margins.smallest > bound, (
        f"a decision of the oracle run is within {margins.smallest:.3g} logits of flipping "
        f"({margins.where}), under the {bound:.3g} that fp32 rounding on another CPU could "
        "reach: pick a prompt or parameters whose decisions are clear"
    )
    ratio = margins.smallest / bound * DECISION_SAFETY
    _observe("decision", ratio, ratio < OBSERVED["decision"][0])
