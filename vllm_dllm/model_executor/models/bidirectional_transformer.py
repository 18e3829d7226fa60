"""The Llama-style non-causal transformer body that every family of this package shares.

LLaDA, Dream, Fast-dLLM v2, SDAR and LLaDA 2.x are pre-norm transformers with RoPE
(rotate-half), SwiGLU MLPs and RMSNorm; they differ in tensor names, q/k/v and output biases,
grouped KV heads, Qwen3's per-head q/k norm and free head size (SDAR, LLaDA 2.x), partial RoPE
(LLaDA 2.x), a tied LM head (Fast-dLLM v2 1.5B), the MLP of each layer (LLaDA 2.x's mixture of
experts) and how logits map to positions. This module holds the common body with
tensor-parallel layers; the family modules map their checkpoints onto it and supply what only
they have. Which keys a query sees (all of the canvas, or block-causal) is the attention
metadata's business, not the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.compilation.decorators import support_torch_compile
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
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

from vllm_dllm.model_executor.layers.bidirectional_attention import BidirectionalAttention
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape


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
        self.head_dim = shape.head_dim
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
            shape.q_size,
            shape.hidden_size,
            bias=shape.o_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        rope_parameters: dict[str, object] = {
            "rope_type": "default",
            "rope_theta": shape.rope_theta,
        }
        if shape.partial_rotary_factor != 1.0:
            rope_parameters["partial_rotary_factor"] = shape.partial_rotary_factor
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=shape.max_position,
            is_neox_style=True,
            rope_parameters=rope_parameters,
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
        # Qwen3 (SDAR), LLaDA 2.x: one RMSNorm over each head of q and of k, applied before RoPE.
        self.qk_norm = shape.qk_norm
        if shape.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=shape.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=shape.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class DiffusionMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    `reduce_results=False` leaves the tensor-parallel sum of `down_proj` to the caller: an MoE
    layer adds its shared expert to the routed experts' partial sums and reduces once.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        quant_config: QuantizationConfig | None,
        prefix: str,
        *,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            reduce_results=reduce_results,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


#: Builds layer `index`'s MLP under the parameter prefix given.
MLPFactory = Callable[[int, str], nn.Module]


class DiffusionDecoderLayer(nn.Module):
    def __init__(
        self, vllm_config: VllmConfig, shape: TransformerShape, mlp: nn.Module, prefix: str
    ) -> None:
        super().__init__()
        self.self_attn = DiffusionAttention(
            shape, vllm_config.cache_config, vllm_config.quant_config, prefix=f"{prefix}.self_attn"
        )
        self.mlp = mlp
        self.input_layernorm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual is carried un-added to the next layer, whose norm adds it (vLLM's
        fused add + RMSNorm); the first layer has none yet."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0})
class DiffusionTransformer(nn.Module):
    """The body, compiled by vLLM like its own models (and CUDA-graphed piecewise on GPUs)."""

    def __init__(
        self,
        *,
        vllm_config: VllmConfig,
        shape: TransformerShape,
        make_mlp: MLPFactory,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            shape.vocab_size,
            shape.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.layers = nn.ModuleList(
            DiffusionDecoderLayer(
                vllm_config,
                shape,
                make_mlp(i, f"{prefix}.layers.{i}.mlp"),
                prefix=f"{prefix}.layers.{i}",
            )
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


#: Checkpoint q/k/v and gate/up projections -> the fused vLLM parameters and their shards.
FUSED_PROJECTIONS = WeightsMapper(
    orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"),
        ".k_proj": (".qkv_proj", "k"),
        ".v_proj": (".qkv_proj", "v"),
        ".gate_proj": (".gate_up_proj", 0),
        ".up_proj": (".gate_up_proj", 1),
    }
)


class DiffusionLM(nn.Module):
    """Base of the vLLM model classes: body, LM head and a strict weight loader.

    Subclasses set `hf_to_vllm_mapper` (checkpoint tensor names -> ours), define
    `shape_from_config` (which config options the family supports, whether q/k/v carry
    biases or a per-head norm) and set `logits_shift`: the model's contract with the sampler
    about which hidden state predicts a canvas position. 0: position j is predicted from hidden
    state j (LLaDA, SDAR, LLaDA 2.x). 1: from hidden state j - 1 (Dream's and Fast-dLLM v2's
    shifted logits). `mask_token_id` is the config's; a family whose config may lack it
    overrides `mask_token_id_from`. A family whose layers are not all the dense SwiGLU MLP
    overrides `make_mlp`; one whose parameters stand for checkpoint tensors the mapper cannot
    name overrides `checkpoint_names_of`.

    A tied LM head (`tie_word_embeddings`) shares the embedding's parameter, as vLLM's Qwen2
    does; `named_parameters()` then lists it once, as `model.embed_tokens.weight`, so the
    strict loader expects no `lm_head.weight`, which tied releases do not ship. A quantization
    that quantizes none of the linear layers is refused at start-up.
    """

    logits_shift: int = 0
    hf_to_vllm_mapper: ClassVar[WeightsMapper] = FUSED_PROJECTIONS
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.shape = self.shape_from_config(config)
        self.mask_token_id: int = self.mask_token_id_from(vllm_config)
        quant_config = vllm_config.quant_config
        self.model = DiffusionTransformer(
            vllm_config=vllm_config,
            shape=self.shape,
            make_mlp=partial(self.make_mlp, vllm_config),
            prefix=_join(prefix, "model"),
        )
        self.lm_head = ParallelLMHead(
            self.shape.vocab_size,
            self.shape.hidden_size,
            quant_config=quant_config,
            prefix=_join(prefix, "lm_head"),
        )
        if self.shape.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(self.shape.vocab_size)
        if quant_config is not None:
            method = vllm_config.model_config.quantization or quant_config.get_name()
            require_quantized_linears(self, method)

    @staticmethod
    def shape_from_config(config: PretrainedConfig) -> TransformerShape:
        raise NotImplementedError

    @classmethod
    def mask_token_id_from(cls, vllm_config: VllmConfig) -> int:
        return int(vllm_config.model_config.hf_config.mask_token_id)

    def make_mlp(self, vllm_config: VllmConfig, index: int, prefix: str) -> nn.Module:
        """Layer `index`'s MLP: the dense SwiGLU."""
        return DiffusionMLP(
            self.shape.hidden_size,
            self.shape.intermediate_size,
            vllm_config.quant_config,
            prefix=prefix,
        )

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
        """Strict: a stray or missing checkpoint tensor fails, named (`load_checked`)."""
        return load_checked(
            self, weights, self.expected_checkpoint_names(), self.hf_to_vllm_mapper
        )

    def expected_checkpoint_names(self) -> set[str]:
        """Every tensor name a complete checkpoint holds: our parameters, mapped back."""
        return {
            name
            for param, _ in self.named_parameters()
            for name in self.checkpoint_names_of(param)
        }

    def checkpoint_names_of(self, param: str) -> list[str]:
        """The checkpoint tensors that load the parameter `param`."""
        return checkpoint_names(self.hf_to_vllm_mapper, param)


def load_checked(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    expected: set[str],
    mapper: WeightsMapper,
) -> set[str]:
    """Load checkpoint tensors by their real names; fail naming any stray or missing one.

    `expected` is every tensor name a complete checkpoint of `model` holds. vLLM's
    `AutoWeightsLoader` does the loading through `mapper`. The strict name check stays ours:
    vLLM's loader lets a stray `.bias` pass, and its check that every parameter was initialised
    exempts unquantized linear layers and cannot see one missing shard (say `k_proj`) of a fused
    parameter, or one missing expert of an MoE layer's stacked expert weights.
    """
    seen: set[str] = set()

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name not in expected:
                raise ValueError(
                    f"unexpected tensor {name!r} in the {type(model).__name__} checkpoint "
                    f"(is this checkpoint of a different architecture?)"
                )
            seen.add(name)
            yield name, tensor

    loaded = AutoWeightsLoader(model).load_weights(checked(), mapper=mapper)
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{type(model).__name__} checkpoint is missing {len(missing)} tensor(s): {shown}"
        )
    return loaded


def checkpoint_names(mapper: WeightsMapper, param: str) -> list[str]:
    """The checkpoint names that `mapper` turns into the vLLM parameter `param`.

    Undoes, in reverse order, what `WeightsMapper` applies to a name: its (ordered) substring
    renames, then the fused projections, then prefix renames. Enough for the name-only
    mappers of this package; vLLM's mapper has no inverse of its own.
    """
    for old, new in mapper.orig_to_new_prefix.items():
        if new is not None and param.startswith(new):
            param = old + param.removeprefix(new)
    names = [
        param.replace(fused, part, 1)
        for part, (fused, _) in mapper.orig_to_new_stacked.items()
        if fused in param
    ] or [param]
    for old, new in reversed(mapper.orig_to_new_substr.items()):
        names = [name.replace(new, old, 1) if new else name for name in names]
    return names


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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
