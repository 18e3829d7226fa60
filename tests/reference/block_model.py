"""Dense fp32 reference forward for the block-diffusion families: Fast-dLLM v2 and SDAR.

Plain torch, no vLLM. It reads ``config.json`` and ``model.safetensors`` by their released names
and runs a Qwen-style decoder with **block-causal** attention:

- Fast-dLLM v2 (``model_type`` ``Fast_dLLM_Qwen``): a Qwen2.5 body, q/k/v biases, GQA, RoPE;
  LM head tied to the embedding when ``tie_word_embeddings`` says so (the 1.5B release), its own
  ``lm_head.weight`` otherwise (the 7B release).
- SDAR (``model_type`` ``sdar``): a Qwen3 body, no q/k/v bias, an RMSNorm over each head of q and
  k before RoPE (``self_attn.q_norm`` / ``self_attn.k_norm``), ``head_dim`` from the config (it
  need not be ``hidden_size / num_attention_heads``).

Block-causal attention: blocks of ``B`` positions are aligned to absolute position 0 (block k is
``[kB, (k+1)B)``, prompt included). A query in block k sees every key of blocks ``0..k``,
bidirectionally inside its own block, and nothing after. The K/V of a finished block therefore
never change once the block's tokens are final, so :class:`BlockKVCache` stores them once (an
append-only prefix) and a cached forward is exact, not an approximation.

One forward computes a *window* of consecutive positions fresh. Its keys are the cached prefix
``[0, cache.length)`` followed by the window's own K/V; with ``block_kv`` (Fast-dLLM v2's
sub-block cache) they are the cached prefix followed by a stored copy of the current block's K/V,
into which the window's fresh rows are written first. ``write_until`` appends the window's rows
before that position to the cache (a prefill, a finished block, or a finished block folded into
the next block's first step).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from tests.reference.model import _apply_rope, _linear, _rms_norm, _rope_tables

FAST_DLLM_V2 = "fast_dllm_v2"
SDAR = "sdar"

# Ids the releases hard-code when a file does not say: Fast-dLLM v2's config has no mask id (its
# generation code defaults to 151665, the tokenizer's ``|<MASK>|``); SDAR's 4B/8B configs lack
# ``mask_token_id`` and ``block_size`` (its code defaults to 151669, ``<|MASK|>``, and block 4).
_MASK_TOKENS = {FAST_DLLM_V2: "|<MASK>|", SDAR: "<|MASK|>"}
_DEFAULT_MASK_IDS = {FAST_DLLM_V2: 151665, SDAR: 151669}
_DEFAULT_BLOCK_SIZES = {FAST_DLLM_V2: 32, SDAR: 4}


@dataclass(frozen=True)
class BlockModelSpec:
    """What the forward and the loops need from the checkpoint files, family-neutral."""

    family: str  # FAST_DLLM_V2 or SDAR
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    block_size: int
    mask_token_id: int
    end_token_ids: tuple[int, ...]
    tie_word_embeddings: bool

    @classmethod
    def from_dir(cls, directory: str | Path) -> "BlockModelSpec":
        """Read config.json, and where they exist generation_config.json and the tokenizer.

        The mask id comes from config ``mask_token_id`` (SDAR 1.7B), else from the tokenizer's
        mask token (Fast-dLLM v2 ships none in its config), else from the release's constant.
        End ids: Fast-dLLM v2's generation loop stops on one token, ``<|im_end|>``, which is
        config ``eos_token_id``; SDAR's loop stops on generation_config's ``eos_token_id`` list
        (``<|im_end|>`` and ``<|endoftext|>``).
        """
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model_type = config["model_type"]
        if model_type == "Fast_dLLM_Qwen":
            family = FAST_DLLM_V2
            block_size = config.get("bd_size", _DEFAULT_BLOCK_SIZES[family])
        elif model_type == "sdar":
            family = SDAR
            block_size = config.get("block_size", _DEFAULT_BLOCK_SIZES[family])
        else:
            raise ValueError(f"not a block-diffusion model_type: {model_type!r}")
        heads = config["num_attention_heads"]
        eos = _as_tuple(config["eos_token_id"])
        generation_file = directory / "generation_config.json"
        if family == SDAR and generation_file.exists():
            eos = _as_tuple(json.loads(generation_file.read_text())["eos_token_id"])
        return cls(
            family=family,
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config["rms_norm_eps"],
            rope_theta=config["rope_theta"],
            vocab_size=config["vocab_size"],
            block_size=block_size,
            mask_token_id=config.get("mask_token_id") or _tokenizer_mask_id(directory, family),
            end_token_ids=eos,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def _as_tuple(value: int | list[int]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def _tokenizer_mask_id(directory: Path, family: str) -> int:
    file = directory / "tokenizer_config.json"
    if file.exists():
        added = json.loads(file.read_text()).get("added_tokens_decoder", {})
        for token_id, entry in added.items():
            if entry["content"] == _MASK_TOKENS[family]:
                return int(token_id)
    return _DEFAULT_MASK_IDS[family]


# Released per-layer tensor names (Qwen2 / Qwen3 layout); optional parts are family-specific.
_LAYER_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
_BIAS_NAMES = {  # Fast-dLLM v2 (Qwen2.5): q/k/v biases
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
}
_QK_NORM_NAMES = {  # SDAR (Qwen3): per-head RMSNorm of q and k
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}


class BlockKVCache:
    """K/V of the finished prefix ``[0, length)``, per layer ``[length, num_kv_heads, head_dim]``.

    Append-only: under block-causal attention a finished block's K/V are final.
    """

    def __init__(self, spec: BlockModelSpec, dtype: torch.dtype = torch.float32) -> None:
        empty = torch.zeros(0, spec.num_kv_heads, spec.head_dim, dtype=dtype)
        self.keys = [empty for _ in range(spec.num_layers)]
        self.values = [empty for _ in range(spec.num_layers)]

    @property
    def length(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class BlockKV:
    """Fast-dLLM v2's sub-block cache: the current block's K/V from its last full-block pass.

    ``start`` is the block's first position. Sub-block steps write their fresh rows into it in
    place (as the release does), and read every other row of the block from it (stale).
    """

    start: int
    keys: list[Tensor]
    values: list[Tensor]


class BlockReferenceModel:
    """A Fast-dLLM v2 or SDAR checkpoint loaded for the dense reference forward (CPU; fp32 as
    the engine runs, or float64 where a test claims two computations agree up to rounding)."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        directory = Path(checkpoint_dir)
        self.spec = spec = BlockModelSpec.from_dir(directory)
        self.dtype = dtype
        tensors = {k: v.to(dtype) for k, v in load_file(directory / "model.safetensors").items()}
        self.embed = tensors["model.embed_tokens.weight"]
        self.final_norm = tensors["model.norm.weight"]
        # A tied release ships no lm_head.weight; the embedding is the LM head.
        self.lm_head = self.embed if spec.tie_word_embeddings else tensors["lm_head.weight"]
        names = dict(_LAYER_NAMES)
        names.update(_BIAS_NAMES if spec.family == FAST_DLLM_V2 else _QK_NORM_NAMES)
        self.layers = [
            {part: tensors[name.format(i=i)] for part, name in names.items()}
            for i in range(spec.num_layers)
        ]

    def new_cache(self) -> BlockKVCache:
        return BlockKVCache(self.spec, self.dtype)

    @torch.no_grad()
    def forward(
        self,
        ids: Tensor,
        start: int,
        cache: BlockKVCache | None = None,
        *,
        block_size: int | None = None,
        write_until: int | None = None,
        block_kv: BlockKV | None = None,
        capture_block: bool = False,
    ) -> Tensor | tuple[Tensor, BlockKV]:
        """Logits ``[T, vocab]`` (unshifted, model dtype) of window ``ids`` at ``start, ...``.

        Keys: the cache's ``[0, cache.length)`` (which must end where the window, or
        ``block_kv``, starts), then the window (or ``block_kv`` with the window written in).
        ``write_until`` appends the window's rows before that position to the cache.
        ``capture_block`` also returns the window's K/V as a :class:`BlockKV`.
        """
        spec = self.spec
        block = spec.block_size if block_size is None else block_size
        cached = 0 if cache is None else cache.length
        fresh_start = start if block_kv is None else block_kv.start
        if fresh_start != cached:
            raise ValueError(f"keys would skip positions: cache ends at {cached}, "
                             f"fresh keys start at {fresh_start}")
        positions = torch.arange(start, start + len(ids))
        h = self.embed[ids]
        cos, sin = _rope_tables(positions, spec.head_dim, spec.rope_theta, self.dtype)
        captured_keys, captured_values = [], []
        for index, w in enumerate(self.layers):
            x = _rms_norm(h, w["attn_norm"], spec.rms_norm_eps)
            q = _linear(x, w["q"], w.get("q_bias")).view(-1, spec.num_heads, spec.head_dim)
            k = _linear(x, w["k"], w.get("k_bias")).view(-1, spec.num_kv_heads, spec.head_dim)
            v = _linear(x, w["v"], w.get("v_bias")).view(-1, spec.num_kv_heads, spec.head_dim)
            if "q_norm" in w:
                q = _rms_norm(q, w["q_norm"], spec.rms_norm_eps)
                k = _rms_norm(k, w["k_norm"], spec.rms_norm_eps)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            captured_keys.append(k)
            captured_values.append(v)
            if block_kv is not None:
                rows = slice(start - block_kv.start, start - block_kv.start + len(ids))
                block_kv.keys[index][rows], block_kv.values[index][rows] = k, v
                k, v = block_kv.keys[index], block_kv.values[index]
            if cache is not None:
                k = torch.cat([cache.keys[index], k])
                v = torch.cat([cache.values[index], v])
            visible = _block_causal(positions, torch.arange(len(k)), block)
            h = h + _linear(_attention(q, k, v, visible), w["o"])
            x = _rms_norm(h, w["mlp_norm"], spec.rms_norm_eps)
            h = h + _linear(torch.nn.functional.silu(_linear(x, w["gate"])) * _linear(x, w["up"]),
                            w["down"])
        logits = _linear(_rms_norm(h, self.final_norm, spec.rms_norm_eps), self.lm_head)
        if write_until is not None:
            if cache is None or block_kv is not None:
                raise ValueError("write_until needs a cache and a plain window")
            rows = write_until - start
            for index in range(spec.num_layers):
                cache.keys[index] = torch.cat([cache.keys[index], captured_keys[index][:rows]])
                cache.values[index] = torch.cat([cache.values[index],
                                                 captured_values[index][:rows]])
        if capture_block:
            return logits, BlockKV(start, [k.clone() for k in captured_keys],
                                   [v.clone() for v in captured_values])
        return logits


def block_causal_mask(length: int, block_size: int) -> Tensor:
    """``[length, length]`` boolean: query i may see key j (j's block is not after i's)."""
    positions = torch.arange(length)
    return _block_causal(positions, positions, block_size)


def _block_causal(query_positions: Tensor, key_positions: Tensor, block_size: int) -> Tensor:
    return (key_positions[None, :] // block_size) <= (query_positions[:, None] // block_size)


def _attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """Masked softmax attention: ``q [T, H, D]`` over ``k, v [S, Hkv, D]``, ``visible [T, S]``;
    GQA groups of ``H / Hkv`` consecutive query heads share one kv head. Returns ``[T, H * D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible[None], float("-inf"))
    out = torch.einsum("hts,shd->thd", scores.softmax(dim=-1), v)
    return out.reshape(q.shape[0], -1)
