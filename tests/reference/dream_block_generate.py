"""Fast-dLLM's Dream block loop with Dream's samplers, one request: the oracle of ``dllm_alg``
with several blocks, a cache or a threshold.

Written from the release's block generator (Fast-dLLM's ``dream/model/generation_utils_block.py``,
``_sample``; read, not copied), on the dense forward and the request bookkeeping of
:mod:`generate` (MASK never proposed nor in the softmax, the same finality rule and early stop,
every forward counted). The canvas is the prompt plus ``gen_length`` MASK, ``gen_length`` a
multiple of ``block_length``; with ``m = steps / blocks`` and timesteps
``T = linspace(1, eps, m + 1)``, each block ``[s, e)``:

- **Step 0**, the block's full forward over the canvas (which, with a cache, keeps the K/V of
  every position: the prefix for ``prefix``, the whole canvas for ``dual``). Dream commits
  position ``s`` alone, from its shifted logits (the argmax, or the counter-based draw at
  temperature > 0), as the release does. LLaDA (no shift; no release has this loop for it)
  uses these logits for the schedule's step 0 instead.
- **Later steps**: ``none`` a full forward, ``prefix`` the window ``[s, L)`` against the kept
  prefix, ``dual`` the window ``[s, e)`` against the kept prefix and suffix; logits shifted
  within the window (Dream). The candidates are the block's masked positions, scored by the
  request's ``alg`` over the distribution (after temperature): the proposal's probability
  (``maskgit_plus``), top-1 minus top-2 probability (``topk_margin``) or
  ``sum p log(p + 1e-10)`` (``entropy``). The release scores this branch by negative entropy
  whatever ``alg`` says; here the request's alg decides (equal for ``entropy``).
- **Selection.** ``threshold`` given: every candidate scoring ``>= threshold`` and always the
  best (the release's ``confidence_threshold`` branch, scored by the alg). Otherwise step ``i``
  (``t = T[i]``, ``s = T[i + 1]``) commits the ``int(masked * (1 - s / t))`` best (float32 as
  released; all that are left at ``i = m - 1``), ties to the lower position; ``alg_temp > 0``
  takes the best of ``score / alg_temp + Gumbel`` instead (drawing without replacement in
  proportion to ``softmax(score / alg_temp)``, the law of the release's ``multinomial``), the
  Gumbel noise from the engine's counter-based uniforms (``REMASK_STREAM``, keyed by seed,
  forward count before this forward and position), so a seeded engine request must match.

``suffix`` (infilling): token ids after the generated positions, fixed context; a ``prefix``
step's window ends where they start (``generate``'s convention).

Not copied: the release's ``m = 1``, whose loop stops after the opening and leaves MASK in the
block (the engine refuses it); the extra forward the release runs on a block already full after
its opening (``block_length`` 1); decoding past an end token (early stop as in :mod:`generate`).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from tests.reference.dream_alg_generate import EPS, _score
from tests.reference.generate import Result, Rule, _Decoder, _shift
from tests.reference.model import ReferenceModel
from vllm_dllm.sampling.noise import REMASK_STREAM, row_keys, uniform

ALGS = ("maskgit_plus", "topk_margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")


def generate_dream_block_alg(
    model: ReferenceModel,
    prompt_ids: Sequence[int],
    *,
    gen_length: int,
    block_length: int,
    cache: str,
    alg: str,
    steps: int | None = None,
    threshold: float | None = None,
    alg_temp: float = 0.0,
    temperature: float = 0.0,
    end_token_ids: Sequence[int] = (),
    max_tokens: int | None = None,
    seed: int = 0,
    suffix: Sequence[int] = (),
) -> Result:
    """Fast-dLLM's Dream ``diffusion_generate(steps=steps, alg=alg, alg_temp=alg_temp,
    block_length=block_length, dual_cache=cache == "dual", threshold=...)`` with the request's
    alg as the score; exactly one of ``steps`` (Dream's schedule) and ``threshold``."""
    if alg not in ALGS or cache not in CACHE_MODES:
        raise ValueError(f"alg must be one of {ALGS} and cache one of {CACHE_MODES}")
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length or not prompt_ids:
        raise ValueError("need a prompt and gen_length a positive multiple of block_length")
    if (steps is None) == (threshold is None):
        raise ValueError("give exactly one of steps and threshold")
    num_blocks = gen_length // block_length
    if steps is not None and (steps % num_blocks or steps // num_blocks < 2 <= block_length):
        raise ValueError(f"steps {steps} must give each of {num_blocks} blocks >= 2 steps")
    decoder = _Decoder(
        model=model,
        canvas=torch.tensor([*prompt_ids] + [model.spec.mask_token_id] * gen_length
                            + [*suffix]),
        prompt_length=len(prompt_ids),
        rule=Rule(threshold=threshold),
        temperature=temperature,
        remasking="low_confidence",
        end_token_ids=frozenset(end_token_ids),
        max_tokens=gen_length if max_tokens is None else max_tokens,
        generator=torch.Generator(),
        counter_noise=True,
        seed=seed,
        gap_end=len(prompt_ids) + gen_length,
    )
    loop = _BlockLoop(decoder, alg, cache, steps and steps // num_blocks, threshold, alg_temp)
    for block in range(num_blocks):
        start = len(prompt_ids) + block * block_length
        if loop.decode_block(start, start + block_length):
            break
    return Result(decoder.output(), decoder.num_forwards, decoder.canvas, decoder.margins)


class _BlockLoop:
    def __init__(self, decoder: _Decoder, alg: str, cache: str, steps_per_block: int | None,
                 threshold: float | None, alg_temp: float) -> None:
        self.decoder, self.alg, self.cache = decoder, alg, cache
        self.threshold, self.alg_temp = threshold, alg_temp
        self.steps_per_block = steps_per_block
        if steps_per_block is not None:
            self.timesteps = torch.linspace(1, EPS, steps_per_block + 1)
        self.shift = decoder.model.spec.family == "dream"

    def decode_block(self, start: int, end: int) -> bool:
        """Decode ``[start, end)``; True when the request is finished."""
        decoder = self.decoder
        length = len(decoder.canvas)
        cache = None if self.cache == "none" else decoder.model.new_cache(length)
        logits = self._shifted(decoder.forward(0, length, cache, write=True))
        step = 0
        if self.shift:
            # Dream's opening: position `start` is predicted from hidden `start - 1`, which no
            # cached step recomputes; the full forward commits it alone.
            x0, _, gaps = decoder.propose(logits[start:start + 1], torch.tensor([start]))
            decoder.margins.proposals(gaps)
            decoder.canvas[start] = x0[0]
            if decoder.finished():
                return True
            step = 1
        else:
            if self.step(logits, 0, start, end, step):
                return True
            step = 1
        while len(decoder.masked(start, end)):
            if self.cache == "none":
                window, logits = 0, decoder.forward(0, length, None, write=False)
            elif self.cache == "prefix":
                window, logits = start, decoder.forward(start, decoder.gap_end, cache,
                                                        write=False)
            else:
                window, logits = start, decoder.forward(start, end, cache, write=True)
            # A window's first row has no predecessor: it belongs to position `start`, already
            # committed, so it is never a candidate.
            if self.step(self._shifted(logits), window, start, end, step):
                return True
            step += 1
        return False

    def _shifted(self, logits: Tensor) -> Tensor:
        return _shift(logits) if self.shift else logits

    def step(self, logits: Tensor, window: int, start: int, end: int, step: int) -> bool:
        """Propose, score, select and commit over the block's masked positions."""
        decoder = self.decoder
        candidates = decoder.masked(start, end)
        rows = logits[candidates - window]
        x0, _, gaps = decoder.propose(rows, candidates)
        score, sensitivity = self._score(rows, x0)
        what = f"{self.alg} score"
        if self.threshold is not None:
            chosen = self._threshold(score, sensitivity, what)
        else:
            assert self.steps_per_block is not None
            masked = len(candidates)
            if step >= self.steps_per_block - 1:
                count = masked
            else:
                ratio = self.timesteps[step + 1] / self.timesteps[step]
                # The release's mask count is a float32 tensor (a sum divided by the batch).
                count = int(torch.tensor(masked) / 1 * (1 - ratio))
            ranked = score
            if self.alg_temp > 0:
                keys = row_keys(torch.full_like(candidates, decoder.seed),
                                torch.full_like(candidates, decoder.num_forwards - 1),
                                candidates, REMASK_STREAM)  # fmt: skip
                alg_temp = torch.tensor(self.alg_temp, dtype=torch.float32)
                ranked = score / alg_temp - uniform(keys).log().neg().log()
            order = torch.sort(ranked, descending=True, stable=True)
            chosen = order.indices[:count]
            # In score units: a drawn ranking moves as its score does.
            scale = self.alg_temp if self.alg_temp > 0 else 1.0
            decoder.margins.score_ranking(order.values * scale, sensitivity[order.indices],
                                          count, what)  # fmt: skip
        decoder.margins.proposals(gaps[chosen])
        decoder.canvas[candidates[chosen]] = x0[chosen]
        return decoder.finished()

    def _score(self, rows: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """The alg's score of each row over its distribution after temperature, and how much
        it moves per unit of error in every raw logit (`dream_alg_generate._score`).
        ``maskgit_plus`` scores the proposal, which at temperature > 0 is a draw (the release's
        ``sample_tokens`` confidence), not the top token."""
        temperature = self.decoder.temperature if self.decoder.temperature > 0 else 1.0
        tempered = rows.float() / temperature
        score, sensitivity = _score(tempered, self.decoder.model.spec.mask_token_id, self.alg)
        if self.alg == "maskgit_plus":
            tempered[:, self.decoder.model.spec.mask_token_id] = float("-inf")
            score = tempered.softmax(dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            sensitivity = 2 * score
        return score, sensitivity / temperature

    def _threshold(self, score: Tensor, sensitivity: Tensor, what: str) -> Tensor:
        """Every score ``>= threshold`` (compared in float32), and always the best."""
        assert self.threshold is not None
        threshold = torch.tensor(self.threshold, dtype=torch.float32)
        order = torch.sort(score, descending=True, stable=True)
        self.decoder.margins.score_against(score, sensitivity, float(threshold), what)
        if order.values[0] < threshold:  # nothing above: the ranking picks the one committed
            self.decoder.margins.score_ranking(order.values, sensitivity[order.indices], 1, what)
        above = torch.nonzero(score >= threshold).flatten()
        return torch.unique(torch.cat([order.indices[:1], above]))
