"""The OpenAI-compatible server as users run it: a subprocess, talked to with `openai`."""

from __future__ import annotations

import concurrent.futures
import re
import time

import openai
import pytest
import requests
from vllm import SamplingParams

from tests.server import assert_completion_equals_offline

pytestmark = pytest.mark.server

MODEL = "tiny-llada"
XARGS = {"dllm_block_length": 8, "dllm_cache": "dual", "dllm_threshold": 0.5}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(llada_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llada_server.url}/v1", api_key="unused", max_retries=0)


def metric_value(server, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on /metrics whose labels include `labels`."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{.*\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


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
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, top_p=0.5)
    assert "top_p" in str(err.value)


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
    forwards_before = metric_value(llada_server, "vllm_dllm:forwards_total")
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
    forwards = metric_value(llada_server, "vllm_dllm:forwards_total") - forwards_before
    assert 0 < forwards < 256, forwards
    after = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_dllm_metrics_move(client, llada_server):
    before = metric_value(llada_server, "vllm_dllm:forwards_total")
    tokens_before = metric_value(llada_server, "vllm_dllm:output_tokens_total")
    client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"vllm_xargs": XARGS}
    )
    assert metric_value(llada_server, "vllm_dllm:forwards_total") > before
    assert metric_value(llada_server, "vllm_dllm:output_tokens_total") > tokens_before
    assert metric_value(llada_server, "vllm_dllm:tokens_per_forward_count") >= 1


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


def test_models_and_health(client, llada_server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert requests.get(f"{llada_server.url}/health", timeout=5).status_code == 200
