"""Dense fp32 reference forward for LLaDA 2.x (model_type ``llada2_moe``): the oracle's model.

Plain torch, no vLLM. It reads ``config.json``, the tokenizer's special tokens and
``model.safetensors`` by their released names and runs the math of the released
``modeling_llada2_moe.py`` (``LLaDA2MoeModelLM``) under **block-causal** attention, as its
``generate()`` masks it: blocks of ``B`` positions aligned to absolute position 0, a query
seeing every key of its own block and of the blocks before. As in :mod:`block_model`, the K/V
of a finished block never change, so the append-only :class:`BlockKVCache` is exact, and one
forward computes a *window* of consecutive positions fresh against the cached prefix;
``write_until`` appends the window's rows before that position to the cache.

The body, per layer: RMSNorm; a fused ``query_key_value`` projection split into q heads, k
heads, v heads; RMSNorm over each q and k head; rotate-half RoPE on the first
``head_dim * partial_rotary_factor`` dims of each head (the rest passes through); GQA
attention; ``dense`` output projection; RMSNorm; then a dense SwiGLU MLP in the first
``first_k_dense_replace`` layers and a mixture of experts after them (:func:`route`), whose
output is each token's chosen experts weighted, plus the shared expert. No token shift: row i
scores position i.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from tests.reference.block_model import BlockKVCache, _attention, _block_causal
from tests.reference.model import _apply_rope, _linear, _rms_norm, _rope_tables

# What the release's generate() hard-codes, used where the files do not say: block length 32
# (no config key), <|endoftext|> 156892 and <|mask|> 156895.
DEFAULT_BLOCK_SIZE = 32
RELEASE_EOS_ID = 156892
RELEASE_MASK_ID = 156895


@dataclass(frozen=True)
class LLaDA2Spec:
    """What the forward and the loops need from the checkpoint files."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    first_k_dense_replace: int
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    block_size: int
    mask_token_id: int
    end_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, directory: str | Path) -> "LLaDA2Spec":
        """Read config.json and the tokenizer's mask token.

        The end id is config ``eos_token_id`` (the release's generate() default, 156892, is
        that id), the mask id the tokenizer's ``mask_token``; the release's constants where a
        file does not say.
        """
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config["model_type"] != "llada2_moe":
            raise ValueError(f"not a LLaDA 2.x model_type: {config['model_type']!r}")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        eos = config.get("eos_token_id", RELEASE_EOS_ID)
        return cls(
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config["num_key_value_heads"],
            head_dim=head_dim,
            rotary_dim=int(head_dim * config.get("partial_rotary_factor", 1.0)),
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=config["rope_theta"],
            vocab_size=config["vocab_size"],
            first_k_dense_replace=config["first_k_dense_replace"],
            num_experts=config["num_experts"],
            num_experts_per_tok=config["num_experts_per_tok"],
            n_group=config["n_group"],
            topk_group=config["topk_group"],
            routed_scaling_factor=config["routed_scaling_factor"],
            block_size=DEFAULT_BLOCK_SIZE,
            mask_token_id=_tokenizer_mask_id(directory),
            end_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        )


def _tokenizer_mask_id(directory: Path) -> int:
    file = directory / "tokenizer_config.json"
    if file.exists():
        tokenizer_config = json.loads(file.read_text())
        mask_text = tokenizer_config.get("mask_token")
        for token_id, entry in tokenizer_config.get("added_tokens_decoder", {}).items():
            if entry["content"] == mask_text:
                return int(token_id)
    return RELEASE_MASK_ID


class LLaDA2ReferenceModel:
    """A LLaDA 2.x checkpoint loaded for the dense reference forward (CPU; fp32 as the engine
    runs, or float64 where a test claims two computations agree up to rounding)."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        directory = Path(checkpoint_dir)
        self.spec = spec = LLaDA2Spec.from_dir(directory)
        self.dtype = dtype
        tensors = {k: v.to(dtype) for k, v in load_file(directory / "model.safetensors").items()}
        self.embed = tensors["model.word_embeddings.weight"]
        self.final_norm = tensors["model.norm.weight"]
        self.lm_head = tensors["lm_head.weight"]
        self.layers = [_layer(tensors, i, spec) for i in range(spec.num_layers)]

    def new_cache(self) -> BlockKVCache:
        return BlockKVCache(self.spec, self.dtype)  # reads num_layers, num_kv_heads, head_dim

    @torch.no_grad()
    def forward(
        self,
        ids: Tensor,
        start: int,
        cache: BlockKVCache | None = None,
        *,
        block_size: int | None = None,
        write_until: int | None = None,
    ) -> Tensor:
        """Logits ``[T, vocab]`` (model dtype) of the window ``ids`` at ``start, start+1, ...``.

        Keys: the cache's ``[0, cache.length)`` (which must end where the window starts), then
        the window. ``write_until`` appends the window's rows before that position to the cache.
        """
        spec = self.spec
        block = spec.block_size if block_size is None else block_size
        cached = 0 if cache is None else cache.length
        if start != cached:
            raise ValueError(
                f"keys would skip positions: cache ends at {cached}, the window starts at {start}"
            )
        positions = torch.arange(start, start + len(ids))
        cos, sin = _rope_tables(positions, spec.rotary_dim, spec.rope_theta, self.dtype)
        h = self.embed[ids]
        fresh_keys, fresh_values = [], []
        for index, w in enumerate(self.layers):
            x = _rms_norm(h, w["attn_norm"], spec.rms_norm_eps)
            qkv = _linear(x, w["qkv"], w.get("qkv_bias"))
            qkv = qkv.view(len(ids), spec.num_heads + 2 * spec.num_kv_heads, spec.head_dim)
            q, k, v = qkv.split([spec.num_heads, spec.num_kv_heads, spec.num_kv_heads], dim=1)
            q = _partial_rope(_rms_norm(q, w["q_norm"], spec.rms_norm_eps), cos, sin)
            k = _partial_rope(_rms_norm(k, w["k_norm"], spec.rms_norm_eps), cos, sin)
            fresh_keys.append(k)
            fresh_values.append(v)
            if cache is not None:
                k = torch.cat([cache.keys[index], k])
                v = torch.cat([cache.values[index], v])
            visible = _block_causal(positions, torch.arange(len(k)), block)
            h = h + _linear(_attention(q, k, v, visible), w["dense"], w.get("dense_bias"))
            x = _rms_norm(h, w["mlp_norm"], spec.rms_norm_eps)
            h = h + (_swiglu(x, w["gate"], w["up"], w["down"]) if "gate" in w else moe(x, w, spec))
        logits = _linear(_rms_norm(h, self.final_norm, spec.rms_norm_eps), self.lm_head)
        if write_until is not None:
            if cache is None:
                raise ValueError("write_until needs a cache")
            rows = write_until - start
            for index in range(spec.num_layers):
                cache.keys[index] = torch.cat([cache.keys[index], fresh_keys[index][:rows]])
                cache.values[index] = torch.cat([cache.values[index], fresh_values[index][:rows]])
        return logits


def _layer(tensors: dict[str, Tensor], i: int, spec: LLaDA2Spec) -> dict[str, Tensor]:
    """One layer's tensors by role; MoE layers stack their routed experts ``[E, ...]``."""
    p = f"model.layers.{i}."
    w = {
        "attn_norm": tensors[p + "input_layernorm.weight"],
        "qkv": tensors[p + "attention.query_key_value.weight"],
        "q_norm": tensors[p + "attention.query_layernorm.weight"],
        "k_norm": tensors[p + "attention.key_layernorm.weight"],
        "dense": tensors[p + "attention.dense.weight"],
        "mlp_norm": tensors[p + "post_attention_layernorm.weight"],
    }
    # use_qkv_bias / use_bias (both false in the release) add these.
    for part, name in (
        ("qkv_bias", "attention.query_key_value.bias"),
        ("dense_bias", "attention.dense.bias"),
    ):
        if p + name in tensors:
            w[part] = tensors[p + name]
    if i < spec.first_k_dense_replace:
        for part in ("gate", "up", "down"):
            w[part] = tensors[p + f"mlp.{part}_proj.weight"]
        return w
    w["router"] = tensors[p + "mlp.gate.weight"]
    w["expert_bias"] = tensors[p + "mlp.gate.expert_bias"]
    for part in ("gate", "up", "down"):
        w[f"experts_{part}"] = torch.stack(
            [tensors[p + f"mlp.experts.{e}.{part}_proj.weight"] for e in range(spec.num_experts)]
        )
        w[f"shared_{part}"] = tensors[p + f"mlp.shared_experts.{part}_proj.weight"]
    return w


def _partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of each head; the rest unchanged."""
    rotary = cos.shape[-1]
    return torch.cat([_apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)


def _swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    return _linear(torch.nn.functional.silu(_linear(x, gate)) * _linear(x, up), down)


def route(x: Tensor, w: dict[str, Tensor], spec: LLaDA2Spec) -> tuple[Tensor, Tensor]:
    """Each token's experts and weights ``[T, top_k]``, as the release's ``LLaDA2MoeGate``.

    Sigmoid scores of the router logits; the expert bias is added for the *choice* only:
    groups of ``E / n_group`` experts are ranked by the sum of their two best biased scores,
    the ``topk_group`` best groups kept, and the ``top_k`` best biased scores in them chosen.
    The weights are the chosen *unbiased* scores, normalised to sum 1 when ``top_k > 1``
    (the release adds 1e-20 to the sum, below fp32 resolution here), times
    ``routed_scaling_factor``.
    """
    scores = torch.sigmoid(_linear(x, w["router"]))
    biased = scores + w["expert_bias"]
    grouped = biased.view(len(x), spec.n_group, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    kept_groups = group_scores.topk(spec.topk_group, dim=-1).indices
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, kept_groups, True)
    allowed = kept[:, :, None].expand_as(grouped).reshape(len(x), -1)
    experts = (
        biased.masked_fill(~allowed, float("-inf")).topk(spec.num_experts_per_tok, dim=-1).indices
    )
    weights = scores.gather(1, experts)
    if spec.num_experts_per_tok > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights * spec.routed_scaling_factor


def moe(x: Tensor, w: dict[str, Tensor], spec: LLaDA2Spec) -> Tensor:
    """Routed experts (each token's chosen experts' weights gathered) plus the shared expert."""
    experts, weights = route(x, w, spec)
    gate, up, down = (
        w["experts_gate"][experts],
        w["experts_up"][experts],
        w["experts_down"][experts],
    )  # [T, k, I, H], [T, k, I, H], [T, k, H, I]
    hidden = torch.nn.functional.silu(torch.einsum("th,tkih->tki", x, gate)) * torch.einsum(
        "th,tkih->tki", x, up
    )
    routed = torch.einsum("tki,tkhi,tk->th", hidden, down, weights)
    return routed + _swiglu(x, w["shared_gate"], w["shared_up"], w["shared_down"])
