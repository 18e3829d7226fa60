"""One denoising step of a batch as device tensor work, planned from host integers.

The host packs each request's plan and parameters into one int32 array (`pack`), which reaches
the device in one asynchronous copy from pinned memory. Everything per token or per position is
then derived on the device (`window_inputs`, `candidates`, `commit`), with shapes the host
already knows, so no step function reads a device value back. The step's single device-to-host
transfer is the `[requests, block + 1]` array that `commit` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor

from vllm_dllm.denoising.canvases import Canvases
from vllm_dllm.denoising.request import RequestState, Targets
from vllm_dllm.sampling import (
    GUMBEL_STREAM,
    REMASK_STREAM,
    Filters,
    ScoreKind,
    SelectionRule,
    row_keys,
    select,
    uniform,
)
from vllm_dllm.sampling.logprobs import LogprobRows, logprob_columns
from vllm_dllm.structured.commit_rule import (
    clear_from_frontier,
    constrain_selection,
    raise_frontier,
)


class WindowField(IntEnum):
    """Rows of the packed per-window array (after the `S + 1` query start offsets).

    Windows are what attention sees as sequences: each has its own queries and key range, and
    reads the block table of its request's slot. A request has one window per step, or several
    for a block-diffusion step over more than one block (`vllm_dllm.cache.policy`).
    """

    SLOT = 0
    START = 1
    LEN = 2
    KEY_END = 3


class Field(IntEnum):
    """Rows of the packed per-request array (after the per-window rows)."""

    SLOT = 0
    #: Flat row and canvas position of the first token of the window that scores the candidates.
    SCORE_ROW = 1
    SCORE_START = 2
    BLOCK_START = 3
    BLOCK_LEN = 4
    #: Block columns `[COMMIT_LO, COMMIT_HI)` may be committed this step.
    COMMIT_LO = 5
    COMMIT_HI = 6
    RULE = 7
    QUOTA = 8
    RANDOM = 9
    SEED_LO = 10
    SEED_HI = 11
    STEP = 12
    #: Sampling filters (0 / 1 / 0: off; always off for greedy rows).
    TOP_K = 13
    #: What scores the candidates (`vllm_dllm.sampling.ScoreKind`).
    SCORE = 14
    #: The request's place among the step's requests that report log-probabilities (-1: none).
    LOGPROB_INDEX = 15
    #: Block column of a constrained request's frontier (`vllm_dllm.structured`; -1: none).
    FRONTIER = 16
    # float32 bit patterns:
    TEMPERATURE = 17
    THRESHOLD = 18
    FACTOR = 19
    #: LLaDA 2.1's editing: committed positions may be rewritten above it (> 1: no editing).
    EDIT_THRESHOLD = 20
    TOP_P = 21
    MIN_P = 22
    #: The entropy-bounded rule's bound on the summed entropy of a step's commits.
    ENTROPY_BOUND = 23
    #: Dream's `alg_temp` (0: the top scores; > 0: drawn in proportion to softmax(score / it)).
    ALG_TEMP = 24


NUM_WINDOW_FIELDS = len(WindowField)
NUM_FIELDS = len(Field)
_FLOATS = (
    Field.TEMPERATURE, Field.THRESHOLD, Field.FACTOR, Field.EDIT_THRESHOLD, Field.TOP_P,
    Field.MIN_P, Field.ENTROPY_BOUND, Field.ALG_TEMP,
)  # fmt: skip


def packed_size(num_reqs: int, num_windows: int) -> int:
    return num_windows + 1 + NUM_WINDOW_FIELDS * num_windows + NUM_FIELDS * num_reqs


@dataclass(frozen=True)
class LogprobPlan:
    """The step's requests that report log-probabilities, as the host knows them."""

    #: How many requests report them.
    num_requests: int
    #: The most alternatives any of them asked for (every one gets that many computed).
    num_logprobs: int
    #: Their candidate rows (a request's rows are consecutive, in batch order), ascending.
    rows: np.ndarray


@dataclass(frozen=True)
class GrammarPlan:
    """The step's constrained requests, as the host knows them (`vllm_dllm.structured`)."""

    #: Block column of each request's frontier (-1: unconstrained, or nothing to commit).
    columns: np.ndarray
    #: Candidate row of each frontier, in batch order (a frontier is its request's first row).
    rows: np.ndarray


@dataclass(frozen=True)
class StepShape:
    """What the host knows about the step's shapes without asking the device."""

    num_reqs: int
    num_windows: int
    num_tokens: int
    num_rows: int
    block_width: int
    max_query_len: int
    any_samples: bool
    any_random: bool
    #: Some sampled row has a top-k / top-p / min-p filter.
    any_filters: bool
    #: Some request scores by something other than probability (`ScoreKind`).
    any_score_kinds: bool
    #: Some request selects by the entropy-bounded rule.
    any_entropy: bool
    #: Some request draws its selection (Dream's `alg_temp`).
    any_alg_temp: bool
    # Views of the packed host array (valid until the next step packs):
    query_start: np.ndarray  # [S + 1] int32
    key_ends: np.ndarray  # [S] int32
    block_starts: np.ndarray  # [N] int32
    block_lens: np.ndarray  # [N] int32
    #: None when no request of the step asked for log-probabilities: no work at all for them.
    logprobs: LogprobPlan | None = None
    #: None when no request of the step is constrained: no grammar work at all.
    grammar: GrammarPlan | None = None


def pack(
    states: Sequence[RequestState],
    slots: Sequence[int],
    buffer: Callable[[int], np.ndarray],
    frontiers: Sequence[int] | None = None,
) -> StepShape:
    """Write the step's per-window and per-request integers into `buffer(size)`, an int32 array
    of at least `size` elements (the caller's pinned staging memory).

    `frontiers`: the canvas position of each constrained request's frontier (-1 for the
    others), or None when no request of the step is constrained.
    """
    n = len(states)
    plans = [s.plan() for s in states]
    targets = [s.targets() for s in states]
    windows = [(slots[i], w) for i, p in enumerate(plans) for w in p.windows]
    num_windows = len(windows)
    out = buffer(packed_size(n, num_windows))
    query_start = out[: num_windows + 1]
    per_window = out[num_windows + 1 : num_windows + 1 + NUM_WINDOW_FIELDS * num_windows]
    per_window = per_window.reshape(NUM_WINDOW_FIELDS, num_windows)
    fields = out[num_windows + 1 + NUM_WINDOW_FIELDS * num_windows : packed_size(n, num_windows)]
    fields = fields.reshape(NUM_FIELDS, n)
    query_start[0] = 0
    np.cumsum([w.num_tokens for _, w in windows], out=query_start[1:])
    for j, (slot, w) in enumerate(windows):
        per_window[:, j] = (slot, w.start, w.num_tokens, w.key_end)
    floats = np.empty((len(_FLOATS), n), dtype=np.float32)
    last_window = np.cumsum([len(p.windows) for p in plans]) - 1
    first_row = np.cumsum([0] + [t.num_candidates for t in targets])
    reporting = [i for i, s in enumerate(states) if s.logprobs is not None]
    logprob_index = np.full(n, -1)
    logprob_index[reporting] = np.arange(len(reporting))
    for i, (s, p, t) in enumerate(zip(states, plans, targets, strict=True)):
        fields[:, i] = (
            slots[i], query_start[last_window[i]], p.windows[-1].start, t.block_start,
            t.block_len, t.lo, t.hi, t.rule, t.quota, s.remasks_randomly, _low_word(s.seed),
            (s.seed >> 32) & 0x7FFFFFFF, s.steps, 0, int(s.score_kind), logprob_index[i], -1,
            0, 0, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        temperature = 0.0 if t.greedy else s.temperature
        edit = 2.0 if t.edit_threshold is None else t.edit_threshold
        # Filters change only a draw (greedy rows are left alone): no filter work without one.
        top_k, top_p, min_p = s.filters if temperature > 0 else (0, 1.0, 0.0)
        fields[Field.TOP_K, i] = top_k
        floats[:, i] = (temperature, t.threshold if t.threshold is not None else s.threshold,
                        s.params.factor or 1.0, edit, top_p, min_p, s.params.eb_threshold or 0.0,
                        s.params.alg_temp or 0.0)  # fmt: skip
    fields[Field.TEMPERATURE :] = floats.view(np.int32)
    grammar = None
    if frontiers is not None:
        grammar = _grammar_plan(frontiers, targets, first_row)
        fields[Field.FRONTIER] = grammar.columns
    return StepShape(
        num_reqs=n,
        num_windows=num_windows,
        num_tokens=int(query_start[-1]),
        num_rows=sum(t.num_candidates for t in targets),
        block_width=max(t.block_len for t in targets),
        max_query_len=max(w.num_tokens for _, w in windows),
        any_samples=bool((floats[0] > 0).any()),
        any_random=any(s.remasks_randomly for s in states),
        any_filters=bool(
            ((fields[Field.TOP_K] > 0) | (floats[_FLOATS.index(Field.TOP_P)] < 1.0)
             | (floats[_FLOATS.index(Field.MIN_P)] > 0.0)).any()
        ),  # fmt: skip
        any_score_kinds=any(s.score_kind != ScoreKind.PROBABILITY for s in states),
        any_entropy=any(t.rule == SelectionRule.ENTROPY_BOUNDED for t in targets),
        any_alg_temp=any(s.params.alg_temp for s in states),
        query_start=query_start,
        key_ends=per_window[WindowField.KEY_END],
        block_starts=fields[Field.BLOCK_START],
        block_lens=fields[Field.BLOCK_LEN],
        logprobs=_logprob_plan(
            {i: s.logprobs.num_logprobs for i, s in enumerate(states) if s.logprobs is not None},
            first_row,
        ),
        grammar=grammar,
    )


def _grammar_plan(
    frontiers: Sequence[int], targets: Sequence[Targets], first_row: np.ndarray
) -> GrammarPlan:
    """Each constrained request's frontier column; under the commit rule it is the lowest
    candidate of its block, so its row is the request's first."""
    columns = np.full(len(targets), -1, dtype=np.int32)
    for i, (position, t) in enumerate(zip(frontiers, targets, strict=True)):
        if position < 0 or t.num_candidates == 0:
            continue
        column = position - t.block_start
        if not t.lo <= column < t.hi:
            raise RuntimeError(
                f"a constrained request's frontier (block column {column}) is outside the "
                f"columns [{t.lo}, {t.hi}) its step may commit"
            )
        columns[i] = column
    return GrammarPlan(columns, first_row[:-1][columns >= 0].astype(np.int64))


def _logprob_plan(num_logprobs: dict[int, int], first_row: np.ndarray) -> LogprobPlan | None:
    """The plan for the requests `num_logprobs` maps (batch index -> alternatives asked for),
    whose candidate rows start at `first_row`."""
    if not num_logprobs:
        return None
    rows = [np.arange(first_row[i], first_row[i + 1]) for i in num_logprobs]
    return LogprobPlan(
        num_requests=len(num_logprobs),
        num_logprobs=max(num_logprobs.values()),
        rows=np.concatenate(rows).astype(np.int64),
    )


def _low_word(value: int) -> int:
    """The low 32 bits of `value` as a signed int32 (the device masks them back)."""
    low = value & 0xFFFFFFFF
    return low - (1 << 32) if low >= 1 << 31 else low


class StepTensors:
    """Device views of a packed array: per-window rows, per-request int32 fields and float32
    parameters."""

    def __init__(self, packed: Tensor, num_reqs: int, num_windows: int) -> None:
        self.query_start = packed[: num_windows + 1]
        window_end = num_windows + 1 + NUM_WINDOW_FIELDS * num_windows
        self.windows = packed[num_windows + 1 : window_end].view(NUM_WINDOW_FIELDS, num_windows)
        self.fields = packed[window_end : packed_size(num_reqs, num_windows)].view(
            NUM_FIELDS, num_reqs
        )

    def window(self, field: WindowField) -> Tensor:
        return self.windows[field]

    def __getitem__(self, field: Field) -> Tensor:
        row = self.fields[field]
        return row.view(torch.float32) if field in _FLOATS else row

    def seed(self) -> Tensor:
        lo = self[Field.SEED_LO].to(torch.int64) & 0xFFFFFFFF
        return (self[Field.SEED_HI].to(torch.int64) << 32) | lo


def window_inputs(
    canvases: Canvases,
    meta: StepTensors,
    shape: StepShape,
    input_ids: Tensor,
    positions: Tensor,
) -> Tensor:
    """Fill `input_ids` and `positions` (padded to their length) with every query window's
    tokens and positions; return the windows' KV slots, padded the same way.

    The two buffers are the model runner's persistent inputs: a captured CUDA graph reads its
    inputs from the addresses it was captured with. Padding tokens read position 0 of slot 0's
    canvas and write KV slot -1, which vLLM's cache writers skip, so they touch no cache.
    """
    device = meta.fields.device
    num_padded = input_ids.shape[0]
    window = torch.repeat_interleave(
        torch.arange(shape.num_windows, device=device),
        meta.window(WindowField.LEN),
        output_size=shape.num_tokens,
    )
    offset = torch.arange(shape.num_tokens, device=device) - meta.query_start[window]
    positions[: shape.num_tokens] = meta.window(WindowField.START)[window] + offset
    positions[shape.num_tokens :] = 0
    slot = torch.zeros(num_padded, dtype=torch.int64, device=device)
    slot[: shape.num_tokens] = meta.window(WindowField.SLOT)[window]
    # A canvas is stored by KV slot, so the gather index is the slot mapping itself.
    slot_mapping = canvases.index(slot, positions)
    input_ids.copy_(canvases.tokens[slot_mapping])
    slot_mapping[shape.num_tokens :] = -1
    return slot_mapping


def clear_rejected(canvases: Canvases, meta: StepTensors, shape: StepShape) -> None:
    """MASK back at every constrained request's block columns from its frontier on: the
    tokens its matcher rejected in the previous step (`vllm_dllm.structured.commit_rule`).
    Runs before the forward, so no forward sees them."""
    column = torch.arange(shape.block_width, device=meta.fields.device)
    positions = (meta[Field.BLOCK_START].unsqueeze(-1) + column).to(torch.int64)
    inside = column < meta[Field.BLOCK_LEN].unsqueeze(-1)
    positions = torch.where(inside, positions, canvases.sink)
    index = canvases.index(meta[Field.SLOT].to(torch.int64).unsqueeze(-1), positions)
    clear_from_frontier(canvases.tokens, index, meta[Field.FRONTIER], meta[Field.BLOCK_LEN],
                        canvases.mask_token_id)  # fmt: skip


@dataclass
class Candidates:
    """The current block of every request, `[N, block_width]`, and its committable positions."""

    positions: Tensor  # canvas position of each column (the sink past a request's block)
    values: Tensor  # tokens there now
    mask: Tensor  # inside the block, allowed this step, and still MASK (or editable)
    masked: Tensor  # the candidates that are MASK (the others may only be edited)
    rows: Tensor  # [R] flat indices (row-major) of the candidates: the rows that get logits


def candidates(canvases: Canvases, meta: StepTensors, shape: StepShape) -> Candidates:
    device = meta.fields.device
    column = torch.arange(shape.block_width, device=device)
    inside = column < meta[Field.BLOCK_LEN].unsqueeze(-1)
    positions = torch.where(
        inside, meta[Field.BLOCK_START].unsqueeze(-1) + column, canvases.sink
    ).to(torch.int64)
    slot = meta[Field.SLOT].to(torch.int64).unsqueeze(-1)
    values = canvases.tokens[canvases.index(slot, positions)]
    # A step may commit only some columns (a Dream block opening, a Fast-dLLM v2 sub-block).
    allowed = (column >= meta[Field.COMMIT_LO].unsqueeze(-1)) & (
        column < meta[Field.COMMIT_HI].unsqueeze(-1)
    )
    is_mask = values.eq(canvases.mask_token_id)
    editing = (meta[Field.EDIT_THRESHOLD] <= 1.0).unsqueeze(-1)
    mask = (is_mask | editing) & inside & allowed
    return Candidates(
        positions, values, mask, mask & is_mask, _compact(mask.view(-1), shape.num_rows)
    )


def _compact(flags: Tensor, count: int) -> Tensor:
    """Indices of the True entries of `flags`, in order; `count` (their number) comes from the
    host, so the result has a known shape and needs no sync (unlike `nonzero`)."""
    destination = torch.where(flags, flags.cumsum(0) - 1, count)
    out = torch.empty(count + 1, dtype=torch.int64, device=flags.device)
    out.scatter_(0, destination, torch.arange(flags.numel(), device=flags.device))
    return out[:count]


def hidden_rows(meta: StepTensors, cand: Candidates, shape: StepShape, logits_shift: int) -> Tensor:
    """Row of the flat forward output that scores each candidate.

    Position j is scored by the row of position `j - logits_shift` in the request's scoring
    window (its last), clamped to the window's first row (the references'
    `cat(logits[:, :1], logits[:, :-1])` within a window); a clamped row only ever belongs to an
    already committed position.
    """
    request = cand.rows // shape.block_width
    position = cand.positions.view(-1)[cand.rows]
    start = meta[Field.SCORE_START][request]
    return meta[Field.SCORE_ROW][request] + torch.clamp(position - logits_shift, min=start) - start


def noise_keys(
    meta: StepTensors, cand: Candidates, shape: StepShape, stream: int
) -> tuple[Tensor, Tensor]:
    """Per-candidate request index and counter-based random key for `stream`."""
    request = cand.rows // shape.block_width
    position = cand.positions.view(-1)[cand.rows]
    keys = row_keys(meta.seed()[request], meta[Field.STEP][request].to(torch.int64), position,
                    stream)  # fmt: skip
    return request, keys


def sampling_inputs(
    meta: StepTensors, cand: Candidates, shape: StepShape
) -> tuple[Tensor, Tensor | None]:
    """Per-candidate temperature and Gumbel keys (None when every request is greedy)."""
    if not shape.any_samples:
        return torch.zeros(shape.num_rows, device=meta.fields.device), None
    request, keys = noise_keys(meta, cand, shape, GUMBEL_STREAM)
    return meta[Field.TEMPERATURE][request], keys


def filters(
    meta: StepTensors, cand: Candidates, shape: StepShape, top_p_first: bool
) -> Filters | None:
    """Per-candidate top-k / top-p / min-p (None when no request filters: nothing to do)."""
    if not shape.any_filters:
        return None
    request = cand.rows // shape.block_width
    return Filters(
        meta[Field.TOP_K].to(torch.int64)[request],
        meta[Field.TOP_P][request],
        meta[Field.MIN_P][request],
        top_p_first,
    )


def score_kinds(meta: StepTensors, cand: Candidates, shape: StepShape) -> Tensor | None:
    """Per-candidate `ScoreKind` (None when every request scores by probability)."""
    if not shape.any_score_kinds:
        return None
    return meta[Field.SCORE].to(torch.int64)[cand.rows // shape.block_width]


def logprob_rows(meta: StepTensors, cand: Candidates, shape: StepShape) -> LogprobRows:
    """The candidate rows whose log-probabilities the proposal reports: every candidate of the
    requests that asked (which of them get committed is only known after the proposal)."""
    plan = shape.logprobs
    assert plan is not None
    wants = meta[Field.LOGPROB_INDEX][cand.rows // shape.block_width] >= 0
    out = torch.empty(
        (len(plan.rows), logprob_columns(plan.num_logprobs)), dtype=torch.int32,
        device=cand.rows.device,
    )  # fmt: skip
    return LogprobRows(_compact(wants, len(plan.rows)), plan.rows, plan.num_logprobs, out)


def logprob_grid(
    meta: StepTensors, cand: Candidates, shape: StepShape, logprobs: LogprobRows
) -> Tensor:
    """`[M, block_width, columns]` int32: the packed log-probabilities of each reporting
    request's block columns (zeros where no candidate was), in the order of `LOGPROB_INDEX`.

    Laid out by block column like `commit`'s result, so the host reads a committed column's
    row next to its token from the same transfer.
    """
    width = shape.block_width
    flat = cand.rows[logprobs.rows]
    index = meta[Field.LOGPROB_INDEX][flat // width].to(torch.int64) * width + flat % width
    assert shape.logprobs is not None
    num_reporting = shape.logprobs.num_requests
    grid = torch.zeros(
        (num_reporting * width, logprobs.out.shape[-1]), dtype=torch.int32, device=flat.device
    )
    return grid.index_copy_(0, index, logprobs.out).view(num_reporting, width, -1)


def commit(
    canvases: Canvases,
    meta: StepTensors,
    cand: Candidates,
    shape: StepShape,
    x0: Tensor,
    confidence: Tensor,
) -> Tensor:
    """Select by each request's rule, write the commits into the canvases, and pack the result.

    An editing request (LLaDA 2.1) also rewrites each already decoded candidate whose proposal
    differs from it with confidence strictly above its editing threshold.

    Returns `[N, block_width + 1]` int32: the committed token of each block column (-1 where
    nothing was committed), then the block offset of the first position still masked (the block
    length when none is left). That is all the host needs to advance every request.
    """
    if shape.any_random or shape.any_alg_temp:
        request, keys = noise_keys(meta, cand, shape, REMASK_STREAM)
        draws = uniform(keys)
        confidence = torch.where(meta[Field.RANDOM][request].bool(), draws, confidence)
        # Dream's alg_temp: drawing the quota in proportion to softmax(score / alg_temp) without
        # replacement is taking the top quota of score / alg_temp + Gumbel noise.
        alg_temp = meta[Field.ALG_TEMP][request]
        drawn = confidence / torch.where(alg_temp > 0, alg_temp, 1.0) - draws.log().neg().log()
        confidence = torch.where(alg_temp > 0, drawn, confidence)
    flat_shape = (shape.num_reqs * shape.block_width,)
    dense_conf = torch.zeros(flat_shape, device=confidence.device).index_copy_(
        0, cand.rows, confidence
    )
    dense_x0 = torch.zeros(flat_shape, dtype=torch.int32, device=x0.device).index_copy_(
        0, cand.rows, x0.to(torch.int32)
    )
    dense_conf = dense_conf.view(shape.num_reqs, -1)
    dense_x0 = dense_x0.view(shape.num_reqs, -1)
    if shape.grammar is not None:
        column = torch.arange(shape.block_width, device=dense_conf.device)
        is_frontier = cand.masked & (column == meta[Field.FRONTIER].unsqueeze(-1))
        by_entropy = meta[Field.RULE] == SelectionRule.ENTROPY_BOUNDED
        dense_conf = raise_frontier(dense_conf, is_frontier, by_entropy)
    chosen = select(
        dense_conf,
        cand.masked,
        meta[Field.RULE].to(torch.int64),
        meta[Field.THRESHOLD],
        meta[Field.FACTOR],
        meta[Field.QUOTA].to(torch.int64),
        meta[Field.ENTROPY_BOUND] if shape.any_entropy else None,
    )
    chosen |= (
        cand.mask
        & ~cand.masked
        & dense_x0.ne(cand.values)
        & (dense_conf > meta[Field.EDIT_THRESHOLD].unsqueeze(-1))
    )
    if shape.grammar is not None:
        chosen = constrain_selection(chosen, meta[Field.FRONTIER]) & cand.mask
    new_values = torch.where(chosen, dense_x0, cand.values)
    slot = meta[Field.SLOT].to(torch.int64).unsqueeze(-1)
    canvases.tokens[canvases.index(slot, cand.positions)] = new_values
    still_masked = new_values.eq(canvases.mask_token_id) & (cand.positions != canvases.sink)
    first_masked = torch.where(
        still_masked.any(dim=-1),
        still_masked.to(torch.int32).argmax(dim=-1).to(torch.int32),
        meta[Field.BLOCK_LEN],
    )
    committed = torch.where(chosen, dense_x0, -1)
    return torch.cat([committed, first_masked.unsqueeze(-1)], dim=-1)
