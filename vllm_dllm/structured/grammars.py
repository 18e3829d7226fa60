"""The worker's grammar matchers: one per constrained request, over its committed prefix.

The matcher lives beside the denoising step (docs/design.md, "Structured output") because the
commit rule needs its verdict between a step's one device-to-host transfer and the next step's
upload: which tokens of the step's run the grammar accepts, and the bitmask of the new
frontier. Grammars are compiled with vLLM's own xgrammar backend (`XgrammarBackend`), from the
request's `structured_outputs` as vLLM's front end validated them; vLLM's scheduler compiles
its own copy, holds the request until that compilation is done, and advances it over the
tokens the worker reports (a second, independent check of every emitted token).

Requests without a constraint cost nothing: with none in the batch, `frontiers` is None and no
step does any grammar work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from vllm_dllm.structured.commit_rule import FrontierMasks, accepted_run

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend


@dataclass
class Constraint:
    """One request's matcher and how many output tokens it has accepted (the frontier is
    `prompt_len + accepted`)."""

    matcher: object  # xgrammar.GrammarMatcher
    prompt_len: int
    accepted: int = 0


class Grammars:
    """The constrained requests of a worker, their frontiers, bitmasks and accepted runs."""

    def __init__(self, vllm_config: VllmConfig, vocab_size: int, pin_memory: bool) -> None:
        self._vllm_config = vllm_config
        self._vocab_size = vocab_size
        self._pin = pin_memory
        self._backend: XgrammarBackend | None = None
        self._constraints: dict[str, Constraint] = {}
        self._table: torch.Tensor | None = None

    def add(self, req_id: str, params: SamplingParams, prompt_len: int) -> None:
        """Compile the request's grammar if it has one (xgrammar caches compiled grammars)."""
        spec = params.structured_outputs
        if spec is None or spec.all_constraints_none():
            return
        from vllm.v1.structured_output.request import get_structured_output_key

        kind, text = get_structured_output_key(spec)
        grammar = self._xgrammar().compile_grammar(
            kind, text, stop_token_ids=set(params.all_stop_token_ids)
        )
        self._constraints[req_id] = Constraint(grammar.matcher, prompt_len)

    def remove(self, req_id: str) -> None:
        self._constraints.pop(req_id, None)

    def _xgrammar(self) -> XgrammarBackend:
        if self._backend is None:
            from vllm.tokenizers import cached_tokenizer_from_config
            from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

            tokenizer = cached_tokenizer_from_config(model_config=self._vllm_config.model_config)
            self._backend = XgrammarBackend(
                self._vllm_config, tokenizer=tokenizer, vocab_size=self._vocab_size
            )
        return self._backend

    def frontiers(self, req_ids: list[str]) -> list[int] | None:
        """Canvas position of each request's frontier (-1: unconstrained); None when no request
        of the step is constrained."""
        if not self._constraints or not any(r in self._constraints for r in req_ids):
            return None
        found = [self._constraints.get(r) for r in req_ids]
        return [-1 if c is None else c.prompt_len + c.accepted for c in found]

    def masks(self, req_ids: list[str], columns: np.ndarray, rows: np.ndarray,
              device: torch.device) -> FrontierMasks:  # fmt: skip
        """Fill the frontier rows' bitmasks (host, while the forward runs on the device) and
        start their upload from pinned memory without blocking.

        `columns` is each request's frontier block column (-1: none this step), `rows` the
        candidate row of each frontier, in batch order.
        """
        import xgrammar as xgr

        count = len(rows)
        words = xgr.get_bitmask_shape(1, self._vocab_size)[1]
        if self._table is None or self._table.numel() < count * (words + 1):
            size = max(count, self._vllm_config.scheduler_config.max_num_seqs) * (words + 1)
            self._table = torch.empty(size, dtype=torch.int32, pin_memory=self._pin)
        # One array, one upload: the bitmasks (contiguous, as xgrammar fills them), then rows.
        table = self._table[: count * (words + 1)]
        bitmask = table[: count * words].view(count, words)
        table[count * words :] = torch.from_numpy(rows.astype(np.int32))
        for k, i in enumerate(np.flatnonzero(columns >= 0)):
            matcher = self._constraints[req_ids[i]].matcher
            matcher.fill_next_token_bitmask(bitmask, k)  # type: ignore[attr-defined]
        uploaded = table.to(device, non_blocking=True)
        return FrontierMasks(
            rows, uploaded[count * words :], uploaded[: count * words].view(count, words)
        )

    def check(self, req_ids: list[str], columns: np.ndarray, committed: np.ndarray,
              first_masked: np.ndarray) -> None:  # fmt: skip
        """Feed each constrained request's run to its matcher; drop, in place, the commits from
        the first rejected token on (the device puts MASK back there before the next forward)."""
        for i in np.flatnonzero(columns >= 0):
            constraint = self._constraints[req_ids[i]]
            column = int(columns[i])
            accepted = accepted_run(constraint.matcher, committed[i], column)  # type: ignore[arg-type]
            constraint.accepted += accepted
            cut = column + accepted
            if cut < committed.shape[1] and committed[i, cut] >= 0:
                committed[i, cut:] = -1
                first_masked[i] = cut
