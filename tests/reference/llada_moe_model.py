"""Dense fp32 reference forward for LLaDA-MoE (``LLaDAMoEModelLM``): the oracle's model.

Plain torch, no vLLM. It reads ``config.json``, the tokenizer's mask token and
``model.safetensors`` by their released names and runs the math of the released
``modeling_lladamoe.py`` with full bidirectional attention (its attention has no mask), so the
LLaDA loop of :mod:`tests.reference.generate` drives it as it drives the dense LLaDA: it has the
same ``spec`` (family ``llada``), ``new_cache`` and ``forward`` as
:class:`tests.reference.model.ReferenceModel`.

The body, per layer, as the release computes it: RMSNorm; separate q/k/v projections (biased
with ``attention_bias``); with ``qk_layernorm`` an RMSNorm over each q and k head; rotate-half
RoPE on the first ``head_dim * partial_rotary_factor`` dims of each head; attention; the output
projection (biased alike); RMSNorm; a dense SwiGLU where ``moe_layer_freq`` is 0, else the
mixture of experts of :func:`moe` plus, when configured, the shared expert.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from tests.reference.llada2_model import _partial_rope, _swiglu, _tokenizer_mask_id
from tests.reference.model import KVCache, ModelSpec, _attention, _linear, _rms_norm, _rope_tables


@dataclass(frozen=True)
class MoeSpec:
    """The release's mixture-of-experts keys and the rotary width."""

    moe_layers: tuple[bool, ...]
    num_experts: int
    num_experts_per_tok: int
    rotary_dim: int
    attention_bias: bool
    qk_layernorm: bool


def read_specs(directory: Path) -> tuple[ModelSpec, MoeSpec]:
    """config.json's keys; the mask id is the tokenizer's mask token (config.json has none),
    the release's 156895 where the tokenizer does not say."""
    config = json.loads((directory / "config.json").read_text())
    if "LLaDAMoEModelLM" not in config["architectures"]:
        raise ValueError(f"not a LLaDA-MoE checkpoint: {config['architectures']}")
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    spec = ModelSpec(
        family="llada",
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=config["rope_theta"],
        vocab_size=config["vocab_size"],
        mask_token_id=_tokenizer_mask_id(directory),
        eos_token_id=config["eos_token_id"],
    )
    moe_spec = MoeSpec(
        moe_layers=tuple(bool(f) for f in config["moe_layer_freq"]),
        num_experts=config["num_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        rotary_dim=int(head_dim * config["partial_rotary_factor"]),
        attention_bias=bool(config.get("attention_bias")),
        qk_layernorm=bool(config.get("qk_layernorm")),
    )
    return spec, moe_spec


class LLaDAMoEReferenceModel:
    """A LLaDA-MoE checkpoint loaded for the dense reference forward (CPU; fp32 as the engine
    runs)."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        directory = Path(checkpoint_dir)
        self.spec, self.moe_spec = read_specs(directory)
        self.dtype = dtype
        tensors = {k: v.to(dtype) for k, v in load_file(directory / "model.safetensors").items()}
        self.embed = tensors["model.embed_tokens.weight"]
        self.final_norm = tensors["model.norm.weight"]
        self.lm_head = tensors["lm_head.weight"]
        self.layers = [_layer(tensors, i, self.moe_spec) for i in range(self.spec.num_layers)]

    def new_cache(self, length: int) -> KVCache:
        """An empty cache for a canvas of ``length`` positions."""
        return KVCache(self.spec, length, self.dtype)

    @torch.no_grad()
    def forward(
        self,
        ids: Tensor,
        positions: Tensor,
        cache: KVCache | None = None,
        *,
        write_cache: bool = False,
    ) -> Tensor:
        """Logits ``[T, vocab]`` of the window ``ids`` at ``positions``; the cache as
        :meth:`tests.reference.model.ReferenceModel.forward` uses it."""
        spec, moe_spec = self.spec, self.moe_spec
        h = self.embed[ids]
        cos, sin = _rope_tables(positions, moe_spec.rotary_dim, spec.rope_theta, self.dtype)
        for index, w in enumerate(self.layers):
            x = _rms_norm(h, w["attn_norm"], spec.rms_norm_eps)
            q = _linear(x, w["q"], w.get("q_bias")).view(-1, spec.num_heads, spec.head_dim)
            k = _linear(x, w["k"], w.get("k_bias")).view(-1, spec.num_kv_heads, spec.head_dim)
            v = _linear(x, w["v"], w.get("v_bias")).view(-1, spec.num_kv_heads, spec.head_dim)
            if moe_spec.qk_layernorm:
                q = _rms_norm(q, w["q_norm"], spec.rms_norm_eps)
                k = _rms_norm(k, w["k_norm"], spec.rms_norm_eps)
            q, k = _partial_rope(q, cos, sin), _partial_rope(k, cos, sin)
            if cache is not None:
                keys, values = cache.keys[index], cache.values[index]
                if not write_cache:
                    keys, values = keys.clone(), values.clone()
                keys[positions], values[positions] = k, v
                k, v = keys, values
            h = h + _linear(_attention(q, k, v), w["o"], w.get("o_bias"))
            x = _rms_norm(h, w["mlp_norm"], spec.rms_norm_eps)
            if "gate" in w:
                h = h + _swiglu(x, w["gate"], w["up"], w["down"])
            else:
                h = h + moe(x, w, moe_spec)
        return _linear(_rms_norm(h, self.final_norm, spec.rms_norm_eps), self.lm_head)


def _layer(tensors: dict[str, Tensor], i: int, moe_spec: MoeSpec) -> dict[str, Tensor]:
    p = f"model.layers.{i}."
    w = {
        "attn_norm": tensors[p + "input_layernorm.weight"],
        "mlp_norm": tensors[p + "post_attention_layernorm.weight"],
    }
    for part in ("q", "k", "v", "o"):
        w[part] = tensors[p + f"self_attn.{part}_proj.weight"]
        if moe_spec.attention_bias:
            w[f"{part}_bias"] = tensors[p + f"self_attn.{part}_proj.bias"]
    if moe_spec.qk_layernorm:
        w["q_norm"] = tensors[p + "self_attn.q_norm.weight"]
        w["k_norm"] = tensors[p + "self_attn.k_norm.weight"]
    if not moe_spec.moe_layers[i]:
        for part in ("gate", "up", "down"):
            w[part] = tensors[p + f"mlp.{part}_proj.weight"]
        return w
    w["router"] = tensors[p + "mlp.gate.weight"]
    if p + "mlp.expert_bias" in tensors:
        w["expert_bias"] = tensors[p + "mlp.expert_bias"]
    for part in ("gate", "up", "down"):
        w[f"experts_{part}"] = torch.stack(
            [tensors[p + f"mlp.experts.{e}.{part}_proj.weight"]
             for e in range(moe_spec.num_experts)]
        )
        if p + f"shared_expert.{part}_proj.weight" in tensors:
            w[f"shared_{part}"] = tensors[p + f"shared_expert.{part}_proj.weight"]
    return w


def route(x: Tensor, w: dict[str, Tensor], moe_spec: MoeSpec) -> tuple[Tensor, Tensor]:
    """Each token's experts and weights ``[T, top_k]``, as the release's sparse MoE block:
    the fp32 softmax of the router logits, plus the expert bias when the checkpoint has one;
    the ``top_k`` best of those biased scores are the choice *and* the weights (no
    renormalisation, no scaling)."""
    scores = torch.softmax(_linear(x, w["router"]), dim=-1, dtype=torch.float32)
    if "expert_bias" in w:
        scores = scores + w["expert_bias"]
    weights, experts = scores.topk(moe_spec.num_experts_per_tok, dim=-1)
    return experts, weights.to(x.dtype)


def moe(x: Tensor, w: dict[str, Tensor], moe_spec: MoeSpec) -> Tensor:
    """The chosen experts' SwiGLU outputs, weighted and summed, plus the shared expert."""
    experts, weights = route(x, w, moe_spec)
    gate, up = w["experts_gate"][experts], w["experts_up"][experts]
    down = w["experts_down"][experts]
    hidden = torch.nn.functional.silu(torch.einsum("th,tkih->tki", x, gate)) * torch.einsum(
        "th,tkih->tki", x, up
    )
    routed = torch.einsum("tki,tkhi,tk->th", hidden, down, weights)
    if "shared_gate" in w:
        routed = routed + _swiglu(x, w["shared_gate"], w["shared_up"], w["shared_down"])
    return routed
