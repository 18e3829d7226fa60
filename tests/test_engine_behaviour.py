"""Engine behaviour beyond token equality: parallel commits, KV pressure, bad parameters."""

from __future__ import annotations

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt

from tests.reference import ReferenceModel
from tests.test_engine_oracle import MAX_TOKENS, PROMPTS, engine_run, oracle_run


def test_peaked_checkpoint_commits_several_tokens_per_forward(llada_peaked_engine):
    extra = {"dllm_cache": "dual", "dllm_block_length": 32, "dllm_threshold": 0.9}
    outputs = llada_peaked_engine.generate(
        [TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, extra_args=extra),
        use_tqdm=False,
    )
    stats = [o.kv_transfer_params["dllm"] for o in outputs]
    tokens = sum(s["output_tokens"] for s in stats)
    forwards = sum(s["forwards"] for s in stats)
    assert tokens / forwards > 2, stats


def test_kv_pressure_queues_requests_without_corrupting_them(
    llada_peaked_engine, llada_peaked_dir
):
    """More requests than KV blocks: they wait for whole canvases and still equal the oracle."""
    num_blocks = llada_peaked_engine.llm_engine.vllm_config.cache_config.num_gpu_blocks
    oracle = ReferenceModel(llada_peaked_dir)
    cases = [
        (PROMPTS[i % 2] + [i], {"dllm_cache": c, "dllm_block_length": 8, "dllm_threshold": t})
        for i, (c, t) in enumerate(
            # Thresholds away from where this checkpoint's confidences crowd (0.9 to 0.999),
            # so no decision is within fp32 rounding of flipping (`assert_decisive`).
            [("dual", 0.6), ("prefix", 0.5), ("none", 0.7), ("dual", 0.3)] * 3
        )
    ]
    assert len(cases) > 2 * num_blocks
    got = engine_run(
        llada_peaked_engine,
        [p for p, _ in cases],
        [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args=e) for _, e in cases],
    )
    assert got == [oracle_run(oracle, llada_peaked_dir, p, e) for p, e in cases]


def test_requests_take_turns_when_their_windows_exceed_the_budget(llada_engine):
    """One whole-canvas window more than one step's token budget holds: the requests share the
    budget in turn (least recently stepped first, the waiting one counting from its arrival),
    so the last one starts while the others run instead of after they all finish, and nobody
    waits two steps in a row. Taking turns changes when a request steps, never what it
    computes: each result equals the request run alone."""
    from tests.worker_probes import start_recording_batches, stop_recording_batches

    budget = llada_engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    gen, steps = 480, 4
    window = len(PROMPTS[1]) + 1 + gen  # no cache: every step forwards the whole canvas
    fits = budget // window
    prompts = [[*PROMPTS[1], i] for i in range(fits + 1)]
    params = SamplingParams(
        max_tokens=gen, temperature=0, ignore_eos=True,
        extra_args={"dllm_cache": "none", "dllm_block_length": gen, "dllm_steps": steps},
    )  # fmt: skip
    llada_engine.collective_rpc(start_recording_batches)
    together = engine_run(llada_engine, prompts, [params] * len(prompts))
    (batches,) = llada_engine.collective_rpc(stop_recording_batches)
    assert together == [engine_run(llada_engine, [p], [params])[0] for p in prompts]
    assert [forwards for _, forwards in together] == [steps] * len(prompts)
    assert max(len(batch) for batch in batches) == fits, batches
    assert sum(map(len, batches)) == steps * len(prompts)
    stepped = {
        request: [i for i, batch in enumerate(batches) if request in batch]
        for request in set().union(*batches)
    }
    # Every request is in flight at once at some step (run to completion, the last one would
    # start only after the others' last steps), and none waits two steps in a row.
    assert max(s[0] for s in stepped.values()) <= min(s[-1] for s in stepped.values()), batches
    for s in stepped.values():
        assert all(b - a <= 2 for a, b in zip(s, s[1:], strict=False)), batches


def test_priority_decides_who_gets_a_freed_canvas(llada_peaked_engine):
    """`--scheduling-policy priority`: with the KV cache full of running canvases that end one
    at a time, each freed canvas goes to the waiting request of highest priority (lowest
    value), whatever the order they arrived in."""
    from tests.worker_probes import start_recording_batches, stop_recording_batches

    def params(gen: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=gen, temperature=0, ignore_eos=True,
            extra_args={"dllm_cache": "none", "dllm_block_length": 8, "dllm_steps": gen},
        )  # fmt: skip

    # The KV cache holds three canvases of one 128-token block (its fourth block is vLLM's
    # reserved null block); these three end one at a time.
    blockers = [32, 48, 64]
    waiting_priorities = [3, 2, 1]  # arriving in the opposite order of their priority
    llada_peaked_engine.collective_rpc(start_recording_batches)
    outputs = llada_peaked_engine.generate(
        [TokensPrompt(prompt_token_ids=PROMPTS[0])] * 6,
        [params(gen) for gen in blockers] + [params(8)] * 3,
        priority=[0] * 3 + waiting_priorities,
        use_tqdm=False,
    )
    (batches,) = llada_peaked_engine.collective_rpc(stop_recording_batches)
    assert [len(o.outputs[0].token_ids) for o in outputs] == blockers + [8] * 3
    first_step = {}
    for step, batch in enumerate(batches):
        for engine_id in batch:
            first_step.setdefault(engine_id, step)
    # vLLM's engine-side ids start with the request's index in the call.
    started = [first_step[next(e for e in first_step if e.split("-")[0] == o.request_id)]
               for o in outputs]  # fmt: skip
    assert max(started[:3]) < min(started[3:]), (started, batches)
    assert sorted(range(3, 6), key=lambda i: started[i]) == [5, 4, 3], (started, batches)


@pytest.mark.parametrize(
    ("extra_args", "parameter"),
    [
        ({"dllm_threshold": 0.0}, "dllm_threshold"),
        ({"dllm_cache": "full"}, "dllm_cache"),
        ({"dllm_factor": -1}, "dllm_factor"),
        ({"dllm_block_length": 8, "dllm_steps": 5}, "dllm_steps"),
        ({"dllm_remasking": "lowest"}, "dllm_remasking"),
        ({"dllm_bogus": 1}, "dllm_bogus"),
    ],
)
def test_bad_parameters_fail_that_request_only(llada_engine, extra_args, parameter):
    good = SamplingParams(max_tokens=16, temperature=0, extra_args={"dllm_block_length": 8})
    bad = SamplingParams(max_tokens=16, temperature=0, extra_args=extra_args)
    with pytest.raises(VLLMValidationError, match=parameter) as err:
        llada_engine.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], bad, use_tqdm=False)
    assert err.value.parameter == parameter
    (out,) = llada_engine.generate(
        [TokensPrompt(prompt_token_ids=PROMPTS[0])], good, use_tqdm=False
    )
    assert out.outputs[0].finish_reason in ("stop", "length") and out.outputs[0].token_ids



def test_each_choice_of_n_keeps_its_own_statistics(llada_engine):
    """Offline, an `n=2` request's output carries each choice's statistics (`dllm_choices`, in
    the order of `outputs`) and their totals (`dllm`); choice i is the request with seed + i."""
    from vllm_dllm.engine.outputs import merge_stats

    def run(n: int, seed: int):
        params = SamplingParams(n=n, max_tokens=16, temperature=0.8, seed=seed,
                                extra_args={"dllm_block_length": 8, "dllm_threshold": 0.5})
        prompt = TokensPrompt(prompt_token_ids=PROMPTS[0])
        return llada_engine.generate([prompt], params, use_tqdm=False)[0]  # fmt: skip

    out = run(2, seed=5)
    choices = out.kv_transfer_params["dllm_choices"]
    assert [c["output_tokens"] for c in choices] == [len(o.token_ids) for o in out.outputs]
    assert choices == [run(1, seed=5 + i).kv_transfer_params["dllm"] for i in range(2)]
    assert out.kv_transfer_params["dllm"] == merge_stats(choices)
