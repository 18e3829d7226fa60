"""Dream's own ``diffusion_generate`` loop (its release's ``generation_utils.py``), one request.

The oracle of ``dllm_alg`` requests, written from the release's loop (read, not copied), on the
dense forward and the request bookkeeping of :mod:`generate` (MASK never proposed nor in the
softmax, the same finality rule and early stop, every forward counted):

- The canvas is the prompt plus ``max_new_tokens`` MASK; every step is a full forward over it,
  logits shifted (position j scored by row j - 1, Dream's convention).
- Timesteps ``linspace(1, eps, steps + 1)`` (float32, ``eps`` 1e-3); step ``i`` goes from
  ``t = T[i]`` to ``s = T[i + 1]``.
- ``origin``: each masked position is committed with probability ``1 - s / t`` (1 at the last
  step). The release draws ``rand < p``; here a position commits when its uniform is
  ``>= 1 - p``: the same law, with the engine's counter-based uniforms (``REMASK_STREAM``,
  keyed by seed, forward count before this forward and position), so a seeded engine request
  must match exactly.
- ``maskgit_plus`` / ``topk_margin`` / ``entropy``: score each masked position by its top
  probability / top-1 minus top-2 probability / ``sum p log(p + 1e-10)`` (the release's
  negative entropy), and commit the ``int(masked * (1 - s / t))`` best (float32 arithmetic as
  released; all that are left at the last step); ties to the lower position. A step may commit
  nothing. Temperature 0 only (argmax proposals), ``alg_temp`` 0.
- ``suffix`` (infilling, as DreamOn's ``infilling`` builds its canvas): token ids after the
  MASK, fixed context seen by every full forward, never committed or output.
- The release runs all ``steps`` forwards; the request here stops once its output is final (the
  same tokens, fewer forwards where the end comes first).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from tests.reference.generate import Result, Rule, _Decoder, _shift
from tests.reference.model import ReferenceModel
from vllm_dllm.sampling.noise import REMASK_STREAM, row_keys, uniform

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
EPS = 1e-3


def generate_dream_alg(
    model: ReferenceModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    steps: int,
    alg: str,
    end_token_ids: Sequence[int] = (),
    seed: int = 0,
    suffix: Sequence[int] = (),
) -> Result:
    """Dream's ``diffusion_generate(steps=steps, alg=alg, alg_temp=0, temperature=0)``."""
    if alg not in ALGS:
        raise ValueError(f"alg must be one of {ALGS}, got {alg!r}")
    if steps <= 0 or max_new_tokens <= 0 or not prompt_ids:
        raise ValueError("need steps > 0, max_new_tokens > 0 and a prompt")
    mask = model.spec.mask_token_id
    decoder = _Decoder(
        model=model,
        canvas=torch.tensor([*prompt_ids] + [mask] * max_new_tokens + [*suffix]),
        prompt_length=len(prompt_ids),
        rule=Rule(threshold=1.0),  # unused: this loop selects by its own schedule
        temperature=0.0,
        remasking="low_confidence",
        end_token_ids=frozenset(end_token_ids),
        max_tokens=max_new_tokens,
        generator=torch.Generator(),
        gap_end=len(prompt_ids) + max_new_tokens,
    )
    length = len(decoder.canvas)
    timesteps = torch.linspace(1, EPS, steps + 1)
    for i in range(steps):
        masked = decoder.masked(len(prompt_ids), decoder.gap_end)
        logits = _shift(decoder.forward(0, length, None, write=False))
        x0, _, gaps = decoder.propose(logits[masked], masked)
        ratio = timesteps[i + 1] / timesteps[i]
        last = i == steps - 1
        if alg == "origin":
            keys = row_keys(torch.full_like(masked, seed),
                            torch.full_like(masked, decoder.num_forwards - 1), masked,
                            REMASK_STREAM)  # fmt: skip
            bound = 0.0 if last else float(1 - (1 - ratio))
            chosen = torch.nonzero(uniform(keys) >= bound).flatten()
        else:
            score, sensitivity = _score(logits[masked], mask, alg)
            count = len(masked) if last else int(torch.tensor(len(masked)) / 1 * (1 - ratio))
            ranked = torch.sort(score, descending=True, stable=True)
            chosen = ranked.indices[:count]
            decoder.margins.score_ranking(ranked.values, sensitivity[ranked.indices], count, alg)
        decoder.margins.proposals(gaps[chosen])
        decoder.canvas[masked[chosen]] = x0[chosen]
        if decoder.finished():
            break
    return Result(decoder.output(), decoder.num_forwards, decoder.canvas, decoder.margins)


def _score(logits: Tensor, mask: int, alg: str) -> tuple[Tensor, Tensor]:
    """The release's confidence of each row at temperature 0 (MASK outside the softmax), and
    how much it can move per unit of error in every logit (for the decision margins): a
    probability ``p`` by ``2p``, a top-2 difference by ``2(p1 + p2)``, an entropy by
    ``2 * sum_j p_j |log p_j + H|``."""
    logits = logits.float().clone()
    logits[:, mask] = float("-inf")
    probs = logits.softmax(dim=-1)
    if alg == "maskgit_plus":
        top = probs.max(dim=-1).values
        return top, 2 * top
    if alg == "topk_margin":
        top = probs.sort(dim=-1, descending=True).values
        return top[:, 0] - top[:, 1], 2 * (top[:, 0] + top[:, 1])
    plogp = probs * torch.log(probs + 1e-10)
    negative_entropy = plogp.sum(dim=-1)
    spread = probs * (torch.log(probs + 1e-10) - negative_entropy[:, None]).abs()
    return negative_entropy, 2 * spread.sum(dim=-1)
