"""How far each decision of an oracle run was from flipping: the checked premise of every
token-for-token comparison with the engine.

The engine (vLLM's kernels) and the oracle (dense torch) compute the same fp32 logits in
different orders, so their logits differ by rounding, by an amount that depends on the CPU's
vector width and math library. Equal tokens on one CPU then mean equal tokens on every CPU only
if no decision the oracle took was within that rounding of its tipping point. A run therefore
records, in **logit units**, the smallest distance of any decision from flipping:

- a committed proposal: the gap between the winning score (logit, plus the scaled noise when
  sampling) and the runner-up's;
- a confidence compared with a threshold or a factor-rule bound: ``|log c - log t|``;
- confidences ranked against each other where the ranking decides what is committed (the
  quota's cut, the always-committed top one): ``log c_a - log c_b``.

A confidence is ``exp((l_x0 - logsumexp(l)) / T)`` (``T = 1`` without sampling), so an error of
``d`` in every logit moves ``log c`` by at most ``2d / T``; log distances are multiplied by
``T / 2`` to be in the same units as a logit gap. A decision cannot flip while the engine's
logits are within half the margin of the oracle's (``tests/tolerances.py`` says how close they
are, and asserts that the margin of every compared run exceeds that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Margins:
    """The smallest decision margin of one oracle run, in logit units, and where it was."""

    smallest: float = math.inf
    where: str = "no decision"
    scale: float = 0.0  # the largest finite logit magnitude the decisions were taken on

    def observe(self, logits: Tensor) -> None:
        """Logits a decision is about to be taken on (their magnitude sets the rounding)."""
        finite = logits[torch.isfinite(logits)]
        if finite.numel():
            self.scale = max(self.scale, float(finite.abs().max()))

    def record(self, value: float, what: str) -> None:
        """Keep ``value`` (logit units) if it is the run's smallest margin so far."""
        if value < self.smallest:
            self.smallest, self.where = value, what

    def proposals(self, gaps: Tensor) -> None:
        """`top2_gaps` of the rows whose proposal was committed."""
        if gaps.numel():
            self.record(float(gaps.min()), "proposal top-2 gap")

    def against(self, confidence: Tensor, bound: float | Tensor, temperature: float = 1.0,
                what: str = "threshold") -> None:
        """Confidences compared with a bound (a threshold, the factor rule's ``1 - f/(i+1)``);
        bounds outside ``(0, 1]`` decide nothing that rounding could change."""
        bound = torch.as_tensor(bound, dtype=torch.float64).expand(confidence.shape)
        live = (bound > 0) & (bound <= 1)
        if live.any():
            gap = (confidence.double()[live].log() - bound[live].log()).abs().min()
            self.record(float(gap) * _scale(temperature), f"confidence vs {what}")

    def ranking(self, ranked: Tensor, cut: int, temperature: float = 1.0) -> None:
        """Confidences sorted descending, of which the first ``cut`` are committed: the gap at
        the cut decides which ones."""
        if 0 < cut < len(ranked):
            gap = ranked[cut - 1].double().log() - ranked[cut].double().log()
            self.record(float(gap) * _scale(temperature), "confidence ranking at the cut")

    def score_ranking(self, ranked: Tensor, sensitivity: Tensor, cut: int, what: str) -> None:
        """Scores sorted descending, of which the first ``cut`` are committed, with each row's
        ``sensitivity``: how much its score moves per unit of error in every logit. The two
        rows at the cut trade places only if the logits move by ``gap / (s_a + s_b)``."""
        if 0 < cut < len(ranked):
            gap = float(ranked[cut - 1] - ranked[cut])
            spread = float(sensitivity[cut - 1] + sensitivity[cut])
            self.record(2 * gap / spread if spread > 0 else math.inf, f"{what} ranking at the cut")

    def score_against(self, scores: Tensor, sensitivity: Tensor, bound: float,
                      what: str) -> None:
        """Scores compared with a ``bound`` (a threshold on a margin), each with its
        ``sensitivity``: a score crosses the bound only if the logits move by
        ``|score - bound| / sensitivity``."""
        if scores.numel():
            gap = (scores.double() - bound).abs() / sensitivity.double()
            self.record(2 * float(gap.min()), f"{what} vs threshold")

    def entropy_cut(self, cumulative: Tensor, bound: float) -> None:
        """The entropy-bounded rule's cumulative entropies (nats, sorted ascending) compared
        with its bound. An entropy moves by about its logits' error (times the spread of its
        log-probabilities, which is O(1) for the rows near the bound), so the distance is
        recorded as a logit gap."""
        if cumulative.numel():
            gap = (cumulative.double() - bound).abs().min()
            self.record(float(gap), "cumulative entropy vs bound")


def top2_gaps(scores: Tensor) -> Tensor:
    """Per row, the winning proposal score minus the runner-up's (MASK's score is ``-inf``)."""
    top2 = scores.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def _scale(temperature: float) -> float:
    return (temperature if temperature > 0 else 1.0) / 2
