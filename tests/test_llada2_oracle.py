"""The LLaDA 2.x oracle (tests/reference/llada2_*.py) and its tiny checkpoints.

No vLLM here: these tests pin down the specification the engine will be compared against, so
they check the oracle against independent facts: a full-mask forward written separately below
(the release's additive block mask, SDPA, routing by sorting in Python, experts run densely one
by one), full forwards against cached ones, and every step's commits recomputed by hand from
the logits the loop saw.
"""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer

from tests.reference.block_model import BlockKVCache
from tests.reference.llada2_generate import generate_llada2, generate_llada21
from tests.reference.llada2_model import LLaDA2ReferenceModel, moe, route
from tests.tolerances import forward_tolerance
from vllm_dllm.testing.llada2_checkpoints import (
    ENDOFTEXT,
    MASK,
    PEAKED_LOGIT_SCALE,
    STARTOFTEXT,
    MoeShape,
    write_llada2_checkpoint,
)
from vllm_dllm.transformers_utils import register_configs
from vllm_dllm.transformers_utils.configs import LLaDA2MoeConfig

BLOCK = 32
PROMPT = list(b"Hello, world")  # 12 tokens: ends inside the first block
BOUNDARY_PROMPT = list(b"The quick brown fox jumps over t")  # 32 tokens: one whole block
NO_END: list[int] = []


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: OpenMP threads cost more than they give on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llada2_checkpoint(tmp_path_factory.mktemp("llada2"))


@pytest.fixture(scope="module")
def model(ckpt_dir: Path) -> LLaDA2ReferenceModel:
    return LLaDA2ReferenceModel(ckpt_dir)


@pytest.fixture(scope="module")
def model64(ckpt_dir: Path) -> LLaDA2ReferenceModel:
    """The oracle in float64, for claims that two computations agree up to rounding."""
    return LLaDA2ReferenceModel(ckpt_dir, torch.float64)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory: pytest.TempPathFactory) -> LLaDA2ReferenceModel:
    path = tmp_path_factory.mktemp("llada2_peaked")
    return LLaDA2ReferenceModel(write_llada2_checkpoint(path, logit_scale=PEAKED_LOGIT_SCALE))


# --- checkpoint -------------------------------------------------------------------------------


def test_checkpoint_reads_back_with_the_config_class(ckpt_dir: Path) -> None:
    register_configs()
    config = AutoConfig.from_pretrained(ckpt_dir)
    shape = MoeShape()
    assert isinstance(config, LLaDA2MoeConfig)
    assert config.architectures == ["LLaDA2MoeModelLM"]
    assert (config.num_experts, config.num_experts_per_tok, config.n_group, config.topk_group) == (
        shape.num_experts,
        shape.num_experts_per_tok,
        shape.n_group,
        shape.topk_group,
    )
    assert config.head_dim == shape.head_dim and config.num_key_value_heads == shape.num_kv_heads
    assert config.first_k_dense_replace == 1 and config.num_shared_experts == 1
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.eos_token_id == config.pad_token_id == ENDOFTEXT
    # Keys the upstream class does not name survive as attributes.
    assert config.norm_topk_prob is True and config.score_function == "sigmoid"
    assert not config.tie_word_embeddings


def test_sliding_window_exists_only_when_switched_on() -> None:
    """The release keeps `sliding_window: 4096` beside `use_sliding_window: false`; vLLM reads
    `sliding_window` alone, so the config class clears it unless the flag is on."""
    assert LLaDA2MoeConfig(sliding_window=4096).sliding_window is None
    assert LLaDA2MoeConfig(use_sliding_window=True, sliding_window=4096).sliding_window == 4096


def test_checkpoint_tensor_names_are_the_released_ones(
    ckpt_dir: Path, model: LLaDA2ReferenceModel
) -> None:
    names = set(load_file(ckpt_dir / "model.safetensors"))
    expected = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    mlp = ("gate_proj", "up_proj", "down_proj")
    for i in range(3):
        p = f"model.layers.{i}."
        expected |= {
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            p + "attention.query_key_value.weight",
            p + "attention.dense.weight",
            p + "attention.query_layernorm.weight",
            p + "attention.key_layernorm.weight",
        }
        if i == 0:
            expected |= {p + f"mlp.{m}.weight" for m in mlp}
        else:
            expected |= {p + "mlp.gate.weight", p + "mlp.gate.expert_bias"}
            expected |= {p + f"mlp.experts.{e}.{m}.weight" for e in range(4) for m in mlp}
            expected |= {p + f"mlp.shared_experts.{m}.weight" for m in mlp}
    assert names == expected
    assert model.spec.mask_token_id == MASK and model.spec.end_token_ids == (ENDOFTEXT,)


def test_tokenizer_and_chat_template(ckpt_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    assert tokenizer.mask_token_id == MASK and tokenizer.eos_token_id == ENDOFTEXT
    assert tokenizer.bos_token_id == STARTOFTEXT
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|>"
        "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    )


# --- forward ----------------------------------------------------------------------------------


def _independent_logits(directory: Path, ids: Tensor, block: int) -> Tensor:
    """A full-mask forward written apart from the oracle, on the release's recipe, in float64.

    The mask is built as the release's generate() builds it (block lower-triangular ones,
    repeated, ``log`` -> 0 / -inf, added to the scores by SDPA); routing sorts in Python and
    every expert runs on every token, its output weighted by a dense token x expert matrix.
    """
    config = json.loads((directory / "config.json").read_text())
    t = {k: v.double() for k, v in load_file(directory / "model.safetensors").items()}
    n, heads, kv_heads = len(ids), config["num_attention_heads"], config["num_key_value_heads"]
    dim, eps = config["head_dim"], config["rms_norm_eps"]
    blocks = -(-n // block)
    mask = (
        torch.tril(torch.ones(blocks, blocks, dtype=torch.float64))
        .repeat_interleave(block, 0)
        .repeat_interleave(block, 1)[:n, :n]
        .log()
    )
    rot = int(dim * config["partial_rotary_factor"])
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot)
    freqs = torch.outer(torch.arange(n).float(), inv_freq)  # in fp32, as the release computes it
    angles = torch.cat([freqs, freqs], -1)
    cos, sin = angles.cos().double(), angles.sin().double()

    def norm(x: Tensor, weight: Tensor) -> Tensor:
        return weight * (x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt())

    def rope(x: Tensor) -> Tensor:  # [heads, n, dim]
        r, rest = x[..., :rot], x[..., rot:]
        half = torch.cat([-r[..., rot // 2 :], r[..., : rot // 2]], -1)
        return torch.cat([r * cos + half * sin, rest], -1)

    h = t["model.word_embeddings.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, t[p + "input_layernorm.weight"])
        qkv = (x @ t[p + "attention.query_key_value.weight"].T).view(n, -1, dim).transpose(0, 1)
        q, k, v = qkv[:heads], qkv[heads : heads + kv_heads], qkv[heads + kv_heads :]
        q = rope(norm(q, t[p + "attention.query_layernorm.weight"]))
        k = rope(norm(k, t[p + "attention.key_layernorm.weight"]))
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + attn.transpose(0, 1).reshape(n, -1) @ t[p + "attention.dense.weight"].T
        x = norm(h, t[p + "post_attention_layernorm.weight"])
        if i < config["first_k_dense_replace"]:
            h = h + _mlp(x, t, p + "mlp.")
        else:
            h = h + _moe_by_expert_loop(x, t, p, config) + _mlp(x, t, p + "mlp.shared_experts.")
    return norm(h, t["model.norm.weight"]) @ t["lm_head.weight"].T


def _mlp(x: Tensor, t: dict[str, Tensor], prefix: str) -> Tensor:
    gate, up, down = (t[prefix + f"{m}_proj.weight"] for m in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _dense_routing(x: Tensor, t: dict[str, Tensor], p: str, config: dict) -> Tensor:
    """``[T, E]`` routing weights, 0 for experts not chosen; one token at a time."""
    experts, groups = config["num_experts"], config["n_group"]
    per_group = experts // groups
    scores = torch.sigmoid(x @ t[p + "mlp.gate.weight"].T)
    biased = scores + t[p + "mlp.gate.expert_bias"]
    dense = torch.zeros_like(scores)
    for row in range(len(x)):
        b = biased[row].tolist()

        def group_score(g: int, b: list[float] = b) -> float:
            return sum(sorted(b[g * per_group : (g + 1) * per_group], reverse=True)[:2])

        kept = sorted(range(groups), key=group_score, reverse=True)[: config["topk_group"]]
        allowed = [e for e in range(experts) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e, b=b: b[e], reverse=True)
        chosen = chosen[: config["num_experts_per_tok"]]
        total = sum(float(scores[row, e]) for e in chosen)
        for e in chosen:
            dense[row, e] = scores[row, e] / total * config["routed_scaling_factor"]
    return dense


def _moe_by_expert_loop(x: Tensor, t: dict[str, Tensor], p: str, config: dict) -> Tensor:
    dense = _dense_routing(x, t, p, config)
    out = torch.zeros_like(x)
    for e in range(config["num_experts"]):
        out += dense[:, e : e + 1] * _mlp(x, t, p + f"mlp.experts.{e}.")
    return out


def test_forward_matches_independent_full_mask_reference(
    ckpt_dir: Path, model64: LLaDA2ReferenceModel
) -> None:
    """Both in float64: equal up to rounding, whatever the CPU."""
    ids = torch.randint(0, 256, (75,), generator=torch.Generator().manual_seed(1))
    expected = _independent_logits(ckpt_dir, ids, BLOCK)
    torch.testing.assert_close(
        model64.forward(ids, 0), expected, **forward_tolerance(expected, model64)
    )


def test_moe_matches_the_expert_loop_and_every_routing_rule_matters(
    ckpt_dir: Path, model64: LLaDA2ReferenceModel
) -> None:
    """In float64: the two MoE computations agree up to rounding, whatever the CPU."""
    model = model64
    config = json.loads((ckpt_dir / "config.json").read_text())
    t = {k: v.double() for k, v in load_file(ckpt_dir / "model.safetensors").items()}
    x = torch.randn(200, config["hidden_size"], generator=torch.Generator().manual_seed(2))
    x = x.double()
    for i in (1, 2):
        w, p = model.layers[i], f"model.layers.{i}."
        expected = _moe_by_expert_loop(x, t, p, config) + _mlp(x, t, p + "mlp.shared_experts.")
        torch.testing.assert_close(moe(x, w, model.spec), expected,
                                   **forward_tolerance(expected, model))
        experts, weights = route(x, w, model.spec)
        torch.testing.assert_close(_dense_routing(x, t, p, config).gather(1, experts), weights)
        # Grouping binds (topk_group 1 of 2 groups of 2: both experts from one group) ...
        assert (experts // 2 == experts[:, :1] // 2).all()
        # ... and changes choices, as the bias does (it selects, it never weighs).
        ungrouped = dataclasses.replace(model.spec, topk_group=2)
        assert (route(x, w, ungrouped)[0] != experts).any()
        unbiased = {**w, "expert_bias": torch.zeros_like(w["expert_bias"])}
        assert (route(x, unbiased, model.spec)[0] != experts).any()


def test_later_blocks_never_change_earlier_logits(model: LLaDA2ReferenceModel) -> None:
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[40:] = MASK
    torch.testing.assert_close(model.forward(changed, 0)[:32], model.forward(ids, 0)[:32])
    assert not torch.allclose(model.forward(changed, 0)[32:40], model.forward(ids, 0)[32:40])


def test_cached_steps_equal_full_block_causal_forward(model64: LLaDA2ReferenceModel) -> None:
    """Exact up to rounding: compared in float64."""
    model = model64
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(4))
    full = model.forward(ids, 0)
    tolerance = forward_tolerance(full, model)
    cache = model.new_cache()
    model.forward(ids[:32], 0, cache, write_until=32)
    torch.testing.assert_close(model.forward(ids[32:64], 32, cache), full[32:64], **tolerance)
    # A finished block written by folding it into the next block's first step.
    folded = model.forward(ids[32:96], 32, cache, write_until=64)
    torch.testing.assert_close(folded[32:], full[64:], **tolerance)
    torch.testing.assert_close(model.forward(ids[64:96], 64, cache), full[64:], **tolerance)
    with pytest.raises(ValueError, match="skip positions"):
        model.forward(ids[0:32], 0, cache)


# --- loops ------------------------------------------------------------------------------------


class _Spy:
    """The model, recording every forward's window (start, ids, logits, whether it wrote)."""

    def __init__(self, model: LLaDA2ReferenceModel) -> None:
        self.model, self.spec = model, model.spec
        self.calls: list[tuple[int, Tensor, Tensor, bool]] = []

    def new_cache(self) -> BlockKVCache:
        return self.model.new_cache()

    def forward(
        self, ids: Tensor, start: int, cache: BlockKVCache | None = None, **kwargs: int
    ) -> Tensor:
        logits = self.model.forward(ids, start, cache, **kwargs)
        self.calls.append((start, ids.clone(), logits, kwargs.get("write_until") is not None))
        return logits


def _steps(spy: _Spy, canvas: Tensor) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """Each denoising step: (block start, block before, block after, the step's logits)."""
    steps = []
    for index, (start, ids, logits, wrote) in enumerate(spy.calls):
        if wrote:
            continue
        later = [c for c in spy.calls[index + 1 :] if c[0] <= start < c[0] + len(c[1])]
        after = (
            later[0][1][start - later[0][0] :][:BLOCK] if later else canvas[start : start + BLOCK]
        )
        steps.append((start, ids[:BLOCK], after, logits[:BLOCK]))
    return steps


def _proposal(logits: Tensor) -> tuple[Tensor, Tensor]:
    logits = logits.clone()
    logits[:, MASK] = float("-inf")
    probs = logits.softmax(-1)
    return probs.argmax(-1), probs.max(-1).values


def _expected_commit(before: Tensor, logits: Tensor, quota: int, threshold: float) -> Tensor:
    """Positions the release commits at one step (ties to the lower position)."""
    _, confidence = _proposal(logits)
    masked = torch.nonzero(before == MASK).flatten()
    above = masked[confidence[masked] > threshold]
    quota = min(quota, len(masked))
    if len(above) >= quota:
        return above
    order = torch.sort(confidence[masked], descending=True, stable=True).indices
    return masked[order[:quota]].sort().values


def _check_threshold_steps(
    spy: _Spy, canvas: Tensor, quotas: list[int], threshold: float
) -> list[int]:
    """Every step commits what the rule says, with the argmax; returns commits per step."""
    counts, step, block_start = [], 0, None
    for start, before, after, logits in _steps(spy, canvas):
        step = step + 1 if start == block_start else 0
        block_start = start
        committed = torch.nonzero((before == MASK) & (after != MASK)).flatten()
        expected = _expected_commit(before, logits, quotas[step], threshold)
        assert committed.tolist() == expected.tolist()
        x0, _ = _proposal(logits)
        assert torch.equal(after[committed], x0[committed])
        unchanged = before != MASK
        assert torch.equal(after[unchanged], before[unchanged])
        counts.append(len(committed))
    return counts


def test_quota_schedule_with_remainder_to_the_first_steps(model: LLaDA2ReferenceModel) -> None:
    spy = _Spy(model)
    result = generate_llada2(
        spy, BOUNDARY_PROMPT, max_new_tokens=32, steps=5, threshold=1.0, end_token_ids=NO_END
    )
    assert _check_threshold_steps(spy, result.canvas, [7, 7, 6, 6, 6], 1.0) == [7, 7, 6, 6, 6]
    assert result.num_forwards == 1 + 5  # prefill + steps
    # Default: 32 steps of one token each.
    assert (
        generate_llada2(
            model, BOUNDARY_PROMPT, max_new_tokens=32, threshold=1.0, end_token_ids=NO_END
        ).num_forwards
        == 1 + 32
    )


def test_steps_are_capped_at_max_new_tokens(model: LLaDA2ReferenceModel) -> None:
    spy = _Spy(model)
    result = generate_llada2(
        spy, BOUNDARY_PROMPT, max_new_tokens=4, threshold=1.0, end_token_ids=NO_END
    )
    counts = _check_threshold_steps(spy, result.canvas, [8] * 4, 1.0)
    assert counts[0] == 8 and len(result.tokens) == 4


def test_threshold_commits_everything_above_it(peaked: LLaDA2ReferenceModel) -> None:
    spy = _Spy(peaked)
    result = generate_llada2(spy, PROMPT, max_new_tokens=60, threshold=0.9, end_token_ids=NO_END)
    counts = _check_threshold_steps(spy, result.canvas, [1] * 32, 0.9)
    assert max(counts) > 1  # the peaked model does clear the threshold with several tokens
    assert result.num_forwards < 60


def test_prompt_ending_mid_block_decodes_that_block_and_keeps_the_prompt(
    model: LLaDA2ReferenceModel,
) -> None:
    spy = _Spy(model)
    result = generate_llada2(
        spy, PROMPT, max_new_tokens=40, steps=8, threshold=1.0, end_token_ids=NO_END
    )
    first_start, first_ids, _, wrote = spy.calls[0]
    assert first_start == 0 and not wrote  # no prefill: the prompt's block is decoded
    assert first_ids[:12].tolist() == PROMPT and (first_ids[12:] == MASK).all()
    counts = _check_threshold_steps(spy, result.canvas, [4] * 8, 1.0)
    assert counts[:5] == [4] * 5  # 20 masks in the prompt's block: 5 steps of 4
    assert result.canvas[:12].tolist() == PROMPT


def test_prompt_ending_on_a_boundary_starts_a_fresh_block(model: LLaDA2ReferenceModel) -> None:
    spy = _Spy(model)
    generate_llada2(spy, BOUNDARY_PROMPT, max_new_tokens=8, end_token_ids=NO_END)
    (start, ids, _, wrote), (next_start, next_ids, _, _) = spy.calls[:2]
    assert (start, len(ids), wrote) == (0, 32, True)  # prefill of the whole prompt block
    assert next_start == 32 and (next_ids == MASK).all()


def test_last_block_is_decoded_past_max_tokens_then_cut(model: LLaDA2ReferenceModel) -> None:
    spy = _Spy(model)
    result = generate_llada2(spy, PROMPT, max_new_tokens=25, threshold=1.0, end_token_ids=NO_END)
    assert len(result.canvas) == 64 and len(result.tokens) == 25
    assert result.tokens == result.canvas[12:37].tolist()
    # steps = min(32, 25): quotas 2 for the first 32 % 25 steps; all 32 slots compete.
    _check_threshold_steps(spy, result.canvas, [2] * 7 + [1] * 18, 1.0)
    assert (result.canvas[37:] != MASK).any()  # some slot past the limit won a step


def test_stops_at_the_end_token_and_cuts_after_it(model: LLaDA2ReferenceModel) -> None:
    free = generate_llada2(model, PROMPT, max_new_tokens=60, end_token_ids=NO_END)
    end = free.tokens[8]
    stopped = generate_llada2(model, PROMPT, max_new_tokens=60, end_token_ids=[end])
    assert stopped.tokens == free.tokens[: free.tokens.index(end) + 1]
    assert stopped.num_forwards < free.num_forwards
    # Without end_token_ids the config's eos_token_id (<|endoftext|>) is the end token.
    assert generate_llada2(model, PROMPT, max_new_tokens=60).tokens == (
        generate_llada2(model, PROMPT, max_new_tokens=60, end_token_ids=[ENDOFTEXT]).tokens
    )


def test_folding_the_finished_block_keeps_tokens_and_saves_forwards(
    model: LLaDA2ReferenceModel,
) -> None:
    plain = generate_llada2(model, PROMPT, max_new_tokens=70, end_token_ids=NO_END)
    folded = generate_llada2(
        model, PROMPT, max_new_tokens=70, end_token_ids=NO_END, fold_finished_block=True
    )
    assert folded.tokens == plain.tokens
    assert folded.num_forwards == plain.num_forwards - 2  # two block boundaries


def test_sampling_is_reproducible_per_seed(model: LLaDA2ReferenceModel) -> None:
    runs = [
        generate_llada2(
            model, PROMPT, max_new_tokens=20, temperature=1.0, seed=s, end_token_ids=NO_END
        ).tokens
        for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_bad_steps_raise(model: LLaDA2ReferenceModel) -> None:
    with pytest.raises(ValueError, match="steps"):
        generate_llada2(model, PROMPT, max_new_tokens=64, steps=0)


def test_more_steps_than_positions_is_one_token_per_step(model: LLaDA2ReferenceModel) -> None:
    runs = [
        generate_llada2(model, PROMPT, max_new_tokens=64, steps=s, threshold=1.0,
                        end_token_ids=NO_END)
        for s in (32, 33, 100)
    ]  # fmt: skip
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    assert runs[0].num_forwards == runs[1].num_forwards == runs[2].num_forwards


# --- 2.1 editing ------------------------------------------------------------------------------


def test_editing_off_matches_the_2_0_loop(model: LLaDA2ReferenceModel) -> None:
    """No edit can pass a threshold of 1: 2.1 is 2.0 with quota 1, plus its post-steps."""
    base = generate_llada2(
        model, BOUNDARY_PROMPT, max_new_tokens=64, threshold=0.5, end_token_ids=NO_END
    )
    no_post = generate_llada21(
        model,
        BOUNDARY_PROMPT,
        max_new_tokens=64,
        threshold=0.5,
        editing_threshold=1.0,
        max_post_steps=0,
        end_token_ids=NO_END,
    )
    one_post = generate_llada21(
        model,
        BOUNDARY_PROMPT,
        max_new_tokens=64,
        threshold=0.5,
        editing_threshold=1.0,
        end_token_ids=NO_END,
    )
    assert base.tokens == no_post.tokens == one_post.tokens
    assert no_post.num_forwards == base.num_forwards
    assert one_post.num_forwards == base.num_forwards + 2  # one edit-free post-step per block


def test_editing_rewrites_decoded_tokens_by_the_rule(peaked: LLaDA2ReferenceModel) -> None:
    spy = _Spy(peaked)
    threshold, editing_threshold, max_post = 0.5, 0.5, 3
    result = generate_llada21(
        spy,
        PROMPT,
        max_new_tokens=40,
        threshold=threshold,
        editing_threshold=editing_threshold,
        max_post_steps=max_post,
        end_token_ids=NO_END,
    )
    edits, post_step_edits = 0, {}
    for start, before, after, logits in _steps(spy, result.canvas):
        x0, confidence = _proposal(logits)
        editable = (before != MASK) & (torch.arange(start, start + BLOCK) >= len(PROMPT))
        expected_edit = editable & (x0 != before) & (confidence > editing_threshold)
        changed = (before != MASK) & (after != before)
        assert torch.equal(changed, expected_edit)
        assert torch.equal(after[changed], x0[changed])
        committed = torch.nonzero((before == MASK) & (after != MASK)).flatten()
        assert committed.tolist() == _expected_commit(before, logits, 1, threshold).tolist()
        edits += int(changed.sum())
        if not (before == MASK).any():
            post_step_edits.setdefault(start, []).append(bool(changed.any()))
    assert edits > 0  # the rule was exercised
    # After a block fills: post-steps while they edit, at most max_post_steps of them.
    assert sorted(post_step_edits) == [0, 32]
    for flags in post_step_edits.values():
        assert 0 < len(flags) <= max_post and all(flags[:-1])
        assert len(flags) == max_post or not flags[-1]
