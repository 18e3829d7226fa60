"""Random-weight LLaDA-MoE checkpoints (``LLaDAMoEModelLM``) in the released layout.

What is as released (inclusionAI/LLaDA-MoE-7B-A1B, read through the public copies of its
``configuration_lladamoe.py`` / ``modeling_lladamoe.py``, one of them vendored by the ``dllm``
project): the config.json keys (the release config class's), ``model_type`` ``llada`` (the
release's config class declares the dense LLaDA's), ``architectures`` ``LLaDAMoEModelLM`` and
the ``auto_map`` to the release's modules; the safetensors names of ``LLaDAMoEModelLM``'s state
dict: ``model.embed_tokens``, per layer ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``self_attn.q_norm`` / ``k_norm``, ``post_attention_layernorm``, then a dense
``mlp.{gate,up,down}_proj`` or the router ``mlp.gate.weight``, ``mlp.experts.{e}.*``, the
``mlp.expert_bias`` buffer when ``moe_router_enable_expert_bias`` and ``shared_expert.*`` when
``shared_expert_intermediate_size`` is set; ``model.norm``, ``lm_head``. The mask id 156895 is
not in config.json (the model card's generate() passes it).

Not verified against the release's own files: the tokenizer's special tokens and chat
template. They are written as LLaDA 2.x's Ling tokenizer has them (``<|endoftext|>`` the EOS,
``<|mask|>`` the mask at 156895, the ``<role>HUMAN</role>...<|role_end|>`` turns), the
template reconstructed from that format rather than copied; ``moe_router_enable_expert_bias``
false and no shared expert by default (both variants can be written).

Deliberate differences (none changes how a loader reads the files): tiny sizes (3 layers, the
first dense through ``moe_layer_freq``, 8 experts, top 2, head_dim 32), a byte-level
tokenizer with the special ids small (``<|startoftext|>`` 256, ``<|endoftext|>`` 257,
``<|mask|>`` 258, ``<|role_end|>`` 259), one fp32 ``model.safetensors``, no
generation_config.json.

Usage: ``python -m vllm_dllm.testing.checkpoints llada_moe OUT_DIR [--lm-head-scale S]``.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_dllm.testing.files import TensorSpec, save_random_tensors, write_json
from vllm_dllm.testing.llada2_checkpoints import (
    ENDOFTEXT,
    MASK,
    SPECIAL_TOKENS,
    STARTOFTEXT,
    VOCAB_SIZE,
)
from vllm_dllm.testing.tokenizer import write_tokenizer

LLADA_MOE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{{- '<role>SYSTEM</role>' + message['content'] + '<|role_end|>' }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '<role>HUMAN</role>' + message['content'] + '<|role_end|>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<role>ASSISTANT</role>' + message['content'] + '<|role_end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<role>ASSISTANT</role>' }}{%- endif %}"
)


@dataclass(frozen=True)
class MoeShape:
    """Sizes of a tiny LLaDA-MoE checkpoint."""

    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    num_layers: int = 3
    moe_layer_freq: tuple[int, ...] = (0, 1, 1)
    dense_intermediate_size: int = 256
    expert_intermediate_size: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    shared_expert_intermediate_size: int | None = None
    expert_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def llada_moe_config_dict(shape: MoeShape) -> dict[str, Any]:
    """config.json of a LLaDA-MoE checkpoint: the release's keys, sorted."""
    return dict(sorted({
        "architectures": ["LLaDAMoEModelLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_lladamoe.LLaDAConfig",
            "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
            "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
        },
        "bos_token_id": STARTOFTEXT,
        "clip_qkv": None,
        "dense_intermediate_size": shape.dense_intermediate_size,
        "eos_token_id": ENDOFTEXT,
        "expert_intermediate_size": shape.expert_intermediate_size,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "max_position_embeddings": 8192,
        "model_type": "llada",
        "moe_layer_freq": list(shape.moe_layer_freq),
        "moe_router_enable_expert_bias": shape.expert_bias,
        "moe_router_score_function": "softmax",
        "norm_topk_prob": False,
        "num_attention_heads": shape.num_heads,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.num_experts_per_tok,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "output_router_logits": False,
        "pad_token_id": ENDOFTEXT,
        "partial_rotary_factor": 1,
        "qk_layernorm": True,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 50000,
        "routed_scaling_factor": 1,
        "router_aux_loss_coef": 0.01,
        "router_num_group": None,
        "router_topk_group": None,
        "shared_expert_intermediate_size": shape.shared_expert_intermediate_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.52.3",
        "use_cache": False,
        "vocab_size": VOCAB_SIZE,
    }.items()))  # fmt: skip


def write_llada_moe_checkpoint(
    path: str | Path, shape: MoeShape = MoeShape(), *, seed: int = 0, logit_scale: float = 1.0
) -> Path:
    """A random LLaDA-MoE checkpoint; ``logit_scale`` multiplies every logit (peaked model)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", llada_moe_config_dict(shape))
    special = {
        "bos_token": SPECIAL_TOKENS[STARTOFTEXT],
        "eos_token": SPECIAL_TOKENS[ENDOFTEXT],
        "mask_token": SPECIAL_TOKENS[MASK],
        "pad_token": SPECIAL_TOKENS[ENDOFTEXT],
    }
    write_tokenizer(
        out,
        VOCAB_SIZE,
        {text: token_id for token_id, text in SPECIAL_TOKENS.items()},
        {
            **special,
            "chat_template": LLADA_MOE_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
        },
        special_map=special,
    )
    # q and k drawn 4x larger, as the other tiny checkpoints' (attention differs by position);
    # the router too, so the softmax scores spread and tokens pick different experts.
    gains = {"linear": 1.0, "query_key": 4.0, "router": 4.0}
    save_random_tensors(
        out / "model.safetensors", _tensors(shape), seed=seed, gains=gains,
        final_norm_scale=logit_scale,
    )  # fmt: skip
    return out


def _tensors(shape: MoeShape) -> Iterator[TensorSpec]:
    h, d = shape.hidden_size, shape.head_dim
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    yield "model.embed_tokens.weight", (VOCAB_SIZE, h), "embedding"
    for n in range(shape.num_layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,), "norm"
        yield p + "self_attn.q_proj.weight", (q, h), "query_key"
        yield p + "self_attn.k_proj.weight", (kv, h), "query_key"
        yield p + "self_attn.v_proj.weight", (kv, h), "linear"
        yield p + "self_attn.o_proj.weight", (h, q), "linear"
        yield p + "self_attn.q_norm.weight", (d,), "qk_norm"
        yield p + "self_attn.k_norm.weight", (d,), "qk_norm"
        yield p + "post_attention_layernorm.weight", (h,), "norm"
        if not shape.moe_layer_freq[n]:
            yield from _mlp(p + "mlp.", h, shape.dense_intermediate_size)
            continue
        yield p + "mlp.gate.weight", (shape.num_experts, h), "router"
        if shape.expert_bias:
            yield p + "mlp.expert_bias", (shape.num_experts,), "expert_bias"
        for e in range(shape.num_experts):
            yield from _mlp(p + f"mlp.experts.{e}.", h, shape.expert_intermediate_size)
        if shape.shared_expert_intermediate_size is not None:
            yield from _mlp(p + "shared_expert.", h, shape.shared_expert_intermediate_size)
    yield "model.norm.weight", (h,), "final_norm"
    yield "lm_head.weight", (VOCAB_SIZE, h), "linear"


def _mlp(prefix: str, hidden: int, width: int) -> Iterator[TensorSpec]:
    yield prefix + "gate_proj.weight", (width, hidden), "linear"
    yield prefix + "up_proj.weight", (width, hidden), "linear"
    yield prefix + "down_proj.weight", (hidden, width), "linear"
