"""Random-weight LLaDA 2.x checkpoints (model_type ``llada2_moe``) in the released layout.

What is as released (inclusionAI/LLaDA2.0-mini, read through public copies of its
``configuration_llada2_moe.py`` / ``modeling_llada2_moe.py``): the config.json keys (the
upstream config class's, plus the router keys the Ling-2.0 family ships:
``moe_router_enable_expert_bias``, ``norm_topk_prob``, ``score_function``, ``router_dtype``),
``pad_token_id`` the ``<|endoftext|>`` id, an untied LM head, and the safetensors names of
``LLaDA2MoeModelLM``'s state dict: ``model.word_embeddings``, per layer
``attention.query_key_value`` (one fused q/k/v matrix), ``attention.query_layernorm`` /
``key_layernorm``, ``attention.dense``, dense ``mlp.{gate,up,down}_proj`` in the first
``first_k_dense_replace`` layers, then ``mlp.gate.weight`` with its ``mlp.gate.expert_bias``
buffer, ``mlp.experts.{e}.*`` and ``mlp.shared_experts.*``; ``model.norm``, ``lm_head``.

Not verified against the release's own files (written as the Ling-2.0 family and the published
LLaDA 2.0 prompts show them): ``eos_token_id`` in config.json (the ``<|endoftext|>`` id, which
is the release generate()'s ``eos_id`` default); the tokenizer naming ``<|endoftext|>`` its EOS
and ``<|mask|>`` its mask token (the public LLaDA 2.1 samplers read both from the tokenizer);
the chat template, reconstructed from the published prompt
``<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>...<|role_end|>
<role>ASSISTANT</role>`` rather than copied.

Deliberate differences (none changes how a loader reads the files):
- tiny sizes: 3 layers (the first dense), 4 routed experts in 2 groups, top-2 from 1 group, one
  shared expert, head_dim 64 (vLLM's CPU attention accepts it; half of it rotary, as released);
- a vocabulary of 320 with the special ids small and in the release's order (``<|startoftext|>``
  256, ``<|endoftext|>`` 257 for 156892, ``<|mask|>`` 258 for 156895, ``<|role_end|>`` 259);
  readers take every id from the files, never from constants;
- a byte-level tokenizer and a short template (system, user and assistant turns; no tools);
- one ``model.safetensors`` in fp32 instead of bf16 shards; no generation_config.json (the
  release's generate() takes its ids as arguments).

Usage: ``python -m vllm_dllm.testing.checkpoints llada2 OUT_DIR [--lm-head-scale S]``.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_dllm.testing.files import TensorSpec, release_config, save_random_tensors, write_json
from vllm_dllm.testing.tokenizer import write_tokenizer

STARTOFTEXT, ENDOFTEXT, MASK, ROLE_END = 256, 257, 258, 259
VOCAB_SIZE = 320
SPECIAL_TOKENS = {
    STARTOFTEXT: "<|startoftext|>",
    ENDOFTEXT: "<|endoftext|>",
    MASK: "<|mask|>",
    ROLE_END: "<|role_end|>",
}
#: Logit scale of the peaked variant: its argmax is confident enough that a threshold step
#: commits several tokens at once.
PEAKED_LOGIT_SCALE = 30.0

LLADA2_CHAT_TEMPLATE = (
    "{{- '<role>SYSTEM</role>' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n' }}{%- endif %}"
    "{{- 'detailed thinking off<|role_end|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '<role>HUMAN</role>' + message['content'] + '<|role_end|>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<role>ASSISTANT</role>' + message['content'] + '<|role_end|>' }}"
    "{%- elif message['role'] == 'system' and not loop.first %}"
    "{{- '<role>SYSTEM</role>' + message['content'] + '<|role_end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<role>ASSISTANT</role>' }}{%- endif %}"
)


@dataclass(frozen=True)
class MoeShape:
    """Sizes of a tiny LLaDA 2.x checkpoint."""

    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_layers: int = 3
    first_k_dense_replace: int = 1
    intermediate_size: int = 256
    moe_intermediate_size: int = 64
    num_experts: int = 4
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    partial_rotary_factor: float = 0.5


def llada2_config_dict(shape: MoeShape) -> dict[str, Any]:
    """config.json of a LLaDA 2.x checkpoint: the release's keys."""
    return release_config(
        shape,
        VOCAB_SIZE,
        ("configuration_llada2_moe", "modeling_llada2_moe", "LLaDA2Moe", "LLaDA2MoeModelLM"),
        {
            "embedding_dropout": 0.0,
            "eos_token_id": ENDOFTEXT,
            "first_k_dense_replace": shape.first_k_dense_replace,
            "head_dim": shape.head_dim,
            "model_type": "llada2_moe",
            "moe_intermediate_size": shape.moe_intermediate_size,
            "moe_router_enable_expert_bias": True,
            "n_group": shape.n_group,
            "norm_head": False,
            "norm_topk_prob": True,
            "num_experts": shape.num_experts,
            "num_experts_per_tok": shape.num_experts_per_tok,
            "num_shared_experts": shape.num_shared_experts,
            "output_dropout": 0.0,
            "output_router_logits": False,
            "pad_token_id": ENDOFTEXT,
            "partial_rotary_factor": shape.partial_rotary_factor,
            "rope_theta": 600000,
            "routed_scaling_factor": shape.routed_scaling_factor,
            "router_dtype": "fp32",
            "score_function": "sigmoid",
            "tie_word_embeddings": False,
            "topk_group": shape.topk_group,
            "torch_dtype": "float32",
            "transformers_version": "4.52.3",
            "use_bias": False,
            "use_cache": True,
            "use_qk_norm": True,
            "use_qkv_bias": False,
        },
    )


def write_llada2_checkpoint(
    path: str | Path, shape: MoeShape = MoeShape(), *, seed: int = 0, logit_scale: float = 1.0
) -> Path:
    """A random LLaDA 2.x checkpoint; ``logit_scale`` multiplies every logit (peaked model)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", llada2_config_dict(shape))
    write_tokenizer(
        out,
        VOCAB_SIZE,
        {text: token_id for token_id, text in SPECIAL_TOKENS.items()},
        {
            "bos_token": SPECIAL_TOKENS[STARTOFTEXT],
            "chat_template": LLADA2_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": SPECIAL_TOKENS[ENDOFTEXT],
            "mask_token": SPECIAL_TOKENS[MASK],
            "model_max_length": 32768,
            "pad_token": SPECIAL_TOKENS[ENDOFTEXT],
        },
        special_map={
            "bos_token": SPECIAL_TOKENS[STARTOFTEXT],
            "eos_token": SPECIAL_TOKENS[ENDOFTEXT],
            "mask_token": SPECIAL_TOKENS[MASK],
            "pad_token": SPECIAL_TOKENS[ENDOFTEXT],
        },
    )
    # The fused q/k/v matrix is drawn 4x larger, as the block-diffusion checkpoints' q and k.
    # The router is too, so sigmoid scores spread over (0, 1) and tokens pick different experts.
    gains = {"linear": 1.0, "query_key_value": 4.0, "router": 4.0}
    save_random_tensors(
        out / "model.safetensors", _tensors(shape), seed=seed, gains=gains,
        final_norm_scale=logit_scale,
    )  # fmt: skip
    return out


def _tensors(shape: MoeShape) -> Iterator[TensorSpec]:
    h, d = shape.hidden_size, shape.head_dim
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * d
    yield "model.word_embeddings.weight", (VOCAB_SIZE, h), "embedding"
    for n in range(shape.num_layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,), "norm"
        yield p + "attention.query_key_value.weight", (qkv, h), "query_key_value"
        yield p + "attention.query_layernorm.weight", (d,), "qk_norm"
        yield p + "attention.key_layernorm.weight", (d,), "qk_norm"
        yield p + "attention.dense.weight", (h, shape.num_heads * d), "linear"
        yield p + "post_attention_layernorm.weight", (h,), "norm"
        if n < shape.first_k_dense_replace:
            yield from _mlp(p + "mlp.", h, shape.intermediate_size)
            continue
        yield p + "mlp.gate.weight", (shape.num_experts, h), "router"
        yield p + "mlp.gate.expert_bias", (shape.num_experts,), "expert_bias"
        for e in range(shape.num_experts):
            yield from _mlp(p + f"mlp.experts.{e}.", h, shape.moe_intermediate_size)
        shared = shape.moe_intermediate_size * shape.num_shared_experts
        yield from _mlp(p + "mlp.shared_experts.", h, shared)
    yield "model.norm.weight", (h,), "final_norm"
    yield "lm_head.weight", (VOCAB_SIZE, h), "linear"


def _mlp(prefix: str, hidden: int, width: int) -> Iterator[TensorSpec]:
    yield prefix + "gate_proj.weight", (width, hidden), "linear"
    yield prefix + "up_proj.weight", (width, hidden), "linear"
    yield prefix + "down_proj.weight", (hidden, width), "linear"
