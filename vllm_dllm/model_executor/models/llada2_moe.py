"""LLaDA 2.x (inclusionAI/LLaDA2.0-mini and its 2.1 successor; model_type ``llada2_moe``) on
vLLM layers.

A Ling-2.0 mixture-of-experts body run non-causally; the denoising loop makes the attention
block-causal through the windows and key ranges it schedules, so the model needs no mask of its
own. The released checkpoint's tensor names are kept as the parameter names (only dense and
shared-expert ``gate_proj``/``up_proj`` are fused into ``gate_up_proj``, and the routed experts
are stacked by vLLM's ``FusedMoE``):

- ``model.word_embeddings``, ``model.norm`` and an untied ``lm_head``;
- per layer ``input_layernorm``, ``attention.query_key_value`` (one fused q/k/v matrix: q heads,
  then k heads, then v heads, as ``QKVParallelLinear`` stores it), ``attention.query_layernorm``
  / ``key_layernorm`` (one RMSNorm over each q and k head, before RoPE), ``attention.dense``,
  ``post_attention_layernorm``;
- a dense SwiGLU ``mlp.{gate,up,down}_proj`` in the first ``first_k_dense_replace`` layers, then
  ``mlp.gate.weight`` with ``mlp.gate.expert_bias``, ``mlp.experts.{e}.{gate,up,down}_proj`` and
  ``mlp.shared_experts.{gate,up,down}_proj``.

RoPE is rotate-half on the first ``head_dim * partial_rotary_factor`` dims of each head. Position
j's logits come from hidden state j (no shift). The routing is the released gate's; how it maps
onto ``FusedMoE`` is explained on :class:`LLaDA2SparseMoe`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix

from vllm_dllm.engine.compat import fused_moe
from vllm_dllm.model_executor.layers.bidirectional_attention import BidirectionalAttention
from vllm_dllm.model_executor.models.bidirectional_transformer import (
    DiffusionLMBase,
    DiffusionMLP,
    pre_norm_layer,
    run_layers,
)
from vllm_dllm.model_executor.models.block_diffusion import resolve_mask_token_id

#: The MASK id the release's generate() hard-codes (``<|mask|>``), for a model directory whose
#: config and tokenizer do not say.
RELEASE_MASK_TOKEN_ID = 156895


def check_config(config: PretrainedConfig) -> None:
    """Refuse settings the body would otherwise silently get wrong."""
    if config.num_key_value_heads <= 0:
        raise ValueError(
            f"num_key_value_heads={config.num_key_value_heads}: LLaDA 2.x attention needs at "
            "least one key/value head"
        )
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (only 'silu')")
    if config.tie_word_embeddings:
        raise ValueError("LLaDA 2.x checkpoints with tie_word_embeddings=true are not supported")
    if config.norm_head:
        raise ValueError("LLaDA 2.x checkpoints with norm_head=true are not supported")
    if config.use_sliding_window:
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")


class LLaDA2Attention(nn.Module):
    """Fused q/k/v, per-head q/k RMSNorm, partial rotate-half RoPE, non-causal attention."""

    def __init__(
        self,
        config: PretrainedConfig,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        if total_heads % tp_size:
            raise ValueError(
                f"{total_heads} attention heads cannot be split over "
                f"tensor_parallel_size={tp_size}"
            )
        self.head_dim = config.head_dim
        self.num_heads = total_heads // tp_size
        # Fewer KV heads than ranks: QKVParallelLinear replicates them, so each rank keeps one.
        self.num_kv_heads = max(1, total_kv_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.query_key_value = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            total_heads,
            total_kv_heads,
            bias=config.use_qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.query_key_value",
        )
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.dense = RowParallelLinear(
            total_heads * self.head_dim,
            config.hidden_size,
            bias=config.use_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.dense",
        )
        # get_rope rotates the first `head_dim * partial_rotary_factor` dims (neox style is
        # rotate-half) and passes the rest through, as the release's partial RoPE does.
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters={
                **config.rope_parameters,
                "partial_rotary_factor": config.partial_rotary_factor,
            },
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
        qkv, _ = self.query_key_value(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.use_qk_norm:
            q = self.query_layernorm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.key_layernorm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.dense(self.attn(q, k, v))
        return output


class LLaDA2SparseMoe(nn.Module):
    """The released MoE block on vLLM's ``FusedMoE`` (routed experts) plus the shared expert.

    The released gate, argument by argument:

    - router logits ``mlp.gate.weight @ x`` in fp32, whatever the model dtype, as the release
      computes them: a ``GateLinear`` with fp32 parameters and output, and
      ``router_logits_dtype=float32`` so nothing downcasts them on the way to the routing;
    - ``scoring_func="sigmoid"``: the scores are the logits' sigmoid;
    - ``e_score_correction_bias=mlp.gate.expert_bias``: added to the scores to *choose* experts
      only; the weights stay the unbiased scores (vLLM gathers the original scores as the
      release does);
    - ``use_grouped_topk=True``, ``num_expert_group=n_group``, ``topk_group=topk_group``: the
      experts fall into ``n_group`` groups, each scored (with a correction bias, as here) by the
      sum of its two best biased scores; the ``topk_group`` best groups are kept and
      ``top_k=num_experts_per_tok`` experts chosen among them;
    - ``renormalize=top_k > 1``: the release normalises the chosen weights to sum 1 whenever
      more than one expert is chosen; it does not read ``norm_topk_prob``, and with one expert
      it leaves the single weight as it is;
    - ``routed_scaling_factor``: multiplies the (normalised) weights;
    - ``activation="silu"`` (the default): each expert is SwiGLU, ``down(silu(gate) * up)``;
    - ``shared_experts``: one SwiGLU of ``moe_intermediate_size * num_shared_experts``, added to
      every token's routed output, unweighted. Its ``down_proj`` does not all-reduce: the MoE
      runner adds it to the routed experts' partial sums and reduces the total once.

    Under tensor parallelism ``FusedMoE`` splits every expert's intermediate dimension over the
    ranks (expert parallelism instead places whole experts), as vLLM does for its own MoE
    models; the gate is replicated.
    """

    def __init__(
        self, config: PretrainedConfig, quant_config: QuantizationConfig | None, prefix: str
    ) -> None:
        super().__init__()
        # The gate is registered before the experts, so the bias that FusedMoE also holds is
        # named (and loaded) as the checkpoint names it: `mlp.gate.expert_bias`.
        self.gate = GateLinear(
            config.hidden_size,
            config.num_experts,
            out_dtype=torch.float32,
            params_dtype=torch.float32,
            prefix=f"{prefix}.gate",
        )
        self.gate.expert_bias = nn.Parameter(
            torch.empty(config.num_experts, dtype=torch.float32), requires_grad=False
        )
        self.shared_experts = (
            DiffusionMLP(
                config.hidden_size,
                config.moe_intermediate_size * config.num_shared_experts,
                quant_config,
                prefix=f"{prefix}.shared_experts",
                reduce_results=False,
            )
            if config.num_shared_experts
            else None
        )
        top_k = config.num_experts_per_tok
        self.experts = fused_moe(
            num_experts=config.num_experts,
            top_k=top_k,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=top_k > 1,
            use_grouped_topk=True,
            num_expert_group=config.n_group,
            topk_group=config.topk_group,
            scoring_func="sigmoid",
            e_score_correction_bias=self.gate.expert_bias,
            routed_scaling_factor=config.routed_scaling_factor,
            router_logits_dtype=torch.float32,
            shared_experts=self.shared_experts,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)


class LLaDA2DecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, index: int, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = LLaDA2Attention(
            config, vllm_config.cache_config, quant_config, prefix=f"{prefix}.attention"
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp: nn.Module
        if index < config.first_k_dense_replace:
            self.mlp = DiffusionMLP(
                config.hidden_size, config.intermediate_size, quant_config, prefix=f"{prefix}.mlp"
            )
        else:
            self.mlp = LLaDA2SparseMoe(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pre_norm_layer(self, self.attention, positions, hidden_states, residual)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0})
class LLaDA2MoeModel(nn.Module):
    """The body, compiled by vLLM like its own models (and CUDA-graphed piecewise on GPUs)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.word_embeddings",
        )
        self.layers = nn.ModuleList(
            LLaDA2DecoderLayer(vllm_config, i, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return run_layers(self.word_embeddings(input_ids), positions, self.layers, self.norm)


class LLaDA2MoeModelLM(DiffusionLMBase):
    """LLaDA 2.x: body, untied LM head, strict loader; the same contract with the denoiser as
    the other families (`mask_token_id`, `logits_shift`, `compute_logits`)."""

    #: Dense and shared-expert gate/up projections -> their fused vLLM parameters. The routed
    #: experts' names go unchanged to FusedMoE's own loader (`mlp.experts`), which stacks them.
    hf_to_vllm_mapper: ClassVar[WeightsMapper] = WeightsMapper(
        orig_to_new_stacked={
            ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
            ".mlp.up_proj": (".mlp.gate_up_proj", 1),
            ".shared_experts.gate_proj": (".shared_experts.gate_up_proj", 0),
            ".shared_experts.up_proj": (".shared_experts.gate_up_proj", 1),
        }
    )
    packed_modules_mapping = {
        "query_key_value": ["query_key_value"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        model_config = vllm_config.model_config
        config = model_config.hf_config
        check_config(config)
        self.config = config
        # The released config.json has no mask id; the tokenizer names its mask token.
        self.mask_token_id: int = resolve_mask_token_id(
            config,
            model_config.tokenizer,
            model_config.tokenizer_revision,
            mask_token=None,
            release_default=RELEASE_MASK_TOKEN_ID,
        )
        self.model = LLaDA2MoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.init_lm_head(vllm_config, prefix, config.vocab_size, config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.word_embeddings(input_ids)

    def checkpoint_names_of(self, param: str) -> list[str]:
        """A stacked expert parameter (``mlp.experts.routed_experts.w13_weight``, ``w2_weight``)
        stands for one tensor per expert and projection: ``mlp.experts.{e}.gate_proj.weight``
        and ``up_proj`` for ``w13``, ``down_proj`` for ``w2``. Every rank expects all
        ``num_experts``: with expert parallelism a rank keeps only its own, yet reads the same
        files.
        """
        if ".routed_experts." in param:
            return _expert_checkpoint_names(param, self.config.num_experts)
        return super().checkpoint_names_of(param)


def _expert_checkpoint_names(param: str, num_experts: int) -> list[str]:
    """``<layer>.mlp.experts.routed_experts.w13_<suffix>`` -> the per-expert tensor names."""
    experts, _, stacked = param.partition(".routed_experts.")
    shard, _, suffix = stacked.partition("_")
    projections = {"w13": ("gate_proj", "up_proj"), "w2": ("down_proj",)}[shard]
    return [f"{experts}.{e}.{p}.{suffix}" for e in range(num_experts) for p in projections]
