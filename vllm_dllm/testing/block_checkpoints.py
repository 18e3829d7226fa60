"""Random-weight Fast-dLLM v2 and SDAR checkpoints in their released on-disk layouts.

What is as released: config.json keys and values' meaning (Fast-dLLM v2: the keys of
``Efficient-Large-Model/Fast_dLLM_v2_1.5B``'s config, ``bd_size``, ``layer_types``, tied LM head;
SDAR: the keys of ``JetLM/SDAR-1.7B-Chat``'s config, ``block_size``, ``mask_token_id``,
``head_dim``, untied LM head), safetensors tensor names (Qwen2 / Qwen3 layout: ``model.layers.{i}.
self_attn.{q,k,v,o}_proj``, q/k/v biases for Fast-dLLM v2, ``self_attn.{q,k}_norm`` for SDAR, no
``lm_head.weight`` when tied), the mask token's spelling in the tokenizer (``|<MASK>|`` /
``<|MASK|>``), and ChatML turn markers.

Deliberate differences (none changes how a loader reads the files):
- small sizes: head_dim 64 (vLLM's CPU attention accepts it), 2 layers, a vocabulary of 320;
- so the special ids are small, in the same order as the releases: ``<|endoftext|>`` 256
  (151643), ``<|im_start|>`` 257 (151644), ``<|im_end|>`` 258 (151645), mask 259 (Fast-dLLM v2
  151665, SDAR 151669). The real ids would need a 151936-row embedding; readers take every id from
  the files, never from constants, so the small ids exercise the same code;
- a byte-level tokenizer (256 byte tokens, no merges) and a short ChatML chat template (system,
  user and assistant turns; no tools, no thinking tags) instead of the Qwen BPE tokenizer;
- one ``model.safetensors`` instead of shards; generation_config.json holds only the token ids.

Usage: ``python -m vllm_dllm.testing.checkpoints {fast_dllm_v2,sdar} OUT_DIR``.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from vllm_dllm.testing.chat_templates import CHATML_TEMPLATE
from vllm_dllm.testing.files import TensorSpec, release_config, save_random_tensors, write_json
from vllm_dllm.testing.tokenizer import write_tokenizer

ENDOFTEXT, IM_START, IM_END, MASK = 256, 257, 258, 259
VOCAB_SIZE = 320


@dataclass(frozen=True, kw_only=True)
class BlockShape:
    """Sizes of a tiny block-diffusion checkpoint; the defaults are the presets' common ones."""

    hidden_size: int = 128
    num_heads: int
    num_kv_heads: int
    head_dim: int = 64
    num_layers: int = 2
    intermediate_size: int = 256
    block_size: int
    tie_word_embeddings: bool

    FAST_DLLM_V2: ClassVar["BlockShape"]
    SDAR: ClassVar["BlockShape"]


# Fast-dLLM v2 1.5B: GQA 12/2, tied head, bd_size 32. Here 2 q heads over 1 kv head.
BlockShape.FAST_DLLM_V2 = BlockShape(
    num_heads=2, num_kv_heads=1, block_size=32, tie_word_embeddings=True
)
# SDAR 1.7B: 16 q / 8 kv heads of 128 on a 2048 hidden (q width != hidden), untied, block 4.
BlockShape.SDAR = BlockShape(num_heads=4, num_kv_heads=2, block_size=4, tie_word_embeddings=False)

_SPECIAL_TOKENS = {ENDOFTEXT: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}


def fast_dllm_v2_config_dict(shape: BlockShape) -> dict[str, Any]:
    """config.json of a Fast-dLLM v2 checkpoint: the release's keys."""
    return release_config(
        shape,
        VOCAB_SIZE,
        ("configuration", "modeling", "Fast_dLLM_Qwen", "Fast_dLLM_QwenForCausalLM"),
        {
            "bd_size": shape.block_size,
            "bos_token_id": ENDOFTEXT,
            "eos_token_id": IM_END,
            "layer_types": ["full_attention"] * shape.num_layers,
            "model_type": "Fast_dLLM_Qwen",
            "pad_token_id": IM_END,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": shape.tie_word_embeddings,
            "torch_dtype": "float32",
            "transformers_version": "4.53.1",
            "use_cache": True,
        },
    )


def sdar_config_dict(shape: BlockShape) -> dict[str, Any]:
    """config.json of an SDAR checkpoint: the release's keys."""
    return release_config(
        shape,
        VOCAB_SIZE,
        ("configuration_sdar", "modeling_sdar", "SDAR", "SDARForCausalLM"),
        {
            "attention_bias": False,
            "attn_implementation": "flex_attention",
            "bos_token_id": ENDOFTEXT,
            "eos_token_id": ENDOFTEXT,
            "block_size": shape.block_size,
            "mask_token_id": MASK,
            "ep_size": 1,
            "fuse_cross_entropy": True,
            "head_dim": shape.head_dim,
            "micro_forward": False,
            "model_type": "sdar",
            "rope_theta": 1000000,
            "skip_checkpoint": False,
            "sliding_window": None,
            "tie_word_embeddings": shape.tie_word_embeddings,
            "torch_dtype": "float32",
            "transformers_version": "4.52.4",
            "use_cache": False,
            "use_deepep": False,
        },
    )


def write_fast_dllm_v2_checkpoint(
    path: str | Path, shape: BlockShape = BlockShape.FAST_DLLM_V2, **options: Any
) -> Path:
    """A random Fast-dLLM v2 checkpoint; ``options``: see `_write`."""
    config = fast_dllm_v2_config_dict(shape)
    return _write(Path(path), config, shape, "|<MASK>|", qkv_bias=True, qk_norm=False, **options)


def write_sdar_checkpoint(
    path: str | Path, shape: BlockShape = BlockShape.SDAR, **options: Any
) -> Path:
    """A random SDAR checkpoint; ``options``: see `_write`."""
    config = sdar_config_dict(shape)
    return _write(Path(path), config, shape, "<|MASK|>", qkv_bias=False, qk_norm=True, **options)


def _write(
    out: Path,
    config: dict[str, Any],
    shape: BlockShape,
    mask_text: str,
    *,
    qkv_bias: bool,
    qk_norm: bool,
    seed: int = 0,
    logit_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the files of one checkpoint, its tensors drawn from ``seed`` and stored as
    ``dtype`` (which config.json's ``torch_dtype`` then names, as a release's does);
    ``logit_scale`` multiplies every logit (peaked model).

    SDAR's per-head q/k norm weights sit near 2, which with q/k drawn 4x larger makes attention
    sharp enough that positions differ. When the embedding is also the LM head it is drawn
    2/sqrt(hidden), for logits of O(1) like an untied head's.
    """
    out.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": [IM_END, ENDOFTEXT],
        "pad_token_id": ENDOFTEXT,
        "transformers_version": config["transformers_version"],
    })  # fmt: skip
    _write_tokenizer(out, {**_SPECIAL_TOKENS, MASK: mask_text})
    save_random_tensors(
        out / "model.safetensors",
        _tensors(shape, qkv_bias=qkv_bias, qk_norm=qk_norm),
        seed=seed,
        gains={"linear": 1.0, "query_key": 4.0, "lm_head": 1.0, "tied_embedding": 2.0},
        final_norm_scale=logit_scale,
        dtype=dtype,
    )
    return out


def _tensors(
    shape: BlockShape, *, qkv_bias: bool, qk_norm: bool
) -> Iterator[TensorSpec]:
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    tied = shape.tie_word_embeddings
    yield "model.embed_tokens.weight", (VOCAB_SIZE, h), "tied_embedding" if tied else "embedding"
    for n in range(shape.num_layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,), "norm"
        for proj, rows, kind in (
            ("q_proj", q, "query_key"),
            ("k_proj", kv, "query_key"),
            ("v_proj", kv, "linear"),
        ):
            yield p + f"self_attn.{proj}.weight", (rows, h), kind
            if qkv_bias:
                yield p + f"self_attn.{proj}.bias", (rows,), "bias"
        if qk_norm:
            yield p + "self_attn.q_norm.weight", (d,), "qk_norm"
            yield p + "self_attn.k_norm.weight", (d,), "qk_norm"
        yield p + "self_attn.o_proj.weight", (h, q), "linear"
        yield p + "post_attention_layernorm.weight", (h,), "norm"
        yield p + "mlp.gate_proj.weight", (i, h), "linear"
        yield p + "mlp.up_proj.weight", (i, h), "linear"
        yield p + "mlp.down_proj.weight", (h, i), "linear"
    yield "model.norm.weight", (h,), "final_norm"
    if not shape.tie_word_embeddings:
        yield "lm_head.weight", (VOCAB_SIZE, h), "lm_head"


def _write_tokenizer(out: Path, special_tokens: dict[int, str]) -> None:
    """The shared byte-level tokenizer with the family's special tokens and ChatML template."""
    write_tokenizer(
        out,
        VOCAB_SIZE,
        {text: token_id for token_id, text in special_tokens.items()},
        {
            "bos_token": None,
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": _SPECIAL_TOKENS[IM_END],
            "model_max_length": 32768,
            "pad_token": _SPECIAL_TOKENS[ENDOFTEXT],
            "split_special_tokens": False,
            "unk_token": None,
        },
        special_map={"eos_token": _SPECIAL_TOKENS[IM_END], "pad_token": _SPECIAL_TOKENS[ENDOFTEXT]},
    )
