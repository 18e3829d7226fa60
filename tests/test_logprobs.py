"""`logprobs`: each token's log-probability under the distribution the step that committed it
drew it from, with the top alternatives and the token's rank, in vLLM's own output structures.

Offline on the pooled engines (every family, the `dllm_alg` and entropy-bounded paths) and
through the shared LLaDA server with the `openai` client. The values are recomputed
independently from the dense reference forward (`tests/reference`) where the canvas of the
committing step is known from the output: one step per block, cache `none`.
"""

from __future__ import annotations

import math

import pytest
import requests
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt

from tests.reference import ReferenceModel
from tests.test_server import PROMPT, XARGS

pytestmark = pytest.mark.server

MODEL = "tiny-llada"
PROMPTS = ([17, 99, 42], [5, 9, 200, 13, 77, 64, 34, 120, 2, 250, 31])
BLOCK = 8
MAX_TOKENS = 16
#: One step per block (the `steps` rule's quota is the whole block), every forward a full one:
#: the canvas each token was drawn from is the prompt, the earlier blocks' output and MASK.
ONE_STEP_PER_BLOCK = {
    "dllm_cache": "none",
    "dllm_block_length": BLOCK,
    "dllm_steps": MAX_TOKENS // BLOCK,
}
#: Agreement of the engine's fp32 log-probabilities with the dense reference's.
TOLERANCE = 1e-4


def generate(llm, prompts, params_list):
    return [
        o.outputs[0]
        for o in llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params_list, use_tqdm=False
        )
    ]


def forwards(llm, prompts, params_list) -> list[int]:
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params_list, use_tqdm=False
    )
    return [o.kv_transfer_params["dllm"]["forwards"] for o in outputs]


def reported(completion) -> list[list[tuple[int, float, int]]]:
    """Per token: (token id, log-probability, rank) of the token first, then the alternatives
    by rank."""
    rows = []
    for token, position in zip(completion.token_ids, completion.logprobs, strict=True):
        chosen = position[token]
        others = sorted(
            ((t, p.logprob, p.rank) for t, p in position.items() if p.rank is not None),
            key=lambda entry: entry[2],
        )
        rows.append([(token, chosen.logprob, chosen.rank), *others])
    return rows


def assert_well_formed(completion, num_logprobs: int, greedy: bool) -> None:
    """One entry per token; the alternatives sorted, at most probability 1 together, each a
    log-probability; the token's rank is one more than the tokens strictly more likely; a greedy
    token is the most likely one."""
    assert completion.logprobs is not None
    assert len(completion.logprobs) == len(completion.token_ids) > 0
    for token, position in zip(completion.token_ids, completion.logprobs, strict=True):
        chosen = position[token]
        top = sorted(
            (p for t, p in position.items() if p.rank is not None and p.rank <= num_logprobs),
            key=lambda p: p.rank,
        )
        assert [p.rank for p in top] == list(range(1, num_logprobs + 1))
        values = [p.logprob for p in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in [*values, chosen.logprob])
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
        assert chosen.rank >= 1
        if chosen.rank <= num_logprobs:
            assert chosen.logprob == pytest.approx(top[chosen.rank - 1].logprob, abs=1e-6)
        else:
            assert chosen.logprob <= values[-1]
        if greedy:
            assert chosen.rank == 1
            assert chosen.logprob == values[0]


def recomputed_distributions(model: ReferenceModel, prompt, tokens, shift: int, temperature=0.0,
                             top_k=0) -> torch.Tensor:  # fmt: skip
    """`[len(tokens), V]` log-probabilities of each emitted position's distribution at the step
    that committed it, from the dense reference forward, for `ONE_STEP_PER_BLOCK`.

    With `shift` (Dream) a block's first position is committed alone by the block's first
    forward (predicted from the row before it) and the rest by the second, which sees it.
    """
    mask = model.spec.mask_token_id
    length = len(prompt) + -(-MAX_TOKENS // BLOCK) * BLOCK
    rows = []
    for start in range(0, len(tokens), BLOCK):
        canvas = [*prompt, *tokens[:start]]
        canvas += [mask] * (length - len(canvas))
        block = range(len(prompt) + start, len(prompt) + min(start + BLOCK, len(tokens)))
        logits = _logits(model, canvas)
        if shift:
            rows.append(logits[block.start - 1])
            canvas[block.start] = tokens[start]
            logits = _logits(model, canvas)
            rows.extend(logits[j - 1] for j in block[1:])
        else:
            rows.extend(logits[j] for j in block)
    scores = torch.stack(rows).to(torch.float32)
    scores[:, mask] = float("-inf")
    if top_k:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if temperature > 0:
        scores = scores / temperature
    return torch.log_softmax(scores, dim=-1)


def _logits(model: ReferenceModel, canvas: list[int]) -> torch.Tensor:
    return model.forward(torch.tensor(canvas), torch.arange(len(canvas)))


def assert_equals_recomputed(completion, expected: torch.Tensor, num_logprobs: int) -> None:
    tokens = list(completion.token_ids)
    assert len(completion.logprobs) == len(tokens)
    for i, row in enumerate(reported(completion)):
        (token, value, rank), *top = row
        assert value == pytest.approx(float(expected[i, token]), abs=TOLERANCE), (i, token)
        assert rank == int((expected[i] >= expected[i, token] - TOLERANCE).sum()), i
        top_values = expected[i].topk(num_logprobs).values.tolist()
        assert [v for _, v, _ in top[:num_logprobs]] == pytest.approx(top_values, abs=TOLERANCE)
        for t, v, _ in top:
            assert v == pytest.approx(float(expected[i, t]), abs=TOLERANCE)


# ---- offline: the values -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_greedy_logprobs_equal_the_reference_distribution(family, request):
    llm = request.getfixturevalue(f"{family}_engine")
    model = ReferenceModel(request.getfixturevalue(f"{family}_tiny_dir"))
    shift = 1 if family == "dream" else 0
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=4,
                            extra_args=ONE_STEP_PER_BLOCK)  # fmt: skip
    for prompt, completion in zip(PROMPTS, generate(llm, PROMPTS, [params] * 2), strict=True):
        expected = recomputed_distributions(model, prompt, list(completion.token_ids), shift)
        assert_equals_recomputed(completion, expected, 4)
        assert_well_formed(completion, 4, greedy=True)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sampled_logprobs_are_under_the_filtered_tempered_distribution(family, request):
    llm = request.getfixturevalue(f"{family}_engine")
    model = ReferenceModel(request.getfixturevalue(f"{family}_tiny_dir"))
    shift = 1 if family == "dream" else 0
    temperature, top_k = 0.8, 12
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, top_k=top_k, seed=7,
                            logprobs=3, extra_args=ONE_STEP_PER_BLOCK)  # fmt: skip
    (completion,) = generate(llm, PROMPTS[1:], [params])
    expected = recomputed_distributions(
        model, PROMPTS[1], list(completion.token_ids), shift, temperature, top_k
    )
    assert_equals_recomputed(completion, expected, 3)
    assert_well_formed(completion, 3, greedy=False)
    assert max(rank for (_, _, rank), *_ in reported(completion)) > 1  # a draw, not the argmax


# ---- offline: nothing else changes -----------------------------------------------------------

#: Every path that commits tokens: each family's own loop, Dream's sampler, the entropy-bounded
#: rule, LLaDA 2.1's editing, Fast-dLLM v2's sub-block cache.
PATHS = [
    ("llada", {"dllm_cache": "dual", "dllm_block_length": BLOCK, "dllm_threshold": 0.5}),
    ("llada", {"dllm_cache": "prefix", "dllm_block_length": BLOCK,
               "dllm_remasking": "entropy_bounded", "dllm_eb_threshold": 0.5}),
    ("dream", {"dllm_cache": "dual", "dllm_block_length": BLOCK, "dllm_factor": 1.0}),
    ("dream", {"dllm_alg": "entropy", "dllm_steps": MAX_TOKENS}),
    ("dream", {"dllm_alg": "topk_margin", "dllm_steps": MAX_TOKENS, "dllm_alg_temp": 0.5}),
    ("sdar", {}),
    ("fast_dllm_v2", {"dllm_cache": "dual"}),
    ("llada2", {"dllm_editing_threshold": 0.5}),
]  # fmt: skip


@pytest.mark.parametrize(("family", "extra"), PATHS, ids=[f"{f}-{i}" for i, (f, _) in
                                                          enumerate(PATHS)])  # fmt: skip
def test_tokens_and_forwards_are_unchanged_by_logprobs(family, extra, request):
    """Greedy and seeded sampled, in one batch with requests that ask nothing: the same tokens
    and forwards with and without `logprobs`, and well-formed values for every token."""
    llm = request.getfixturevalue(f"{family}_engine")

    def params(logprobs, temperature, seed):
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed,
                              logprobs=logprobs, extra_args=extra)  # fmt: skip

    # Seeded throughout: Dream's `alg_temp` draws its selection even for a greedy request.
    plain = [params(None, 0, 1), params(None, 0.9, 5), params(None, 0, 2)]
    asking = [params(2, 0, 1), params(5, 0.9, 5), params(None, 0, 2)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    without = generate(llm, prompts, plain)
    with_logprobs = generate(llm, prompts, asking)
    assert [list(c.token_ids) for c in with_logprobs] == [list(c.token_ids) for c in without]
    assert forwards(llm, prompts, asking) == forwards(llm, prompts, plain)
    assert_well_formed(with_logprobs[0], 2, greedy=True)
    assert_well_formed(with_logprobs[1], 5, greedy=False)
    assert with_logprobs[2].logprobs is None


def test_prompt_logprobs_are_refused_offline(llada_engine):
    with pytest.raises(VLLMValidationError, match="prompt_logprobs.*autoregressively"):
        llada_engine.generate(["hi"], SamplingParams(max_tokens=4, prompt_logprobs=1),
                              use_tqdm=False)  # fmt: skip


# ---- the server ------------------------------------------------------------------------------


def test_completion_logprobs_equal_offline(client, llada_engine):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                  extra_body={"vllm_xargs": XARGS})  # fmt: skip
    response = client.completions.create(logprobs=3, **kwargs)
    plain = client.completions.create(**kwargs)
    choice = response.choices[0]
    assert choice.text == plain.choices[0].text
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens
    offline = llada_engine.generate(
        [PROMPT], SamplingParams(max_tokens=16, temperature=0, logprobs=3, extra_args=XARGS),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    expected = [row[0][1] for row in reported(offline)]
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-6)
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        # Keyed by text: alternatives that decode alike (byte tokens) share an entry, the last
        # one's value kept. A greedy token is the most likely: no alternative is above it.
        # (So the dict's order is not the ranking either: chat's list keeps it, below.)
        assert 1 <= len(top) <= 3 and value >= max(top.values())
        assert all(v <= 0 for v in top.values())


def test_streamed_completion_logprobs_equal_non_streamed(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.8, seed=3,
                  logprobs=2, extra_body={"vllm_xargs": XARGS})  # fmt: skip
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values, tops = [], [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            tops += chunk.choices[0].logprobs.top_logprobs
    assert tokens == whole.tokens
    assert values == whole.token_logprobs
    assert tops == whole.top_logprobs
    assert all(v <= 0 for v in values)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client, stream):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}],
                  max_tokens=16, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body={"vllm_xargs": XARGS})  # fmt: skip
    if stream:
        content = []
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                content += chunk.choices[0].logprobs.content or []
        plain = client.chat.completions.create(
            **{k: v for k, v in kwargs.items() if k not in ("logprobs", "top_logprobs")}
        )
        assert len(content) == plain.usage.completion_tokens
    else:
        response = client.chat.completions.create(**kwargs)
        content = response.choices[0].logprobs.content
        assert len(content) == response.usage.completion_tokens
    assert content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert entry.logprob == values[0] and entry.token == entry.top_logprobs[0].token


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 0}, "echo"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "echo": True, "logprobs": True, "top_logprobs": 1}, "echo"),
    ],
)  # fmt: skip
def test_prompt_logprobs_and_echo_with_logprobs_are_400(llada_server, path, body, param):
    response = requests.post(
        f"{llada_server.url}{path}",
        json={"model": MODEL, "max_tokens": 4, **body},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert "autoregressively" in error["message"]
