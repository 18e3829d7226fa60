"""The decoding algorithm (docs/design.md, "The algorithm") for one request: the oracle in code.

Readable over fast: one request, dense attention, fp32. The engine must reproduce its token ids
and its number of model forwards. Decisions the algorithm leaves open, fixed here:

- **Rules.** Exactly one of ``threshold`` / ``factor`` / ``steps``; none given means
  ``threshold=0.9``. Candidates are the still-masked positions of the current block.
- **Ties.** Wherever confidences are ordered (top-1 of the threshold rule, the factor rule's
  sort, the steps rule's top-k), equal confidences go to the lower position first.
- **factor f.** Sort candidates by confidence, ``c1 >= c2 >= ...``; select the longest prefix
  ``1..n`` with ``c_i >= 1 - f / (i + 1)`` for every ``2 <= i <= n``; ``c1`` always.
- **steps S.** ``S`` must be a positive multiple of the number of blocks; ``m = S / blocks``.
  With ``M`` masked block positions when the block's first rule step starts (``B`` for LLaDA,
  ``B - 1`` for Dream), rule step ``i`` of the block commits ``M // m + (i < M % m)`` positions
  (never more than remain), the most confident first.
- **Proposal.** The MASK logit is ``-inf`` for proposal and confidence. ``T = 0``: argmax;
  ``T > 0``: ``argmax(logits + T * Gumbel)``, the noise drawn for the candidate rows in
  position order. Confidence is ``softmax(logits)[x0]`` of the noise-free logits, in fp32.
  ``remasking="random"`` draws confidences uniformly instead. One ``torch.Generator`` seeded
  with ``seed`` (0 when None) serves all draws, in the order they happen.
- **Finality.** After every step, ``x[P:f]`` is final, ``f`` the first still-masked position at
  or after ``P`` (``L`` if none). The request stops once that prefix contains an end token or
  reaches ``max_tokens`` (default: ``gen_length``) tokens. Output: that prefix cut just after its
  first end token (the end token is kept, as vLLM keeps EOS), then cut to ``max_tokens``.
- **Counting.** Every model forward counts, the block-start full forwards included.
- **Infilling.** ``suffix`` (token ids) follows the generated positions: the canvas is
  ``prompt ++ [MASK] * gen_length ++ suffix``, ``L`` its whole length and ``g = P + gen_length``
  the gap's end. The suffix is context: never a candidate, never output, and a PrefixCache step
  recomputes ``[s, g)`` only, reusing the suffix's K/V from the block's first forward as it
  reuses the prompt's. Full forwards and DualCache steps are unchanged (keys over ``[0, L)``).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tests.reference.block_generate import _filtered_probs
from tests.reference.margins import Margins, top2_gaps
from tests.reference.model import KVCache, ReferenceModel
from vllm_dllm.sampling.noise import GUMBEL_STREAM, gumbel, row_keys

CACHE_MODES = ("none", "prefix", "dual")
REMASKING = ("low_confidence", "random", "entropy_bounded")


@dataclass
class Result:
    """Output tokens (final, cut at the first end token), forwards used, final canvas, and how
    far the run's closest decision was from flipping."""

    tokens: list[int]
    num_forwards: int
    canvas: Tensor
    margins: Margins


@dataclass(frozen=True)
class Rule:
    """The request's selection rule: exactly one of the three fields is set."""

    threshold: float | None = None
    factor: float | None = None
    steps_per_block: int | None = None


def generate(
    model: ReferenceModel,
    prompt_ids: Sequence[int],
    *,
    gen_length: int,
    block_length: int = 32,
    cache: str = "dual",
    threshold: float | None = None,
    factor: float | None = None,
    steps: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    end_token_ids: Sequence[int] = (),
    max_tokens: int | None = None,
    seed: int | None = None,
    counter_noise: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    eb_threshold: float = 0.35,
    suffix: Sequence[int] = (),
) -> Result:
    """Decode ``gen_length`` tokens after ``prompt_ids`` block by block.

    ``counter_noise``: sample as the engine does instead of from the generator: Gumbel noise
    keyed by (seed, forward count before this forward, position), after top-k / top-p
    filtering; the confidence is LLaDA's (the raw softmax of the proposal) or Dream's (its
    probability under the filtered, tempered distribution). A seeded engine request must then
    give exactly these tokens.

    ``remasking="entropy_bounded"`` (the EB-sampler, temperature 0): instead of the rule, each
    step sorts the candidates by the entropy of their softmax, ascending, and commits the longest
    prefix whose summed entropy is at most ``eb_threshold``, at least one.
    """
    if not prompt_ids:
        raise ValueError("the prompt must not be empty")
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block {block_length}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    num_blocks = gen_length // block_length
    rule = _make_rule(threshold, factor, steps, num_blocks)
    decoder = _Decoder(
        model=model,
        canvas=torch.tensor([*prompt_ids] + [model.spec.mask_token_id] * gen_length
                            + [*suffix]),
        prompt_length=len(prompt_ids),
        rule=rule,
        temperature=temperature,
        remasking=remasking,
        end_token_ids=frozenset(end_token_ids),
        max_tokens=gen_length if max_tokens is None else max_tokens,
        generator=torch.Generator().manual_seed(0 if seed is None else seed),
        counter_noise=counter_noise,
        top_k=top_k,
        top_p=top_p,
        seed=0 if seed is None else seed,
        eb_threshold=eb_threshold,
        gap_end=len(prompt_ids) + gen_length,
    )
    decode_block = _decode_dream_block if model.spec.family == "dream" else _decode_llada_block
    for block in range(num_blocks):
        start = len(prompt_ids) + block * block_length
        if decode_block(decoder, start, start + block_length, cache):
            break
    return Result(decoder.output(), decoder.num_forwards, decoder.canvas, decoder.margins)


def _make_rule(threshold: float | None, factor: float | None, steps: int | None,
               num_blocks: int) -> Rule:
    if sum(value is not None for value in (threshold, factor, steps)) > 1:
        raise ValueError("give at most one of threshold, factor, steps")
    if factor is not None:
        return Rule(factor=factor)
    if steps is not None:
        if steps <= 0 or steps % num_blocks:
            raise ValueError(f"steps {steps} is not a positive multiple of {num_blocks} blocks")
        return Rule(steps_per_block=steps // num_blocks)
    return Rule(threshold=0.9 if threshold is None else threshold)


@dataclass
class _Decoder:
    """One request's state: the canvas, the sampling settings and the forward count."""

    model: ReferenceModel
    canvas: Tensor
    prompt_length: int
    rule: Rule
    temperature: float
    remasking: str
    end_token_ids: frozenset[int]
    max_tokens: int
    generator: torch.Generator
    num_forwards: int = 0
    margins: Margins = field(default_factory=Margins)
    counter_noise: bool = False
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eb_threshold: float = 0.35
    #: End of the generated positions, an infilling suffix after it (default: the canvas's end).
    gap_end: int = -1

    def __post_init__(self) -> None:
        if self.gap_end < 0:
            self.gap_end = len(self.canvas)

    def forward(self, start: int, end: int, cache: KVCache | None, *, write: bool) -> Tensor:
        """Logits of window ``[start, end)`` of the canvas; counts the forward."""
        self.num_forwards += 1
        positions = torch.arange(start, end)
        return self.model.forward(self.canvas[start:end], positions, cache, write_cache=write)

    def masked(self, start: int, end: int) -> Tensor:
        """Positions in ``[start, end)`` still holding MASK."""
        is_mask = self.canvas[start:end] == self.model.spec.mask_token_id
        return start + torch.nonzero(is_mask).flatten()

    def rule_step(self, logits: Tensor, window_start: int, start: int, end: int,
                  step: int, masked_at_start: int) -> bool:
        """Propose, score, select and commit over the block's masked positions.

        ``logits`` rows are canvas positions ``window_start, window_start + 1, ...``.
        Returns True when the request is finished.
        """
        candidates = self.masked(start, end)
        x0, confidence, gaps = self.propose(logits[candidates - window_start], candidates)
        if self.remasking == "entropy_bounded":
            rows = logits[candidates - window_start].float().clone()
            rows[:, self.model.spec.mask_token_id] = float("-inf")
            probs = rows.softmax(dim=-1)
            entropy = -torch.where(probs > 0, probs * probs.log(), 0.0).sum(dim=-1)
            order = torch.sort(entropy, stable=True).indices
            cumulative = entropy[order].cumsum(dim=0)
            self.margins.entropy_cut(cumulative, self.eb_threshold)
            chosen = order[: max(1, int((cumulative <= self.eb_threshold).sum()))]
        else:
            margins = self.margins if self.remasking == "low_confidence" else Margins()
            chosen = _select(confidence, self.rule, step, masked_at_start, margins)
        assert len(chosen) > 0, "every step commits at least one token, so every block ends"
        self.margins.proposals(gaps[chosen])
        self.canvas[candidates[chosen]] = x0[chosen]
        return self.finished()

    def propose(self, logits: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Proposed tokens, their confidences and their proposal margins (`top2_gaps`) for
        rows of logits at canvas ``positions`` (MASK never proposed)."""
        logits = logits.float().clone()
        logits[:, self.model.spec.mask_token_id] = float("-inf")
        self.margins.observe(logits)
        if self.temperature > 0 and self.counter_noise:
            return self._propose_counter_based(logits, positions)
        scores = logits
        if self.temperature > 0:
            uniform = torch.rand(logits.shape, generator=self.generator)
            gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
            scores = logits + self.temperature * gumbel
        x0, gaps = scores.argmax(dim=-1), top2_gaps(scores)
        if self.remasking == "random":
            return x0, torch.rand(x0.shape, generator=self.generator), gaps
        chosen_logit = logits.gather(-1, x0[:, None]).squeeze(-1)
        return x0, torch.exp(chosen_logit - torch.logsumexp(logits, dim=-1)), gaps

    def _propose_counter_based(self, logits: Tensor, positions: Tensor
                               ) -> tuple[Tensor, Tensor, Tensor]:
        """``argmax(filtered logits + T * G)`` with the engine's counter-based Gumbel noise."""
        draw = logits
        if self.top_k or self.top_p < 1.0:
            kept = _filtered_probs(logits / self.temperature, self.top_k, self.top_p) > 0
            draw = logits.masked_fill(~kept, float("-inf"))
        keys = row_keys(torch.full_like(positions, self.seed),
                        torch.full_like(positions, self.num_forwards - 1), positions,
                        GUMBEL_STREAM)  # fmt: skip
        scores = gumbel(keys, logits.shape[-1]).mul_(self.temperature).add_(draw)
        x0 = scores.argmax(dim=-1)
        scored = draw / self.temperature if self.model.spec.family == "dream" else logits
        chosen = scored.gather(-1, x0[:, None]).squeeze(-1)
        return x0, torch.exp(chosen - torch.logsumexp(scored, dim=-1)), top2_gaps(scores)

    def final_prefix(self) -> Tensor:
        """``x[P:f]``: the committed tokens before the first MASK at or after ``P``, within
        the gap."""
        masked = self.masked(self.prompt_length, self.gap_end)
        first_mask = int(masked[0]) if len(masked) else self.gap_end
        return self.canvas[self.prompt_length:first_mask]

    def finished(self) -> bool:
        """Early stop: the final prefix holds an end token or reaches ``max_tokens``."""
        prefix = self.final_prefix().tolist()
        return len(prefix) >= self.max_tokens or any(t in self.end_token_ids for t in prefix)

    def output(self) -> list[int]:
        """The final prefix cut just after its first end token, then to ``max_tokens``."""
        tokens = self.final_prefix().tolist()
        for index, token in enumerate(tokens):
            if token in self.end_token_ids:
                tokens = tokens[: index + 1]
                break
        return tokens[: self.max_tokens]


def _decode_llada_block(decoder: _Decoder, start: int, end: int, mode: str) -> bool:
    """LLaDA: every step proposes from the position's own logits row. Returns "finished"."""
    length = len(decoder.canvas)
    cache = None if mode == "none" else decoder.model.new_cache(length)
    logits = decoder.forward(0, length, cache, write=True)
    masked_at_start = len(decoder.masked(start, end))
    if decoder.rule_step(logits, 0, start, end, 0, masked_at_start):
        return True
    step = 1
    while len(decoder.masked(start, end)):
        if mode == "none":
            window_start, logits = 0, decoder.forward(0, length, None, write=False)
        elif mode == "prefix":
            window_start = start
            logits = decoder.forward(start, decoder.gap_end, cache, write=False)
        else:
            window_start, logits = start, decoder.forward(start, end, cache, write=True)
        if decoder.rule_step(logits, window_start, start, end, step, masked_at_start):
            return True
        step += 1
    return False


def _decode_dream_block(decoder: _Decoder, start: int, end: int, mode: str) -> bool:
    """Dream: position j is predicted from hidden j-1 (shifted logits, within each window).

    The block's full forward commits exactly position ``start`` (proposal only, no rule): a
    cached step never recomputes hidden ``start - 1``. The rule loop then decodes the rest.
    """
    length = len(decoder.canvas)
    cache = None if mode == "none" else decoder.model.new_cache(length)
    logits = _shift(decoder.forward(0, length, cache, write=True))
    x0, _, gaps = decoder.propose(logits[start:start + 1], torch.tensor([start]))
    decoder.margins.proposals(gaps)
    decoder.canvas[start] = x0[0]
    if decoder.finished():
        return True
    masked_at_start = len(decoder.masked(start, end))
    step = 0
    while len(decoder.masked(start, end)):
        if mode == "none":
            window_start, logits = 0, decoder.forward(0, length, None, write=False)
        elif mode == "prefix":
            window_start = start
            logits = decoder.forward(start, decoder.gap_end, cache, write=False)
        else:
            window_start, logits = start, decoder.forward(start, end, cache, write=True)
        # Within a window the first row has no predecessor; it belongs to position `start`,
        # already committed, so it is never a candidate.
        if decoder.rule_step(_shift(logits), window_start, start, end, step, masked_at_start):
            return True
        step += 1
    return False


def _shift(logits: Tensor) -> Tensor:
    """Row j <- row j-1 (row 0 kept): Dream's next-token-style prediction."""
    return torch.cat([logits[:1], logits[:-1]], dim=0)


def _select(confidence: Tensor, rule: Rule, step: int, masked_at_start: int,
            margins: Margins | None = None) -> Tensor:
    """Indices (into the candidates, which are in position order) to commit this step; the
    comparisons that decided them go into ``margins``."""
    margins = Margins() if margins is None else margins
    # Stable descending sort: equal confidences keep position order, lower position first.
    order = torch.sort(confidence, descending=True, stable=True).indices
    ranked = confidence[order]
    if rule.threshold is not None:
        margins.against(confidence, rule.threshold)
        if ranked[0] < rule.threshold:  # nothing above: the ranking picks the one committed
            margins.ranking(ranked, 1)
        above = torch.nonzero(confidence >= rule.threshold).flatten()
        return torch.unique(torch.cat([order[:1], above]))
    if rule.factor is not None:
        count = 1
        while count < len(ranked) and ranked[count] >= 1 - rule.factor / (count + 2):
            count += 1
        compared = torch.arange(1, min(count + 1, len(ranked)))
        margins.against(ranked[compared], 1 - rule.factor / (compared + 2.0), what="factor bound")
        margins.ranking(ranked, count)
        return order[:count]
    per_step, extra = divmod(masked_at_start, rule.steps_per_block)
    quota = min(per_step + (1 if step < extra else 0), len(order))
    margins.ranking(ranked, quota)
    return order[:quota]
