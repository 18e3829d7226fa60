"""Checkpoints the benchmarks run on, written with fixed seeds (no downloads).

- random LLaDA checkpoints in the released layout (``vllm_dllm.testing.checkpoints``);
- a random Hugging Face **Llama** checkpoint with the same hidden size, layers, heads, MLP width
  and vocabulary (``LlamaConfig`` + safetensors + the same byte-level tokenizer files), which
  vLLM serves with its own ``LlamaForCausalLM``: the autoregressive reference;
- the trained ``models/llada-arith`` checkpoint is used in place when it exists.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from vllm_dllm.model_executor.models.transformer_shape import TransformerShape
from vllm_dllm.testing.checkpoints import (
    DREAM_NAMES,
    LLADA_MID,
    LLADA_REAL,
    LLADA_TINY,
    TinyCheckpoint,
    write_llada_checkpoint,
    write_weights,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINED_MODEL_DIR = REPO_ROOT / "models" / "llada-arith"

#: The cache benchmark's model: the MID preset (hidden 256, 4 layers, 4 heads, MLP 704, 3.4 M
#: parameters). One full fp32 forward over the 768-token canvas costs ~200 ms on one core of our
#: CPUs, tens of times the engine's per-step overhead (~6 ms, measured on TINY by the overhead
#: section, and reported as ``full_forward_over_step_overhead``), so the cache modes are compared
#: on model compute, not on overhead; yet `none` at one token per step (256 full forwards) still
#: fits in about a minute.
BENCH_MODEL = LLADA_MID
#: The engine-overhead model: compute is negligible next to the per-step overhead.
TINY_MODEL = LLADA_TINY
#: The step benchmark's model: mid-size layers with the real LLaDA vocabulary and token ids, so
#: the LM head over a block (32 x 126464 logits) weighs what it weighs in the released model.
STEP_MODEL = replace(LLADA_REAL, shape=replace(
    LLADA_REAL.shape, hidden_size=512, num_heads=8, num_kv_heads=8, num_layers=8,
    intermediate_size=1536))

SEEDS = {"bench": 1234, "tiny": 0, "llama": 4321, "step": 99}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def shape_dict(shape: TransformerShape) -> dict:
    """The sizes of a shape (for results.json)."""
    keys = ("hidden_size", "num_heads", "num_kv_heads", "num_layers", "intermediate_size",
            "vocab_size")
    return {k: v for k, v in asdict(shape).items() if k in keys}


def num_params(shape: TransformerShape) -> int:
    """Parameters of a LLaDA / Llama model of this shape (untied head, no biases)."""
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.kv_size
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return shape.num_layers * layer + 2 * v * h + h


def write_llada(path: Path, ckpt: TinyCheckpoint, seed: int) -> Path:
    """A random LLaDA checkpoint (fp32), rewritten only when its config or seed changed."""
    stamp = {"shape": asdict(ckpt.shape), "seed": seed, "kind": "llada"}
    if _fresh(path, stamp):
        return path
    shutil.rmtree(path, ignore_errors=True)
    write_llada_checkpoint(path, ckpt, seed=seed)
    _stamp(path, stamp)
    return path


def write_llama_like(
    path: Path, ckpt: TinyCheckpoint, seed: int, tokenizer_from: Path
) -> Path:
    """A random HF Llama checkpoint with ``ckpt``'s sizes, for vLLM's ``LlamaForCausalLM``.

    The tokenizer files are copied from ``tokenizer_from`` (a LLaDA checkpoint of the same
    vocabulary), so both models read the same prompt ids.
    """
    shape, eos = ckpt.shape, ckpt.token_ids["<|endoftext|>"]
    stamp = {"shape": asdict(shape), "seed": seed, "kind": "llama"}
    if _fresh(path, stamp):
        return path
    from transformers import LlamaConfig

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        bos_token_id=ckpt.token_ids["<|startoftext|>"],
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    config.save_pretrained(path)
    # Llama's tensor names are Dream's (Qwen2's), without the q/k/v biases.
    write_weights(path / "model.safetensors", replace(shape, qkv_bias=False), DREAM_NAMES,
                  seed=seed)
    for name in _TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, path / name)
    _stamp(path, stamp)
    return path


def trained_model(d: Path = TRAINED_MODEL_DIR) -> Path | None:
    """``d`` (default ``models/llada-arith``) when it holds a complete checkpoint, else None."""
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return d if all((d / f).exists() for f in needed) else None


def _fresh(path: Path, stamp: dict) -> bool:
    f = path / "bench_stamp.json"
    return f.exists() and json.loads(f.read_text()) == stamp


def _stamp(path: Path, stamp: dict) -> None:
    (path / "bench_stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
