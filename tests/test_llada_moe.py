"""LLaDA-MoE (`LLaDAMoEModelLM`) against its checkpoint files and its oracle.

The config and the strict loader are checked in this process; the model's logits and the LLaDA
loop through the real engine (paged KV cache, non-causal metadata, FusedMoE on CPU with the
release's routing) against `tests/reference/llada_moe_model.py`, whose forward follows the
release's `modeling_lladamoe.py` and routes every token by hand. One mixed batch holds the
nine cache x rule combinations at block lengths 8, 16 and 32 and seeded sampling; it runs
offline and, sent at once from threads, through a real `vllm-dllm serve` subprocess with the
`openai` client, which also answers the model card's chat request and refuses a parameter of
another family with a 400 naming it.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.engines import dllm_score, end_token_ids, server_args
from tests.oracle_cache import memoized
from tests.reference import generate
from tests.reference.llada_moe_model import LLaDAMoEReferenceModel
from tests.server import Server
from tests.tolerances import assert_decisive, assert_forward_close
from tests.worker_probes import model_contract
from vllm_dllm.testing.llada2_checkpoints import MASK, ROLE_END

MAX_TOKENS = 32
PROMPTS = ([17, 99, 42], [5, 9, 200, 13, 77, 64, 34, 120, 2, 250, 31])
RULES = {
    "threshold": {"dllm_threshold": 0.3},
    "factor": {"dllm_factor": 1.0},
    "steps": {"dllm_steps": MAX_TOKENS},
}
ORACLE_RULE_KEYS = {"dllm_threshold": "threshold", "dllm_factor": "factor", "dllm_steps": "steps"}
#: Every cache mode x rule once, block lengths and prompts mixed (each oracle decision clear of
#: fp32 rounding: `assert_decisive`).
CASES = [
    (PROMPTS[i % 2], {"dllm_cache": cache, "dllm_block_length": block, **RULES[rule]})
    for i, (cache, rule, block) in enumerate([
        ("none", "threshold", 8), ("none", "factor", 16), ("none", "steps", 32),
        ("prefix", "threshold", 16), ("prefix", "factor", 32), ("prefix", "steps", 8),
        ("dual", "threshold", 32), ("dual", "factor", 8), ("dual", "steps", 16),
    ])
]  # fmt: skip
#: Seeded sampling requests: (prompt, temperature, seed, extra).
SAMPLED = [
    (PROMPTS[0], 1.0, 3, {"dllm_cache": "dual", "dllm_block_length": 16, "dllm_threshold": 0.3}),
    (PROMPTS[1], 1.5, 4, {"dllm_cache": "prefix", "dllm_block_length": 16, "dllm_factor": 1.0}),
]


@pytest.fixture(scope="module")
def oracle(llada_moe_tiny_dir) -> LLaDAMoEReferenceModel:
    return LLaDAMoEReferenceModel(llada_moe_tiny_dir)


@memoized
def oracle_run(model, checkpoint, prompt, extra, **kwargs) -> tuple[list[int], int]:
    rule = {ORACLE_RULE_KEYS[k]: v for k, v in extra.items() if k in ORACLE_RULE_KEYS}
    block = extra["dllm_block_length"]
    result = generate(
        model, prompt, gen_length=-(-MAX_TOKENS // block) * block, block_length=block,
        cache=extra["dllm_cache"], end_token_ids=end_token_ids(checkpoint),
        max_tokens=MAX_TOKENS, **rule, **kwargs,
    )  # fmt: skip
    assert_decisive(result.margins, model)
    return result.tokens, result.num_forwards


def engine_batch(llm, cases) -> list[tuple[list[int], int]]:
    """(tokens, forwards) of each (prompt, SamplingParams), run as one batch."""
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p, _ in cases], [sp for _, sp in cases],
        use_tqdm=False,
    )  # fmt: skip
    return [(list(o.outputs[0].token_ids), o.kv_transfer_params["dllm"]["forwards"])
            for o in outputs]  # fmt: skip


def mixed_batch(oracle, checkpoint) -> tuple[list, list]:
    """The nine greedy cases and the seeded ones as (prompt, params), and the oracle's answers."""
    cases, expected = [], []
    for prompt, extra in CASES:
        cases.append((prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                             extra_args=extra)))  # fmt: skip
        expected.append(oracle_run(oracle, checkpoint, prompt, extra))
    for prompt, temperature, seed, extra in SAMPLED:
        cases.append((prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature,
                                             seed=seed, extra_args=extra)))  # fmt: skip
        expected.append(oracle_run(oracle, checkpoint, prompt, extra, temperature=temperature,
                                   seed=seed, counter_noise=True))  # fmt: skip
    return cases, expected


# ---- configuration and strict loading -------------------------------------------------------


def test_one_model_type_two_architectures(llada_moe_tiny_dir, llada_tiny_dir):
    """The release's config declares the dense LLaDA's model_type; the architecture decides."""
    from transformers import AutoConfig

    from vllm_dllm.transformers_utils import register_configs
    from vllm_dllm.transformers_utils.configs import LLaDAConfig, LLaDAMoEConfig

    register_configs()
    moe = AutoConfig.from_pretrained(llada_moe_tiny_dir)
    assert type(moe) is LLaDAMoEConfig and moe.model_type == "llada"
    assert [moe.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert type(AutoConfig.from_pretrained(llada_tiny_dir)) is LLaDAConfig


def test_checkpoint_names_are_the_released_ones(llada_moe_tiny_dir, build_model):
    model = build_model(llada_moe_tiny_dir)
    tensors = load_file(llada_moe_tiny_dir / "model.safetensors")
    assert set(tensors) == model.expected_checkpoint_names()
    assert model.load_weights(tensors.items()) == {name for name, _ in model.named_parameters()}


def test_stray_and_missing_tensors_are_named(llada_moe_tiny_dir, build_model):
    model = build_model(llada_moe_tiny_dir)
    tensors = load_file(llada_moe_tiny_dir / "model.safetensors")
    stray = "model.layers.1.mlp.expert_bias"  # moe_router_enable_expert_bias is false
    with pytest.raises(ValueError, match=rf"unexpected tensor '{stray}'"):
        model.load_weights({**tensors, stray: torch.zeros(8)}.items())
    gone = "model.layers.2.mlp.experts.7.down_proj.weight"
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\): {gone}$"):
        model.load_weights({k: v for k, v in tensors.items() if k != gone}.items())


def test_variant_names_load(llada_moe_variant_dir, build_model):
    """Expert bias and shared expert: the release's optional tensors."""
    checkpoint = llada_moe_variant_dir
    model = build_model(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    assert "model.layers.1.shared_expert.down_proj.weight" in tensors
    assert set(tensors) == model.expected_checkpoint_names()
    model.load_weights(tensors.items())


def test_routing_matters(llada_moe_tiny_dir, oracle, tmp_path):
    """The oracle's routing is visible in its logits: routing every token to the same experts
    changes them, so the engine comparisons below see a wrong router."""
    shutil.copytree(llada_moe_tiny_dir, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
        tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    canvas = torch.tensor(PROMPTS[1] + [MASK] * 16)
    positions = torch.arange(len(canvas))
    flat = LLaDAMoEReferenceModel(tmp_path / "ckpt").forward(canvas, positions)
    assert (flat - oracle.forward(canvas, positions)).abs().max() > 1e-2


# ---- through the engine ---------------------------------------------------------------------


def test_engine_runs_the_plugin_model(llada_moe_engine):
    """Our model, the tokenizer's mask id (config.json has none), unshifted logits."""
    (contract,) = llada_moe_engine.collective_rpc(model_contract)
    assert contract == ("LLaDAMoEModelLM", MASK, 0)


def test_logits_equal_oracle(llada_moe_engine, oracle):
    """The full forward equals the oracle's; a DualCache window equals the full forward."""
    canvas = PROMPTS[1] + [MASK] * 8 + [7, 8, 9] + [MASK] * 13
    length, start = len(canvas), len(PROMPTS[1])
    full, window = dllm_score(llada_moe_engine, canvas, [(0, length), (start, start + 8)])[0]
    expected = oracle.forward(torch.tensor(canvas), torch.arange(length))
    assert_forward_close(torch.tensor(full), expected, oracle)
    assert_forward_close(torch.tensor(window), torch.tensor(full)[start : start + 8], oracle)


def test_variant_logits_and_tokens_equal_oracle(llada_moe_variant_engine, llada_moe_variant_dir):
    """With an expert bias (added to the routing weights) and a shared expert: the full
    forward equals the oracle's, as does a greedy DualCache run; zeroing the bias changes the
    oracle's logits, so the comparison sees it."""
    oracle = LLaDAMoEReferenceModel(llada_moe_variant_dir)
    canvas = PROMPTS[1] + [MASK] * 8 + [7, 8, 9] + [MASK] * 13
    positions = torch.arange(len(canvas))
    ((full,),) = dllm_score(llada_moe_variant_engine, canvas, [(0, len(canvas))])
    expected = oracle.forward(torch.tensor(canvas), positions)
    assert_forward_close(torch.tensor(full), expected, oracle)
    for layer in oracle.layers:
        layer.pop("expert_bias", None)
    assert (oracle.forward(torch.tensor(canvas), positions) - expected).abs().max() > 1e-2

    oracle = LLaDAMoEReferenceModel(llada_moe_variant_dir)
    extra = {"dllm_cache": "dual", "dllm_block_length": 16, "dllm_threshold": 0.3}
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra)
    (got,) = engine_batch(llada_moe_variant_engine, [(PROMPTS[1], params)])
    assert got == oracle_run(oracle, llada_moe_variant_dir, PROMPTS[1], extra)


def test_nine_combinations_and_sampling_in_one_batch_equal_oracle(
    llada_moe_engine, oracle, llada_moe_tiny_dir
):
    """none/prefix/dual x threshold/factor/steps, blocks of 8, 16 and 32, and seeded sampling
    requests, in one batch and in reverse order: tokens and forward counts equal the oracle's."""
    cases, expected = mixed_batch(oracle, llada_moe_tiny_dir)
    assert engine_batch(llada_moe_engine, cases) == expected
    assert engine_batch(llada_moe_engine, cases[::-1]) == expected[::-1]
    # The batch is not degenerate: the rules commit at different rates.
    assert len({forwards for _, forwards in expected}) > 2


# ---- through the server ---------------------------------------------------------------------

MODEL = "tiny-llada-moe"


@pytest.fixture(scope="module")
def client(llada_moe_tiny_dir, tmp_path_factory):
    """The `openai` client of `vllm-dllm serve` on the tiny checkpoint (no retries)."""
    import openai

    server = Server(
        llada_moe_tiny_dir, server_args(MODEL),
        tmp_path_factory.mktemp("llada_moe_server") / "server.log",
    )  # fmt: skip
    server.wait_ready()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    server.stop()


def _completion(client, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=params.max_tokens,
        temperature=params.temperature, seed=params.seed,
        extra_body={"vllm_xargs": params.extra_args, "return_token_ids": True},
    )  # fmt: skip
    stats = response.model_extra["kv_transfer_params"]["dllm"]
    return response.choices[0].model_extra["token_ids"], stats["forwards"]


@pytest.mark.server
def test_server_mixed_batch_equals_oracle(client, oracle, llada_moe_tiny_dir):
    """The offline batch's requests sent at once: the server batches them and answers each
    with the oracle's tokens and forward count."""
    cases, expected = mixed_batch(oracle, llada_moe_tiny_dir)
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda case: _completion(client, *case), cases))
    assert got == expected


@pytest.mark.server
def test_server_answers_the_model_card_request(client, oracle, llada_moe_tiny_dir):
    """The card's chat: its template, then generate(steps=gen_length, block_length=32,
    temperature=0, remasking='low_confidence') without a cache (the card generates 128 tokens
    in 128 steps; 32 in 32 here keep the oracle fast), one token per step."""
    xargs = {"dllm_steps": 32, "dllm_block_length": 32, "dllm_cache": "none"}
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=32,
        temperature=0, extra_body={"vllm_xargs": xargs, "return_token_ids": True},
    )  # fmt: skip
    prompt = [*b"<role>HUMAN</role>Hi", ROLE_END, *b"<role>ASSISTANT</role>"]
    assert response.model_extra["prompt_token_ids"] == prompt
    result = generate(oracle, prompt, gen_length=32, block_length=32, cache="none", steps=32,
                      end_token_ids=end_token_ids(llada_moe_tiny_dir))  # fmt: skip
    assert_decisive(result.margins, oracle)
    assert response.choices[0].model_extra["token_ids"] == result.tokens
    assert response.model_extra["kv_transfer_params"]["dllm"]["forwards"] == result.num_forwards


@pytest.mark.server
def test_server_refuses_another_familys_parameter(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="dllm_editing_threshold"):
        client.completions.create(
            model=MODEL, prompt="hi", max_tokens=8,
            extra_body={"vllm_xargs": {"dllm_editing_threshold": 0.5}},
        )  # fmt: skip
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=8).choices[0].text
