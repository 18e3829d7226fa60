"""One denoising step for a batch of requests, on the model runner's model and paged KV cache.

This replaces the model runner's token-by-token `execute_model` for diffusion models. It keeps
vLLM's model loading, KV-cache allocation and attention backends, and drives them itself:

1. each scheduled request's `StepPlan` becomes a slice of one flat batch (input ids, positions,
   KV slots of the window) with non-causal attention metadata whose keys span the whole canvas;
2. one model forward, then logits only for the rows that score the current block's positions
   (`logits_shift` moves Dream's rows one position left);
3. the batched sampler proposes, scores and selects for every request at once;
4. one device-to-host transfer of the choices, and each request commits and reports the tokens
   that became final.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_dllm.cache.policy import StepPlan
from vllm_dllm.config import parse_dllm_params, server_defaults
from vllm_dllm.engine.outputs import DllmRunnerOutput
from vllm_dllm.engine.request_state import RequestState
from vllm_dllm.sampling import RowGenerator, propose, random_confidence, select

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner


class ForwardSlice(NamedTuple):
    """One request's part of a batched forward: its canvas, KV slots and this step's plan."""

    canvas: torch.Tensor
    slots: torch.Tensor
    block_ids: list[int]
    plan: StepPlan


def canvas_slots(block_ids: list[int], length: int, block_size: int) -> torch.Tensor:
    """KV slot of each canvas position: `block_ids[pos // block_size] * block_size + offset`."""
    positions = torch.arange(length)
    blocks = torch.tensor(block_ids, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


class Denoiser:
    def __init__(self, runner: GPUModelRunner) -> None:
        self.runner = runner
        self.model = runner.get_model()
        self.device = runner.device
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"diffusion models use one KV cache group, got {len(groups)}")
        self.kv_block_size: int = groups[0].kv_cache_spec.block_size
        self.layer_names = list(groups[0].layer_names)
        self.mask_token_id: int = self.model.mask_token_id
        self.logits_shift: int = self.model.logits_shift
        self.states: dict[str, RequestState] = {}

    # ---- request bookkeeping -------------------------------------------------------------

    def _add_request(self, new: NewRequestData) -> None:
        sp = new.sampling_params
        assert sp is not None and new.prompt_token_ids is not None
        params = parse_dllm_params(sp.extra_args, sp.max_tokens, server_defaults())
        prompt = torch.tensor(new.prompt_token_ids, dtype=torch.long)
        canvas = torch.cat(
            [prompt, torch.full((params.gen_length,), self.mask_token_id, dtype=torch.long)]
        )
        end_ids = set(sp.stop_token_ids or ())
        if sp.eos_token_id is not None:
            end_ids.add(sp.eos_token_id)
        generator = None
        if sp.temperature > 0 or params.remasking == "random":
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sp.seed if sp.seed is not None else self._unseeded_seed(new))
        self.states[new.req_id] = RequestState(
            req_id=new.req_id,
            prompt_len=prompt.shape[0],
            params=params,
            canvas=canvas,
            slots=canvas_slots(new.block_ids[0], canvas.shape[0], self.kv_block_size),
            block_ids=new.block_ids[0],
            mask_token_id=self.mask_token_id,
            logits_shift=self.logits_shift,
            temperature=float(sp.temperature),
            end_token_ids=frozenset(end_ids),
            generator=generator,
        )

    def _unseeded_seed(self, new: NewRequestData) -> int:
        """A seed for a request that gave none, the same on every tensor-parallel rank.

        Every rank runs the sampler on the same all-gathered logits; drawing from identically
        seeded generators keeps their commits identical without any communication. The
        request id makes the seeds differ between requests.
        """
        engine_seed = self.runner.model_config.seed or 0
        return (zlib.crc32(new.req_id.encode()) << 32 | engine_seed) & (2**63 - 1)

    # ---- diagnostics ------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, token_ids: list[int], windows: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Logits (unshifted, fp32, CPU) of a fixed canvas for a sequence of query windows.

        Runs the engine's own forward path (paged KV cache, non-causal metadata) for one canvas
        on scratch KV blocks at the top of the cache, each window attending to keys `[0, L)`;
        windows after the first see the K/V the earlier ones wrote, exactly as cached steps do.
        It borrows blocks no request holds only when no request is in flight, so it refuses to
        run otherwise. Used to check the model and the cache against the oracle.
        """
        if self.states:
            raise RuntimeError("score() needs an idle engine (requests are in flight)")
        canvas = torch.tensor(token_ids, dtype=torch.long)
        num_kv_blocks = -(-len(token_ids) // self.kv_block_size)
        total = self.runner.kv_cache_config.num_blocks
        block_ids = list(range(total - num_kv_blocks, total))
        slots = canvas_slots(block_ids, len(token_ids), self.kv_block_size)
        results = []
        for start, end in windows:
            plan = StepPlan(start, end, len(token_ids), full=(start, end) == (0, len(token_ids)))
            hidden = self._forward([ForwardSlice(canvas, slots, block_ids, plan)])
            results.append(self.model.compute_logits(hidden).float().cpu())
        return results

    # ---- the step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in scheduler_output.finished_req_ids:
            self.states.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self._add_request(new)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        if not req_ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        states = [self.states[r] for r in req_ids]
        plans = [s.plan() for s in states]
        for state, plan in zip(states, plans, strict=True):
            expected = scheduler_output.num_scheduled_tokens[state.req_id]
            if plan.num_tokens != expected:
                raise RuntimeError(
                    f"request {state.req_id}: scheduled {expected} tokens, plan needs "
                    f"{plan.num_tokens}"
                )

        pairs = zip(states, plans, strict=True)
        hidden = self._forward([ForwardSlice(s.canvas, s.slots, s.block_ids, p) for s, p in pairs])
        block_len = max(s.params.block_length for s in states)
        rows, valid = self._block_rows(states, plans, block_len)
        logits = self.model.compute_logits(hidden[rows.view(-1)])
        positions, tokens = self._sample(states, logits, valid, block_len)

        sampled: list[list[int]] = []
        next_windows: dict[str, int] = {}
        finished: dict[str, tuple[int, bool]] = {}
        for state, pos, tok in zip(states, positions, tokens, strict=True):
            sampled.append(state.commit(pos, tok))
            if state.done:
                finished[state.req_id] = (state.block, state.early_stop)
            else:
                next_windows[state.req_id] = state.plan().num_tokens
        return DllmRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            next_windows=next_windows,
            finished=finished,
        )

    def _forward(self, slices: list[ForwardSlice]) -> torch.Tensor:
        """One model forward over every slice's query window; returns hidden states."""
        input_ids = torch.cat([c.canvas[c.plan.start : c.plan.end] for c in slices])
        positions = torch.cat([torch.arange(c.plan.start, c.plan.end) for c in slices])
        slot_mapping = torch.cat([c.slots[c.plan.start : c.plan.end] for c in slices])
        query_lens = np.array([c.plan.num_tokens for c in slices], dtype=np.int32)
        query_start = np.zeros(len(slices) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        seq_lens = np.array([c.plan.key_end for c in slices], dtype=np.int32)
        max_blocks = max(len(c.block_ids) for c in slices)
        block_table = np.zeros((len(slices), max_blocks), dtype=np.int32)
        for i, c in enumerate(slices):
            block_table[i, : len(c.block_ids)] = c.block_ids

        dev = self.device
        query_start_cpu = torch.from_numpy(query_start)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_cpu.to(dev, non_blocking=True),
            query_start_loc_cpu=query_start_cpu,
            seq_lens=torch.from_numpy(seq_lens).to(dev, non_blocking=True),
            num_reqs=len(slices),
            num_actual_tokens=int(query_start[-1]),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=torch.from_numpy(block_table).to(dev, non_blocking=True),
            slot_mapping=slot_mapping.to(dev, non_blocking=True),
            causal=False,
        )
        attn_metadata = {}
        for group in self.runner.attn_groups[0]:
            metadata = group.build_metadata(common)
            for name in group.layer_names:
                attn_metadata[name] = metadata
        slots_by_layer = dict.fromkeys(self.layer_names, common.slot_mapping)
        num_tokens = common.num_actual_tokens
        with set_forward_context(
            attn_metadata,
            self.runner.vllm_config,
            num_tokens=num_tokens,
            slot_mapping=slots_by_layer,
        ):
            return self.model(
                input_ids=input_ids.to(dev, non_blocking=True),
                positions=positions.to(dev, non_blocking=True),
            )

    def _block_rows(
        self, states: list[RequestState], plans: list, block_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden-state row scoring each block position, `[R, B]`, and which columns exist.

        Position j is scored by the window row of position `j - logits_shift`, clamped to the
        window's first row (the reference's `cat(logits[:, :1], logits[:, :-1])` within the
        window); a clamped row only ever scores an already committed position.
        """
        rows = np.zeros((len(states), block_len), dtype=np.int64)
        valid = np.zeros((len(states), block_len), dtype=bool)
        offset = 0
        for i, (s, p) in enumerate(zip(states, plans, strict=True)):
            b = s.params.block_length
            pos = np.arange(s.block_start, s.block_start + b) - self.logits_shift
            rows[i, :b] = offset + np.maximum(pos, p.start) - p.start
            valid[i, :b] = True
            offset += p.num_tokens
        return torch.from_numpy(rows).to(self.device), torch.from_numpy(valid)

    def _sample(
        self, states: list[RequestState], logits: torch.Tensor, valid: torch.Tensor, block_len: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Propose, score and select for every request; returns committed positions and tokens."""
        num_reqs = len(states)
        dev = self.device
        temperature = torch.tensor(
            [s.temperature for s in states], dtype=torch.float32
        ).repeat_interleave(block_len)
        all_greedy = all(s.temperature == 0 for s in states)
        # A seeded request draws for its own block rows only: spanning the batch's longest block
        # would advance its generator by a batch-dependent amount and change its later blocks.
        noise_gens = [
            RowGenerator(i * block_len, i * block_len + s.params.block_length, s.generator)
            for i, s in enumerate(states)
            if s.temperature > 0 and s.generator is not None
        ]
        x0, confidence = propose(
            logits,
            self.mask_token_id,
            temperature.to(dev),
            noise_gens,
            all_greedy=all_greedy,
        )
        if any(s.params.remasking == "random" for s in states):
            use_random = torch.tensor(
                [s.params.remasking == "random" for s in states]
            ).repeat_interleave(block_len)
            random_gens = [
                RowGenerator(i * block_len, i * block_len + s.params.block_length, s.generator)
                for i, s in enumerate(states)
                if s.params.remasking == "random" and s.generator is not None
            ]
            confidence = random_confidence(confidence, use_random.to(dev), random_gens)
        x0 = x0.view(num_reqs, block_len)
        confidence = confidence.view(num_reqs, block_len)

        canvas_block = torch.full((num_reqs, block_len), -1, dtype=torch.long)
        for i, s in enumerate(states):
            canvas_block[i, : s.params.block_length] = s.canvas[s.block_start : s.block_end]
        candidates = canvas_block.eq(self.mask_token_id) & valid
        single = torch.tensor([s.opens_with_single_commit for s in states])
        # A Dream block opening commits its first position alone (it is predicted from the
        # prompt side, which no cached step of this block recomputes).
        first_col = torch.zeros_like(candidates)
        first_col[:, 0] = True
        candidates = torch.where(single.unsqueeze(-1), candidates & first_col, candidates)

        chosen = select(
            confidence,
            candidates.to(dev),
            torch.tensor([int(s.rule_id) for s in states], device=dev),
            torch.tensor([s.params.threshold or 1.0 for s in states], device=dev),
            torch.tensor([s.params.factor or 1.0 for s in states], device=dev),
            torch.tensor(
                [1 if s.opens_with_single_commit else s.quota() for s in states], device=dev
            ),
        )
        chosen = torch.where(
            single.to(dev).unsqueeze(-1),
            candidates.to(dev),
            chosen,
        )
        # The one device-to-host transfer of the step.
        chosen_cpu, x0_cpu = chosen.cpu(), x0.cpu()
        positions, tokens = [], []
        for i, s in enumerate(states):
            cols = chosen_cpu[i].nonzero().view(-1)
            positions.append((cols + s.block_start).tolist())
            tokens.append(x0_cpu[i, cols].tolist())
        return positions, tokens
