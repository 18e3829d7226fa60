"""The Llama-style bidirectional transformer that LLaDA and Dream share, on vLLM layers.

Both families are pre-norm transformers with RoPE (rotate-half), SwiGLU MLPs and RMSNorm; they
differ in tensor names, q/k/v biases, grouped KV heads and how logits map to positions. This
module holds the common body with tensor-parallel layers; `llada.py` and `dream.py` only map
their checkpoints onto it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from vllm_dllm.model_executor.layers.bidirectional_attention import BidirectionalAttention


@dataclass(frozen=True)
class TransformerShape:
    """Sizes of the shared body, read from each family's own config keys."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    qkv_bias: bool


class DiffusionAttention(nn.Module):
    def __init__(
        self,
        shape: TransformerShape,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if shape.num_heads % tp_size:
            raise ValueError(
                f"{shape.num_heads} attention heads cannot be split over "
                f"tensor_parallel_size={tp_size}"
            )
        self.head_dim = shape.hidden_size // shape.num_heads
        self.num_heads = shape.num_heads // tp_size
        # Fewer KV heads than ranks: vLLM replicates them (QKVParallelLinear does the same).
        self.num_kv_heads = max(1, shape.num_kv_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            shape.hidden_size,
            self.head_dim,
            shape.num_heads,
            shape.num_kv_heads,
            bias=shape.qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            shape.num_heads * self.head_dim,
            shape.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=shape.max_position,
            is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        )
        self.attn = BidirectionalAttention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class DiffusionMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(
        self, shape: TransformerShape, quant_config: QuantizationConfig | None, prefix: str
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            shape.hidden_size,
            [shape.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            shape.intermediate_size,
            shape.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class DiffusionDecoderLayer(nn.Module):
    def __init__(
        self,
        shape: TransformerShape,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.self_attn = DiffusionAttention(
            shape, cache_config, quant_config, prefix=f"{prefix}.self_attn"
        )
        self.mlp = DiffusionMLP(shape, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DiffusionTransformer(nn.Module):
    def __init__(
        self,
        shape: TransformerShape,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            shape.vocab_size,
            shape.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.layers = nn.ModuleList(
            DiffusionDecoderLayer(shape, cache_config, quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(shape.num_layers)
        )
        self.norm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# vLLM-side parameter -> (fused parameter, shard id) for the q/k/v and gate/up projections.
_STACKED_PARAMS = (
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
)


class DiffusionLM(nn.Module):
    """Base of the vLLM model classes: body, untied LM head and a strict weight loader.

    Subclasses define `shape_from_config` and `checkpoint_to_vllm_name`, and set
    `logits_shift`: the model's contract with the sampler about which hidden state predicts a
    canvas position. 0: position j is predicted from hidden state j (LLaDA). 1: from hidden
    state j - 1 (Dream's shifted logits). The sampler (`vllm_dllm.engine.denoiser`) consumes it.
    """

    logits_shift: int = 0
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.shape = self.shape_from_config(config)
        self.mask_token_id: int = int(config.mask_token_id)
        quant_config = vllm_config.quant_config
        self.model = DiffusionTransformer(
            self.shape, vllm_config.cache_config, quant_config, prefix=_join(prefix, "model")
        )
        self.lm_head = ParallelLMHead(
            self.shape.vocab_size,
            self.shape.hidden_size,
            quant_config=quant_config,
            prefix=_join(prefix, "lm_head"),
        )
        self.logits_processor = LogitsProcessor(self.shape.vocab_size)
        if quant_config is not None:
            method = vllm_config.model_config.quantization or quant_config.get_name()
            require_quantized_linears(self, method)

    @staticmethod
    def shape_from_config(config: object) -> TransformerShape:
        raise NotImplementedError

    @classmethod
    def checkpoint_to_vllm_name(cls, name: str) -> str | None:
        """Map a checkpoint tensor name to our parameter name; None if it is not ours."""
        raise NotImplementedError

    @classmethod
    def expected_checkpoint_names(cls, config: object) -> set[str]:
        """Every tensor name a complete checkpoint of this config holds."""
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: object = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors by their real names; fail naming any stray or missing one."""
        params = dict(self.named_parameters())
        seen: set[str] = set()
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name = self.checkpoint_to_vllm_name(ckpt_name)
            if name is None:
                raise ValueError(
                    f"unexpected tensor {ckpt_name!r} in the {type(self).__name__} checkpoint "
                    f"(is this checkpoint of a different architecture?)"
                )
            seen.add(ckpt_name)
            for part, fused, shard_id in _STACKED_PARAMS:
                if part in name:
                    param = params[name.replace(part, fused)]
                    param.weight_loader(param, tensor, shard_id)
                    loaded.add(name.replace(part, fused))
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} has no parameter {name!r}")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        missing = sorted(self.expected_checkpoint_names(self.config) - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"{type(self).__name__} checkpoint is missing {len(missing)} tensor(s): {shown}"
            )
        return loaded


def require_quantized_linears(model: nn.Module, method: str) -> None:
    """Refuse a quantization that leaves every linear layer of `model` unquantized.

    Some methods target only layer kinds these models do not have (MoE experts, for example
    `int8_per_channel_weight_only`), or a checkpoint's ignore list may match every layer; vLLM
    then silently runs the model unquantized. Failing at start-up, naming the method, is better
    than serving a model the user believes quantized.
    """
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    if all(isinstance(m.quant_method, UnquantizedLinearMethod) for m in linears):
        raise ValueError(
            f"quantization {method!r} quantizes none of the "
            f"{len(linears)} linear layers of {type(model).__name__} (q/k/v, o, gate/up, down "
            f"projections); refusing to run the model unquantized"
        )


def rope_theta_of(config: object, default: float) -> float:
    """RoPE theta from `rope_parameters` (transformers >= 5) or the legacy `rope_theta` key."""
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", default)))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
