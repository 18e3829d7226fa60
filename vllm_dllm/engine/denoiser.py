"""The vLLM side of a denoising step: metadata, the compiled forward, and the transfers.

This replaces the model runner's token-by-token `execute_model` for diffusion models. vLLM keeps
loading the model, allocating the KV cache, choosing attention backends, compiling the model and
capturing CUDA graphs; a step then is:

1. one asynchronous upload of the step's per-window and per-request integers
   (`denoising.step.pack`) from a pinned buffer; input ids, positions and KV slots are gathered
   on the device from the resident canvases;
2. non-causal attention metadata with one sequence per query window (its own key range: the
   whole canvas for LLaDA/Dream, up to the window's block end for block diffusion), and one
   forward through the runner's model as vLLM itself
   calls it (compiled; on a GPU, replaying the piecewise CUDA graph captured for the padded
   token count);
3. logits only for the positions that may be committed, chunk by chunk with the proposal
   (`sampling.propose_rows`; chunks as large as the memory vLLM profiled for its own sampler
   allows), then each request's rule and the commits, on the device;
4. one device-to-host transfer of the commits, from which the host advances every request and
   reports the tokens that became final.

The algorithm lives in `vllm_dllm.denoising` (state and device math) and `vllm_dllm.sampling`.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import BatchDescriptor, set_forward_context
from vllm.utils.platform_utils import is_pin_memory_available
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_dllm.config import parse_dllm_params
from vllm_dllm.defaults import request_defaults
from vllm_dllm.denoising.canvases import Canvases
from vllm_dllm.denoising.logprobs import LogprobRecord
from vllm_dllm.denoising.request import RequestState, new_state
from vllm_dllm.denoising.step import (
    NUM_WINDOW_FIELDS,
    Field,
    StepShape,
    StepTensors,
    WindowField,
    candidates,
    clear_rejected,
    commit,
    filters,
    hidden_rows,
    logprob_grid,
    logprob_rows,
    pack,
    packed_size,
    sampling_inputs,
    score_kinds,
    window_inputs,
)
from vllm_dllm.engine.compat import build_attn_metadata
from vllm_dllm.engine.logprobs import logprobs_lists
from vllm_dllm.engine.outputs import DllmRunnerOutput
from vllm_dllm.families import family_of, sampling_convention
from vllm_dllm.sampling import propose_rows, rows_per_chunk, sampler_profile_bytes
from vllm_dllm.structured.grammars import Grammars

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner


class Denoiser:
    def __init__(self, runner: GPUModelRunner) -> None:
        self.runner = runner
        model = runner.get_model()
        self.mask_token_id: int = model.mask_token_id
        self.logits_shift: int = model.logits_shift
        self.compute_logits = model.compute_logits
        self.family = family_of(runner.model_config.hf_config)
        # Fixed for the engine's life: the checkpoint's and the server's (`vllm_dllm.defaults`).
        self.defaults = request_defaults(runner.model_config, self.family)
        self.sampling = sampling_convention(runner.model_config.hf_config)
        self.device = runner.device
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"diffusion models use one KV cache group, got {len(groups)}")
        self.kv_block_size: int = groups[0].kv_cache_spec.block_size
        self.layer_names = list(groups[0].layer_names)
        self.eager = runner.model_config.enforce_eager
        max_len = runner.max_model_len
        pin = is_pin_memory_available()
        # One slot more than running requests can use: `score()` borrows it.
        num_slots = runner.vllm_config.scheduler_config.max_num_seqs + 1
        self.canvases = Canvases(
            num_slots, max_len, runner.kv_cache_config.num_blocks, self.kv_block_size,
            self.mask_token_id, self.device, pin,
        )  # fmt: skip
        self._pin = pin
        self._packed = torch.empty(packed_size(num_slots, num_slots), dtype=torch.int32,
                                   pin_memory=pin)  # fmt: skip
        self.vocab_size = runner.model_config.get_vocab_size()
        self.logits_itemsize = runner.model_config.head_dtype.itemsize
        # What vLLM's start-up profile left free for its sampler: the budget of the step's
        # proposal chunks (one GEMM for the whole step where its rows fit).
        self.scratch_bytes = sampler_profile_bytes(
            min(runner.max_num_reqs, runner.max_num_tokens), self.vocab_size, self.logits_itemsize
        )
        self.states: dict[str, RequestState] = {}
        self.slots: dict[str, int] = {}
        self.grammars = Grammars(runner.vllm_config, self.vocab_size, pin)

    # ---- request bookkeeping -------------------------------------------------------------

    def _add_request(self, new: NewRequestData) -> None:
        sp = new.sampling_params
        assert sp is not None and new.prompt_token_ids is not None
        params = parse_dllm_params(sp.extra_args, sp.max_tokens, self.defaults, self.family)
        end_ids = set(sp.stop_token_ids or ())
        if sp.eos_token_id is not None:
            end_ids.add(sp.eos_token_id)
        state = new_state(
            prompt_len=len(new.prompt_token_ids),
            params=params,
            logits_shift=self.logits_shift,
            end_token_ids=frozenset(end_ids),
            temperature=float(sp.temperature),
            filters=(max(sp.top_k, 0), float(sp.top_p), float(sp.min_p)),
            seed=(sp.seed if sp.seed is not None else self._unseeded_seed(new)) & (2**63 - 1),
            # The scheduler admitted it with these prompt positions' K/V from the prefix cache.
            cached_prefix=new.num_computed_tokens,
        )
        if sp.logprobs is not None:
            # -1 asks for the whole vocabulary, as in vLLM.
            num_logprobs = self.vocab_size if sp.logprobs < 0 else sp.logprobs
            state.logprobs = LogprobRecord(
                num_logprobs, state.prompt_len, state.canvas_len - state.prompt_len
            )
        self.grammars.add(new.req_id, sp, state.prompt_len)
        self.states[new.req_id] = state
        self.slots[new.req_id] = self.canvases.add(
            new.prompt_token_ids, state.canvas_len, new.block_ids[0], params.suffix
        )

    def _remove_request(self, req_id: str) -> None:
        self.grammars.remove(req_id)
        if self.states.pop(req_id, None) is not None:
            self.canvases.release(self.slots.pop(req_id))

    def _unseeded_seed(self, new: NewRequestData) -> int:
        """A seed for a request that gave none, the same on every tensor-parallel rank.

        Every rank runs the sampler on the same all-gathered logits; drawing from identically
        keyed random numbers keeps their commits identical without any communication. The
        request id makes the seeds differ between requests.
        """
        engine_seed = self.runner.model_config.seed or 0
        return (zlib.crc32(new.req_id.encode()) << 32 | engine_seed) & (2**63 - 1)

    def _staging(self, size: int) -> np.ndarray:
        """The pinned staging array of a step's packed integers, grown when a step needs more.

        The previous step ended with its device-to-host transfer, so no copy from the old
        buffer is still in flight when it is replaced.
        """
        if size > self._packed.numel():
            self._packed = torch.empty(2 * size, dtype=torch.int32, pin_memory=self._pin)
        return self._packed.numpy()[:size]

    # ---- the step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in scheduler_output.finished_req_ids:
            self._remove_request(req_id)
        self.canvases.begin_step()
        for new in scheduler_output.scheduled_new_reqs:
            self._add_request(new)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        if not req_ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        states = [self.states[r] for r in req_ids]
        slots = [self.slots[r] for r in req_ids]
        shape = pack(states, slots, self._staging, self.grammars.frontiers(req_ids))
        if shape.num_tokens != scheduler_output.total_num_scheduled_tokens:
            raise RuntimeError(
                f"scheduled {scheduler_output.total_num_scheduled_tokens} tokens, the step plans "
                f"need {shape.num_tokens}"
            )
        size = packed_size(shape.num_reqs, shape.num_windows)
        meta = StepTensors(
            self._packed[:size].to(self.device, non_blocking=True),
            shape.num_reqs,
            shape.num_windows,
        )
        if shape.grammar is not None:
            clear_rejected(self.canvases, meta, shape)
        hidden = self._forward(meta, shape)
        token_masks = None
        if shape.grammar is not None:
            # Host grammar work while the device runs the forward.
            token_masks = self.grammars.masks(
                req_ids, shape.grammar.columns, shape.grammar.rows, self.device
            )
        cand = candidates(self.canvases, meta, shape)
        temperature, noise_keys = sampling_inputs(meta, cand, shape)
        logprobs = None if shape.logprobs is None else logprob_rows(meta, cand, shape)
        x0, confidence = propose_rows(
            hidden[hidden_rows(meta, cand, shape, self.logits_shift)],
            self.compute_logits,
            self.mask_token_id,
            temperature,
            noise_keys,
            # A step that filters, scores by margin or entropy, or reports log-probabilities
            # holds more temporaries.
            rows_per_chunk(
                self.vocab_size, self.scratch_bytes, self.logits_itemsize, noise_keys is not None,
                shape.any_filters or shape.any_score_kinds, logprobs is not None,
            ),
            tempered_confidence=self.sampling.tempered_confidence,
            filters=filters(meta, cand, shape, self.sampling.top_p_first),
            score_kinds=score_kinds(meta, cand, shape),
            logprobs=logprobs,
            token_masks=token_masks,
        )
        packed = commit(self.canvases, meta, cand, shape, x0, confidence)
        if logprobs is not None:
            # Into the same transfer: the commits first, then the log-probabilities.
            grid = logprob_grid(meta, cand, shape, logprobs)
            packed = torch.cat([packed.view(-1), grid.view(-1)])
        result = packed.cpu().numpy()  # the step's one device-to-host transfer
        return self._advance(req_ids, states, slots, shape, result)

    def _advance(
        self,
        req_ids: list[str],
        states: list[RequestState],
        slots: list[int],
        shape: StepShape,
        result: np.ndarray,
    ) -> DllmRunnerOutput:
        """Host side of the step: mirror the commits, advance each request, emit final tokens
        (with their log-probabilities, for the requests that asked)."""
        width = shape.block_width
        commits = result[: shape.num_reqs * (width + 1)].reshape(shape.num_reqs, width + 1)
        committed, first_masked = commits[:, :width], commits[:, width]
        if shape.grammar is not None:
            self.grammars.check(req_ids, shape.grammar.columns, committed, first_masked)
        grid = None
        if shape.logprobs is not None:
            grid = result[commits.size :].reshape(shape.logprobs.num_requests, width, -1)
        column = np.arange(width)
        positions = np.where(
            column < shape.block_lens[:, None],
            shape.block_starts[:, None] + column,
            self.canvases.sink,
        )
        slot_array = np.asarray(slots)
        self.canvases.apply_commits(slot_array, positions, committed)
        sampled: list[list[int]] = []
        reported: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        next_windows: dict[str, int] = {}
        kv_final: dict[str, int] = {}
        finished: dict[str, tuple[int, bool]] = {}
        reporting = 0
        for i, (req_id, state) in enumerate(zip(req_ids, states, strict=True)):
            if state.logprobs is not None:
                assert grid is not None and shape.logprobs is not None
                columns = np.flatnonzero(committed[i] >= 0)
                state.logprobs.record(
                    positions[i, columns], grid[reporting, columns], shape.logprobs.num_logprobs
                )
                reporting += 1
            kv_final_before = state.kv_final_end
            final_end = state.advance(committed[i], int(first_masked[i]))
            if state.kv_final_end > kv_final_before:
                kv_final[req_id] = state.kv_final_end
            start, stop = state.newly_final(final_end)
            sampled.append(state.emit(self.canvases.read(slots[i], start, stop), final_end))
            reported.append(
                None if state.logprobs is None
                else state.logprobs.take(start, start + len(sampled[-1]))
            )  # fmt: skip
            if state.done:
                finished[req_id] = (state.blocks_done, state.early_stop)
            else:
                next_windows[req_id] = state.plan().num_tokens
        return DllmRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=logprobs_lists(reported),
            next_windows=next_windows,
            kv_final=kv_final,
            finished=finished,
        )

    def _forward(self, meta: StepTensors, shape: StepShape) -> torch.Tensor:
        """One forward over every request's query window; returns `[num_tokens, hidden]`."""
        mode, descriptor = self._dispatch(shape.num_tokens)
        input_ids = self.runner.input_ids.gpu[: descriptor.num_tokens]
        positions = self.runner.positions[: descriptor.num_tokens]
        slot_mapping = window_inputs(self.canvases, meta, shape, input_ids, positions)
        common = CommonAttentionMetadata(
            query_start_loc=meta.query_start,
            query_start_loc_cpu=torch.from_numpy(shape.query_start.copy()),
            seq_lens=meta.window(WindowField.KEY_END),
            num_reqs=shape.num_windows,
            num_actual_tokens=shape.num_tokens,
            max_query_len=shape.max_query_len,
            max_seq_len=int(shape.key_ends.max()),
            block_table_tensor=self.canvases.block_table[
                meta.window(WindowField.SLOT).to(torch.int64)
            ],
            slot_mapping=slot_mapping[: shape.num_tokens],
            causal=False,
        )
        attn_metadata = {}
        for group in self.runner.attn_groups[0]:
            metadata = build_attn_metadata(group, common)
            for name in group.layer_names:
                attn_metadata[name] = metadata
        with set_forward_context(
            attn_metadata,
            self.runner.vllm_config,
            num_tokens=descriptor.num_tokens,
            cudagraph_runtime_mode=mode,
            batch_descriptor=descriptor,
            slot_mapping=dict.fromkeys(self.layer_names, slot_mapping),
        ):
            hidden = self.runner.model(input_ids=input_ids, positions=positions)
        return hidden[: shape.num_tokens]

    def _dispatch(self, num_tokens: int) -> tuple[CUDAGraphMode, BatchDescriptor]:
        """The CUDA-graph mode and padded size vLLM chose for a batch of `num_tokens`.

        Denoising windows are mixed-length, non-causal batches: they replay the piecewise graphs
        (everything but attention) captured for the padded size, never a full graph, whose
        captured attention metadata assumes vLLM's own batches. Without captured graphs (CPU,
        `enforce_eager`, sizes above the largest capture) the size is not padded.
        """
        if self.eager:
            return CUDAGraphMode.NONE, BatchDescriptor(num_tokens)
        return self.runner.cudagraph_dispatcher.dispatch(
            num_tokens=num_tokens, uniform_decode=False, invalid_modes={CUDAGraphMode.FULL}
        )

    # ---- diagnostics ------------------------------------------------------------------------

    @torch.inference_mode()
    def score(
        self, token_ids: list[int], windows: list[tuple[int, ...]]
    ) -> list[torch.Tensor]:
        """Logits (unshifted, fp32, CPU) of a fixed canvas for a sequence of query windows.

        Runs the engine's own forward path (resident canvas, paged KV cache, non-causal
        metadata) for one canvas on scratch KV blocks at the top of the cache. A window is
        `(start, end)`, attending to keys `[0, L)`, or `(start, end, key_end)`; windows after
        the first see the K/V the earlier ones wrote, exactly as cached steps do. It borrows
        blocks no request holds only when no request is in flight, so it refuses to run
        otherwise. Used to check the model and the cache against the oracles.
        """
        if self.states:
            raise RuntimeError("score() needs an idle engine (requests are in flight)")
        length = len(token_ids)
        num_kv_blocks = -(-length // self.kv_block_size)
        total = self.runner.kv_cache_config.num_blocks
        self.canvases.begin_step()
        slot = self.canvases.add(token_ids, length, list(range(total - num_kv_blocks, total)))
        try:
            results = []
            for window in windows:
                start, end, key_end = (*window, length)[:3]
                packed = np.zeros(packed_size(1, 1), dtype=np.int32)
                packed[:2] = (0, end - start)
                per_window = packed[2 : 2 + NUM_WINDOW_FIELDS]
                per_window[:] = (slot, start, end - start, key_end)
                fields = packed[2 + NUM_WINDOW_FIELDS :].reshape(-1, 1)
                shape = StepShape(
                    num_reqs=1, num_windows=1, num_tokens=end - start, num_rows=0, block_width=1,
                    max_query_len=end - start, any_samples=False, any_random=False,
                    any_filters=False, any_score_kinds=False, any_entropy=False,
                    any_alg_temp=False,
                    query_start=packed[:2], key_ends=per_window[WindowField.KEY_END :],
                    block_starts=fields[Field.BLOCK_START], block_lens=fields[Field.BLOCK_LEN],
                )  # fmt: skip
                meta = StepTensors(torch.from_numpy(packed).to(self.device), 1, 1)
                results.append(self.compute_logits(self._forward(meta, shape)).float().cpu())
            return results
        finally:
            self.canvases.release(slot)
