"""The oracle (tests/reference) and the tiny checkpoints it runs on.

No vLLM here: these tests pin down the specification the engine is compared against, so they
check the oracle against independent facts (dense forwards, hand-computed selections, counts
that follow from the algorithm in docs/design.md) rather than against itself.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.reference import ReferenceModel, generate
from tests.reference.generate import Rule, _select
from tests.reference.margins import Margins, top2_gaps
from tests.tolerances import assert_decisive, forward_tolerance
from vllm_dllm.testing.checkpoints import DREAM_TINY, LLADA_TINY
from vllm_dllm.transformers_utils.configs import DreamConfig, LLaDAConfig

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # "Hello, world"
GEN, BLOCK = 64, 32
BLOCKS = GEN // BLOCK
MODES = ("none", "prefix", "dual")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The oracle multiplies tiny matrices: OpenMP threads cost more than they give, and
    they stall badly when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llada(llada_tiny_dir: Path) -> ReferenceModel:
    return ReferenceModel(llada_tiny_dir)


@pytest.fixture(scope="module")
def dream(dream_tiny_dir: Path) -> ReferenceModel:
    return ReferenceModel(dream_tiny_dir)


@pytest.fixture(scope="module")
def peaked(llada_peaked_dir: Path) -> ReferenceModel:
    return ReferenceModel(llada_peaked_dir)


@pytest.fixture(params=["llada", "dream"])
def model(request: pytest.FixtureRequest) -> ReferenceModel:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["llada", "dream"])
def model64(request: pytest.FixtureRequest) -> ReferenceModel:
    """The oracle in float64, for claims that two computations agree up to rounding: fp32
    rounding differs between CPUs, float64 rounding is far below anything the claims compare."""
    return ReferenceModel(request.getfixturevalue(f"{request.param}_tiny_dir"), torch.float64)


def _canvas(model: ReferenceModel) -> torch.Tensor:
    """Prompt, 20 committed tokens, then MASK up to 2 blocks: a mid-generation canvas."""
    committed = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1))
    masks = torch.full((GEN - 20,), model.spec.mask_token_id)
    return torch.cat([torch.tensor(PROMPT), committed, masks])


# --- the model and its cache -------------------------------------------------------------------


def _transformers_twin(model: ReferenceModel, checkpoint: Path) -> PreTrainedModel:
    """The same weights in transformers' own Llama / Qwen2 code: an independent forward.

    LLaDA's blocks are Llama blocks (ff_proj = gate, up_proj = up, ff_out = down); Dream's are
    Qwen2 blocks with the released tensor names already.
    """
    spec = model.spec
    tensors = load_file(checkpoint / "model.safetensors")
    sizes = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.num_heads * spec.head_dim,
        "intermediate_size": model.layers[0]["gate"].shape[0],
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": False,
    }
    if spec.family == "dream":
        twin = Qwen2ForCausalLM(Qwen2Config(**sizes))
    else:
        twin = LlamaForCausalLM(LlamaConfig(**sizes))
        renames = [("model.transformer.ff_out.", "lm_head."), ("transformer.wte.", "embed_tokens."),
                   ("transformer.ln_f.", "norm."), ("transformer.blocks.", "layers."),
                   ("attn_norm.", "input_layernorm."), ("ff_norm.", "post_attention_layernorm."),
                   ("q_proj.", "self_attn.q_proj."), ("k_proj.", "self_attn.k_proj."),
                   ("v_proj.", "self_attn.v_proj."), ("attn_out.", "self_attn.o_proj."),
                   ("ff_proj.", "mlp.gate_proj."), ("up_proj.", "mlp.up_proj."),
                   ("ff_out.", "mlp.down_proj.")]
        for old, new in renames:
            tensors = {name.replace(old, new): value for name, value in tensors.items()}
    twin.load_state_dict(tensors, strict=True)
    return twin.eval()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_reference_forward_matches_transformers_run_bidirectionally(
    request: pytest.FixtureRequest, family: str
) -> None:
    """In fp32 (transformers' RMSNorm and RoPE compute in fp32 whatever the model's dtype):
    equal up to fp32 rounding in another order."""
    model = request.getfixturevalue(family)
    twin = _transformers_twin(model, request.getfixturevalue(f"{family}_tiny_dir"))
    x = _canvas(model)
    everything_visible = torch.zeros(1, 1, len(x), len(x))  # additive mask: no causal mask
    with torch.no_grad():
        expected = twin(input_ids=x[None], attention_mask=everything_visible).logits[0]
    torch.testing.assert_close(model.forward(x, torch.arange(len(x))), expected,
                               **forward_tolerance(expected, model))


def test_cached_logits_equal_full_forward_when_tokens_unchanged(model64: ReferenceModel) -> None:
    model = model64
    x = _canvas(model)
    length, start = len(x), len(PROMPT) + BLOCK // 2
    end = start + BLOCK // 2
    positions = torch.arange(length)
    full = model.forward(x, positions)
    tolerance = forward_tolerance(full, model)
    cache = model.new_cache(length)
    torch.testing.assert_close(model.forward(x, positions, cache, write_cache=True), full,
                               **tolerance)
    prefix = model.forward(x[start:], positions[start:], cache)
    torch.testing.assert_close(prefix, full[start:], **tolerance)
    dual = model.forward(x[start:end], positions[start:end], cache, write_cache=True)
    torch.testing.assert_close(dual, full[start:end], **tolerance)


def test_cached_step_reads_stale_keys_outside_window(model64: ReferenceModel) -> None:
    """Positions outside the window come from the cache, not from the current tokens."""
    model = model64
    x = _canvas(model)
    length, start, end = len(x), len(PROMPT), len(PROMPT) + BLOCK
    positions = torch.arange(length)
    cache = model.new_cache(length)
    before = model.forward(x, positions, cache, write_cache=True)
    x[3] = (x[3] + 1) % 256  # a prompt token changes; the cache is not refreshed
    stale = model.forward(x[start:end], positions[start:end], cache, write_cache=True)
    torch.testing.assert_close(stale, before[start:end], **forward_tolerance(before, model))
    assert not torch.allclose(model.forward(x, positions)[start:end], stale, atol=1e-3)


@pytest.mark.parametrize("cache_mode", ["prefix", "dual"])
def test_window_ignores_cached_values_at_its_own_positions(model64: ReferenceModel,
                                                           cache_mode: str) -> None:
    """A cached step uses fresh K/V for every window position, whatever the cache holds."""
    model = model64
    x = _canvas(model)
    length, start = len(x), len(PROMPT)
    end = length if cache_mode == "prefix" else start + BLOCK
    positions = torch.arange(length)
    cache = model.new_cache(length)
    full = model.forward(x, positions, cache, write_cache=True)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys[start:end], values[start:end] = torch.randn(2, end - start, *keys.shape[1:])
    window = model.forward(x[start:end], positions[start:end], cache,
                           write_cache=cache_mode == "dual")
    torch.testing.assert_close(window, full[start:end], **forward_tolerance(full, model))


def test_dual_step_writes_window_and_prefix_step_does_not(model64: ReferenceModel) -> None:
    model = model64
    x = _canvas(model)
    length, start, end = len(x), len(PROMPT), len(PROMPT) + BLOCK
    positions = torch.arange(length)
    cache = model.new_cache(length)
    model.forward(x, positions, cache, write_cache=True)
    old_keys = cache.keys[0].clone()
    x[start:end] = torch.arange(BLOCK)  # commit the block
    model.forward(x[start:], positions[start:], cache)  # PrefixCache step: no write
    torch.testing.assert_close(cache.keys[0], old_keys, atol=0, rtol=0)
    model.forward(x[start:end], positions[start:end], cache, write_cache=True)
    fresh = model.new_cache(length)
    model.forward(x, positions, fresh, write_cache=True)
    # Layer-0 keys depend only on token and position: the window now holds the new ones.
    torch.testing.assert_close(cache.keys[0][start:end], fresh.keys[0][start:end],
                               **forward_tolerance(fresh.keys[0], model))
    torch.testing.assert_close(cache.keys[0][end:], old_keys[end:], atol=0, rtol=0)


# --- the checkpoint files ----------------------------------------------------------------------


def test_llada_checkpoint_round_trips(llada_tiny_dir: Path) -> None:
    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    config = AutoConfig.from_pretrained(llada_tiny_dir)
    shape, ids = LLADA_TINY.shape, LLADA_TINY.token_ids
    assert isinstance(config, LLaDAConfig)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.num_hidden_layers, config.intermediate_size, config.head_dim) == (
        shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.num_layers,
        shape.intermediate_size, shape.hidden_size // shape.num_heads)
    assert (config.vocab_size, config.max_position_embeddings, config.tie_word_embeddings) == (
        shape.vocab_size, shape.max_position, False)
    tokenizer = AutoTokenizer.from_pretrained(llada_tiny_dir)
    assert tokenizer.convert_ids_to_tokens(config.mask_token_id) == "<|mdm_mask|>"
    assert tokenizer.eos_token_id == config.eos_token_id == ids["<|endoftext|>"]
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == ids["<|eot_id|>"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.encode(text)[:2] == [ids["<|startoftext|>"], ids["<|start_header_id|>"]]
    names = _tensor_names(llada_tiny_dir)
    assert "model.transformer.ff_out.weight" in names  # the untied LM head
    assert len(names) == 3 + 9 * shape.num_layers


def test_dream_checkpoint_round_trips(dream_tiny_dir: Path) -> None:
    AutoConfig.register("Dream", DreamConfig, exist_ok=True)
    config = AutoConfig.from_pretrained(dream_tiny_dir)
    shape, ids = DREAM_TINY.shape, DREAM_TINY.token_ids
    assert isinstance(config, DreamConfig)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.rope_theta, config.dtype) == (
        shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.vocab_size,
        shape.rope_theta, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(dream_tiny_dir)
    assert tokenizer.mask_token_id == config.mask_token_id == ids["<|mask|>"]
    assert tokenizer.eos_token_id == config.eos_token_id == ids["<|endoftext|>"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                        add_generation_prompt=True, tokenize=False)
    assert ids.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    names = _tensor_names(dream_tiny_dir)
    assert "model.layers.0.self_attn.k_proj.bias" in names
    assert len(names) == 3 + 12 * shape.num_layers
    assert json.loads((dream_tiny_dir / "config.json").read_text())["architectures"] == [
        "DreamModel"]


def _tensor_names(directory: Path) -> set[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return set(f.keys())


# --- the generator -----------------------------------------------------------------------------


@pytest.mark.parametrize("cache", MODES)
def test_generate_fills_every_position(model: ReferenceModel, cache: str) -> None:
    result = generate(model, PROMPT, gen_length=GEN, block_length=BLOCK, cache=cache)
    assert len(result.tokens) == GEN
    assert model.spec.mask_token_id not in result.canvas.tolist()
    assert result.canvas[: len(PROMPT)].tolist() == PROMPT
    assert BLOCKS <= result.num_forwards <= GEN  # at least one token per step


@pytest.mark.parametrize("cache", MODES)
def test_tiny_threshold_commits_each_block_in_one_forward(peaked: ReferenceModel,
                                                          cache: str) -> None:
    result = generate(peaked, PROMPT, gen_length=GEN, block_length=BLOCK, cache=cache,
                      threshold=1e-9)
    assert result.num_forwards == BLOCKS
    assert len(result.tokens) == GEN


def test_peaked_model_commits_several_tokens_per_step(peaked: ReferenceModel) -> None:
    result = generate(peaked, PROMPT, gen_length=GEN, block_length=BLOCK, threshold=0.9)
    assert result.num_forwards < GEN // 2
    assert len(result.tokens) == GEN


@pytest.mark.parametrize("cache", MODES)
def test_steps_equal_to_gen_length_commit_one_token_per_forward(llada: ReferenceModel,
                                                                cache: str) -> None:
    result = generate(llada, PROMPT, gen_length=GEN, block_length=BLOCK, cache=cache, steps=GEN)
    assert result.num_forwards == GEN
    assert len(result.tokens) == GEN


@pytest.mark.parametrize("steps, rule_steps_per_block", [(GEN, BLOCK - 1), (GEN // 2, BLOCK // 2)])
def test_dream_forwards_are_blocks_plus_rule_steps(dream: ReferenceModel, steps: int,
                                                  rule_steps_per_block: int) -> None:
    """Each block: one full forward committing position s, then the rule loop (M = B - 1)."""
    result = generate(dream, PROMPT, gen_length=GEN, block_length=BLOCK, steps=steps)
    assert result.num_forwards == BLOCKS * (1 + rule_steps_per_block)


def test_dream_block_start_commits_argmax_of_shifted_logits(dream: ReferenceModel) -> None:
    x = torch.tensor(PROMPT + [dream.spec.mask_token_id] * GEN)
    logits = dream.forward(x, torch.arange(len(x)))[len(PROMPT) - 1]  # hidden s-1 predicts s
    logits[dream.spec.mask_token_id] = float("-inf")
    result = generate(dream, PROMPT, gen_length=GEN, block_length=BLOCK, cache="dual")
    assert result.tokens[0] == int(logits.argmax())


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_end_token_stops_early(request: pytest.FixtureRequest, family: str) -> None:
    model = request.getfixturevalue(family)
    full = generate(model, PROMPT, gen_length=GEN, block_length=BLOCK, steps=GEN)
    end = full.tokens[5]  # first occurs in the first block, at index <= 5
    stopped = generate(model, PROMPT, gen_length=GEN, block_length=BLOCK, steps=GEN,
                       end_token_ids=[end])
    assert stopped.tokens == full.tokens[: full.tokens.index(end) + 1]
    assert stopped.num_forwards <= full.num_forwards - BLOCK
    assert model.spec.mask_token_id in stopped.canvas.tolist()  # the last block never ran


def test_mask_token_is_never_proposed(llada: ReferenceModel,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when MASK has by far the highest logit everywhere, no MASK is committed."""
    forward, mask = llada.forward, llada.spec.mask_token_id
    calls = []

    def mask_loving_forward(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) > BLOCK:  # committing MASK would never finish the block
            raise RuntimeError("the block does not progress")
        logits = forward(*args, **kwargs)
        logits[:, mask] += 1000.0
        return logits

    monkeypatch.setattr(llada, "forward", mask_loving_forward)
    result = generate(llada, PROMPT, gen_length=BLOCK, block_length=BLOCK, steps=BLOCK)
    assert mask not in result.tokens
    assert result.num_forwards == BLOCK


def test_max_tokens_stops_early(llada: ReferenceModel) -> None:
    full = generate(llada, PROMPT, gen_length=GEN, block_length=BLOCK, steps=GEN)
    cut = generate(llada, PROMPT, gen_length=GEN, block_length=BLOCK, steps=GEN, max_tokens=5)
    assert cut.tokens == full.tokens[:5]
    assert cut.num_forwards < full.num_forwards


def test_sampling_is_reproducible_per_seed(llada: ReferenceModel) -> None:
    def run(seed: int) -> list[int]:
        return generate(llada, PROMPT, gen_length=BLOCK, block_length=BLOCK, temperature=1.0,
                        remasking="random", seed=seed).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("kwargs", [
    {"gen_length": 48, "block_length": 32},
    {"gen_length": 64, "block_length": 32, "steps": 3},
    {"gen_length": 64, "block_length": 32, "threshold": 0.5, "factor": 1.0},
    {"gen_length": 64, "block_length": 32, "cache": "paged"},
])
def test_bad_arguments_raise(llada: ReferenceModel, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate(llada, PROMPT, **kwargs)


# --- the selection rules, on hand-made confidences -----------------------------------------------


def test_factor_rule_selects_longest_passing_prefix() -> None:
    # Sorted: .99 .9 .8 .3; bounds 1 - 1/(i+1): i=2 .667, i=3 .75, i=4 .8 -> 3 selected,
    # although the scan fails only at the last candidate.
    confidence = torch.tensor([0.3, 0.9, 0.99, 0.8])
    chosen = _select(confidence, Rule(factor=1.0), step=0, masked_at_start=4)
    assert sorted(chosen.tolist()) == [1, 2, 3]


def test_factor_rule_bound_for_the_second_is_one_third() -> None:
    # i = 2: bound 1 - 1/3 = .667, so .6 fails (a bound of 1 - f/i would have passed it).
    chosen = _select(torch.tensor([0.6, 0.99]), Rule(factor=1.0), step=0, masked_at_start=2)
    assert chosen.tolist() == [1]


def test_factor_rule_always_selects_the_best() -> None:
    chosen = _select(torch.tensor([0.2, 0.4, 0.1]), Rule(factor=0.1), step=0, masked_at_start=3)
    assert chosen.tolist() == [1]


def test_threshold_rule_takes_all_above_and_at_least_the_best() -> None:
    rule = Rule(threshold=0.9)
    assert sorted(_select(torch.tensor([0.95, 0.5, 0.9, 0.2]), rule, 0, 4).tolist()) == [0, 2]
    assert _select(torch.tensor([0.3, 0.5, 0.5]), rule, 0, 3).tolist() == [1]  # tie: lower


def test_steps_rule_quota_and_ties() -> None:
    rule = Rule(steps_per_block=3)  # M = 7 over 3 steps: quotas 3, 2, 2
    confidence = torch.tensor([0.5, 0.7, 0.5, 0.9, 0.5, 0.1, 0.5])
    assert sorted(_select(confidence, rule, step=0, masked_at_start=7).tolist()) == [0, 1, 3]
    assert sorted(_select(confidence, rule, step=1, masked_at_start=7).tolist()) == [1, 3]
    assert _select(confidence[:1], rule, step=2, masked_at_start=7).tolist() == [0]  # clipped


def test_decision_margins_catch_near_ties(llada: ReferenceModel) -> None:
    """The margins every engine comparison relies on: a near-tie in the ranking, a confidence
    next to its threshold and a near-equal top-2 proposal are each recorded, in logit units,
    and `assert_decisive` refuses a run that took one; a clear run passes."""
    near = Margins(scale=4.0)
    _select(torch.tensor([0.30, 0.3000003, 0.1]), Rule(steps_per_block=4), 0, 4, near)
    assert near.where == "confidence ranking at the cut" and near.smallest < 1e-6
    with pytest.raises(AssertionError, match="ranking at the cut"):
        assert_decisive(near, llada)
    at_threshold = Margins(scale=4.0)
    _select(torch.tensor([0.9000001, 0.2]), Rule(threshold=0.9), 0, 2, at_threshold)
    assert at_threshold.where == "confidence vs threshold" and at_threshold.smallest < 1e-6
    top2 = Margins(scale=4.0)
    top2.proposals(top2_gaps(torch.tensor([[1.0, 1.0 + 1e-6, -2.0], [3.0, 0.0, 1.0]])))
    assert top2.smallest == pytest.approx(1e-6, abs=1e-7)
    clear = Margins(scale=4.0)
    _select(torch.tensor([0.6, 0.3, 0.1]), Rule(steps_per_block=4), 0, 4, clear)
    assert_decisive(clear, llada)
