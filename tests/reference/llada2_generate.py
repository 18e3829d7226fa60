"""LLaDA 2.x's decoding loops for one request: the oracle the engine must reproduce.

Readable over fast: one request, the dense block-causal forward of :mod:`llada2_model`, fp32.
The conventions of :mod:`block_generate` hold (its ``_Request`` runs the canvas): MASK never
proposed, ``temperature == 0`` argmax with the softmax probability as confidence (the 2.0
release draws with ``torch.multinomial`` even at temperature 0; its 2.1 code takes the argmax,
as here), ties to the lower position, every model forward counted.

What both releases' ``generate()`` do, kept here: blocks of ``B`` (32) positions at fixed
positions from 0, the prompt included; decoding starts at the block holding the prompt's end,
its prompt positions fixed and seen with the block's masks (a prompt ending on a boundary
starts a fresh block); ``ceil((P + max_new_tokens) / B)`` blocks, the last decoded in full past
``max_new_tokens`` (its extra positions compete for the quota, then are cut); no token shift.
The output is cut just after the first end token (kept), then to ``max_new_tokens``.

Where we differ, exactly:

- **Cache.** The releases recompute the whole prefix at every step. Block-causal attention
  makes the K/V of finished blocks final, so one forward prefills the prompt's whole blocks and
  every finished block's K/V are appended once, as SDAR's loop in :mod:`block_generate` does:
  by one more forward over the finished block, or with ``fold_finished_block`` on the next
  block's first step (one forward over both blocks, the first one's rows appended; same logits
  for the new block, one forward fewer per boundary: what the engine should do).
- **Stop.** 2.0 stops after the block in which an end token appears. Without editing a
  committed token never changes, so the request stops as soon as the final prefix ``x[P:f]``
  (``f`` the first still-masked position) holds an end token or ``max_new_tokens`` tokens: the
  same tokens, fewer forwards. With editing (2.1) the current block may still change, so the
  request stops after the block (its post-steps included) that makes the prefix final. The
  2.1 release only stops early with ``eos_early_stop``; we always do (the tokens before the
  end token are the same). The releases' early-stop return (prompt included, ``gen_length``
  ignored) is not copied.
"""

from collections.abc import Callable, Sequence

import torch

from tests.reference.block_generate import DEFAULT_THRESHOLD, BlockResult, _Request, _top
from tests.reference.llada2_model import LLaDA2ReferenceModel

# The 2.1 release's generate() defaults.
DEFAULT_EDITING_THRESHOLD = 0.9
DEFAULT_MAX_POST_STEPS = 16


def generate_llada2(
    model: LLaDA2ReferenceModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    block_length: int | None = None,
    steps: int = 32,
    threshold: float = DEFAULT_THRESHOLD,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    end_token_ids: Sequence[int] | None = None,
    fold_finished_block: bool = False,
    seed: int | None = None,
) -> BlockResult:
    """LLaDA 2.0's ``generate()`` (threshold decoding), for one request.

    ``steps`` counts steps per block, as the release's. It is capped at ``max_new_tokens`` (the
    release's ``min(steps, gen_length // minimal_topk)``, ``minimal_topk`` 1) and at ``B``: more
    steps than positions give the first ``B`` steps a quota of 1 and the rest 0, and those never
    run, since every step commits at least its quota. Step ``i`` of a block (from 0,
    restarting every block, also in the prompt's block) has quota ``n = B // steps + (i <
    B % steps)``: every masked slot with confidence strictly above ``threshold`` is committed
    if there are at least ``n`` of them, else the ``n`` most confident (all, when fewer are
    masked). The threshold default, 0.95, is the release's.
    """
    block = model.spec.block_size if block_length is None else block_length
    if steps <= 0:
        raise ValueError(f"need steps > 0, got {steps}")
    steps = min(steps, max_new_tokens, block)
    request = _Request(
        model,
        prompt_ids,
        block_size=block,
        max_new_tokens=max_new_tokens,
        end_token_ids=end_token_ids,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    quotas = [block // steps + (1 if i < block % steps else 0) for i in range(steps)]

    def decode_block(start: int, end: int, first_logits: torch.Tensor) -> bool:
        logits, step = first_logits, 0
        while True:
            candidates = request.masked(start, end)
            x0, confidence, gaps = request.propose(logits[candidates - start], candidates)
            above = torch.nonzero(confidence > threshold).flatten()
            quota = min(quotas[step], len(candidates))
            request.decided_by_threshold(confidence, threshold)
            if len(above) >= quota:
                chosen = above
            else:
                chosen = _top(confidence, quota)
                request.decided_by_ranking(confidence, quota)
            request.commit(candidates[chosen], x0[chosen], gaps[chosen])
            if request.finished():
                return True
            if not len(request.masked(start, end)):
                return False
            step += 1
            logits = request.forward(start, end)

    return _run_blocks(request, fold_finished_block, decode_block)


def generate_llada21(
    model: LLaDA2ReferenceModel,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    block_length: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    editing_threshold: float = DEFAULT_EDITING_THRESHOLD,
    max_post_steps: int = DEFAULT_MAX_POST_STEPS,
    num_to_transfer: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    end_token_ids: Sequence[int] | None = None,
    fold_finished_block: bool = False,
    seed: int | None = None,
) -> BlockResult:
    """LLaDA 2.1's ``generate()`` (threshold decoding with token editing), for one request.

    Every step forwards the block and proposes a token for each of its non-prompt positions.
    Masked slots: as 2.0 with a fixed quota ``num_to_transfer`` (no step schedule). Already
    decoded non-prompt slots of the block (masked ones committed in this very step excluded)
    are rewritten where the proposal differs from the token with confidence strictly above
    ``editing_threshold``. Once the block holds no MASK, up to ``max_post_steps`` more forwards
    run, ending after the first that edits nothing (with 0, none). Defaults are the release's.
    """
    block = model.spec.block_size if block_length is None else block_length
    if num_to_transfer <= 0 or max_post_steps < 0:
        raise ValueError("need num_to_transfer > 0 and max_post_steps >= 0")
    request = _Request(
        model,
        prompt_ids,
        block_size=block,
        max_new_tokens=max_new_tokens,
        end_token_ids=end_token_ids,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )

    def decode_block(start: int, end: int, first_logits: torch.Tensor) -> bool:
        rows = torch.arange(max(start, request.prompt_length), end)
        logits, post_steps = first_logits, 0
        while True:
            masked = request.canvas[rows] == request.mask
            x0, confidence, gaps = request.propose(logits[rows - start], rows)
            commit = torch.zeros_like(masked)
            if masked.any():
                candidates = torch.nonzero(masked).flatten()
                above = candidates[confidence[candidates] > threshold]
                quota = min(num_to_transfer, len(candidates))
                request.decided_by_threshold(confidence[candidates], threshold)
                if len(above) < quota:
                    request.decided_by_ranking(confidence[candidates], quota)
                commit[
                    above
                    if len(above) >= quota
                    else candidates[_top(confidence[candidates], quota)]
                ] = True
            # An edit needs a confident proposal that differs from the token: both decide.
            request.decided_by_threshold(confidence[~masked], editing_threshold)
            request.margins.proposals(gaps[~masked & (confidence > editing_threshold)])
            edit = ~masked & (x0 != request.canvas[rows]) & (confidence > editing_threshold)
            request.commit(rows[commit | edit], x0[commit | edit], gaps[commit | edit])
            if not masked.any():
                post_steps += 1
                if not edit.any():
                    break
            if not (request.canvas[rows] == request.mask).any() and post_steps >= max_post_steps:
                break
            logits = request.forward(start, end)
        return request.finished()

    return _run_blocks(request, fold_finished_block, decode_block)


def _run_blocks(
    request: _Request,
    fold_finished_block: bool,
    decode_block: Callable[[int, int, torch.Tensor], bool],
) -> BlockResult:
    """Prefill the prompt's whole blocks, then decode block after block until finished.

    ``decode_block(start, end, logits)`` gets the block's first-step logits and returns True
    when the request is finished.
    """
    block, prompt_length = request.block_size, request.prompt_length
    num_blocks = -(-(prompt_length + request.max_new_tokens) // block)
    request.extend_to(num_blocks * block)
    whole = prompt_length // block * block
    if whole:
        request.forward(0, whole, write_until=whole)
    unwritten: int | None = None  # start of a finished block whose K/V are not yet cached
    for start in range(whole, num_blocks * block, block):
        end = start + block
        if unwritten is not None:
            logits = request.forward(unwritten, end, write_until=start)[start - unwritten :]
        else:
            logits = request.forward(start, end)
        if decode_block(start, end, logits):
            break
        if fold_finished_block:
            unwritten = start
        else:
            request.forward(start, end, write_until=end)
    return request.result()
