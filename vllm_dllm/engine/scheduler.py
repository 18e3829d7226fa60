"""The diffusion scheduler: admits whole canvases and schedules one denoising step per request.

vLLM's scheduler budgets tokens that extend a sequence; a diffusion request instead re-reads a
fixed canvas `prompt ++ [MASK] * G` every step. So this scheduler:

- admits a waiting request only when KV slots for its **whole canvas** can be allocated at once.
  A running request then never needs another block, so KV pressure can never preempt it: under
  pressure new requests wait instead (no canvas is ever lost or recomputed);
- schedules every running request for one denoising step per engine step (continuous
  batching: requests join and leave between any two steps), charging the step's query window to
  the token budget. The worker reports each request's next window (full canvas at a block start,
  the cached window otherwise), so the budget is exact;
- when the windows exceed one step's budget, shares it in turn: least recently stepped first,
  a waiting request counting from its arrival (`_turn`). A diffusion step costs a whole window
  per request, so a few long canvases fill the budget, and running them to completion first
  would make a short request wait for whole waves of long ones; a request can instead pause
  between any two steps at no cost (its canvas and K/V stay where they are), and the order in
  which requests step never changes what they compute (the step is batch-independent and
  seeded draws count the request's own steps);
- keeps vLLM's prefix caching exact for the block-diffusion families
  (`vllm_dllm.engine.prefix_cache`): a waiting request reuses the cached whole blocks of its
  prompt and is admitted with them as computed tokens, and KV blocks are committed to the cache
  only once their K/V are final;
- leaves stop handling to vLLM: the worker emits a request's tokens once they are final, and
  `update_from_output` appends them and applies EOS / stop tokens / `max_tokens` as usual;
- counts forwards per request and reports them with the finished request; reports each
  admitted prompt to vLLM's prompt-token statistics (`vllm:prompt_tokens_total`, the periodic
  prompt throughput), which vLLM's own scheduler fills in where it schedules a prefill.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, wait
from dataclasses import dataclass

from vllm import envs
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from vllm_dllm.config import DllmParamError, DllmParams, parse_dllm_params
from vllm_dllm.defaults import request_defaults
from vllm_dllm.denoising.request import first_step_tokens
from vllm_dllm.engine.compat import grammar_wait_status, scheduler_output
from vllm_dllm.engine.metrics import DllmMetrics
from vllm_dllm.engine.outputs import DllmRunnerOutput, request_stats
from vllm_dllm.engine.prefix_cache import PrefixCache
from vllm_dllm.families import family_of
from vllm_dllm.logger import init_logger

logger = init_logger(__name__)


@dataclass
class _Tracked:
    next_window: int
    #: When the request last stepped (`time.time()`, as `Request.arrival_time`): the rotation's
    #: order.
    last_turn: float
    #: Reads and writes the prefix cache (`PrefixCache.takes_part`).
    caches: bool = False
    forwards: int = 0
    output_tokens: int = 0
    blocks: int | None = None
    early_stop: bool | None = None


#: Longest a step's admission waits for grammars being compiled (seconds, in all).
GRAMMAR_WAIT_S = 0.05


class DllmScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A diffusion step emits zero or more tokens and never rolls anything back.
        self.num_sampled_tokens_per_step = 0
        self._tracked: dict[str, _Tracked] = {}
        self._metrics = DllmMetrics(
            self.vllm_config.model_config.served_model_name,
            envs.VLLM_LOG_STATS_INTERVAL if self.log_stats else None,
        )
        self._rejected: dict[str, tuple[Request, str]] = {}
        self._family = family_of(self.vllm_config.model_config.hf_config)
        self._defaults = request_defaults(self.vllm_config.model_config, self._family)
        self._prefix_cache = PrefixCache(
            self.kv_cache_manager, self._family, self._defaults, self.block_size,
            bool(self.cache_config.enable_prefix_caching),
        )  # fmt: skip
        self._grammar_wait = grammar_wait_status()

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self.current_step += 1
        self.kv_cache_manager.new_step_starts()
        token_budget = self.max_num_scheduled_tokens
        num_scheduled_tokens: dict[str, int] = {}
        running: list[Request] = []
        new_reqs: list[Request] = []
        new_blocks = {}
        now = time.monotonic()
        turn_stamp = time.time()  # the clock of `Request.arrival_time`

        # The budget goes round: whoever has waited longest for a step goes first, running or
        # waiting (`_turn`). Admission stays first come, first served (or by priority).
        order = sorted(self.running, key=self._turn)
        admitting = True
        compiling: list[Request] = []
        i = 0
        while True:
            head = None
            if admitting and self.waiting and len(self.running) < self.max_num_running_reqs:
                head = self.waiting.peek_request()
            if head is not None and (i == len(order) or self._turn(head) <= self._turn(order[i])):
                if head.status == self._grammar_wait:
                    if not self._grammar_compiled(head, now + GRAMMAR_WAIT_S):
                        # Still compiling: skipped this step, as vLLM skips it (a failed
                        # grammar has already left the queue).
                        if not head.is_finished():
                            compiling.append(self.waiting.pop_request())
                        continue
                    head.status = RequestStatus.WAITING
                admission = self._admission(head)
                if admission is None:
                    continue  # rejected: finished with an error, no longer waiting
                canvas_len, dllm = admission
                # Looked up at every attempt: a block evicted while the request waited is
                # simply not a hit, and computed again.
                hit_blocks, hit = self._prefix_cache.lookup(head, dllm)
                first_window = first_step_tokens(dllm, head.num_prompt_tokens, hit)
                if first_window > token_budget:
                    admitting = False  # its turn comes first in a later step
                    continue
                blocks = self.kv_cache_manager.allocate_slots(
                    head, canvas_len - hit, num_new_computed_tokens=hit,
                    new_computed_blocks=hit_blocks, delay_cache_blocks=True,
                )  # fmt: skip
                if blocks is None:
                    admitting = False  # no room for the whole canvas yet: wait, never preempt
                    continue
                head.num_computed_tokens = hit
                self._prefix_cache.admitted(head, dllm, hit)
                self.waiting.pop_request()
                self.running.append(head)
                head.status = RequestStatus.RUNNING
                if self.log_stats:
                    head.record_event(EngineCoreEventType.SCHEDULED, now)
                if head.prefill_stats is not None:
                    # The rest of the prompt is computed in the canvas's first forward.
                    head.prefill_stats.set(
                        num_prompt_tokens=head.num_prompt_tokens,
                        num_local_cached_tokens=hit,
                        num_external_cached_tokens=0,
                    )
                self._tracked[head.request_id] = _Tracked(
                    next_window=first_window, last_turn=turn_stamp,
                    caches=self._prefix_cache.takes_part(dllm),
                )  # fmt: skip
                new_blocks[head.request_id] = self.kv_cache_manager.get_blocks(head.request_id)
                num_scheduled_tokens[head.request_id] = first_window
                token_budget -= first_window
                new_reqs.append(head)
                continue
            if i == len(order):
                break
            request = order[i]
            i += 1
            tracked = self._tracked[request.request_id]
            if tracked.next_window > token_budget:
                continue  # a smaller window may still fit; this one goes first next step
            num_scheduled_tokens[request.request_id] = tracked.next_window
            token_budget -= tracked.next_window
            tracked.last_turn = turn_stamp
            running.append(request)

        if compiling:
            self.waiting.prepend_requests(reversed(compiling))  # extendleft reverses
        for req_id, n in num_scheduled_tokens.items():
            self.requests[req_id].num_in_flight_tokens += n
            self._tracked[req_id].forwards += 1

        output = scheduler_output(
            scheduled_new_reqs=[
                NewRequestData.from_request(r, new_blocks[r.request_id].get_block_ids())
                for r in new_reqs
            ],
            scheduled_cached_reqs=_cached_data(running),
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=sum(num_scheduled_tokens.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
        )
        self.finished_req_ids = set()
        return output

    def _turn(self, request: Request) -> tuple[float, ...]:
        """Sort key of the step budget's rotation: least recently stepped first, a waiting
        request counting from its arrival; under `--scheduling-policy priority` the request's
        priority first (vLLM's order: lower values first)."""
        tracked = self._tracked.get(request.request_id)
        since = request.arrival_time if tracked is None else tracked.last_turn
        if self.policy == SchedulingPolicy.PRIORITY:
            return (request.priority, since)
        return (since,)

    def _grammar_compiled(self, request: Request, deadline: float) -> bool:
        """Whether vLLM finished compiling a constrained request's grammar (in the background,
        as it does for every model); a grammar that failed fails its request alone.

        A compilation still running is waited for until `deadline` (`time.monotonic`): a
        cached grammar takes milliseconds, and a request left for the next step would cost a
        whole extra forward for it (batches arriving together would be split).
        """
        spec = request.structured_output_request
        pending = None if spec is None else getattr(spec, "_grammar", None)
        if isinstance(pending, Future) and not pending.done():
            wait([pending], timeout=max(0.0, deadline - time.monotonic()))
        grammar = None if spec is None else spec.grammar
        if isinstance(grammar, Exception):
            self._reject(request, f"structured_outputs: the grammar did not compile: {grammar}")
            return False
        return grammar is not None

    def _admission(self, request: Request) -> tuple[int, DllmParams] | None:
        """A waiting request's canvas length and parameters; None (and queued as an error) if
        invalid."""
        params = request.sampling_params
        assert params is not None
        prompt_len = request.num_prompt_tokens
        try:
            dllm = parse_dllm_params(
                params.extra_args, request.max_tokens, self._defaults, self._family
            )
        except DllmParamError as err:
            self._reject(request, str(err))
            return None
        canvas_len = dllm.canvas_length(prompt_len)
        if canvas_len > self.max_model_len:
            suffix = f" + dllm_suffix of {len(dllm.suffix)} tokens" if dllm.suffix else ""
            self._reject(
                request,
                f"the canvas (prompt of {prompt_len} tokens + max_tokens, rounded up to whole "
                f"blocks of dllm_block_length {dllm.block_length}{suffix}) = {canvas_len} "
                f"exceeds the model's max_model_len ({self.max_model_len})",
            )
            return None
        if canvas_len > self.max_num_scheduled_tokens:
            self._reject(
                request,
                f"the canvas ({canvas_len} tokens) exceeds max_num_batched_tokens "
                f"({self.max_num_scheduled_tokens}); a block's first step is one forward over it",
            )
            return None
        return canvas_len, dllm

    def _reject(self, request: Request, reason: str) -> None:
        """Fail one request (its output goes out with the next step); the others carry on."""
        logger.warning("vllm-dllm: rejecting request %s: %s", request.request_id, reason)
        self.finish_requests(request.request_id, RequestStatus.FINISHED_ERROR)
        self._rejected[request.request_id] = (request, reason)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        if isinstance(model_runner_output, DllmRunnerOutput):
            for req_id, window in model_runner_output.next_windows.items():
                if req_id in self._tracked:
                    self._tracked[req_id].next_window = window
            # Before vLLM frees the requests that finished this step.
            for req_id, kv_final_end in model_runner_output.kv_final.items():
                tracked = self._tracked.get(req_id)
                if tracked is not None and tracked.caches:
                    self._prefix_cache.final(self.requests[req_id], kv_final_end)
            for req_id, (blocks, early_stop) in model_runner_output.finished.items():
                if req_id in self._tracked:
                    self._tracked[req_id].blocks = blocks
                    self._tracked[req_id].early_stop = early_stop
        self._metrics.step(len(scheduler_output.num_scheduled_tokens))
        # Requests aborted while the step ran (a stop string matched in the front end, a client
        # disconnected) are already freed: they have no entry left and get no statistics.
        tracked_before = {
            req_id: self._tracked[req_id]
            for req_id in scheduler_output.num_scheduled_tokens
            if req_id in self._tracked
        }
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for eco in outputs.values():
            for out in eco.outputs:
                tracked = tracked_before.get(out.request_id)
                if tracked is None:
                    continue
                tracked.output_tokens += len(out.new_token_ids)
                self._metrics.output_tokens(len(out.new_token_ids))
                if out.finish_reason is not None:
                    self._record_finished(out, tracked)
        self._fail_rejected(outputs)
        self._metrics.maybe_log(len(self.running))
        return outputs

    def _record_finished(self, out: EngineCoreOutput, tracked: _Tracked) -> None:
        stats = request_stats(
            tracked.forwards, tracked.output_tokens, tracked.blocks, tracked.early_stop
        )
        out.kv_transfer_params = {"dllm": stats}
        self._metrics.finished(stats)

    def _fail_rejected(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        if not self._rejected:
            return
        rejected, self._rejected = self._rejected, {}
        for request, reason in rejected.values():
            eco = outputs.setdefault(request.client_index, EngineCoreOutputs())
            eco.outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    stop_reason=reason,
                )
            )

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        self._tracked.pop(request.request_id, None)
        return super()._free_request(request, delay_free_blocks)


def _cached_data(running: list[Request]) -> CachedRequestData:
    """Requests the worker already holds: nothing new to send beyond their ids."""
    return CachedRequestData(
        req_ids=[r.request_id for r in running],
        resumed_req_ids=set(),
        new_token_ids=[[] for _ in running],
        all_token_ids={},
        new_block_ids=[None for _ in running],
        num_computed_tokens=[r.num_computed_tokens for r in running],
        num_output_tokens=[r.num_output_tokens for r in running],
    )
