"""The decoding loops of Fast-dLLM v2 and SDAR for one request: the block-diffusion oracle.

Readable over fast: one request, dense block-causal attention (:mod:`block_model`), fp32. The
engine must reproduce the token ids and the number of model forwards. Both loops keep the K/V of
finished blocks in an append-only cache, which is exact under block-causal attention.

Shared decisions (where the releases leave room or disagree):

- **Proposal.** The MASK logit is ``-inf`` for proposal and confidence (the releases let MASK be
  proposed; a committed MASK would only stay masked, so excluding it changes nothing for a
  trained model and keeps the rule of the bidirectional oracle). ``temperature == 0``: argmax,
  confidence = full-softmax probability of it. ``temperature > 0``: a Gumbel-max sample of the
  probabilities of ``logits / T`` (after top-k and top-p filtering, renormalised, when asked);
  confidence = that probability of the drawn token (what both releases compare to the
  threshold). The filters (top-k, then top-p over what top-k kept, as SDAR's and LLaDA 2.x's
  releases apply them; Fast-dLLM v2's has top-p only) are this file's own sort-based
  implementation; the dropped tokens get logit ``-inf``. The noise is the engine's
  counter-based noise (``vllm_dllm.sampling.noise``, checked bit for bit against NumPy): keyed
  by ``seed`` (0 when None), the request's forward count before this forward and the canvas
  position, so a seeded engine request must give exactly these tokens, filtered or not.
  Fast-dLLM v2's release draws one row and applies it to every row of a batch; we draw every
  row.
- **Ties.** Equal confidences go to the lower position first (top-1 and top-k).
- **Finality and stop.** After every step the output prefix ``x[P:f]`` is final, ``f`` the first
  still-masked position at or after ``P`` (the canvas end if none). The request stops as soon as
  that prefix holds an end token or ``max_new_tokens`` tokens: no further step, block, or
  finished-block forward (the releases decode the rest of the block after a stop token, and
  Fast-dLLM v2 runs its finished-block forward after the last block; same tokens before the
  stop, fewer forwards). Output: the prefix cut just after its first end token (kept), then to
  ``max_new_tokens``.
- **Counting.** Every model forward counts: prefill, denoising steps, finished-block forwards.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tests.reference.block_model import BlockKV, BlockReferenceModel
from tests.reference.margins import Margins, top2_gaps
from vllm_dllm.sampling.noise import GUMBEL_STREAM, gumbel, row_keys

# Default threshold of both loops: Fast-dLLM v2's batch_sample default, and the value of SDAR's
# evaluation config behind its published numbers (its generate.py says 0.85, its README 0.9).
DEFAULT_THRESHOLD = 0.95
SDAR_REMASKING = ("low_confidence_dynamic", "low_confidence_static", "entropy_bounded")
# SDAR's release default bound of its entropy_bounded strategy.
DEFAULT_EB_THRESHOLD = 0.35


@dataclass
class BlockResult:
    """Output tokens (final, cut at the first end token), forwards used, final canvas, and how
    far the run's closest decision was from flipping."""

    tokens: list[int]
    num_forwards: int
    canvas: Tensor
    margins: Margins


class _Request:
    """One request's canvas, sampling state, forward count and finality rule."""

    def __init__(self, model: BlockReferenceModel, prompt_ids: Sequence[int], *,
                 block_size: int, max_new_tokens: int, end_token_ids: Sequence[int] | None,
                 temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
        if not prompt_ids:
            raise ValueError("the prompt must not be empty")
        if max_new_tokens <= 0 or block_size <= 0:
            raise ValueError("max_new_tokens and the block size must be positive")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        self.model = model
        self.mask = model.spec.mask_token_id
        self.canvas = torch.tensor(list(prompt_ids))
        self.prompt_length = len(prompt_ids)
        self.block_size = block_size
        self.max_new_tokens = max_new_tokens
        ends = model.spec.end_token_ids if end_token_ids is None else end_token_ids
        self.end_token_ids = frozenset(ends)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = 0 if seed is None else seed
        self.cache = model.new_cache()
        self.num_forwards = 0
        self.margins = Margins()

    def forward(self, start: int, end: int, **kwargs: object) -> Tensor | tuple[Tensor, BlockKV]:
        """Logits of canvas window ``[start, end)`` (see BlockReferenceModel.forward); counts."""
        self.num_forwards += 1
        return self.model.forward(self.canvas[start:end], start, self.cache,
                                  block_size=self.block_size, **kwargs)

    def extend_to(self, length: int) -> None:
        """Grow the canvas with MASK up to ``length`` positions."""
        missing = length - len(self.canvas)
        if missing > 0:
            self.canvas = torch.cat([self.canvas, torch.full((missing,), self.mask)])

    def masked(self, start: int, end: int) -> Tensor:
        """Positions in ``[start, end)`` still holding MASK."""
        return start + torch.nonzero(self.canvas[start:end] == self.mask).flatten()

    def propose(self, logits: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Proposed tokens, confidences and proposal margins (`top2_gaps`) for rows of logits
        at canvas ``positions`` (MASK never proposed). Sampling draws the engine's
        counter-based noise, after the top-k / top-p filters (see the module docstring)."""
        logits = logits.float().clone()
        logits[:, self.mask] = float("-inf")
        self.margins.observe(logits)
        if self.temperature == 0:
            x0 = logits.argmax(dim=-1)
            confidence = logits.softmax(dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            return x0, confidence, top2_gaps(logits)
        if self.top_k or self.top_p < 1.0:
            kept = _filtered_probs(logits / self.temperature, self.top_k, self.top_p) > 0
            logits = logits.masked_fill(~kept, float("-inf"))
        return self._sample_counter_based(logits, positions)

    def _sample_counter_based(self, logits: Tensor, positions: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor]:
        """``argmax(logits + T * G)``, ``G`` the Gumbel noise keyed by (seed, step, position):
        a sample of ``softmax(logits / T)`` (over the kept tokens when filtered); confidence its
        probability there, as released."""
        step = self.num_forwards - 1  # the forward whose logits these are, counted from 0
        keys = row_keys(
            torch.full_like(positions, self.seed), torch.full_like(positions, step),
            positions.to(torch.int64), GUMBEL_STREAM,
        )  # fmt: skip
        scores = gumbel(keys, logits.shape[-1]).mul_(self.temperature).add_(logits)
        x0 = scores.argmax(dim=-1)
        scaled = logits / self.temperature
        chosen = scaled.gather(-1, x0[:, None]).squeeze(-1)
        return x0, torch.exp(chosen - torch.logsumexp(scaled, dim=-1)), top2_gaps(scores)

    def commit(self, positions: Tensor, x0: Tensor, gaps: Tensor) -> None:
        """Write proposals into the canvas, recording their margins."""
        self.margins.proposals(gaps)
        self.canvas[positions] = x0

    def decided_by_threshold(self, confidence: Tensor, threshold: float) -> None:
        """Record the margins of confidences compared with ``threshold``."""
        self.margins.against(confidence, threshold, self.temperature)

    def decided_by_ranking(self, confidence: Tensor, count: int) -> None:
        """Record the margin of the ranking that picked the ``count`` most confident."""
        ranked = torch.sort(confidence, descending=True, stable=True).values
        self.margins.ranking(ranked, count, self.temperature)

    def entropies(self, logits: Tensor) -> Tensor:
        """Entropy (nats) of each row's distribution after temperature and filters: the one
        ``propose`` draws from (the raw softmax at temperature 0)."""
        logits = logits.float().clone()
        logits[:, self.mask] = float("-inf")
        if self.temperature > 0:
            probs = _filtered_probs(logits / self.temperature, self.top_k, self.top_p)
        else:
            probs = logits.softmax(dim=-1)
        terms = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
        return -terms.sum(dim=-1)

    def greedy_token(self, logits_row: Tensor) -> int:
        """Argmax of one row, MASK excluded (Fast-dLLM v2's prefill / finished-block token)."""
        row = logits_row.float().clone()
        row[self.mask] = float("-inf")
        self.margins.observe(row)
        self.margins.proposals(top2_gaps(row[None]))
        return int(row.argmax())

    def final_prefix(self) -> list[int]:
        """``x[P:f]``: the committed tokens before the first MASK at or after ``P``."""
        masked = self.masked(self.prompt_length, len(self.canvas))
        first_mask = int(masked[0]) if len(masked) else len(self.canvas)
        return self.canvas[self.prompt_length:first_mask].tolist()

    def finished(self) -> bool:
        prefix = self.final_prefix()
        return (len(prefix) >= self.max_new_tokens
                or any(token in self.end_token_ids for token in prefix))

    def result(self) -> BlockResult:
        tokens = self.final_prefix()
        for index, token in enumerate(tokens):
            if token in self.end_token_ids:
                tokens = tokens[: index + 1]
                break
        return BlockResult(tokens[: self.max_new_tokens], self.num_forwards, self.canvas,
                           self.margins)


def _filtered_probs(scaled: Tensor, top_k: int, top_p: float) -> Tensor:
    """Softmax of ``scaled`` keeping the top-k, then the smallest top-p nucleus; renormalised."""
    if top_k > 0:
        kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each token
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before > top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _top(confidence: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` highest confidences; ties to the lower index."""
    return torch.sort(confidence, descending=True, stable=True).indices[:count]


# --- Fast-dLLM v2 --------------------------------------------------------------------------------


def generate_fast_dllm_v2(
    model: BlockReferenceModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    block_size: int | None = None,
    small_block_size: int = 8,
    threshold: float = DEFAULT_THRESHOLD,
    use_block_cache: bool = False,
    temperature: float = 0.0,
    top_p: float = 0.95,
    end_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
) -> BlockResult:
    """Fast-dLLM v2's ``batch_sample`` for one request, with the exact improvements below.

    - **Prompt.** One block-causal forward prefills the prompt's whole blocks into the cache.
      If the prompt ends on a boundary, that forward's last row (argmax) is the first new token.
      A partial last prompt block is filled up with MASK and recomputed, prompt tokens included,
      at every step of that block. (The release skips the prefill when the prompt is at most one
      block long, so a prompt of exactly one block is never seen; we always prefill.)
    - **Steps.** Blocks are ``[kB, (k+1)B)`` from position 0. Sub-blocks of
      ``small_block_size`` are aligned to the block, decoded left to right, skipped when nothing
      in them is masked. A step forwards the whole block against the cache, shifts the logits
      within that window (position i is scored by row i-1; the window's first row keeps its
      own, never a candidate since the block's first slot is always committed) and commits, in
      the current sub-block, every masked slot with confidence strictly above ``threshold`` plus
      always the most confident one.
    - **Finished block.** One more forward over the finished block appends its exact K/V to the
      cache; the argmax of its last row is the next block's first token (greedy, no threshold,
      also when sampling).
    - **Sub-block cache** (``use_block_cache``): a full-block pass (which keeps the block's K/V)
      whenever the current sub-block's first slot is still masked or no pass has run in this
      block; otherwise only the sub-block's rows are recomputed, attending to the cache plus the
      block's stored K/V (stale outside the sub-block), their fresh K/V written into the store.
      Logits are shifted within the sub-block window. An approximation, as released.
    - Blocks continue until the output is final (see the module docstring); the release's own
      block count, which counts the prompt's partial block against ``max_new_tokens``, is
      replaced by that rule.
    """
    block = model.spec.block_size if block_size is None else block_size
    if small_block_size <= 0 or block % small_block_size:
        raise ValueError(f"small_block_size {small_block_size} does not divide block {block}")
    request = _Request(model, prompt_ids, block_size=block, max_new_tokens=max_new_tokens,
                       end_token_ids=end_token_ids, temperature=temperature, top_k=0,
                       top_p=top_p, seed=seed)
    prompt_length = request.prompt_length
    whole = prompt_length // block * block
    if whole:
        logits = request.forward(0, whole, write_until=whole)
        if whole == prompt_length:
            request.extend_to(whole + 1)
            request.canvas[whole] = request.greedy_token(logits[-1])
            if request.finished():
                return request.result()
    start = whole
    while True:
        end = start + block
        request.extend_to(end)
        if _decode_fast_dllm_v2_block(request, start, end, small_block_size, threshold,
                                      use_block_cache):
            return request.result()
        logits = request.forward(start, end, write_until=end)
        request.extend_to(end + 1)
        request.canvas[end] = request.greedy_token(logits[-1])
        if request.finished():
            return request.result()
        start = end


def _decode_fast_dllm_v2_block(request: _Request, start: int, end: int, small_block: int,
                               threshold: float, use_block_cache: bool) -> bool:
    """Decode every masked slot of block ``[start, end)``. Returns True when finished."""
    block_kv: BlockKV | None = None
    for sub_start in range(start, end, small_block):
        sub_end = sub_start + small_block
        while len(candidates := request.masked(sub_start, sub_end)):
            if not use_block_cache:
                rows = _shift(request.forward(start, end))[sub_start - start:sub_end - start]
            elif block_kv is None or request.canvas[sub_start] == request.mask:
                logits, block_kv = request.forward(start, end, capture_block=True)
                rows = _shift(logits)[sub_start - start:sub_end - start]
            else:
                rows = _shift(request.forward(sub_start, sub_end, block_kv=block_kv))
            x0, confidence, gaps = request.propose(rows[candidates - sub_start], candidates)
            chosen = torch.unique(torch.cat([
                _top(confidence, 1), torch.nonzero(confidence > threshold).flatten()]))
            request.decided_by_threshold(confidence, threshold)
            if confidence.max() <= threshold:
                request.decided_by_ranking(confidence, 1)
            request.commit(candidates[chosen], x0[chosen], gaps[chosen])
            if request.finished():
                return True
    return False


def _shift(logits: Tensor) -> Tensor:
    """Row i <- row i-1 within the window (row 0 kept): Fast-dLLM v2's token shift."""
    return torch.cat([logits[:1], logits[:-1]], dim=0)


# --- SDAR ----------------------------------------------------------------------------------------


def generate_sdar(
    model: BlockReferenceModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    block_length: int | None = None,
    denoising_steps: int | None = None,
    remasking: str = "low_confidence_dynamic",
    threshold: float = DEFAULT_THRESHOLD,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    end_token_ids: Sequence[int] | None = None,
    fold_finished_block: bool = False,
    seed: int | None = None,
    eb_threshold: float = DEFAULT_EB_THRESHOLD,
) -> BlockResult:
    """SDAR's block diffusion loop (its evaluation code's greedy path; sampling as generate.py).

    - **Prompt.** Blocks are ``[kB, (k+1)B)`` from position 0 (``B`` = ``block_length``,
      default the config's ``block_size``, else 4). One forward prefills the prompt's whole
      blocks, a prompt of exactly one block included. A partial last prompt block is decoded as
      the first block: its prompt tokens are recomputed every step and never changed.
    - **Canvas.** ``ceil((P + max_new_tokens) / B)`` blocks: the last block is a full block of
      masks even when ``max_new_tokens`` ends inside it; its positions past the limit take part
      in the decoding until the output is final.
    - **Steps.** No token shift: position i is scored by row i. Step ``i`` of a block (counting
      from 0, restarting every block) has quota ``k = B // steps + (i < B % steps)``
      (``denoising_steps`` defaults to ``B``). ``low_confidence_dynamic``: commit every masked
      slot strictly above ``threshold`` if there are at least ``k``, else the ``k`` most
      confident. ``low_confidence_static``: the ``k`` most confident. With fewer than ``k``
      masks left, all of them (the release's top-k then overwrites committed or prompt slots: a
      defect not copied). ``entropy_bounded`` (the EB-sampler, no quota): sort the masked slots
      by the entropy of their own distribution (after temperature and filters), ascending, and
      commit the longest prefix whose summed entropy is at most ``eb_threshold``, at least one.
      (The release's generate.py computes its "entropies" from the drawn tokens' probabilities
      ``[batch, block]``, summed over the block: one number per row, broadcast to every slot,
      so its order is arbitrary; not copied.)
    - **Finished block.** One more forward over the finished block appends its exact K/V (its
      logits unused). With ``fold_finished_block`` that write rides on the next block's first
      step instead: one forward over both blocks, the first block's rows appended to the cache;
      the logits of the new block are the same, so the tokens are, with one forward fewer per
      block boundary.
    """
    block = model.spec.block_size if block_length is None else block_length
    steps = block if denoising_steps is None else denoising_steps
    if steps <= 0:
        raise ValueError(f"denoising_steps must be positive, got {steps}")
    if remasking not in SDAR_REMASKING:
        raise ValueError(f"remasking must be one of {SDAR_REMASKING}, got {remasking!r}")
    request = _Request(model, prompt_ids, block_size=block, max_new_tokens=max_new_tokens,
                       end_token_ids=end_token_ids, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed)
    prompt_length = request.prompt_length
    num_blocks = -(-(prompt_length + max_new_tokens) // block)
    request.extend_to(num_blocks * block)
    whole = prompt_length // block * block
    if whole:
        request.forward(0, whole, write_until=whole)
    quotas = [block // steps + (1 if i < block % steps else 0) for i in range(steps)]
    unwritten: int | None = None  # start of a finished block whose K/V are not yet cached
    for start in range(whole, num_blocks * block, block):
        end = start + block
        step = 0
        while len(candidates := request.masked(start, end)):
            if unwritten is not None:
                logits = request.forward(unwritten, end, write_until=start)[start - unwritten:]
                unwritten = None
            else:
                logits = request.forward(start, end)
            x0, confidence, gaps = request.propose(logits[candidates - start], candidates)
            quota = min(quotas[step], len(candidates))
            above = torch.nonzero(confidence > threshold).flatten()
            if remasking == "low_confidence_dynamic":
                request.decided_by_threshold(confidence, threshold)
            if remasking == "entropy_bounded":
                entropy = request.entropies(logits[candidates - start])
                order = torch.sort(entropy, stable=True).indices
                cumulative = entropy[order].cumsum(dim=0)
                request.margins.entropy_cut(cumulative, eb_threshold)
                chosen = order[: max(1, int((cumulative <= eb_threshold).sum()))]
            elif remasking == "low_confidence_dynamic" and len(above) >= quota:
                chosen = above
            else:
                chosen = _top(confidence, quota)
                request.decided_by_ranking(confidence, quota)
            request.commit(candidates[chosen], x0[chosen], gaps[chosen])
            if request.finished():
                return request.result()
            step += 1
        if fold_finished_block:
            unwritten = start
        else:
            request.forward(start, end, write_until=end)
    return request.result()
