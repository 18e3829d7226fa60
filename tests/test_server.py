"""The OpenAI-compatible server as users run it: a subprocess, talked to with `openai`."""

from __future__ import annotations

import concurrent.futures
import re
import time

import openai
import pytest
import requests
from vllm import SamplingParams

from tests.server import assert_completion_equals_offline, metric_value
from vllm_dllm.entrypoints.middleware import UNSUPPORTED_FIELDS

pytestmark = pytest.mark.server

MODEL = "tiny-llada"
XARGS = {"dllm_block_length": 8, "dllm_cache": "dual", "dllm_threshold": 0.5}
PROMPT = "The quick brown fox"


def test_completion_equals_offline_engine(client, llada_engine):
    assert_completion_equals_offline(client, MODEL, llada_engine, PROMPT, XARGS)


def test_chat_equals_offline_engine(client, llada_engine):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        extra_body={"vllm_xargs": XARGS},
    )
    offline = llada_engine.chat(
        messages, SamplingParams(max_tokens=16, temperature=0, extra_args=XARGS), use_tqdm=False
    )[0].outputs[0]
    assert response.choices[0].message.content == offline.text


def test_stream_equals_non_streamed(client):
    kwargs = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=32,
        temperature=0,
        extra_body={"vllm_xargs": {"dllm_block_length": 8, "dllm_steps": 32}},
    )
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
    assert "".join(chunks) == whole
    assert sum(1 for c in chunks if c) > 1


def test_stop_string_cuts_stream_like_non_stream(client):
    base = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, extra_body={"vllm_xargs": XARGS}
    ).choices[0].text
    stop = base[5:7]
    kwargs = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=32,
        temperature=0,
        stop=[stop],
        extra_body={"vllm_xargs": XARGS},
    )
    whole = client.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert whole.text == base[: base.index(stop)]
    assert streamed == whole.text


@pytest.mark.parametrize(
    ("xargs", "parameter"),
    [
        ({"dllm_threshold": 1.5}, "dllm_threshold"),
        ({"dllm_cache": "triple"}, "dllm_cache"),
        ({"dllm_block_lenght": 8}, "dllm_block_lenght"),
        ({"dllm_threshold": 0.5, "dllm_factor": 1.0}, "dllm_factor"),
        ({"dllm_block_length": 8, "dllm_steps": 3}, "dllm_steps"),
        ({"dllm_block_length": 0}, "dllm_block_length"),
    ],
)
def test_bad_parameters_are_400_naming_them(client, xargs, parameter):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, extra_body={"vllm_xargs": xargs}
        )
    assert parameter in str(err.value)


def test_unsupported_sampling_parameter_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, presence_penalty=0.5)
    assert "presence_penalty" in str(err.value)


def test_top_k_top_p_min_p_are_served(client):
    """Filtering is accepted at any temperature: seeded draws repeat, and at temperature 0 the
    filters change nothing (the argmax is never filtered out)."""

    def text(temperature: float, **filters) -> str:
        return client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=temperature, seed=11,
            extra_body={"ignore_eos": True, **filters},
        ).choices[0].text  # fmt: skip

    filters = {"top_p": 0.5, "top_k": 3, "min_p": 0.05}
    assert text(0.0, **filters) == text(0.0)
    assert text(0.8, **filters) == text(0.8, **filters)


def test_prompt_longer_than_model_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=8)


def test_concurrent_clients_with_a_third_invalid(client, llada_server, llada_engine):
    """16 clients at once: valid ones get the right answer, invalid ones a 400, server healthy."""
    prompts = [f"client {i} says" for i in range(16)]
    expected = {
        p: o.outputs[0].text
        for p, o in zip(
            prompts,
            llada_engine.generate(
                prompts,
                SamplingParams(max_tokens=16, temperature=0, extra_args=XARGS),
                use_tqdm=False,
            ),
            strict=True,
        )
    }

    def call(i: int):
        xargs = {"dllm_threshold": 7} if i % 3 == 0 else XARGS
        try:
            r = client.completions.create(
                model=MODEL,
                prompt=prompts[i],
                max_tokens=16,
                temperature=0,
                extra_body={"vllm_xargs": xargs},
            )
            return i, r.choices[0].text
        except openai.BadRequestError as err:
            return i, err

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    for i, result in results:
        if i % 3 == 0:
            assert isinstance(result, openai.BadRequestError) and "dllm_threshold" in str(result)
        else:
            assert result == expected[prompts[i]]
    assert requests.get(f"{llada_server.url}/health", timeout=5).status_code == 200


def test_disconnect_mid_stream_aborts_request(client, llada_server):
    """A 256-forward request whose client leaves after the first chunk stops early."""
    forwards_before = metric_value(llada_server, "vllm_dllm:denoising_steps_total")
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=256,
        temperature=0,
        stream=True,
        extra_body={"vllm_xargs": {"dllm_block_length": 8, "dllm_steps": 256}},
    )
    next(iter(stream))
    stream.close()
    for _ in range(60):
        if metric_value(llada_server, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the disconnected request is still running")
    forwards = metric_value(llada_server, "vllm_dllm:denoising_steps_total") - forwards_before
    assert 0 < forwards < 256, forwards
    after = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_dllm_metrics_count_forwards_steps_and_requests(client, llada_server):
    """Two concurrent 8-step requests: 16 denoising steps in about 8 batched model forwards
    (fewer than 16: they share forwards), and one observation each in the per-request series."""
    names = (
        "vllm_dllm:model_forwards_total",
        "vllm_dllm:denoising_steps_total",
        "vllm_dllm:output_tokens_total",
        "vllm_dllm:request_forwards_count",
        "vllm_dllm:request_forwards_sum",
        "vllm_dllm:request_tokens_per_forward_count",
    )
    before = {name: metric_value(llada_server, name) for name in names}
    kwargs = dict(
        model=MODEL,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"dllm_block_length": 8, "dllm_steps": 8}},
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(
            pool.map(lambda p: client.completions.create(prompt=p, **kwargs), ["a b", "c d"])
        )
    moved = {name: metric_value(llada_server, name) - before[name] for name in names}
    assert [r.model_extra["kv_transfer_params"]["dllm"]["forwards"] for r in responses] == [8, 8]
    assert moved["vllm_dllm:denoising_steps_total"] == 16
    assert moved["vllm_dllm:request_forwards_sum"] == 16
    assert moved["vllm_dllm:request_forwards_count"] == 2
    assert moved["vllm_dllm:request_tokens_per_forward_count"] == 2
    assert moved["vllm_dllm:output_tokens_total"] == 16
    assert 8 <= moved["vllm_dllm:model_forwards_total"] <= 16


def test_stream_final_usage_chunk_carries_the_statistics(client):
    """With `include_usage`, a stream's last chunk has the non-streamed `kv_transfer_params`."""
    kwargs = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"dllm_block_length": 8, "dllm_steps": 8}},
    )
    whole = client.completions.create(**kwargs).model_extra["kv_transfer_params"]
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 16
    assert final.model_extra["kv_transfer_params"] == whole
    assert whole["dllm"]["forwards"] == 8 and whole["dllm"]["output_tokens"] == 16
    assert all("kv_transfer_params" not in (c.model_extra or {}) for c in chunks[:-1])


def test_chat_stream_final_usage_chunk_carries_the_statistics(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=8,
        temperature=0,
        extra_body={"vllm_xargs": XARGS},
    )
    whole = client.chat.completions.create(**kwargs).model_extra["kv_transfer_params"]
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[-1].model_extra["kv_transfer_params"] == whole


def stream_choices(chunks) -> tuple[dict[int, dict], dict[int, int]]:
    """Each choice's statistics (from the chunk with its `finish_reason`) and token count."""
    stats: dict[int, dict] = {}
    tokens: dict[int, int] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            tokens[choice.index] = tokens.get(choice.index, 0) + len(
                (choice.model_extra or {}).get("token_ids") or ()
            )
            if choice.finish_reason is not None:
                stats[choice.index] = choice.model_extra["dllm"]
    return stats, tokens


def assert_totals(totals: dict, stats: list[dict], completion_tokens: int) -> None:
    assert totals["output_tokens"] == sum(s["output_tokens"] for s in stats) == completion_tokens
    assert totals["forwards"] == sum(s["forwards"] for s in stats)
    assert totals["blocks"] == sum(s["blocks"] for s in stats)


@pytest.mark.parametrize("shape", ["n=2", "two prompts"])
def test_each_choice_carries_its_own_statistics(client, shape):
    """`n=2`, or two prompts in one request: every choice has its own `dllm` statistics
    (streamed: on the chunk that finishes it), equal streamed and not (seeded sampling); the
    response's statistics are their totals, and its `output_tokens` the usage's."""
    prompt, n = (PROMPT, 2) if shape == "n=2" else ([PROMPT, "Once upon a time"], 1)
    kwargs = dict(
        model=MODEL, prompt=prompt, n=n, max_tokens=16, temperature=0.8, seed=5,
        extra_body={"vllm_xargs": XARGS, "return_token_ids": True},
    )  # fmt: skip
    response = client.completions.create(**kwargs)
    assert [c.index for c in response.choices] == [0, 1]
    stats = [c.model_extra["dllm"] for c in response.choices]
    for choice, s in zip(response.choices, stats, strict=True):
        assert s["output_tokens"] == len(choice.model_extra["token_ids"]) and s["forwards"] >= 1
    totals = response.model_extra["kv_transfer_params"]["dllm"]
    assert_totals(totals, stats, response.usage.completion_tokens)

    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    streamed, tokens = stream_choices(chunks)
    assert streamed == dict(enumerate(stats))
    assert tokens == {i: s["output_tokens"] for i, s in enumerate(stats)}
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert chunks[-1].model_extra["kv_transfer_params"] == {"dllm": totals}


def test_each_chat_choice_carries_its_own_statistics(client):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], n=2,
        max_tokens=16, temperature=0.8, seed=5, extra_body={"vllm_xargs": XARGS},
    )  # fmt: skip
    response = client.chat.completions.create(**kwargs)
    stats = [c.model_extra["dllm"] for c in response.choices]
    assert_totals(
        response.model_extra["kv_transfer_params"]["dllm"], stats, response.usage.completion_tokens
    )
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    streamed, _ = stream_choices(chunks)
    assert streamed == dict(enumerate(stats))
    assert chunks[-1].model_extra["kv_transfer_params"] == response.model_extra[
        "kv_transfer_params"
    ]


@pytest.mark.parametrize(
    ("xargs", "message"),
    [
        ({"alg": "entropy"}, "alg is not a known parameter; did you mean dllm_alg?"),
        ({"block_length": 8}, "block_length is not a known parameter; did you mean "
                              "dllm_block_length?"),
        ({"dllm_treshold": 0.5}, "dllm_treshold is not a known parameter; did you mean "
                                 "dllm_threshold?"),
        (
            {"dllm_remasking": "low_confidence_static"},
            "dllm_remasking must be one of low_confidence, random, entropy_bounded for "
            "bidirectional (LLaDA, Dream) models, got 'low_confidence_static'",
        ),
    ],
)  # fmt: skip
def test_keys_nothing_reads_are_400_naming_the_parameter_meant(client, xargs, message):
    """A key that nothing on the server reads is refused (streamed or not) naming the parameter
    meant; a value list is the model family's own."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=8, stream=stream,
                extra_body={"vllm_xargs": xargs},
            )  # fmt: skip
        assert message in str(err.value)


def test_keys_vllm_reads_pass(client):
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8,
        extra_body={"vllm_xargs": {"kv_cache_report_mode": "incremental", **XARGS}},
    )  # fmt: skip
    assert response.choices[0].finish_reason in ("stop", "length")


def test_prompt_tokens_are_counted(client, llada_server):
    """`vllm:prompt_tokens_total` grows by the prompt's tokens (vLLM's prefill statistics)."""
    before = metric_value(llada_server, "vllm:prompt_tokens_total")
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"vllm_xargs": XARGS}
    )
    prompt_tokens = response.usage.prompt_tokens
    assert prompt_tokens > 0
    for _ in range(20):  # the front end records the engine's statistics after replying
        grown = metric_value(llada_server, "vllm:prompt_tokens_total") - before
        if grown:
            break
        time.sleep(0.25)
    assert grown == prompt_tokens


#: A value for each unsupported field that asks for the feature (and that vLLM would accept).
ASKING = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.2,
    "logit_bias": {"5": 1.0},
    "prompt_logprobs": 1,
    "logprob_token_ids": [5],
    "min_tokens": 2,
    "allowed_token_ids": [5, 6],
    "bad_words": ["fox"],
    "use_beam_search": True,
    "length_penalty": 0.5,
    "kv_transfer_params": {"do_remote_decode": True},
}


def test_every_unsupported_field_has_a_test_value():
    assert set(ASKING) == set(UNSUPPORTED_FIELDS)


@pytest.mark.parametrize("temperature", [0, 0.7])
@pytest.mark.parametrize("field", sorted(ASKING))
def test_unsupported_fields_are_400_naming_them_at_any_temperature(
    llada_server, field, temperature
):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": temperature}
    response = requests.post(
        f"{llada_server.url}/v1/completions", json={**body, field: ASKING[field]}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert error["message"].startswith(f"{field}=")


def test_neutral_values_of_unsupported_fields_are_accepted(llada_server):
    """What clients send by default (`logprobs` null, `presence_penalty` 0, ...) is not a
    request for it."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "repetition_penalty": 1.0,
        "logit_bias": {},
        "logprobs": None,
        "min_tokens": 0,
        "bad_words": [],
        "use_beam_search": False,
        "length_penalty": 1,
        "response_format": {"type": "text"},
    }
    response = requests.post(
        f"{llada_server.url}/v1/completions", json={**body, **neutral}, timeout=30
    )
    assert response.status_code == 200, response.text


def test_malformed_json_is_a_short_400(llada_server):
    response = requests.post(
        f"{llada_server.url}/v1/completions",
        data=b'{"model": "tiny-llada", "prompt": "hi" "max_tokens": 8}',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("the request body is not valid JSON: Expecting ','")
    assert len(message) < 200


def test_server_defaults_apply_to_requests_without_parameters(client, llada_engine):
    """The server runs with `--dllm-defaults` block length 8 + prefix: a bare request uses them."""
    response = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.model_extra["kv_transfer_params"]["dllm"]["blocks"] == 2
    offline = llada_engine.generate(
        [PROMPT],
        SamplingParams(
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            extra_args={"dllm_block_length": 8, "dllm_cache": "prefix"},
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert response.choices[0].text == offline.text


def test_empty_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="", max_tokens=8)


def test_invalid_utf8_body_is_400(llada_server):
    invalid = bytes([0xE9, 0x20, 0xFF, 0xFE])  # Latin-1 bytes, not UTF-8
    body = b'{"model": "tiny-llada", "prompt": "caf' + invalid + b'", "max_tokens": 8}'
    response = requests.post(
        f"{llada_server.url}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert requests.get(f"{llada_server.url}/health", timeout=5).status_code == 200


def test_start_up_log_says_what_the_plugin_set(llada_server):
    """The plugin's start-up line goes through vLLM's logging (format, level) like vLLM's own:
    family, scheduler, worker, prefix caching and why, the CUDA-graph mode, and the request
    defaults in force with where each comes from (here the server's `--dllm-defaults`)."""
    log = llada_server.log_path.read_text()
    line = re.search(r"^\(APIServer pid=\d+\) INFO .*\[config_hook\.py:\d+\] (vllm-dllm: .*)$",
                     log, re.MULTILINE)  # fmt: skip
    assert line, log[-5000:]
    assert line.group(1).startswith(
        "vllm-dllm: LLaDAModelLM is a bidirectional (LLaDA, Dream) diffusion model: scheduler "
        "vllm_dllm.engine.scheduler.DllmScheduler, worker vllm_dllm.engine.worker.DllmCPUWorker, "
        "prefix caching off (LLaDA and Dream attend bidirectionally, so a prompt's K/V depend "
        "on the canvas after it"
    )
    assert line.group(1).endswith(
        "cudagraph_mode NONE, request defaults: dllm_block_length=8 (--dllm-defaults), "
        "dllm_cache=prefix (--dllm-defaults)"
    )


def test_models_and_health(client, llada_server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert requests.get(f"{llada_server.url}/health", timeout=5).status_code == 200
