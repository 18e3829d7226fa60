"""Random-weight LLaDA / Dream checkpoints in the released on-disk layout.

Real checkpoints cannot be downloaded on our machines, so tests and CPU benchmarks run on small
random models written here **exactly as the released repos lay them out**: config.json keys,
generation_config.json, safetensors tensor names, and tokenizer files that
``AutoTokenizer.from_pretrained`` loads offline. A loader that passes on these files is the loader
users run on GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B.

Deliberate differences from the releases (none changes how a loader reads the files):
- one ``model.safetensors`` instead of shards plus an index;
- a byte-level tokenizer (256 byte tokens, no merges) whose special tokens sit at the ids the
  shape says (the real ids for ``REAL``), every other id filled with a plain
  ``<|reserved_token_N|>`` entry so that every logit row decodes to text;
- Dream's tokenizer is a ``PreTrainedTokenizerFast`` (tokenizer.json), where the release ships
  a custom ``DreamTokenizer`` behind ``auto_map`` (that would need trust_remote_code).

Usage: ``python -m vllm_dllm.tiny_checkpoints {llada,dream} OUT_DIR [--preset tiny|mid]``.
"""

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# vLLM's CPU attention kernels support only these head sizes.
SUPPORTED_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


@dataclass(frozen=True)
class LLaDAShape:
    """Sizes and special-token ids of a LLaDA checkpoint (presets: TINY, MID, REAL)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    mask_token_id: int
    start_header_token_id: int
    end_header_token_id: int
    eot_token_id: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    TINY: ClassVar["LLaDAShape"]
    MID: ClassVar["LLaDAShape"]
    REAL: ClassVar["LLaDAShape"]

    def __post_init__(self) -> None:
        _check_heads(self.hidden_size, self.num_heads, self.num_kv_heads)

    @property
    def special_tokens(self) -> dict[int, str]:
        """The released tokenizer's special tokens that the model and chat template use."""
        return {
            self.bos_token_id: "<|startoftext|>",
            self.eos_token_id: "<|endoftext|>",
            self.mask_token_id: "<|mdm_mask|>",
            self.start_header_token_id: "<|start_header_id|>",
            self.end_header_token_id: "<|end_header_id|>",
            self.eot_token_id: "<|eot_id|>",
        }


@dataclass(frozen=True)
class DreamShape:
    """Sizes and special-token ids of a Dream checkpoint (presets: TINY, MID, REAL)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_id: int
    im_start_token_id: int
    im_end_token_id: int
    bos_token_id: int
    mask_token_id: int
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6

    TINY: ClassVar["DreamShape"]
    MID: ClassVar["DreamShape"]
    REAL: ClassVar["DreamShape"]

    def __post_init__(self) -> None:
        _check_heads(self.hidden_size, self.num_heads, self.num_kv_heads)

    @property
    def special_tokens(self) -> dict[int, str]:
        """The released tokenizer's special tokens that the model and chat template use.

        ``bos_token_id`` is the tokenizer's ``<|beginoftext|>``; config.json's own
        ``bos_token_id`` is ``<|endoftext|>``, as in the release.
        """
        return {
            self.eos_token_id: "<|endoftext|>",
            self.im_start_token_id: "<|im_start|>",
            self.im_end_token_id: "<|im_end|>",
            self.bos_token_id: "<|beginoftext|>",
            self.mask_token_id: "<|mask|>",
        }


def _check_heads(hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
    head_dim, rest = divmod(hidden_size, num_heads)
    if rest or head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {hidden_size}/{num_heads} unsupported by vLLM CPU attention")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} kv heads")


# Small presets share one token layout: ids 0-255 are bytes, the special tokens follow.
LLaDAShape.TINY = LLaDAShape(
    hidden_size=128, num_heads=2, num_kv_heads=2, num_layers=2, intermediate_size=256,
    vocab_size=320, max_position_embeddings=4096, bos_token_id=256, eos_token_id=257,
    mask_token_id=258, start_header_token_id=259, end_header_token_id=260, eot_token_id=261,
)
# MID: a dense fp32 forward over 768 tokens costs ~150 ms on one core of our 2-core CPUs
# (~35 ms for TINY), so model compute, not engine overhead, dominates CPU benchmarks.
LLaDAShape.MID = LLaDAShape(
    hidden_size=256, num_heads=4, num_kv_heads=4, num_layers=4, intermediate_size=704,
    vocab_size=320, max_position_embeddings=4096, bos_token_id=256, eos_token_id=257,
    mask_token_id=258, start_header_token_id=259, end_header_token_id=260, eot_token_id=261,
)
LLaDAShape.REAL = LLaDAShape(
    hidden_size=4096, num_heads=32, num_kv_heads=32, num_layers=32, intermediate_size=12288,
    vocab_size=126464, max_position_embeddings=4096, bos_token_id=126080, eos_token_id=126081,
    mask_token_id=126336, start_header_token_id=126346, end_header_token_id=126347,
    eot_token_id=126348,
)
DreamShape.TINY = DreamShape(
    hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=2, intermediate_size=512,
    vocab_size=320, max_position_embeddings=4096, eos_token_id=256, im_start_token_id=257,
    im_end_token_id=258, bos_token_id=259, mask_token_id=260,
)
DreamShape.MID = DreamShape(
    hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=4, intermediate_size=704,
    vocab_size=320, max_position_embeddings=4096, eos_token_id=256, im_start_token_id=257,
    im_end_token_id=258, bos_token_id=259, mask_token_id=260,
)
DreamShape.REAL = DreamShape(
    hidden_size=3584, num_heads=28, num_kv_heads=4, num_layers=28, intermediate_size=18944,
    vocab_size=152064, max_position_embeddings=131072, eos_token_id=151643,
    im_start_token_id=151644, im_end_token_id=151645, bos_token_id=151665, mask_token_id=151666,
)

# Verbatim from GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json (it always ends with the
# assistant header, whatever add_generation_prompt says).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)

# Dream-v0-Instruct-7B uses the Qwen2.5 template with a neutral default system prompt.
DREAM_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501  (a chat template is data; its lines stay as released)


def llada_config_dict(shape: LLaDAShape) -> dict[str, Any]:
    """config.json of a LLaDA checkpoint: every key of the release, in its order.

    The release has no ``torch_dtype`` key; vLLM then reads the dtype from the safetensors.
    """
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
        "eos_token_id": shape.eos_token_id,
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
        "mask_token_id": shape.mask_token_id,
        "max_sequence_length": shape.max_position_embeddings,
        "mlp_hidden_size": shape.intermediate_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": shape.num_heads,
        "n_kv_heads": shape.num_kv_heads,
        "n_layers": shape.num_layers,
        "pad_token_id": shape.eos_token_id,
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


def dream_config_dict(shape: DreamShape, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of a Dream checkpoint: every key of the release, in its order."""
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": shape.eos_token_id,
        "eos_token_id": shape.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "mask_token_id": shape.mask_token_id,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.num_layers,
        "model_type": "Dream",
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pad_token_id": shape.eos_token_id,
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
    path: str | Path,
    shape: LLaDAShape = LLaDAShape.TINY,
    *,
    seed: int = 0,
    lm_head_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random LLaDA checkpoint (weights drawn from ``seed``) into ``path``."""
    out = _prepare(path)
    _write_json(out / "config.json", llada_config_dict(shape))
    _write_json(out / "generation_config.json", {
        "_from_model_config": True,
        "eos_token_id": shape.eos_token_id,
        "pad_token_id": shape.eos_token_id,
        "transformers_version": "4.46.3",
    })
    bos, eos = shape.special_tokens[shape.bos_token_id], shape.special_tokens[shape.eos_token_id]
    _write_tokenizer(out, shape.vocab_size, shape.special_tokens, {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": bos,
        "chat_template": LLADA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": eos,
    }, special_map={"bos_token": bos, "eos_token": eos, "pad_token": eos})
    _save_weights(out / "model.safetensors", _llada_tensors(shape), seed, lm_head_scale, dtype)
    return out


def write_dream_checkpoint(
    path: str | Path,
    shape: DreamShape = DreamShape.TINY,
    *,
    seed: int = 0,
    lm_head_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random Dream checkpoint (weights drawn from ``seed``) into ``path``."""
    out = _prepare(path)
    _write_json(out / "config.json", dream_config_dict(shape, dtype=dtype))
    _write_json(out / "generation_config.json", {
        "_from_model_config": True,
        "bos_token_id": shape.eos_token_id,
        "eos_token_id": shape.eos_token_id,
        "pad_token_id": shape.eos_token_id,
        "transformers_version": "4.46.2",
    })
    names = shape.special_tokens
    eos, bos = names[shape.eos_token_id], names[shape.bos_token_id]
    mask = names[shape.mask_token_id]
    extra = [names[shape.im_start_token_id], names[shape.im_end_token_id]]
    _write_tokenizer(out, shape.vocab_size, names, {
        "additional_special_tokens": extra,
        "bos_token": bos,
        "chat_template": DREAM_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "mask_token": mask,
        "model_max_length": shape.max_position_embeddings,
        "pad_token": eos,
        "split_special_tokens": False,
        "unk_token": None,
    }, special_map={
        "additional_special_tokens": extra,
        "bos_token": bos, "eos_token": eos, "mask_token": mask, "pad_token": eos,
    })
    _save_weights(out / "model.safetensors", _dream_tensors(shape), seed, lm_head_scale, dtype)
    return out


# A tensor to draw: (name, shape, kind); kind picks the initialisation in _draw.
_TensorSpec = tuple[str, tuple[int, ...], str]


def _llada_tensors(shape: LLaDAShape) -> Iterator[_TensorSpec]:
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q = h
    kv = shape.num_kv_heads * (h // shape.num_heads)
    yield "model.transformer.wte.weight", (v, h), "embedding"
    for n in range(shape.num_layers):
        p = f"model.transformer.blocks.{n}."
        yield p + "attn_norm.weight", (h,), "norm"
        yield p + "q_proj.weight", (q, h), "query_key"
        yield p + "k_proj.weight", (kv, h), "query_key"
        yield p + "v_proj.weight", (kv, h), "linear"
        yield p + "attn_out.weight", (h, q), "linear"
        yield p + "ff_norm.weight", (h,), "norm"
        yield p + "ff_proj.weight", (i, h), "linear"
        yield p + "up_proj.weight", (i, h), "linear"
        yield p + "ff_out.weight", (h, i), "linear"
    yield "model.transformer.ln_f.weight", (h,), "norm"
    yield "model.transformer.ff_out.weight", (v, h), "lm_head"


def _dream_tensors(shape: DreamShape) -> Iterator[_TensorSpec]:
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q = h
    kv = shape.num_kv_heads * (h // shape.num_heads)
    yield "model.embed_tokens.weight", (v, h), "embedding"
    for n in range(shape.num_layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,), "norm"
        for proj, rows, kind in (("q_proj", q, "query_key"), ("k_proj", kv, "query_key"),
                                 ("v_proj", kv, "linear")):
            yield p + f"self_attn.{proj}.weight", (rows, h), kind
            yield p + f"self_attn.{proj}.bias", (rows,), "bias"
        yield p + "self_attn.o_proj.weight", (h, q), "linear"
        yield p + "post_attention_layernorm.weight", (h,), "norm"
        yield p + "mlp.gate_proj.weight", (i, h), "linear"
        yield p + "mlp.up_proj.weight", (i, h), "linear"
        yield p + "mlp.down_proj.weight", (h, i), "linear"
    yield "model.norm.weight", (h,), "norm"
    yield "lm_head.weight", (v, h), "lm_head"


def _draw(
    size: tuple[int, ...], kind: str, gen: torch.Generator, lm_head_scale: float
) -> torch.Tensor:
    """Initialise so that every sublayer matters and logits are far from uniform.

    The usual std-0.02 init leaves the residual stream dominated by the token embedding, so
    all MASK positions would get near-identical logits (ties everywhere, position-independent
    argmax). Unit-variance embeddings and 1/sqrt(fan_in) linears give each sublayer an O(1)
    contribution; q and k are drawn 4x larger so attention is sharp and, through RoPE,
    differs from position to position (measured: many more distinct argmaxes over a masked
    block than with plain 1/sqrt(fan_in)). Norm weights and biases are perturbed away from
    1 and 0 so that a loader which drops them fails the logits comparison.
    """
    noise = torch.randn(size, generator=gen, dtype=torch.float32)
    if kind == "embedding":
        return noise
    if kind == "norm":
        return 1.0 + 0.1 * noise
    if kind == "bias":
        return 0.2 * noise
    gain = {"linear": 1.0, "query_key": 4.0, "lm_head": lm_head_scale}[kind]
    return gain * size[1] ** -0.5 * noise


def _save_weights(
    file: Path,
    specs: Iterator[_TensorSpec],
    seed: int,
    lm_head_scale: float,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _draw(size, kind, gen, lm_head_scale).to(dtype) for name, size, kind in specs
    }
    save_file(tensors, str(file), metadata={"format": "pt"})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _write_tokenizer(
    out: Path,
    vocab_size: int,
    special_tokens: dict[int, str],
    tokenizer_config: dict[str, Any],
    *,
    special_map: dict[str, Any],
) -> None:
    """Byte-level tokenizer whose ids match the config: bytes 0-255, specials at their ids."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    for token_id in range(256, vocab_size):
        vocab[special_tokens.get(token_id, f"<|reserved_token_{token_id}|>")] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Tokens already in the vocabulary keep their ids when added as special tokens.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for _, t in sorted(special_tokens.items())])
    tok.save(str(out / "tokenizer.json"))

    added = {
        str(token_id): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for token_id, text in sorted(special_tokens.items())
    }
    _write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": added,
        **tokenizer_config,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    token_entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write_json(out / "special_tokens_map.json", {
        key: value if isinstance(value, list) else {"content": value, **token_entry}
        for key, value in special_map.items()
    })


def _prepare(path: str | Path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(file: Path, content: dict[str, Any]) -> None:
    file.write_text(json.dumps(content, indent=2) + "\n")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    """Command line: write one checkpoint and print its directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=["llada", "dream"])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-head-scale", type=float, default=1.0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    args = parser.parse_args(argv)
    options = {"seed": args.seed, "lm_head_scale": args.lm_head_scale,
               "dtype": _DTYPES[args.dtype]}
    if args.family == "llada":
        shape = LLaDAShape.TINY if args.preset == "tiny" else LLaDAShape.MID
        print(write_llada_checkpoint(args.out_dir, shape, **options))
    else:
        preset = DreamShape.TINY if args.preset == "tiny" else DreamShape.MID
        print(write_dream_checkpoint(args.out_dir, preset, **options))


if __name__ == "__main__":
    main()
