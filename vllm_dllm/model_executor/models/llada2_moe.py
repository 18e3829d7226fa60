"""LLaDA 2.x (inclusionAI/LLaDA2.0-mini and its 2.1 successor; model_type ``llada2_moe``) on
vLLM layers.

A Ling-2.0 mixture-of-experts body run non-causally; the denoising loop makes the attention
block-causal through the windows and key ranges it schedules, so the model needs no mask of its
own. It runs on the body every family shares (`bidirectional_transformer`); the released
checkpoint's tensors map onto it by name:

- ``model.word_embeddings`` -> ``model.embed_tokens``; ``model.norm`` and an untied ``lm_head``;
- per layer ``input_layernorm``, ``attention.query_key_value`` (one fused q/k/v matrix: q heads,
  then k heads, then v heads, as ``QKVParallelLinear`` stores it) -> ``self_attn.qkv_proj``,
  ``attention.query_layernorm`` / ``key_layernorm`` (one RMSNorm over each q and k head, before
  RoPE) -> ``self_attn.q_norm`` / ``k_norm``, ``attention.dense`` (with a bias) ->
  ``self_attn.o_proj``, ``post_attention_layernorm``;
- a dense SwiGLU ``mlp.{gate,up,down}_proj`` in the first ``first_k_dense_replace`` layers, then
  ``mlp.gate.weight`` with ``mlp.gate.expert_bias``, ``mlp.experts.{e}.{gate,up,down}_proj``
  (stacked by vLLM's ``FusedMoE``) and ``mlp.shared_experts.{gate,up,down}_proj``.

RoPE is rotate-half on the first ``head_dim * partial_rotary_factor`` dims of each head. Position
j's logits come from hidden state j (no shift). The routing is the released gate's; how it maps
onto ``FusedMoE`` is explained on :class:`LLaDA2SparseMoe`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper

from vllm_dllm.engine.compat import fused_moe
from vllm_dllm.model_executor.models.bidirectional_transformer import DiffusionMLP
from vllm_dllm.model_executor.models.block_diffusion import BlockDiffusionLM
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape


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
        expert_bias = nn.Parameter(
            torch.empty(config.num_experts, dtype=torch.float32), requires_grad=False
        )
        # The gate is registered before the experts, so the bias that FusedMoE also holds is
        # named (and loaded) as the checkpoint names it: `mlp.gate.expert_bias`.
        self.gate = GateLinear(
            config.hidden_size,
            config.num_experts,
            out_dtype=torch.float32,
            params_dtype=torch.float32,
            prefix=f"{prefix}.gate",
        )
        self.gate.expert_bias = expert_bias
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
            e_score_correction_bias=expert_bias,
            routed_scaling_factor=config.routed_scaling_factor,
            router_logits_dtype=torch.float32,
            shared_experts=self.shared_experts,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)


class LLaDA2MoeModelLM(BlockDiffusionLM):
    """LLaDA 2.x on the shared body: its attention (fused q/k/v renamed onto ``qkv_proj``,
    output bias, per-head q/k norm, partial RoPE), an untied LM head, a dense MLP in the first
    ``first_k_dense_replace`` layers and :class:`LLaDA2SparseMoe` in the others."""

    #: The release's names -> the body's. Its q/k/v matrix is already fused: QKVParallelLinear
    #: splits it into q, k and v itself (for tensor parallelism too). Dense and shared-expert
    #: gate/up projections -> their fused parameters. The routed experts' names go unchanged
    #: to FusedMoE's own loader (`mlp.experts`), which stacks them.
    hf_to_vllm_mapper: ClassVar[WeightsMapper] = WeightsMapper(
        orig_to_new_substr={
            "model.word_embeddings.": "model.embed_tokens.",
            ".attention.query_key_value.": ".self_attn.qkv_proj.",
            ".attention.query_layernorm.": ".self_attn.q_norm.",
            ".attention.key_layernorm.": ".self_attn.k_norm.",
            ".attention.dense.": ".self_attn.o_proj.",
        },
        orig_to_new_stacked={
            ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
            ".mlp.up_proj": (".mlp.gate_up_proj", 1),
            ".shared_experts.gate_proj": (".shared_experts.gate_up_proj", 0),
            ".shared_experts.up_proj": (".shared_experts.gate_up_proj", 1),
        },
    )
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    #: The released config.json has no mask id; the tokenizer names its mask token, else the
    #: release's generate() constant (``<|mask|>``).
    mask_token = None
    release_mask_token_id = 156895

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuse settings the body would otherwise silently get wrong."""
        BlockDiffusionLM.check_config(config)
        if config.num_key_value_heads <= 0:
            raise ValueError(
                f"num_key_value_heads={config.num_key_value_heads}: LLaDA 2.x attention needs "
                "at least one key/value head"
            )
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (only 'silu')")
        if config.tie_word_embeddings:
            raise ValueError(
                "LLaDA 2.x checkpoints with tie_word_embeddings=true are not supported"
            )
        if config.norm_head:
            raise ValueError("LLaDA 2.x checkpoints with norm_head=true are not supported")

    @classmethod
    def shape_from_config(cls, config: PretrainedConfig) -> TransformerShape:
        cls.check_config(config)
        return TransformerShape.from_config(
            config,
            qkv_bias=config.use_qkv_bias,
            qk_norm=config.use_qk_norm,
            o_bias=config.use_bias,
            partial_rotary_factor=config.partial_rotary_factor,
        )

    def make_mlp(self, vllm_config: VllmConfig, index: int, prefix: str) -> nn.Module:
        if index < self.config.first_k_dense_replace:
            return super().make_mlp(vllm_config, index, prefix)
        return LLaDA2SparseMoe(self.config, vllm_config.quant_config, prefix)

    def checkpoint_names_of(self, param: str) -> list[str]:
        """A stacked expert parameter (``mlp.experts.routed_experts.w13_weight``, ``w2_weight``)
        stands for one tensor per expert and projection: ``mlp.experts.{e}.gate_proj.weight``
        and ``up_proj`` for ``w13``, ``down_proj`` for ``w2``. Every rank expects all
        ``num_experts``: with expert parallelism a rank keeps only its own, yet reads the same
        files.
        """
        if ".routed_experts." in param:
            return expert_checkpoint_names(param, self.config.num_experts)
        return super().checkpoint_names_of(param)


def expert_checkpoint_names(param: str, num_experts: int) -> list[str]:
    """``<layer>.mlp.experts.routed_experts.w13_<suffix>`` -> the per-expert tensor names."""
    experts, _, stacked = param.partition(".routed_experts.")
    shard, _, suffix = stacked.partition("_")
    projections = {"w13": ("gate_proj", "up_proj"), "w2": ("down_proj",)}[shard]
    return [f"{experts}.{e}.{p}.{suffix}" for e in range(num_experts) for p in projections]
