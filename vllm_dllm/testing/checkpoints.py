"""Random-weight LLaDA / Dream checkpoints in the released on-disk layout.

Real checkpoints cannot be downloaded on our machines, so tests and CPU benchmarks run on small
random models written here **exactly as the released repos lay them out**: config.json keys,
generation_config.json, safetensors tensor names, and tokenizer files that
``AutoTokenizer.from_pretrained`` loads offline. A loader that passes on these files is the loader
users run on GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B.

Deliberate differences from the releases (none changes how a loader reads the files):
- one ``model.safetensors`` instead of shards plus an index;
- a byte-level tokenizer (256 byte tokens, no merges) whose special tokens sit at the ids the
  checkpoint description says (the real ids for ``*_REAL``), every other id filled with a plain
  ``<|reserved_token_N|>`` entry so that every logit row decodes to text;
- Dream's tokenizer is a ``PreTrainedTokenizerFast`` (tokenizer.json), where the release ships
  a custom ``DreamTokenizer`` behind ``auto_map`` (that would need trust_remote_code).

Usage: ``python -m vllm_dllm.testing.checkpoints {llada,dream} OUT_DIR [--preset tiny|mid]``;
``fast_dllm_v2`` and ``sdar`` (tiny only) are written by `block_checkpoints`, ``llada2`` (tiny,
float32) by `llada2_checkpoints`, ``llada_moe`` (tiny, float32) by `llada_moe_checkpoints`.
"""

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_dllm.model_executor.models.transformer_shape import TransformerShape
from vllm_dllm.testing.chat_templates import DREAM_CHAT_TEMPLATE, LLADA_CHAT_TEMPLATE
from vllm_dllm.testing.files import TensorSpec, save_random_tensors, write_json
from vllm_dllm.testing.tokenizer import write_tokenizer

# vLLM's CPU attention kernels support only these head sizes.
SUPPORTED_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


@dataclass(frozen=True)
class TinyCheckpoint:
    """A checkpoint to write: the model body's shape and the ids of its special tokens.

    ``token_ids`` maps each special token the model and the chat template use, by its text in
    the released tokenizer, to its id; every family's writer reads the ids it needs from it.
    """

    shape: TransformerShape
    token_ids: Mapping[str, int]

    def __post_init__(self) -> None:
        s = self.shape
        if s.hidden_size % s.num_heads or s.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim {s.hidden_size}/{s.num_heads} unsupported by vLLM CPU")
        if s.num_heads % s.num_kv_heads:
            raise ValueError(f"{s.num_heads} query heads do not group over {s.num_kv_heads}")


def _shape(
    hidden: int, heads: int, kv_heads: int, layers: int, mlp: int, vocab: int, **rest: Any
) -> TransformerShape:
    family = {
        "max_position": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "qkv_bias": False,
    } | rest
    return TransformerShape(hidden, heads, kv_heads, layers, mlp, vocab, **family)


_DREAM = {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "qkv_bias": True}
# Small checkpoints share one token layout: ids 0-255 are bytes, the special tokens follow.
LLADA_SMALL_TOKENS = {
    "<|startoftext|>": 256,
    "<|endoftext|>": 257,
    "<|mdm_mask|>": 258,
    "<|start_header_id|>": 259,
    "<|end_header_id|>": 260,
    "<|eot_id|>": 261,
}
DREAM_SMALL_TOKENS = {
    "<|endoftext|>": 256,
    "<|im_start|>": 257,
    "<|im_end|>": 258,
    "<|beginoftext|>": 259,
    "<|mask|>": 260,
}

LLADA_TINY = TinyCheckpoint(_shape(128, 2, 2, 2, 256, 320), LLADA_SMALL_TOKENS)
# MID: a dense fp32 forward over 768 tokens costs ~150 ms on one core of our 2-core CPUs
# (~35 ms for TINY), so model compute, not engine overhead, dominates CPU benchmarks.
LLADA_MID = TinyCheckpoint(_shape(256, 4, 4, 4, 704, 320), LLADA_SMALL_TOKENS)
LLADA_REAL = TinyCheckpoint(
    _shape(4096, 32, 32, 32, 12288, 126464),
    {
        "<|startoftext|>": 126080,
        "<|endoftext|>": 126081,
        "<|mdm_mask|>": 126336,
        "<|start_header_id|>": 126346,
        "<|end_header_id|>": 126347,
        "<|eot_id|>": 126348,
    },
)
DREAM_TINY = TinyCheckpoint(_shape(256, 4, 2, 2, 512, 320, **_DREAM), DREAM_SMALL_TOKENS)
DREAM_MID = TinyCheckpoint(_shape(256, 4, 2, 4, 704, 320, **_DREAM), DREAM_SMALL_TOKENS)
DREAM_REAL = TinyCheckpoint(
    _shape(3584, 28, 4, 28, 18944, 152064, max_position=131072, **_DREAM),
    {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|beginoftext|>": 151665,
        "<|mask|>": 151666,
    },
)


def llada_config_dict(ckpt: TinyCheckpoint) -> dict[str, Any]:
    """config.json of a LLaDA checkpoint: every key of the release, in its order.

    The release has no ``torch_dtype`` key; vLLM then reads the dtype from the safetensors.
    """
    shape, ids = ckpt.shape, ckpt.token_ids
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": shape.hidden_size,
        "embedding_dropout": 0.0,
        "embedding_size": shape.vocab_size,
        "eos_token_id": ids["<|endoftext|>"],
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ids["<|mdm_mask|>"],
        "max_sequence_length": shape.max_position,
        "mlp_hidden_size": shape.intermediate_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": shape.num_heads,
        "n_kv_heads": shape.num_kv_heads,
        "n_layers": shape.num_layers,
        "pad_token_id": ids["<|endoftext|>"],
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": shape.rope_theta,
        "scale_logits": False,
        "transformers_version": "4.46.3",
        "use_cache": False,
        "vocab_size": shape.vocab_size,
        "weight_tying": False,
    }


def dream_config_dict(
    ckpt: TinyCheckpoint, *, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """config.json of a Dream checkpoint: every key of the release, in its order."""
    shape, ids = ckpt.shape, ckpt.token_ids
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "mask_token_id": ids["<|mask|>"],
        "max_position_embeddings": shape.max_position,
        "max_window_layers": shape.num_layers,
        "model_type": "Dream",
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pad_token_id": ids["<|endoftext|>"],
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": shape.vocab_size,
    }


def write_llada_checkpoint(
    path: str | Path, ckpt: TinyCheckpoint = LLADA_TINY, **weights: Any
) -> Path:
    """Write a random LLaDA checkpoint into ``path``; ``weights``: see `_write`."""
    return _write(Path(path), ckpt, LLADA_NAMES, _llada_configs(ckpt), **weights)


def write_llada_config_files(path: str | Path, ckpt: TinyCheckpoint = LLADA_TINY) -> Path:
    """Every file of a LLaDA checkpoint but its weights (config.json, generation_config.json,
    the tokenizer files), as `write_llada_checkpoint` writes them.

    vLLM's ``load_format="dummy"`` builds the model from these with random weights in memory:
    for shapes whose weights are too large to write, such as the released 8B one (16 GB).
    """
    out = Path(path)
    _write_configs(out, ckpt, _llada_configs(ckpt))
    return out


def _llada_configs(ckpt: TinyCheckpoint) -> tuple[dict[str, Any], ...]:
    """config.json, generation_config.json, tokenizer_config.json and special_tokens_map.json
    of a LLaDA checkpoint."""
    config = llada_config_dict(ckpt)
    bos_text, eos_text = "<|startoftext|>", "<|endoftext|>"
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": bos_text,
        "chat_template": LLADA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_text,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": eos_text,
    }
    special_map = {"bos_token": bos_text, "eos_token": eos_text, "pad_token": eos_text}
    generation = _generation_config(config, "eos_token_id", "pad_token_id")
    return config, generation, tokenizer_config, special_map


def write_dream_checkpoint(
    path: str | Path, ckpt: TinyCheckpoint = DREAM_TINY, **weights: Any
) -> Path:
    """Write a random Dream checkpoint into ``path``; ``weights``: see `_write`."""
    config = dream_config_dict(ckpt, dtype=weights.get("dtype", torch.float32))
    # The tokenizer's bos is <|beginoftext|>; config.json's own bos_token_id is <|endoftext|>,
    # as in the release.
    eos_text, bos_text, mask_text = "<|endoftext|>", "<|beginoftext|>", "<|mask|>"
    extra = ["<|im_start|>", "<|im_end|>"]
    tokenizer_config = {
        "additional_special_tokens": extra,
        "bos_token": bos_text,
        "chat_template": DREAM_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_text,
        "errors": "replace",
        "mask_token": mask_text,
        "model_max_length": ckpt.shape.max_position,
        "pad_token": eos_text,
        "split_special_tokens": False,
        "unk_token": None,
    }
    special_map = {
        "additional_special_tokens": extra,
        "bos_token": bos_text,
        "eos_token": eos_text,
        "mask_token": mask_text,
        "pad_token": eos_text,
    }
    generation = _generation_config(config, "bos_token_id", "eos_token_id", "pad_token_id")
    configs = (config, generation, tokenizer_config, special_map)
    return _write(Path(path), ckpt, DREAM_NAMES, configs, **weights)


def _generation_config(config: dict[str, Any], *token_keys: str) -> dict[str, Any]:
    """generation_config.json as transformers derives it from config.json, and as the release
    ships it: ``_from_model_config``, the ``token_keys`` of config.json, its version."""
    return {
        "_from_model_config": True,
        **{key: config[key] for key in token_keys},
        "transformers_version": config["transformers_version"],
    }


def _write(
    out: Path,
    ckpt: TinyCheckpoint,
    names: Mapping[str, str],
    configs: tuple[dict[str, Any], ...],
    *,
    seed: int = 0,
    lm_head_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the files of one checkpoint; weights drawn from ``seed``, the LM head scaled by
    ``lm_head_scale`` (larger: more peaked, more confident logits), stored as ``dtype``.

    ``configs``: see `_write_configs`.
    """
    _write_configs(out, ckpt, configs)
    write_weights(
        out / "model.safetensors",
        ckpt.shape,
        names,
        seed=seed,
        lm_head_scale=lm_head_scale,
        dtype=dtype,
    )
    return out


def _write_configs(out: Path, ckpt: TinyCheckpoint, configs: tuple[dict[str, Any], ...]) -> None:
    """Every file but the weights. ``configs``: config.json, generation_config.json,
    tokenizer_config.json and special_tokens_map.json, in that order."""
    config, generation, tokenizer_config, special_map = configs
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation)
    write_tokenizer(
        out, ckpt.shape.vocab_size, ckpt.token_ids, tokenizer_config, special_map=special_map
    )


#: Tensor names of each family: the embedding, one layer's tensors (with `{}` for the layer
#: index) by role, the final norm and the untied LM head. Dream's are Qwen2's and Llama's.
LLADA_NAMES = {
    "embed": "model.transformer.wte",
    "norm": "model.transformer.ln_f",
    "lm_head": "model.transformer.ff_out",
    "layer": "model.transformer.blocks.{}.",
    "input_norm": "attn_norm",
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "attn_out",
    "post_norm": "ff_norm",
    "gate": "ff_proj",
    "up": "up_proj",
    "down": "ff_out",
}
DREAM_NAMES = {
    "embed": "model.embed_tokens",
    "norm": "model.norm",
    "lm_head": "lm_head",
    "layer": "model.layers.{}.",
    "input_norm": "input_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "post_norm": "post_attention_layernorm",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _tensors(shape: TransformerShape, names: Mapping[str, str]) -> Iterator[TensorSpec]:
    h, i, v, kv = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.kv_size
    yield names["embed"] + ".weight", (v, h), "embedding"
    for n in range(shape.num_layers):
        p = names["layer"].format(n)
        yield p + names["input_norm"] + ".weight", (h,), "norm"
        projections = (("q", h, "query_key"), ("k", kv, "query_key"), ("v", kv, "linear"))
        for proj, rows, kind in projections:
            yield p + names[proj] + ".weight", (rows, h), kind
            if shape.qkv_bias:
                yield p + names[proj] + ".bias", (rows,), "bias"
        yield p + names["o"] + ".weight", (h, h), "linear"
        yield p + names["post_norm"] + ".weight", (h,), "norm"
        yield p + names["gate"] + ".weight", (i, h), "linear"
        yield p + names["up"] + ".weight", (i, h), "linear"
        yield p + names["down"] + ".weight", (h, i), "linear"
    yield names["norm"] + ".weight", (h,), "norm"
    yield names["lm_head"] + ".weight", (v, h), "lm_head"


def write_weights(
    file: Path,
    shape: TransformerShape,
    names: Mapping[str, str],
    *,
    seed: int,
    lm_head_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """A random safetensors file with the tensors of ``shape`` under the family's ``names``.

    q and k are drawn 4x larger: through RoPE attention then differs from position to position
    (measured: many more distinct argmaxes over a masked block than with plain 1/sqrt(fan_in)).
    """
    gains = {"linear": 1.0, "query_key": 4.0, "lm_head": lm_head_scale}
    save_random_tensors(file, _tensors(shape, names), seed=seed, gains=gains, dtype=dtype)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    """Command line: write one checkpoint and print its directory."""
    from vllm_dllm.testing.block_checkpoints import (
        write_fast_dllm_v2_checkpoint,
        write_sdar_checkpoint,
    )
    from vllm_dllm.testing.llada2_checkpoints import write_llada2_checkpoint
    from vllm_dllm.testing.llada_moe_checkpoints import write_llada_moe_checkpoint

    parser = argparse.ArgumentParser(
        prog="python -m vllm_dllm.testing.checkpoints",
        description="Writes a random-weight checkpoint of one model family (LLaDA, Dream, "
        "Fast-dLLM v2, SDAR, LLaDA 2.x, LLaDA-MoE) in its release's on-disk layout, for tests, "
        "benchmarks and trying the server (vllm-dllm serve OUT_DIR); prints its directory."
    )
    parser.add_argument(
        "family",
        choices=["llada", "dream", "fast_dllm_v2", "sdar", "llada2", "llada_moe"],
        help="llada: LLaDA (GSAI-ML/LLaDA-8B-*); dream: Dream (Dream-org/Dream-v0-*); "
        "fast_dllm_v2: Fast-dLLM v2; sdar: SDAR; llada2: LLaDA 2.x (MoE); "
        "llada_moe: LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*)",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument(
        "--preset", choices=["tiny", "mid"], default="tiny", help="mid: LLaDA and Dream only"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-head-scale", type=float, default=1.0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype]
    options = {"seed": args.seed, "lm_head_scale": args.lm_head_scale, "dtype": dtype}
    block_writers = {"fast_dllm_v2": write_fast_dllm_v2_checkpoint, "sdar": write_sdar_checkpoint}
    moe_writers = {"llada2": write_llada2_checkpoint, "llada_moe": write_llada_moe_checkpoint}
    if args.family in moe_writers:
        if args.preset != "tiny" or args.dtype != "float32":
            parser.error(f"{args.family} has only the tiny preset in float32")
        write_moe = moe_writers[args.family]
        print(write_moe(args.out_dir, seed=args.seed, logit_scale=args.lm_head_scale))
    elif args.family in block_writers:
        if args.preset != "tiny":
            parser.error(f"{args.family} has only the tiny preset")
        # The block-diffusion writers scale the final norm, which scales the logits alike for a
        # tied and an untied LM head.
        write = block_writers[args.family]
        print(write(args.out_dir, seed=args.seed, logit_scale=args.lm_head_scale, dtype=dtype))
    elif args.family == "llada":
        ckpt = LLADA_TINY if args.preset == "tiny" else LLADA_MID
        print(write_llada_checkpoint(args.out_dir, ckpt, **options))
    else:
        ckpt = DREAM_TINY if args.preset == "tiny" else DREAM_MID
        print(write_dream_checkpoint(args.out_dir, ckpt, **options))


if __name__ == "__main__":
    main()
