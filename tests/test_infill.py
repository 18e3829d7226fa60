"""Infilling: a fixed suffix after the generated gap (`dllm_suffix`, the completions `suffix`).

The engine against the oracle extended with a suffix (same tokens, same forwards) for every
cache mode and rule, mixed in one batch with requests without a suffix; the parameter's
parsing, the canvas that must fit, and the block-diffusion families' refusal; through the
OpenAI server, `suffix` answered like the offline engine, streamed like non-streamed, and bad
inputs refused with a 400 naming the problem.
"""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt

from tests.engines import end_token_ids
from tests.oracle_cache import memoized
from tests.reference import ReferenceModel, generate
from tests.reference.dream_alg_generate import generate_dream_alg
from tests.tolerances import assert_decisive
from vllm_dllm.config import DllmParamError, parse_dllm_params
from vllm_dllm.defaults import server_defaults
from vllm_dllm.denoising.request import new_state
from vllm_dllm.engine.front_end import fitted_max_tokens
from vllm_dllm.entrypoints.middleware import move_suffix
from vllm_dllm.families import fast_dllm_v2, llada2, sdar
from vllm_dllm.infill import canvas_suffix

MAX_TOKENS = 8
PROMPTS = ([17, 99, 42], [5, 9, 200, 13, 77, 64, 34, 120, 2, 250, 31])
SUFFIXES = ([7, 8, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
RULES = {
    "threshold": {"dllm_threshold": 0.9},
    "factor": {"dllm_factor": 1.0},
    "steps": {"dllm_steps": MAX_TOKENS},
    "entropy_bounded": {"dllm_remasking": "entropy_bounded", "dllm_eb_threshold": 12.0},
}
ORACLE_KEYS = {
    "dllm_threshold": "threshold",
    "dllm_factor": "factor",
    "dllm_steps": "steps",
    "dllm_remasking": "remasking",
    "dllm_eb_threshold": "eb_threshold",
}


# ---- the parameter, the canvas, the step plans (no engine) ---------------------------------


def test_suffix_is_part_of_the_canvas_and_of_its_fit():
    params = parse_dllm_params({"dllm_suffix": [5, 6, 7], "dllm_block_length": 8}, 12)
    assert params.suffix == (5, 6, 7)
    assert params.canvas_length(3) == 3 + 16 + 3
    # 30 positions: 3 of prompt and 3 of suffix leave 24, three blocks of 8.
    assert params.fitting_max_tokens(3, 30) == 24
    assert parse_dllm_params({"dllm_suffix": []}, 12).suffix == ()
    assert parse_dllm_params({"dllm_suffix": None}, 12).canvas_length(3) == 3 + 32


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, True], "list of token ids"),
        ([1, -2], "list of token ids"),
        (3, "list of token ids"),
        ("text", "tokenizes"),  # text never reaches the engine core: the front end tokenizes it
    ],
)
def test_bad_suffix_values_are_refused_naming_the_parameter(value, message):
    with pytest.raises(DllmParamError, match=message) as err:
        parse_dllm_params({"dllm_suffix": value}, 8)
    assert str(err.value).startswith("dllm_suffix")


def test_server_defaults_cannot_set_a_suffix(monkeypatch):
    monkeypatch.setenv("VLLM_DLLM_DEFAULTS", '{"dllm_suffix": "x"}')
    server_defaults.cache_clear()
    try:
        with pytest.raises(DllmParamError, match="per request"):
            server_defaults()
    finally:
        monkeypatch.delenv("VLLM_DLLM_DEFAULTS")
        server_defaults.cache_clear()


@pytest.mark.parametrize("family", [fast_dllm_v2(32), sdar(4), llada2(32)], ids=lambda f: f.name)
def test_block_diffusion_families_refuse_a_suffix_saying_why(family):
    params = SamplingParams(max_tokens=8, extra_args={"dllm_suffix": [1, 2]})
    with pytest.raises(VLLMValidationError) as err:
        fitted_max_tokens(params, 5, 512, family)
    assert "dllm_suffix" in str(err.value) and "block-causal" in str(err.value)
    assert err.value.parameter == "dllm_suffix"


def test_a_suffix_the_context_cannot_hold_is_refused_or_fitted():
    suffix = {"dllm_suffix": list(range(480)), "dllm_block_length": 8}
    # 10 + 480 leaves 22 of 512 positions: max_tokens 64 is lowered to two blocks.
    assert fitted_max_tokens(SamplingParams(max_tokens=64, extra_args=suffix), 10, 512) == 16
    with pytest.raises(VLLMValidationError, match="dllm_suffix"):
        fitted_max_tokens(SamplingParams(max_tokens=8, extra_args=suffix), 30, 512)


def test_text_suffix_is_its_tokens_then_eos(llada_tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(llada_tiny_dir)
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode(" return x", add_special_tokens=False)
    assert canvas_suffix(" return x", tokenizer, eos, 1000) == (*ids, eos)
    assert canvas_suffix("", tokenizer, eos, 1000) == ()
    # Token ids are the canvas's tail as given: nothing appended.
    assert canvas_suffix([4, 5], tokenizer, eos, 1000) == (4, 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        canvas_suffix([4, 1000], tokenizer, eos, 1000)


@pytest.mark.parametrize(
    ("cache", "later_window"),
    # Prompt 3, gap 16 (two blocks of 8), suffix 3: the second step of block 0.
    [("none", (0, 22)), ("prefix", (3, 19)), ("dual", (3, 11))],
)
def test_step_plans_keep_the_suffix_as_context(cache, later_window):
    params = parse_dllm_params(
        {"dllm_suffix": [5, 6, 7], "dllm_block_length": 8, "dllm_cache": cache}, 16
    )
    state = new_state(
        prompt_len=3,
        params=params,
        logits_shift=0,
        end_token_ids=frozenset(),
        temperature=0.0,
        seed=0,
    )
    assert [(w.start, w.end, w.key_end) for w in state.plan().windows] == [(0, 22, 22)]
    import numpy as np

    state.advance(np.array([9, -1, -1, -1, -1, -1, -1, -1]), 1)
    (window,) = state.plan().windows
    assert (window.start, window.end, window.key_end) == (*later_window, 22)
    assert state.gap_end == 19


def test_completion_suffix_moves_into_the_diffusion_parameters():
    body = {"prompt": "a", "suffix": "b", "vllm_xargs": {"dllm_block_length": 8}}
    assert move_suffix(body) is True
    assert body == {"prompt": "a", "vllm_xargs": {"dllm_block_length": 8, "dllm_suffix": "b"}}
    empty = {"prompt": "a", "suffix": ""}
    assert move_suffix(empty) is True and empty == {"prompt": "a"}
    assert move_suffix({"prompt": "a"}) is False
    assert move_suffix({"prompt": "a", "suffix": "b", "echo": True})[1] == "echo"
    assert move_suffix({"prompt": "a", "suffix": 3})[1] == "suffix"
    both = {"prompt": "a", "suffix": "b", "vllm_xargs": {"dllm_suffix": "c"}}
    assert move_suffix(both)[1] == "suffix"


# ---- the engine against the oracle ------------------------------------------------------------


@memoized
def oracle_run(model: ReferenceModel, checkpoint, prompt, extra_args, **kwargs):
    oracle_args = {ORACLE_KEYS[k]: v for k, v in extra_args.items() if k in ORACLE_KEYS}
    block = extra_args["dllm_block_length"]
    result = generate(
        model,
        prompt,
        gen_length=-(-MAX_TOKENS // block) * block,
        block_length=block,
        cache=extra_args["dllm_cache"],
        end_token_ids=kwargs.pop("end_token_ids", end_token_ids(checkpoint)),
        max_tokens=MAX_TOKENS,
        suffix=extra_args.get("dllm_suffix", ()),
        **oracle_args,
        **kwargs,
    )
    assert_decisive(result.margins, model)
    suffix = list(extra_args.get("dllm_suffix", ()))
    assert result.canvas[len(result.canvas) - len(suffix) :].tolist() == suffix  # never written
    return result.tokens, result.num_forwards


def _cases() -> list[tuple[list[int], dict]]:
    """Every cache mode x rule with a suffix (two blocks of 4), some of them without one."""
    cases = []
    for i, (cache, rule) in enumerate((c, r) for c in ("none", "prefix", "dual") for r in RULES):
        extra = {"dllm_cache": cache, "dllm_block_length": 4, **RULES[rule]}
        prompt = PROMPTS[i % 2]
        cases.append((prompt, {**extra, "dllm_suffix": SUFFIXES[i // 2 % 2]}))
        if i % 5 == 0:
            cases.append((prompt, extra))
    # One block over the whole gap.
    cases.append(
        (
            PROMPTS[1],
            {
                "dllm_cache": "prefix",
                "dllm_block_length": 8,
                "dllm_threshold": 0.9,
                "dllm_suffix": SUFFIXES[0],
            },
        )
    )
    return cases


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_infilling_equals_oracle_in_a_mixed_batch(family, request):
    """Tokens and forwards equal the oracle's for every cache mode x rule, with and without a
    suffix in one batch (those without are unchanged); the suffix changes some answers."""
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    llm = request.getfixturevalue(f"{family}_engine")
    oracle = ReferenceModel(checkpoint)
    cases = _cases()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p, _ in cases],
        [
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra)
            for _, extra in cases
        ],
        use_tqdm=False,
    )
    got = [
        (list(o.outputs[0].token_ids), o.kv_transfer_params["dllm"]["forwards"]) for o in outputs
    ]
    want = [oracle_run(oracle, checkpoint, p, extra) for p, extra in cases]
    assert got == want
    plain = [i for i, (_, extra) in enumerate(cases) if "dllm_suffix" not in extra]
    assert len(plain) == 3
    # The suffix informs the gap: each request without it follows the same one with it.
    assert any(got[i][0] != got[i - 1][0] for i in plain)


def test_dream_own_loop_with_a_suffix_equals_its_oracle(dream_tiny_dir, dream_engine):
    """Dream's `diffusion_generate` (`dllm_alg`) over prompt ++ MASK ++ suffix, as DreamOn's
    infilling decodes it."""
    oracle = ReferenceModel(dream_tiny_dir)
    prompt, suffix = PROMPTS[1], SUFFIXES[1]
    extra = {"dllm_alg": "entropy", "dllm_steps": 16, "dllm_suffix": suffix}
    (out,) = dream_engine.generate(
        [TokensPrompt(prompt_token_ids=prompt)],
        SamplingParams(max_tokens=16, temperature=0.0, extra_args=extra),
        use_tqdm=False,
    )
    want = generate_dream_alg(
        oracle,
        prompt,
        max_new_tokens=16,
        steps=16,
        alg="entropy",
        end_token_ids=end_token_ids(dream_tiny_dir),
        suffix=suffix,
    )
    assert_decisive(want.margins, oracle)
    got = (list(out.outputs[0].token_ids), out.kv_transfer_params["dllm"]["forwards"])
    assert got == (want.tokens, want.num_forwards)


def test_end_token_in_the_gap_stops_and_the_suffix_is_never_returned(llada_tiny_dir, llada_engine):
    """An end token committed in the gap ends the answer there (finish reason stop); the same
    token in the suffix does not, and the text (suffix tokenized, then EOS) is what the oracle
    decodes with those ids."""
    oracle = ReferenceModel(llada_tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(llada_tiny_dir)
    prompt = PROMPTS[1]
    extra = {"dllm_cache": "dual", "dllm_block_length": 4, "dllm_steps": MAX_TOKENS}
    text = " and so on"
    suffix_ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    free = oracle_run(
        oracle, llada_tiny_dir, prompt, {**extra, "dllm_suffix": suffix_ids}, end_token_ids=()
    )
    stop_token = free[0][3]  # committed in the first block
    stopped = SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        stop_token_ids=[stop_token],
        extra_args={**extra, "dllm_suffix": text},
    )
    (out,) = llada_engine.generate([TokensPrompt(prompt_token_ids=prompt)], stopped, use_tqdm=False)
    got = (list(out.outputs[0].token_ids), out.kv_transfer_params["dllm"]["forwards"])
    assert got == oracle_run(
        oracle,
        llada_tiny_dir,
        prompt,
        {**extra, "dllm_suffix": suffix_ids},
        end_token_ids=(stop_token,),
    )
    assert out.outputs[0].finish_reason == "stop" and got[0][-1] == stop_token
    assert len(got[0]) <= 4 and got[1] < free[1]
    # The stop token inside the suffix itself stops nothing.
    in_suffix = SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        stop_token_ids=[stop_token],
        extra_args={**extra, "dllm_suffix": [stop_token, *suffix_ids]},
    )
    (whole,) = llada_engine.generate(
        [TokensPrompt(prompt_token_ids=prompt)], in_suffix, use_tqdm=False
    )
    assert (
        list(whole.outputs[0].token_ids)
        == oracle_run(
            oracle,
            llada_tiny_dir,
            prompt,
            {**extra, "dllm_suffix": [stop_token, *suffix_ids]},
            end_token_ids=(stop_token,),
        )[0]
    )


def test_a_long_suffix_lowers_max_tokens_to_fit(llada_engine):
    suffix = [5 + i % 250 for i in range(480)]
    params = SamplingParams(
        max_tokens=64,
        temperature=0.0,
        ignore_eos=True,
        extra_args={"dllm_block_length": 8, "dllm_suffix": suffix},
    )
    prompt = TokensPrompt(prompt_token_ids=PROMPTS[1])
    (out,) = llada_engine.generate([prompt], params, use_tqdm=False)
    # 11 + 480 of 512 positions leave two blocks of 8.
    assert len(out.outputs[0].token_ids) == 16
    assert out.outputs[0].finish_reason == "length"
    vocab = llada_engine.llm_engine.model_config.get_vocab_size()
    params.extra_args = {"dllm_suffix": [5, vocab]}
    with pytest.raises(VLLMValidationError, match="outside the vocabulary"):
        llada_engine.generate([prompt], params, use_tqdm=False)


# ---- the OpenAI server --------------------------------------------------------------------------

MODEL = "tiny-llada"
PROMPT = "def add(a, b):"
SUFFIX = "\n    return c\n"
XARGS = {"dllm_block_length": 8, "dllm_threshold": 0.5}


def test_server_suffix_equals_offline_engine(client, llada_engine):
    """The server's `suffix` is the offline `dllm_suffix` (the server's default cache, prefix,
    given offline too), and it changes the answer."""
    response = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        suffix=SUFFIX,
        max_tokens=16,
        temperature=0,
        extra_body={"vllm_xargs": XARGS, "return_token_ids": True},
    )
    infill = {**XARGS, "dllm_cache": "prefix", "dllm_suffix": SUFFIX}
    offline = llada_engine.generate(
        [PROMPT], SamplingParams(max_tokens=16, temperature=0, extra_args=infill), use_tqdm=False
    )[0].outputs[0]
    plain = llada_engine.generate(
        [PROMPT],
        SamplingParams(max_tokens=16, temperature=0, extra_args={**XARGS, "dllm_cache": "prefix"}),
        use_tqdm=False,
    )[0].outputs[0]
    assert response.choices[0].text == offline.text
    assert response.choices[0].model_extra["token_ids"] == list(offline.token_ids)
    assert list(offline.token_ids) != list(plain.token_ids)  # the suffix informs the gap


def test_server_suffix_with_n_choices(client):
    """`n` seeded choices: two of them, each repeatable."""
    kwargs = dict(
        model=MODEL,
        prompt=PROMPT,
        suffix=SUFFIX,
        max_tokens=16,
        temperature=1.0,
        seed=5,
        n=2,
        extra_body={"vllm_xargs": XARGS, "ignore_eos": True},
    )
    first = client.completions.create(**kwargs).choices
    again = client.completions.create(**kwargs).choices
    assert len(first) == 2 and [c.text for c in first] == [c.text for c in again]
    assert all(c.finish_reason == "length" for c in first)


def test_server_suffix_streams_like_non_streamed(client):
    kwargs = dict(
        model=MODEL,
        prompt=PROMPT,
        suffix=SUFFIX,
        max_tokens=32,
        temperature=0,
        extra_body={"vllm_xargs": {"dllm_block_length": 8, "dllm_steps": 32}},
    )
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
    assert "".join(chunks) == whole.text
    assert sum(1 for c in chunks if c) > 1


def test_server_suffix_stop_string_cuts_stream_like_non_stream(client):
    kwargs = dict(
        model=MODEL,
        prompt=PROMPT,
        suffix=SUFFIX,
        max_tokens=32,
        temperature=0,
        extra_body={"vllm_xargs": XARGS, "ignore_eos": True},
    )
    base = client.completions.create(**kwargs).choices[0].text
    stop = base[5:7]
    whole = client.completions.create(stop=[stop], **kwargs).choices[0]
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(stream=True, stop=[stop], **kwargs)
    )
    assert whole.text == base[: base.index(stop)] and whole.finish_reason == "stop"
    assert streamed == whole.text


def test_server_empty_suffix_is_no_suffix(client):
    kwargs = dict(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"vllm_xargs": XARGS}
    )
    plain = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(suffix="", **kwargs).choices[0].text == plain


@pytest.mark.parametrize(
    ("extra", "parameter", "words"),
    [
        ({"echo": True}, "echo", "echo is not supported with suffix"),
        ({"extra_body": {"vllm_xargs": {"dllm_suffix": "x"}}}, "suffix", "not both"),
        ({"extra_body": {"suffix": 5}}, "suffix", "must be a string"),
        # The prompt and the suffix leave no room for one block of the 512-token context.
        ({"suffix": "x" * 520}, "dllm_block_length", "dllm_suffix"),
    ],
)
def test_server_bad_suffix_requests_are_400_naming_the_problem(client, extra, parameter, words):
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "suffix": SUFFIX, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kwargs)
    assert words in str(err.value)
    assert err.value.param == parameter, err.value.body
