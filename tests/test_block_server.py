"""The OpenAI-compatible server on the block-diffusion families (Fast-dLLM v2, SDAR, LLaDA 2.x).

One real `vllm-dllm serve` subprocess per family (module-scoped, the first shut down before the
second starts), talked to with the `openai` client and compared with the session's offline
engine on the same checkpoint: completions and chats (ChatML; LLaDA 2's role template) token for
token, streams against
the non-streamed text, the engine statistics in `kv_transfer_params`, a parameter the family
does not take answered with a 400 that names it, after which the server still answers, and
structured-output requests answered within their grammar. The SDAR
and LLaDA 2.x servers run with a server-wide `dllm_steps` (steps per block, so it fits every
prompt length).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from vllm import SamplingParams

from tests.engines import NO_FREE_WHITESPACE, server_args
from tests.server import Server, assert_completion_equals_offline, metric_value
from tests.structured_cases import MAX_TOKENS as CONSTRAINED_MAX_TOKENS
from tests.structured_cases import cases
from vllm_dllm.testing.block_checkpoints import IM_END, IM_START
from vllm_dllm.testing.llada2_checkpoints import ROLE_END

pytestmark = pytest.mark.server

#: Per family: served name, the parameters the equality tests send, and requests the family
#: refuses (parameters of other families, or values outside its own) with the name to expect.
FAMILIES = {
    "fast_dllm_v2": {
        "model": "tiny-fast-dllm-v2",
        "xargs": {"dllm_cache": "dual", "dllm_threshold": 0.5, "dllm_sub_block_length": 8},
        "rejected": [
            ({"dllm_cache": "prefix"}, "dllm_cache"),
            ({"dllm_block_length": 16}, "dllm_block_length"),
            ({"dllm_steps": 32}, "dllm_steps"),
            ({"dllm_remasking": "low_confidence_static"}, "dllm_remasking"),
        ],
    },
    "sdar": {
        "model": "tiny-sdar",
        # Server-wide: 8 steps per block (capped at the block of 4: one token per step).
        "defaults": {"dllm_steps": 8},
        "xargs": {"dllm_threshold": 0.5, "dllm_remasking": "low_confidence_dynamic"},
        "rejected": [
            ({"dllm_cache": "none"}, "dllm_cache"),
            ({"dllm_sub_block_length": 2}, "dllm_sub_block_length"),
            ({"dllm_factor": 1.0}, "dllm_factor"),
            ({"dllm_remasking": "random"}, "dllm_remasking"),
        ],
    },
    "llada2": {
        "model": "tiny-llada2",
        "defaults": {"dllm_steps": 8},
        # LLaDA 2.1's editing: a block's tokens become final (and stream) when it ends.
        "xargs": {"dllm_threshold": 0.5, "dllm_editing_threshold": 0.2},
        "rejected": [
            ({"dllm_cache": "dual"}, "dllm_cache"),
            ({"dllm_remasking": "low_confidence_static"}, "dllm_remasking"),
            ({"dllm_sub_block_length": 8}, "dllm_sub_block_length"),
            ({"dllm_max_post_steps": 2}, "dllm_max_post_steps"),
        ],
    },
}

# The byte-level tokenizer: one token per character, no BOS. 19 tokens end inside a block of
# either family (32 / 4); 32 tokens end exactly on a block boundary of both.
PROMPT_MID_BLOCK = "The quick brown fox"
PROMPT_ON_BOUNDARY = "The quick brown fox jumped over."
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]
# The ChatML prompt the checkpoints' template renders for MESSAGES (byte tokens + specials).
CHATML_PROMPT_IDS = [
    IM_START, *b"user\nWhat is 2+2?", IM_END, *b"\n", IM_START, *b"assistant\n",
]  # fmt: skip
# LLaDA 2's template: role tags in plain text, turns ended by <|role_end|>.
LLADA2_PROMPT_IDS = [
    *b"<role>SYSTEM</role>detailed thinking off", ROLE_END,
    *b"<role>HUMAN</role>What is 2+2?", ROLE_END, *b"<role>ASSISTANT</role>",
]  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(family, request, tmp_path_factory):
    """`vllm-dllm serve` on the family's tiny checkpoint, with the family's server defaults."""
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    defaults = FAMILIES[family].get("defaults")
    server = Server(
        checkpoint,
        server_args(FAMILIES[family]["model"])
        + (["--dllm-defaults", json.dumps(defaults)] if defaults else [])
        + ["--structured-outputs-config", json.dumps(NO_FREE_WHITESPACE)],
        tmp_path_factory.mktemp(f"{family}_server") / "server.log",
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def engine(family, request):
    return request.getfixturevalue(f"{family}_engine")


def test_prompts_end_mid_block_and_on_a_boundary():
    assert len(PROMPT_MID_BLOCK) % 4 and len(PROMPT_MID_BLOCK) < 32
    assert len(PROMPT_ON_BOUNDARY) == 32  # a boundary of blocks of 4 and of 32


def test_models_lists_the_served_name(family, client):
    assert [m.id for m in client.models.list().data] == [FAMILIES[family]["model"]]


@pytest.mark.parametrize("prompt", [PROMPT_MID_BLOCK, PROMPT_ON_BOUNDARY])
@pytest.mark.parametrize("defaults", [False, True], ids=["xargs", "family-defaults"])
def test_completion_equals_offline_engine(family, client, engine, prompt, defaults):
    xargs = {} if defaults else FAMILIES[family]["xargs"]
    # The offline engine has no server defaults: it gets them as the request's (merged as the
    # server merges them: request values win, key by key).
    offline = {**FAMILIES[family].get("defaults", {}), **xargs}
    if "dllm_editing_threshold" in xargs:
        offline.pop("dllm_steps", None)  # LLaDA 2.1's editing drops a server's steps
    assert_completion_equals_offline(
        client, FAMILIES[family]["model"], engine, prompt, xargs, offline_xargs=offline
    )


@pytest.mark.parametrize("prompt_len", [3, 40, 100])
def test_server_steps_default_answers_every_prompt_length(family, client, engine, prompt_len):
    """`dllm_steps` per block: a server default fits prompts that decode any number of blocks."""
    defaults = FAMILIES[family].get("defaults")
    if defaults is None:
        pytest.skip("Fast-dLLM v2 takes no dllm_steps")
    prompt = ("The quick brown fox jumps over the lazy dog. " * 3)[:prompt_len]
    assert_completion_equals_offline(
        client, FAMILIES[family]["model"], engine, prompt, {}, offline_xargs=defaults
    )


def test_chat_uses_the_family_template_and_equals_offline_chat(family, client, engine):
    xargs = FAMILIES[family]["xargs"]
    response = client.chat.completions.create(
        model=FAMILIES[family]["model"],
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        extra_body={"vllm_xargs": xargs, "return_token_ids": True},
    )
    (offline,) = engine.chat(
        MESSAGES, SamplingParams(max_tokens=24, temperature=0, extra_args=xargs), use_tqdm=False
    )
    expected_prompt = LLADA2_PROMPT_IDS if family == "llada2" else CHATML_PROMPT_IDS
    assert list(offline.prompt_token_ids) == expected_prompt
    assert response.model_extra["prompt_token_ids"] == expected_prompt
    choice = response.choices[0]
    assert choice.model_extra["token_ids"] == list(offline.outputs[0].token_ids)
    assert choice.message.content == offline.outputs[0].text
    assert choice.finish_reason == offline.outputs[0].finish_reason
    stats = response.model_extra["kv_transfer_params"]["dllm"]
    assert stats["output_tokens"] == response.usage.completion_tokens
    assert stats == offline.kv_transfer_params["dllm"]


def _stream_kwargs(family: str, **kwargs) -> dict:
    # 72 tokens span several blocks of either family; ignore_eos keeps all of them.
    return dict(
        model=FAMILIES[family]["model"],
        max_tokens=72,
        temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": FAMILIES[family]["xargs"]},
        **kwargs,
    )


def test_completion_stream_equals_non_streamed(family, client):
    kwargs = _stream_kwargs(family, prompt=PROMPT_MID_BLOCK)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    texts = [c.choices[0].text for c in chunks[:-1]]
    assert "".join(texts) == whole.choices[0].text
    assert sum(1 for t in texts if t) > 1  # the answer arrived in pieces, not at the end
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 72
    assert final.model_extra["kv_transfer_params"] == whole.model_extra["kv_transfer_params"]
    stats = whole.model_extra["kv_transfer_params"]["dllm"]
    # Block completions and cache refreshes are forwards too: there may be more than tokens.
    assert stats["output_tokens"] == 72 and stats["forwards"] >= 1
    assert stats["tokens_per_forward"] == round(72 / stats["forwards"], 4)
    assert all("kv_transfer_params" not in (c.model_extra or {}) for c in chunks[:-1])


def test_chat_stream_equals_non_streamed(family, client):
    kwargs = _stream_kwargs(family, messages=MESSAGES)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 72
    assert final.model_extra["kv_transfer_params"] == whole.model_extra["kv_transfer_params"]
    assert whole.model_extra["kv_transfer_params"]["dllm"]["output_tokens"] == 72


def test_suffix_is_400_saying_why(family, client):
    """Infilling needs a suffix that the gap attends to; block-causal attention cannot."""
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=FAMILIES[family]["model"], prompt=PROMPT_MID_BLOCK, suffix=" the end.",
            max_tokens=8,
        )  # fmt: skip
    assert "suffix" in str(err.value) and "block-causal" in str(err.value), err.value


def test_parameters_of_other_families_are_400_naming_them(family, client, server):
    model = FAMILIES[family]["model"]
    for xargs, name in FAMILIES[family]["rejected"]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(
                model=model, prompt=PROMPT_MID_BLOCK, max_tokens=8, extra_body={"vllm_xargs": xargs}
            )
        assert name in str(err.value), (xargs, err.value)
        # The chat endpoint validates the same way.
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=8, extra_body={"vllm_xargs": xargs}
            )
        assert name in str(err.value), (xargs, err.value)
    # Still answering, with a full answer.
    after = client.completions.create(
        model=model,
        prompt=PROMPT_MID_BLOCK,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert after.usage.completion_tokens == 8 and after.choices[0].finish_reason == "length"
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200


def test_shared_prefix_hits_the_prefix_cache_and_answers_as_a_cold_run(family, client, server,
                                                                       engine):
    """Prefix caching is on (the default): a prompt sharing two whole KV blocks (128 tokens on
    CPU) with the previous one is answered from them, vLLM's `vllm:prefix_cache_*` series count
    the hit, and the answer (text, tokens, forwards) equals the offline engine's with nothing
    cached, i.e. a run without the cache."""
    model = FAMILIES[family]["model"]
    offline_xargs = FAMILIES[family].get("defaults", {})
    shared = ("You are a careful assistant; answer briefly. " * 8)[:300]
    hits = metric_value(server, "vllm:prefix_cache_hits_total")
    queries = metric_value(server, "vllm:prefix_cache_queries_total")
    for question in (" What is 2+2?", " Name a colour, please."):
        response = client.completions.create(
            model=model, prompt=shared + question, max_tokens=24, temperature=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        engine.reset_prefix_cache()
        (cold,) = engine.generate(
            [shared + question],
            SamplingParams(max_tokens=24, temperature=0, extra_args=offline_xargs),
            use_tqdm=False,
        )
        assert cold.num_cached_tokens == 0
        assert response.choices[0].model_extra["token_ids"] == list(cold.outputs[0].token_ids)
        stats = response.model_extra["kv_transfer_params"]["dllm"]
        assert stats["forwards"] == cold.kv_transfer_params["dllm"]["forwards"]
    # The second prompt reused the first's two whole KV blocks (at least: earlier tests' prompts
    # may have left the first one's in the cache too).
    assert metric_value(server, "vllm:prefix_cache_hits_total") - hits >= 256
    assert metric_value(server, "vllm:prefix_cache_queries_total") - queries >= 2 * 300


def test_constrained_requests_validate_and_stream_alike(family, client):
    """Structured output through the family's server: JSON schemas, regexes and choices,
    greedy and seeded, each answer valid and ended by the grammar (`stop`), a stream of each
    kind showing the same text as the whole answer."""
    model = FAMILIES[family]["model"]

    def ask(i: int, spec: dict, **options):
        return client.completions.create(
            model=model, prompt=f"Answer {i}:", max_tokens=CONSTRAINED_MAX_TOKENS,
            temperature=(0.0, 1.0)[i % 2], seed=i, extra_body={"structured_outputs": spec},
            **options,
        )  # fmt: skip

    constrained = cases(11)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(i, constrained[i].spec).choices[0],
                                range(len(constrained))))  # fmt: skip
    for case, answer in zip(constrained, answers, strict=True):
        assert answer.finish_reason == "stop", (case.spec, answer.text)
        assert case.valid(answer.text), (case.spec, answer.text)
    for i in (0, 4, 8):  # one JSON schema, one regex, one choice
        chunks = list(ask(i, constrained[i].spec, stream=True))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == answers[i].text, constrained[i].spec
