"""Structured output through `vllm-dllm serve` and the official `openai` client.

Every request form vLLM's server offers (`response_format` `json_schema` / `json_object`,
`structured_outputs` with `json`, `regex`, `choice`, `grammar`) returns text the constraint
accepts; streamed text equals the non-streamed text; stop strings and `n > 1` work as
without a constraint; an invalid schema is a 400 and the server keeps serving. The server is
the session's LLaDA server (`llada_server`, through the `client` fixture), whose JSON has no
free whitespace.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.structured_cases import MAX_TOKENS, SCHEMAS, cases

MODEL = "tiny-llada"
#: Greedy, DualCache, threshold 0.9, blocks of 8: several tokens per forward where allowed.
XARGS = {"dllm_cache": "dual", "dllm_threshold": 0.9, "dllm_block_length": 8}


def _complete(client, prompt: str, structured: dict, **options):
    extra_body = {"structured_outputs": structured, "vllm_xargs": XARGS}
    return client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body=extra_body, **options,
    )  # fmt: skip


def test_every_request_form_returns_valid_output(client) -> None:
    constrained = cases(20)

    def one(i: int):
        return _complete(client, f"Answer {i}:", constrained[i].spec).choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(len(constrained))))
    for case, choice in zip(constrained, choices, strict=True):
        assert choice.finish_reason == "stop", (case.spec, choice.text)
        assert case.valid(choice.text), (case.spec, choice.text)

    grammar = 'root ::= "x" digit digit\ndigit ::= [0-9]'
    text = _complete(client, "G:", {"grammar": grammar}).choices[0].text
    assert re.fullmatch("x[0-9][0-9]", text), text

    import jsonschema

    schema = SCHEMAS[0]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A colour and a count, please."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "colour_count", "schema": schema},
        },
        extra_body={"vllm_xargs": XARGS},
    ).choices[0]
    assert chat.finish_reason == "stop", chat.message.content
    jsonschema.validate(json.loads(chat.message.content), schema)

    anything = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Any JSON object."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"vllm_xargs": XARGS},
    ).choices[0]
    content = anything.message.content
    # An object of any size: it may be cut by max_tokens, but always starts as one.
    assert content.startswith("{"), content
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(content), dict), content


def test_streamed_text_equals_non_streamed(client) -> None:
    for i, case in enumerate(cases(6)):
        whole = _complete(client, f"S{i}:", case.spec).choices[0]
        stream = _complete(client, f"S{i}:", case.spec, stream=True)
        chunks = list(stream)
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == whole.text, case.spec
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop"


def test_stop_strings_and_several_samples_under_a_constraint(client) -> None:
    regex = "[a-f]{2,5}-[0-9]{2}"
    full = _complete(client, "Code:", {"regex": regex}).choices[0].text
    assert re.fullmatch(regex, full), full
    cut = _complete(client, "Code:", {"regex": regex}, stop=["-"]).choices[0]
    assert cut.text == full.split("-")[0] and cut.finish_reason == "stop", (full, cut.text)

    response = client.completions.create(
        model=MODEL, prompt="Pick:", max_tokens=MAX_TOKENS, temperature=1.0, seed=3, n=4,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]},
                    "vllm_xargs": XARGS},
    )  # fmt: skip
    assert len(response.choices) == 4
    assert all(c.text in ("alpha", "beta", "gamma") for c in response.choices), response


def test_invalid_constraints_are_400_and_the_server_serves_on(client) -> None:
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "object", "required": 5}},
            },
        )
    with pytest.raises(openai.BadRequestError, match="dllm_suffix"):
        client.completions.create(
            model=MODEL, prompt="a", suffix="b", max_tokens=8,
            extra_body={"structured_outputs": {"regex": "[0-9]+"}},
        )  # fmt: skip
    text = _complete(client, "After:", {"choice": ["up", "down"]}).choices[0].text
    assert text in ("up", "down")
