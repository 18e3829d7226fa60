"""Dense fp32 reference forward for LLaDA and Dream checkpoints (the oracle's model).

Plain torch, no vLLM: it reads config.json and model.safetensors by their released names and
runs the math of modeling_llada.py / modeling_dream.py with full bidirectional attention. Both
families share one transformer body; only the tensor names, the q/k/v biases and the config
keys differ.

K/V caching follows the cache modes of docs/design.md. A :class:`KVCache` holds the K/V of
every canvas position ``[0, L)``. A forward computes a *window* of positions fresh, and its
queries attend to all ``L`` cached positions with the window's own positions replaced by the
fresh K/V:

- full forward: the window is ``[0, L)`` (and ``write_cache=True`` fills the cache);
- PrefixCache step: window ``[s, L)``, cache untouched (keys = cached ``[0, s)`` + fresh);
- DualCache step: window ``[s, e)``, ``write_cache=True`` (fresh ``[s, e)`` overwrite the cache).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor


@dataclass(frozen=True)
class ModelSpec:
    """What the forward needs from config.json, in family-neutral names."""

    family: str  # "llada" or "dream"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    mask_token_id: int
    eos_token_id: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelSpec":
        """Read the released keys: OLMo-style for LLaDA, Qwen2-style for Dream."""
        if config["model_type"] == "llada":
            return cls(
                family="llada",
                num_layers=config["n_layers"],
                num_heads=config["n_heads"],
                num_kv_heads=config["n_kv_heads"] or config["n_heads"],
                head_dim=config["d_model"] // config["n_heads"],
                rms_norm_eps=config["rms_norm_eps"],
                rope_theta=config["rope_theta"],
                vocab_size=config["embedding_size"] or config["vocab_size"],
                mask_token_id=config["mask_token_id"],
                eos_token_id=config["eos_token_id"],
            )
        if config["model_type"] == "Dream":
            return cls(
                family="dream",
                num_layers=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"],
                num_kv_heads=config["num_key_value_heads"],
                head_dim=config["hidden_size"] // config["num_attention_heads"],
                rms_norm_eps=config["rms_norm_eps"],
                rope_theta=config["rope_theta"],
                vocab_size=config["vocab_size"],
                mask_token_id=config["mask_token_id"],
                eos_token_id=config["eos_token_id"],
            )
        raise ValueError(f"unknown model_type {config['model_type']!r}")


# Released tensor names, per family: (embedding, final norm, LM head) and per-layer parts.
_GLOBAL_NAMES = {
    "llada": ("model.transformer.wte.weight", "model.transformer.ln_f.weight",
              "model.transformer.ff_out.weight"),
    "dream": ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"),
}
_LAYER_NAMES = {
    "llada": {
        "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
        "q": "model.transformer.blocks.{i}.q_proj.weight",
        "k": "model.transformer.blocks.{i}.k_proj.weight",
        "v": "model.transformer.blocks.{i}.v_proj.weight",
        "o": "model.transformer.blocks.{i}.attn_out.weight",
        "mlp_norm": "model.transformer.blocks.{i}.ff_norm.weight",
        "gate": "model.transformer.blocks.{i}.ff_proj.weight",  # ff_proj is the silu gate
        "up": "model.transformer.blocks.{i}.up_proj.weight",
        "down": "model.transformer.blocks.{i}.ff_out.weight",
    },
    "dream": {
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "q": "model.layers.{i}.self_attn.q_proj.weight",
        "k": "model.layers.{i}.self_attn.k_proj.weight",
        "v": "model.layers.{i}.self_attn.v_proj.weight",
        "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
        "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
        "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
        "o": "model.layers.{i}.self_attn.o_proj.weight",
        "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "gate": "model.layers.{i}.mlp.gate_proj.weight",
        "up": "model.layers.{i}.mlp.up_proj.weight",
        "down": "model.layers.{i}.mlp.down_proj.weight",
    },
}


class KVCache:
    """Per-layer K and V of every canvas position: ``[L, num_kv_heads, head_dim]`` each."""

    def __init__(self, spec: ModelSpec, length: int, dtype: torch.dtype = torch.float32) -> None:
        size = (length, spec.num_kv_heads, spec.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(size, dtype=dtype) for _ in range(spec.num_layers)]

    def __len__(self) -> int:
        return self.keys[0].shape[0]


class ReferenceModel:
    """A checkpoint directory loaded for the dense reference forward (CPU; fp32 as the engine
    runs, or float64 where a test claims two computations agree up to rounding)."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        directory = Path(checkpoint_dir)
        self.spec = ModelSpec.from_config(json.loads((directory / "config.json").read_text()))
        self.dtype = dtype
        tensors = {k: v.to(dtype) for k, v in load_file(directory / "model.safetensors").items()}
        embed, final_norm, lm_head = _GLOBAL_NAMES[self.spec.family]
        self.embed, self.final_norm = tensors[embed], tensors[final_norm]
        self.lm_head = tensors[lm_head]
        names = _LAYER_NAMES[self.spec.family]
        self.layers = [
            {part: tensors[name.format(i=i)] for part, name in names.items()}
            for i in range(self.spec.num_layers)
        ]

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
        """Logits ``[T, vocab]`` (unshifted, model dtype) for the window ``ids`` at ``positions``.

        Without a cache the window attends to itself only (pass the whole canvas). With a cache
        the window attends to all cached positions, its own replaced by the fresh K/V;
        ``write_cache`` keeps those fresh K/V in the cache.
        """
        spec = self.spec
        h = self.embed[ids]
        cos, sin = _rope_tables(positions, spec.head_dim, spec.rope_theta, self.dtype)
        for index, w in enumerate(self.layers):
            x = _rms_norm(h, w["attn_norm"], spec.rms_norm_eps)
            q = _linear(x, w["q"], w.get("q_bias")).view(-1, spec.num_heads, spec.head_dim)
            k = _linear(x, w["k"], w.get("k_bias")).view(-1, spec.num_kv_heads, spec.head_dim)
            v = _linear(x, w["v"], w.get("v_bias")).view(-1, spec.num_kv_heads, spec.head_dim)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            if cache is not None:
                keys, values = cache.keys[index], cache.values[index]
                if not write_cache:
                    keys, values = keys.clone(), values.clone()
                keys[positions], values[positions] = k, v
                k, v = keys, values
            h = h + _linear(_attention(q, k, v), w["o"])
            x = _rms_norm(h, w["mlp_norm"], spec.rms_norm_eps)
            h = h + _linear(torch.nn.functional.silu(_linear(x, w["gate"])) * _linear(x, w["up"]),
                            w["down"])
        return _linear(_rms_norm(h, self.final_norm, spec.rms_norm_eps), self.lm_head)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_tables(positions: Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos/sin ``[T, 1, head_dim]`` of rotate-half RoPE (both halves share the frequencies),
    computed in fp32 as the releases (and vLLM) compute them, then cast to ``dtype``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bidirectional softmax attention: ``q [T, H, D]`` over ``k, v [S, Hkv, D]``, GQA groups
    of ``H / Hkv`` consecutive query heads sharing one kv head. Returns ``[T, H * D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
    out = torch.einsum("hts,shd->thd", scores.softmax(dim=-1), v)
    return out.reshape(q.shape[0], -1)
