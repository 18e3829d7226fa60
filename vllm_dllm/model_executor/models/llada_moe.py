"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct; ``LLaDAMoEModelLM``) on vLLM layers.

A bidirectional mixture-of-experts LLaDA: it runs LLaDA's loop (every cache mode and selection
rule) on the body every family shares (`bidirectional_transformer`). The released tensor names
are the body's own but for the MoE parts:

- ``model.embed_tokens``, ``model.norm`` and an untied ``lm_head``;
- per layer ``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` (biased when
  ``attention_bias``), ``self_attn.q_norm`` / ``k_norm`` (``qk_layernorm``),
  ``post_attention_layernorm``;
- a dense layer's ``mlp.{gate,up,down}_proj``; an MoE layer's router ``mlp.gate.weight``, its
  ``mlp.expert_bias`` buffer (``moe_router_enable_expert_bias``), ``mlp.experts.{e}.*``
  (stacked by vLLM's ``FusedMoE``) and a shared expert ``shared_expert.*`` that sits on the
  layer, not in ``mlp`` (mapped to ``mlp.shared_experts``).

Position j's logits come from hidden state j (no shift). The routing is the release's, which
is not LLaDA 2.x's: see :class:`LLaDAMoESparseMoe`.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper

from vllm_dllm.engine.compat import fused_moe
from vllm_dllm.model_executor.models.bidirectional_transformer import DiffusionLM, DiffusionMLP
from vllm_dllm.model_executor.models.block_diffusion import resolve_mask_token_id
from vllm_dllm.model_executor.models.llada2_moe import expert_checkpoint_names
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape


def release_routing(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    *,
    expert_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's router: fp32 softmax of the router logits, the expert bias (if any) added
    to the scores, and the top-``topk`` biased scores as both the choice and the weights.

    ``renormalize`` is ``FusedMoE``'s argument, always False here: the release never
    renormalises.
    """
    scores = torch.softmax(gating_output, dim=-1, dtype=torch.float32)
    if expert_bias is not None:
        scores = scores + expert_bias.float()
    weights, ids = torch.topk(scores, topk, dim=-1)
    return weights, ids


class LLaDAMoESparseMoe(nn.Module):
    """The released MoE block on vLLM's ``FusedMoE``, with the release's routing.

    Unlike LLaDA 2.x (sigmoid scores, a bias for the choice only, groups, renormalised and
    scaled weights), LLaDA-MoE routes by softmax, adds its expert bias to the weights too,
    never renormalises and has no groups and no scaling; ``FusedMoE`` takes the routing as a
    custom routing function (:func:`release_routing`). The router logits come from a
    replicated gate in the model dtype, as the release's ``nn.Linear``. The shared expert, when
    the config has one, is added to every token's routed output unweighted; its ``down_proj``
    leaves the tensor-parallel sum to the MoE runner, which reduces routed and shared once.
    """

    def __init__(
        self, config: PretrainedConfig, quant_config: QuantizationConfig | None, prefix: str
    ) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(
            config.hidden_size, config.num_experts, bias=False, quant_config=None,
            prefix=f"{prefix}.gate",
        )  # fmt: skip
        self.expert_bias = (
            nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)
            if config.moe_router_enable_expert_bias
            else None
        )
        self.shared_experts = (
            DiffusionMLP(
                config.hidden_size,
                config.shared_expert_intermediate_size,
                quant_config,
                prefix=f"{prefix}.shared_experts",
                reduce_results=False,
            )
            if config.shared_expert_intermediate_size is not None
            else None
        )
        self.experts = fused_moe(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.expert_intermediate_size,
            renormalize=False,
            custom_routing_function=partial(release_routing, expert_bias=self.expert_bias),
            shared_experts=self.shared_experts,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)


class LLaDAMoEModelLM(DiffusionLM):
    """LLaDA-MoE on the shared body: LLaDA's loop, a dense SwiGLU where ``moe_layer_freq`` is 0
    and :class:`LLaDAMoESparseMoe` elsewhere."""

    logits_shift = 0
    #: The shared expert moves under ``mlp``; q/k/v and the dense and shared gate/up
    #: projections go to their fused parameters. The routed experts' names go unchanged to
    #: FusedMoE's own loader (``mlp.experts``), which stacks them.
    hf_to_vllm_mapper: ClassVar[WeightsMapper] = WeightsMapper(
        orig_to_new_substr={".shared_expert.": ".mlp.shared_experts."},
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".mlp.gate_proj": (".mlp.gate_up_proj", 0),
            ".mlp.up_proj": (".mlp.gate_up_proj", 1),
            ".shared_experts.gate_proj": (".shared_experts.gate_up_proj", 0),
            ".shared_experts.up_proj": (".shared_experts.gate_up_proj", 1),
        },
    )
    #: The released config.json has no mask id; the model card's generate() passes 156895
    #: (the tokenizer's ``<|mask|>``).
    release_mask_token_id = 156895

    @staticmethod
    def shape_from_config(config: PretrainedConfig) -> TransformerShape:
        """Refuse what the release supports and the body would silently get wrong."""
        if config.clip_qkv is not None:
            raise ValueError(f"LLaDA-MoE with clip_qkv={config.clip_qkv} is not supported")
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (only 'silu')")
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_scaling of type {rope_type!r} is not supported")
        if len(config.moe_layer_freq) != config.num_hidden_layers:
            raise ValueError(
                f"moe_layer_freq has {len(config.moe_layer_freq)} entries for "
                f"{config.num_hidden_layers} layers"
            )
        return TransformerShape.from_config(
            config,
            qkv_bias=bool(config.attention_bias),
            qk_norm=bool(config.qk_layernorm),
            o_bias=bool(config.attention_bias),
            partial_rotary_factor=float(config.partial_rotary_factor),
        )

    @classmethod
    def mask_token_id_from(cls, vllm_config: VllmConfig) -> int:
        """Config ``mask_token_id``, else the tokenizer's mask token, else the release's id."""
        model_config = vllm_config.model_config
        return resolve_mask_token_id(
            model_config.hf_config,
            model_config.tokenizer,
            model_config.tokenizer_revision,
            None,
            cls.release_mask_token_id,
        )

    def make_mlp(self, vllm_config: VllmConfig, index: int, prefix: str) -> nn.Module:
        if not self.config.is_moe_layer(index):
            return super().make_mlp(vllm_config, index, prefix)
        return LLaDAMoESparseMoe(self.config, vllm_config.quant_config, prefix)

    def checkpoint_names_of(self, param: str) -> list[str]:
        """A stacked expert parameter stands for one tensor per expert and projection."""
        if ".routed_experts." in param:
            return expert_checkpoint_names(param, self.config.num_experts)
        return super().checkpoint_names_of(param)
