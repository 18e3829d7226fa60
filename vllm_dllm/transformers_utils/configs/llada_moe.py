"""LLaDA-MoE configuration (inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct), readable without
``trust_remote_code``.

The release ships ``configuration_lladamoe.py`` behind ``auto_map``; its config class declares
``model_type = "llada"``, the dense LLaDA's. So the same ``model_type`` names two
architectures: the dense LLaDA config class (registered for ``llada``) hands a config.json
whose ``architectures`` name ``LLaDAMoEModelLM`` to this class
(`LLaDAConfig.from_dict`). The defaults below are the release class's, so a key missing from a
config.json means what it means upstream.

What the release's ``modeling_lladamoe.py`` does with the keys (the oracle and the vLLM model
follow it, and ignore what it ignores):

- attention: separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, all four with a bias
  when ``attention_bias``; ``head_dim = hidden_size / num_attention_heads``; with
  ``qk_layernorm`` one RMSNorm over each q and k head before RoPE; rotate-half RoPE on the
  first ``head_dim * partial_rotary_factor`` dims; no mask (bidirectional);
- layer ``i`` is a mixture of experts when ``moe_layer_freq[i]`` is not 0, else a dense SwiGLU
  of ``dense_intermediate_size``;
- the router: ``softmax(gate(x))`` in fp32; ``expert_bias`` (a buffer, present when
  ``moe_router_enable_expert_bias``) is *added to the scores*, and the top
  ``num_experts_per_tok`` biased scores are both the choice and the weights; no
  renormalisation (the code fixes ``norm_topk_prob = False`` and never reads the key); experts
  of ``expert_intermediate_size``;
- a shared expert of ``shared_expert_intermediate_size`` (on the layer, added unweighted) in
  every MoE layer when that key is not null;
- never read: ``moe_router_score_function``, ``norm_topk_prob``, ``routed_scaling_factor``,
  ``router_num_group``, ``router_topk_group``.
"""

from typing import Any

from transformers import PreTrainedConfig

from vllm_dllm.transformers_utils.configs.common import set_upstream_keys

#: The release's ``LLaDAConfig.__init__`` defaults (configuration_lladamoe.py).
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "vocab_size": -1, "hidden_size": -1, "dense_intermediate_size": -1,
    "expert_intermediate_size": -1, "shared_expert_intermediate_size": -1,
    "num_hidden_layers": -1, "num_attention_heads": -1, "num_key_value_heads": None,
    "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
    "rms_norm_eps": 1e-05, "use_cache": False, "rope_theta": -1,
    "partial_rotary_factor": -1, "rope_scaling": None, "attention_bias": False,
    "attention_dropout": 0.0, "clip_qkv": None, "num_experts_per_tok": -1, "num_experts": -1,
    "output_router_logits": False, "router_aux_loss_coef": 0.01, "norm_topk_prob": None,
    "qk_layernorm": None, "moe_layer_freq": [], "moe_router_enable_expert_bias": None,
    "moe_router_score_function": None, "routed_scaling_factor": 1, "router_num_group": -2,
    "router_topk_group": -2,
}
#: Ids the release's __init__ passes to the base class, with its defaults.
UPSTREAM_TOKEN_DEFAULTS: dict[str, Any] = {
    "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279, "tie_word_embeddings": False,
}


class LLaDAMoEConfig(PreTrainedConfig):
    """The keys of the released LLaDA-MoE config.json, with vLLM's standard names on top."""

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any) -> None:
        set_upstream_keys(self, UPSTREAM_DEFAULTS, kwargs)
        for key, default in UPSTREAM_TOKEN_DEFAULTS.items():
            kwargs.setdefault(key, default)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.head_dim = self.hidden_size // self.num_attention_heads
        # vLLM sizes dense MLP-related things by `intermediate_size`: the dense layers' width.
        self.intermediate_size = self.dense_intermediate_size
        kwargs.setdefault("architectures", ["LLaDAMoEModelLM"])
        super().__init__(**kwargs)

    def is_moe_layer(self, index: int) -> bool:
        """Layer ``index`` routes to experts (the release: ``moe_layer_freq[index] != 0``)."""
        return self.moe_layer_freq[index] != 0
