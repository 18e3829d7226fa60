"""The block-diffusion oracle (tests/reference/block_*.py) and its tiny checkpoints
(vllm_dllm/testing/block_checkpoints.py).

No vLLM here: these tests pin down the specification the engine will be compared against, so
they check the oracle against independent facts: transformers' own Qwen2 / Qwen3 forwards under
a block-causal mask, full forwards against cached ones, forward counts that follow from the loop
rules, and selections recomputed by hand from the model's logits.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.reference.block_generate import (
    _filtered_probs,
    generate_fast_dllm_v2,
    generate_sdar,
)
from tests.reference.block_model import (
    FAST_DLLM_V2,
    SDAR,
    BlockReferenceModel,
    block_causal_mask,
)
from tests.tolerances import forward_tolerance
from vllm_dllm.testing.block_checkpoints import (
    ENDOFTEXT,
    IM_END,
    MASK,
    BlockShape,
    write_fast_dllm_v2_checkpoint,
    write_sdar_checkpoint,
)

PROMPT = list(b"Hello, world")  # 12 tokens: ends inside Fast-dLLM v2's first block of 32
PEAKED_LOGIT_SCALE = 30.0
NO_END: list[int] = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: OpenMP threads cost more than they give on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fast_dllm_v2_checkpoint(tmp_path_factory.mktemp("fast_dllm_v2"))


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sdar_checkpoint(tmp_path_factory.mktemp("sdar"))


@pytest.fixture(scope="module")
def v2(v2_dir: Path) -> BlockReferenceModel:
    return BlockReferenceModel(v2_dir)


@pytest.fixture(scope="module")
def sdar(sdar_dir: Path) -> BlockReferenceModel:
    return BlockReferenceModel(sdar_dir)


@pytest.fixture(scope="module")
def v2_peaked(tmp_path_factory: pytest.TempPathFactory) -> BlockReferenceModel:
    return BlockReferenceModel(
        write_fast_dllm_v2_checkpoint(
            tmp_path_factory.mktemp("fast_dllm_v2_peaked"), logit_scale=PEAKED_LOGIT_SCALE
        )
    )


@pytest.fixture(scope="module")
def sdar_peaked(tmp_path_factory: pytest.TempPathFactory) -> BlockReferenceModel:
    return BlockReferenceModel(
        write_sdar_checkpoint(
            tmp_path_factory.mktemp("sdar_peaked"), logit_scale=PEAKED_LOGIT_SCALE
        )
    )


@pytest.fixture(params=["v2", "sdar"])
def model(request: pytest.FixtureRequest) -> BlockReferenceModel:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["v2", "sdar"])
def model64(request: pytest.FixtureRequest) -> BlockReferenceModel:
    """The oracle in float64, for claims that two computations agree up to rounding: fp32
    rounding differs between CPUs, float64 rounding is far below anything the claims compare."""
    return BlockReferenceModel(request.getfixturevalue(f"{request.param}_dir"), torch.float64)


def _canvas(model: BlockReferenceModel, blocks: int = 3, extra: int = 5) -> torch.Tensor:
    """Random tokens (MASK among them) over ``blocks`` whole blocks and a partial one."""
    length = blocks * model.spec.block_size + extra
    x = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(1))
    x[-extra:] = model.spec.mask_token_id
    return x


# --- (a) the forward against transformers --------------------------------------------------------


def _transformers_twin(model: BlockReferenceModel, checkpoint: Path) -> PreTrainedModel:
    """The same weights in transformers' own Qwen2 (Fast-dLLM v2) / Qwen3 (SDAR) code.

    The released tensor names are the Qwen2 / Qwen3 names, so they load unchanged; a tied
    checkpoint has no ``lm_head.weight`` and transformers ties it to the embedding.
    """
    spec = model.spec
    sizes = {
        "vocab_size": spec.vocab_size,
        "hidden_size": model.embed.shape[1],
        "intermediate_size": model.layers[0]["gate"].shape[0],
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": spec.tie_word_embeddings,
    }
    if spec.family == FAST_DLLM_V2:
        twin = Qwen2ForCausalLM(Qwen2Config(**sizes))
    else:
        twin = Qwen3ForCausalLM(Qwen3Config(head_dim=spec.head_dim, attention_bias=False, **sizes))
    result = twin.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == (["lm_head.weight"] if spec.tie_word_embeddings else [])
    return twin.eval()


@pytest.mark.parametrize("family", ["v2", "sdar"])
def test_forward_matches_transformers_under_block_causal_mask(
    request: pytest.FixtureRequest, family: str
) -> None:
    """In fp32 (transformers' RMSNorm and RoPE compute in fp32 whatever the model's dtype):
    equal up to fp32 rounding in another order."""
    model = request.getfixturevalue(family)
    twin = _transformers_twin(model, request.getfixturevalue(f"{family}_dir"))
    x = _canvas(model, blocks=3 if family == "v2" else 7)
    visible = block_causal_mask(len(x), model.spec.block_size)
    additive = torch.zeros(len(x), len(x)).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = twin(input_ids=x[None], attention_mask=additive[None, None]).logits[0]
    torch.testing.assert_close(model.forward(x, 0), expected, **forward_tolerance(expected, model))


def test_block_causal_mask_layout() -> None:
    mask = block_causal_mask(6, 2)
    assert mask[0].tolist() == [True, True, False, False, False, False]  # own block, both ways
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert mask[5].all()


def test_later_blocks_never_change_earlier_logits(model: BlockReferenceModel) -> None:
    x, block = _canvas(model), model.spec.block_size
    full = model.forward(x, 0)
    changed = x.clone()
    changed[2 * block + 1] = (changed[2 * block + 1] + 1) % 256
    after = model.forward(changed, 0)
    torch.testing.assert_close(after[: 2 * block], full[: 2 * block], atol=0, rtol=0)
    # ... while the changed token's own block (both directions) does see it.
    assert not torch.allclose(after[2 * block], full[2 * block], atol=1e-4)


# --- (b) cached forwards -------------------------------------------------------------------------


def test_cached_blocks_equal_full_forward(model64: BlockReferenceModel) -> None:
    model = model64
    x, block = _canvas(model), model.spec.block_size
    full = model.forward(x, 0)
    tolerance = forward_tolerance(full, model)
    whole = model.new_cache()  # prefill of two blocks at once
    torch.testing.assert_close(
        model.forward(x[: 2 * block], 0, whole, write_until=2 * block), full[: 2 * block],
        **tolerance,
    )
    stepwise = model.new_cache()  # one finished block at a time
    for start in (0, block):
        model.forward(x[start : start + block], start, stepwise, write_until=start + block)
    assert whole.length == stepwise.length == 2 * block
    for cache in (whole, stepwise):
        torch.testing.assert_close(
            model.forward(x[2 * block :], 2 * block, cache), full[2 * block :], **tolerance
        )
        assert cache.length == 2 * block  # a step without write_until leaves the cache alone
    for mine, theirs in zip(
        whole.keys + whole.values, stepwise.keys + stepwise.values, strict=True
    ):
        torch.testing.assert_close(mine, theirs, **forward_tolerance(theirs, model))


def test_folded_block_write_equals_separate_write(model64: BlockReferenceModel) -> None:
    """One forward over a finished block and the next, writing only the first: same logits for
    the second block and the same cache as a separate finished-block forward."""
    model = model64
    x, block = _canvas(model), model.spec.block_size
    full = model.forward(x, 0)
    folded, separate = model.new_cache(), model.new_cache()
    for cache in (folded, separate):
        model.forward(x[:block], 0, cache, write_until=block)
    logits = model.forward(x[block : 3 * block], block, folded, write_until=2 * block)
    torch.testing.assert_close(logits, full[block : 3 * block], **forward_tolerance(full, model))
    model.forward(x[block : 2 * block], block, separate, write_until=2 * block)
    assert folded.length == separate.length == 2 * block
    torch.testing.assert_close(
        folded.keys[-1], separate.keys[-1], **forward_tolerance(separate.keys[-1], model)
    )


def test_window_must_start_where_cache_ends(model: BlockReferenceModel) -> None:
    x, block = _canvas(model), model.spec.block_size
    cache = model.new_cache()
    model.forward(x[:block], 0, cache, write_until=block)
    with pytest.raises(ValueError, match="skip positions"):
        model.forward(x[2 * block : 3 * block], 2 * block, cache)


def test_sub_block_cache_is_exact_when_fresh_and_stale_after_a_commit(v2_dir: Path) -> None:
    """Fast-dLLM v2's sub-block cache: rows of the current sub-block recomputed against the
    block's stored K/V. Exact (up to rounding: compared in float64, whose rounding no CPU
    brings near the tolerance) while the block is unchanged; after a token elsewhere in the
    block changes, the step still reads the stored (stale) K/V, as released."""
    v2 = BlockReferenceModel(v2_dir, torch.float64)
    block, small = v2.spec.block_size, 8
    x = _canvas(v2)
    start, end = block, 2 * block
    cache = v2.new_cache()
    v2.forward(x[:start], 0, cache, write_until=start)
    full_block, block_kv = v2.forward(x[start:end], start, cache, capture_block=True)
    sub = slice(start + small, start + 2 * small)
    tolerance = forward_tolerance(full_block, v2)
    torch.testing.assert_close(
        v2.forward(x[sub], sub.start, cache, block_kv=block_kv),
        full_block[small : 2 * small],
        **tolerance,
    )
    x[start + 3] = (x[start + 3] + 1) % 256  # a commit in another sub-block of this block
    stale = v2.forward(x[sub], sub.start, cache, block_kv=block_kv)
    torch.testing.assert_close(stale, full_block[small : 2 * small], **tolerance)
    fresh = v2.forward(x[start:end], start, cache)[small : 2 * small]
    assert not torch.allclose(stale, fresh, atol=1e-4)
    # The step wrote its fresh rows into the store (layer 0 keys depend on token and position).
    x[sub.start] = (x[sub.start] + 1) % 256
    v2.forward(x[sub], sub.start, cache, block_kv=block_kv)
    _, recomputed = v2.forward(x[start:end], start, cache, capture_block=True)
    torch.testing.assert_close(
        block_kv.keys[0][small : 2 * small],
        recomputed.keys[0][small : 2 * small],
        **forward_tolerance(recomputed.keys[0], v2),
    )


# --- the checkpoint files ------------------------------------------------------------------------


def _tensor_names(directory: Path) -> set[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_fast_dllm_v2_checkpoint_layout(v2_dir: Path, v2: BlockReferenceModel) -> None:
    config = json.loads((v2_dir / "config.json").read_text())
    assert config["architectures"] == ["Fast_dLLM_QwenForCausalLM"]
    assert (config["model_type"], config["bd_size"], config["tie_word_embeddings"]) == (
        "Fast_dLLM_Qwen",
        32,
        True,
    )
    assert "mask_token_id" not in config  # as released: the id comes from the tokenizer
    names = _tensor_names(v2_dir)
    assert "lm_head.weight" not in names and "model.layers.1.self_attn.v_proj.bias" in names
    assert len(names) == 2 + 12 * BlockShape.FAST_DLLM_V2.num_layers
    spec = v2.spec
    assert (spec.family, spec.mask_token_id, spec.end_token_ids, spec.head_dim) == (
        FAST_DLLM_V2,
        MASK,
        (IM_END,),
        64,
    )
    tokenizer = AutoTokenizer.from_pretrained(v2_dir)
    assert tokenizer.convert_ids_to_tokens(MASK) == "|<MASK>|"
    assert tokenizer.eos_token_id == IM_END
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_sdar_checkpoint_layout(sdar_dir: Path, sdar: BlockReferenceModel) -> None:
    config = json.loads((sdar_dir / "config.json").read_text())
    assert config["architectures"] == ["SDARForCausalLM"]
    assert (config["model_type"], config["block_size"], config["mask_token_id"]) == (
        "sdar",
        4,
        MASK,
    )
    names = _tensor_names(sdar_dir)
    assert {
        "lm_head.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight",
    } <= names
    assert not any(name.endswith("_proj.bias") for name in names)
    assert len(names) == 3 + 11 * BlockShape.SDAR.num_layers
    spec = sdar.spec
    assert spec.num_heads * spec.head_dim != config["hidden_size"]  # head_dim read, not derived
    assert (spec.family, spec.block_size, spec.end_token_ids) == (SDAR, 4, (IM_END, ENDOFTEXT))
    assert AutoTokenizer.from_pretrained(sdar_dir).convert_ids_to_tokens(MASK) == "<|MASK|>"


# --- (c) Fast-dLLM v2's loop ---------------------------------------------------------------------


def _greedy(logits_row: torch.Tensor, mask: int) -> int:
    row = logits_row.clone()
    row[mask] = float("-inf")
    return int(row.argmax())


def test_v2_first_step_uses_shifted_logits_in_block_aligned_sub_block(
    v2: BlockReferenceModel,
) -> None:
    """Prompt of 12: the first sub-block with masks is [8, 16) (aligned to the block, not to
    generation start); slot i is scored by row i-1; the most confident of 12..15 is committed."""
    mask, start = v2.spec.mask_token_id, len(PROMPT)
    x = torch.tensor(PROMPT + [mask] * (32 - start))
    logits = v2.forward(x, 0)
    logits[:, mask] = float("-inf")
    rows = logits[start - 1 : 15]  # rows 11..14 score slots 12..15
    confidence = rows.softmax(-1).max(-1).values
    slot = start + int(confidence.argmax())
    result = generate_fast_dllm_v2(
        v2, PROMPT, max_new_tokens=12, threshold=1.0, end_token_ids=NO_END
    )
    assert int(result.canvas[slot]) == int(rows[slot - start].argmax())
    assert result.canvas[:start].tolist() == PROMPT
    # Threshold 1: one commit per step; the 4 slots of [12, 16) then the 8 of [16, 24).
    assert result.num_forwards == 12 and len(result.tokens) == 12


@pytest.mark.parametrize("prompt_blocks", [1, 2])
def test_v2_prompt_on_boundary_starts_with_prefill_argmax(
    v2: BlockReferenceModel, prompt_blocks: int
) -> None:
    """A prompt of whole blocks (one block included, which the release never prefills) is
    prefilled; the last row's argmax is the first token; then 31 single-commit steps, the
    finished-block forward and its token: 33 tokens in 1 + 31 + 1 forwards."""
    prompt = (PROMPT * 6)[: 32 * prompt_blocks]
    full = v2.forward(torch.tensor(prompt), 0)
    result = generate_fast_dllm_v2(
        v2, prompt, max_new_tokens=33, threshold=1.0, end_token_ids=NO_END
    )
    assert result.tokens[0] == _greedy(full[-1], v2.spec.mask_token_id)
    assert result.num_forwards == 33 and len(result.tokens) == 33
    # The finished-block forward's last row gives token 33: check it on the full canvas.
    canvas = torch.tensor(prompt + result.tokens[:32])
    assert result.tokens[32] == _greedy(v2.forward(canvas, 0)[-1], v2.spec.mask_token_id)
    # Stopping at 32 tokens skips that forward.
    cut = generate_fast_dllm_v2(v2, prompt, max_new_tokens=32, threshold=1.0, end_token_ids=NO_END)
    assert cut.tokens == result.tokens[:32] and cut.num_forwards == 32


def test_v2_mid_block_prompt_is_never_changed_and_blocks_chain(v2: BlockReferenceModel) -> None:
    result = generate_fast_dllm_v2(v2, PROMPT, max_new_tokens=53, end_token_ids=NO_END)
    assert result.canvas[: len(PROMPT)].tolist() == PROMPT
    assert len(result.tokens) == 53 and v2.spec.mask_token_id not in result.tokens
    # 20 + 32 slots, the second block's first slot from the first block's finished forward:
    # every slot needs one step at most, plus 2 finished-block forwards, no prefill.
    assert 3 <= result.num_forwards <= 20 + 31 + 2


def test_v2_prompt_past_one_block_and_mid_block(v2: BlockReferenceModel) -> None:
    """Prompt 40: [0, 32) prefilled; block [32, 64) holds 8 prompt tokens (recomputed with the
    masks every step) and 24 masks in sub-blocks [40, 48) [48, 56) [56, 64); threshold 1 commits
    one per step: 1 + 24 forwards, and the request ends before the finished-block forward."""
    prompt = (PROMPT * 4)[:40]
    result = generate_fast_dllm_v2(
        v2, prompt, max_new_tokens=24, threshold=1.0, end_token_ids=NO_END
    )
    assert result.num_forwards == 1 + 24 and len(result.tokens) == 24
    assert result.canvas[:40].tolist() == prompt


def test_v2_early_stop_at_end_token(v2: BlockReferenceModel) -> None:
    full = generate_fast_dllm_v2(v2, PROMPT, max_new_tokens=64, end_token_ids=NO_END)
    end = full.tokens[3]
    stopped = generate_fast_dllm_v2(v2, PROMPT, max_new_tokens=64, end_token_ids=[end])
    assert stopped.tokens == full.tokens[: full.tokens.index(end) + 1]
    assert stopped.num_forwards < full.num_forwards - 20  # the later blocks never ran


def test_v2_sub_block_cache_changes_nothing_when_sub_block_is_block(
    v2: BlockReferenceModel,
) -> None:
    plain = generate_fast_dllm_v2(
        v2, PROMPT, max_new_tokens=40, small_block_size=32, end_token_ids=NO_END
    )
    cached = generate_fast_dllm_v2(
        v2,
        PROMPT,
        max_new_tokens=40,
        small_block_size=32,
        use_block_cache=True,
        end_token_ids=NO_END,
    )
    assert (cached.tokens, cached.num_forwards) == (plain.tokens, plain.num_forwards)


def test_v2_sub_block_cache_recomputes_only_the_sub_block(
    v2: BlockReferenceModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With sub-blocks of 8, a step whose sub-block starts committed forwards 8 rows against the
    stored block K/V; a step whose sub-block starts masked forwards the whole block. Outputs
    differ from the uncached loop here (stale K/V), as in the release."""
    widths: list[int] = []
    first_slots_of_sub_block_steps: list[int] = []
    forward = v2.forward

    def spy(ids: torch.Tensor, *args: object, **kwargs: object) -> object:
        widths.append(len(ids))
        if len(ids) == 8:
            first_slots_of_sub_block_steps.append(int(ids[0]))
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(v2, "forward", spy)
    cached = generate_fast_dllm_v2(
        v2, PROMPT, max_new_tokens=52, use_block_cache=True, end_token_ids=NO_END
    )
    assert widths.count(8) > 0 and set(widths) == {8, 32}
    assert v2.spec.mask_token_id not in first_slots_of_sub_block_steps
    assert len(widths) == cached.num_forwards
    monkeypatch.undo()
    plain = generate_fast_dllm_v2(v2, PROMPT, max_new_tokens=52, end_token_ids=NO_END)
    assert cached.tokens != plain.tokens


def test_v2_peaked_model_commits_several_tokens_per_forward(v2_peaked: BlockReferenceModel) -> None:
    result = generate_fast_dllm_v2(
        v2_peaked, PROMPT, max_new_tokens=64, threshold=0.9, end_token_ids=NO_END
    )
    assert len(result.tokens) == 64 and result.num_forwards < 64 // 2


def test_v2_mask_is_never_proposed(
    v2: BlockReferenceModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward, mask = v2.forward, v2.spec.mask_token_id

    def mask_loving(*args: object, **kwargs: object) -> torch.Tensor:
        logits = forward(*args, **kwargs)
        logits[:, mask] += 1000.0
        return logits

    monkeypatch.setattr(v2, "forward", mask_loving)
    result = generate_fast_dllm_v2(
        v2, PROMPT, max_new_tokens=21, threshold=1.0, end_token_ids=NO_END
    )
    assert mask not in result.tokens and len(result.tokens) == 21
    assert result.num_forwards == 20 + 1  # 20 single commits, the finished block's token


def test_v2_sampling_is_reproducible_per_seed(v2: BlockReferenceModel) -> None:
    def run(seed: int) -> list[int]:
        return generate_fast_dllm_v2(
            v2, PROMPT, max_new_tokens=20, temperature=1.0, seed=seed, end_token_ids=NO_END
        ).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


# --- (c) SDAR's loop -----------------------------------------------------------------------------


def test_sdar_static_steps_forward_count(sdar: BlockReferenceModel) -> None:
    """Prompt 12 = 3 whole blocks of 4: 1 prefill; 32 tokens = 8 blocks of 4 single-commit steps;
    a finished-block forward after each block but the last: 1 + 32 + 7."""
    result = generate_sdar(
        sdar, PROMPT, max_new_tokens=32, remasking="low_confidence_static", end_token_ids=NO_END
    )
    assert len(result.tokens) == 32 and result.num_forwards == 1 + 32 + 7
    halved = generate_sdar(
        sdar,
        PROMPT,
        max_new_tokens=32,
        denoising_steps=2,
        remasking="low_confidence_static",
        end_token_ids=NO_END,
    )
    assert halved.num_forwards == 1 + 16 + 7
    one_block = generate_sdar(
        sdar, PROMPT[:4], max_new_tokens=4, remasking="low_confidence_static", end_token_ids=NO_END
    )
    assert one_block.num_forwards == 1 + 4  # a prompt of exactly one block is prefilled


def test_sdar_first_step_scores_each_slot_by_its_own_row(sdar: BlockReferenceModel) -> None:
    """Prompt 6: block [4, 8) holds prompt 4, 5 and masks 6, 7; no shift, quota 1."""
    prompt, mask = PROMPT[:6], sdar.spec.mask_token_id
    logits = sdar.forward(torch.tensor(prompt + [mask, mask]), 0)
    logits[:, mask] = float("-inf")
    confidence = logits[6:8].softmax(-1).max(-1).values
    slot = 6 + int(confidence.argmax())
    result = generate_sdar(
        sdar, prompt, max_new_tokens=2, remasking="low_confidence_static", end_token_ids=NO_END
    )
    assert int(result.canvas[slot]) == int(logits[slot].argmax())
    assert result.num_forwards == 1 + 2  # prefill of [0, 4), then one commit per step


def test_sdar_quota_never_overwrites_prompt_or_committed_tokens(sdar: BlockReferenceModel) -> None:
    """One step per block: quota 4, but the prompt's partial block has 2 masks; exactly they are
    committed and the prompt stays (the released top-k would overwrite two prompt slots)."""
    prompt = PROMPT[:6]
    result = generate_sdar(
        sdar,
        prompt,
        max_new_tokens=10,
        denoising_steps=1,
        remasking="low_confidence_static",
        end_token_ids=NO_END,
    )
    assert result.canvas[:6].tolist() == prompt
    assert len(result.tokens) == 10
    # prefill, then blocks [4,8) [8,12) [12,16) in one step each, 2 finished-block forwards
    assert result.num_forwards == 1 + 3 + 2


def test_sdar_dynamic_commits_above_threshold_static_keeps_quota(
    sdar_peaked: BlockReferenceModel,
) -> None:
    dynamic = generate_sdar(sdar_peaked, PROMPT, max_new_tokens=32, end_token_ids=NO_END)
    static = generate_sdar(
        sdar_peaked,
        PROMPT,
        max_new_tokens=32,
        remasking="low_confidence_static",
        end_token_ids=NO_END,
    )
    assert static.num_forwards == 1 + 32 + 7
    assert dynamic.num_forwards < static.num_forwards  # several commits per forward
    everything = generate_sdar(
        sdar_peaked, PROMPT, max_new_tokens=32, threshold=0.0, end_token_ids=NO_END
    )
    assert everything.num_forwards == 1 + 8 + 7  # every block in one step
    assert len(dynamic.tokens) == len(static.tokens) == len(everything.tokens) == 32


def test_sdar_folding_the_block_write_keeps_tokens(sdar: BlockReferenceModel) -> None:
    separate = generate_sdar(sdar, PROMPT, max_new_tokens=32, end_token_ids=NO_END)
    folded = generate_sdar(
        sdar, PROMPT, max_new_tokens=32, fold_finished_block=True, end_token_ids=NO_END
    )
    assert folded.tokens == separate.tokens
    assert folded.num_forwards == separate.num_forwards - 7


def test_sdar_last_block_is_decoded_past_max_tokens(sdar: BlockReferenceModel) -> None:
    """max 5 after a 12-token prompt: the canvas ends at 20, a whole block [16, 20) of masks;
    the output is the first 5 tokens of the longer run, and it stops once they are final."""
    short = generate_sdar(sdar, PROMPT, max_new_tokens=5, end_token_ids=NO_END)
    longer = generate_sdar(sdar, PROMPT, max_new_tokens=8, end_token_ids=NO_END)
    assert len(short.canvas) == 20 and len(short.tokens) == 5
    assert short.tokens == longer.tokens[:5]
    assert short.num_forwards <= longer.num_forwards


def test_sdar_early_stop_at_end_token(sdar: BlockReferenceModel) -> None:
    full = generate_sdar(sdar, PROMPT, max_new_tokens=32, end_token_ids=NO_END)
    end = full.tokens[5]
    stopped = generate_sdar(sdar, PROMPT, max_new_tokens=32, end_token_ids=[end])
    assert stopped.tokens == full.tokens[: full.tokens.index(end) + 1]
    assert stopped.num_forwards < full.num_forwards - 10
    default = generate_sdar(sdar, PROMPT, max_new_tokens=32)  # the checkpoint's end ids
    assert not set(default.tokens[:-1]) & {IM_END, ENDOFTEXT}


def test_sdar_sampling_is_reproducible_per_seed(sdar: BlockReferenceModel) -> None:
    def run(seed: int) -> list[int]:
        return generate_sdar(
            sdar, PROMPT, max_new_tokens=16, temperature=1.0, seed=seed, end_token_ids=NO_END
        ).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


# --- shared pieces -------------------------------------------------------------------------------


def test_top_p_keeps_smallest_nucleus_and_renormalises() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = _filtered_probs(logits, top_k=0, top_p=0.7)  # 0.5 then 0.3 reach 0.8 > 0.7
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0]]))
    top1 = _filtered_probs(logits, top_k=1, top_p=1.0)
    torch.testing.assert_close(top1, torch.tensor([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"small_block_size": 12},
        {"max_new_tokens": 0},
        {"temperature": -1.0},
    ],
)
def test_v2_bad_arguments_raise(v2: BlockReferenceModel, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_fast_dllm_v2(v2, PROMPT, **{"max_new_tokens": 8, **kwargs})


@pytest.mark.parametrize("kwargs", [{"remasking": "random"}, {"denoising_steps": 0}])
def test_sdar_bad_arguments_raise(sdar: BlockReferenceModel, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_sdar(sdar, PROMPT, max_new_tokens=8, **kwargs)
