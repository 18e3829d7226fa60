"""LLaDA 2.x configuration (model_type ``llada2_moe``), readable without ``trust_remote_code``.

inclusionAI/LLaDA2.0-mini and its 2.1 successor ship a Ling-2.0 style MoE config.json with an
``auto_map`` to their own ``configuration_llada2_moe.py``. The defaults below are that file's,
so a key missing from a config.json means what it means upstream. The released config.json
also carries keys the upstream class does not name (``moe_router_enable_expert_bias``,
``norm_topk_prob``, ``score_function``, ``router_dtype``, ...); they stay attributes through
``**kwargs``, as they do upstream.

What the released modeling code does with them (the oracle and the vLLM model follow it):
sigmoid router scores, computed in fp32; ``mlp.gate.expert_bias`` added for the choice of
experts only; ``n_group`` groups scored by the sum of their two best biased scores, the
``topk_group`` best groups kept, the ``num_experts_per_tok`` best experts in them chosen; the
chosen unbiased scores normalised to sum 1 whenever more than one expert is chosen (the code
does not read ``norm_topk_prob``, true in the release) and multiplied by
``routed_scaling_factor``; one shared expert of ``moe_intermediate_size * num_shared_experts``;
the first ``first_k_dense_replace`` layers dense. Attention: fused ``query_key_value`` (q heads,
then k heads, then v heads), RMSNorm over each q and k head (``use_qk_norm``), rotate-half RoPE
on the first ``head_dim * partial_rotary_factor`` dims of each head.
"""

from typing import Any

from transformers import PreTrainedConfig

from vllm_dllm.transformers_utils.configs.common import set_upstream_keys

#: Upstream ``configuration_llada2_moe.py``'s defaults. ``num_key_value_heads`` 0 is kept as
#: given, as upstream does (the releases state it; the attention divides by it).
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30592, "hidden_size": 1024, "intermediate_size": None,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 0,
    "hidden_act": "silu", "use_qkv_bias": False, "use_qk_norm": True, "use_bias": True,
    "rms_norm_eps": 1e-5, "norm_head": False, "tie_word_embeddings": False,
    "embedding_dropout": 0.1, "attention_dropout": 0.1, "output_dropout": 0.1,
    "initializer_range": 0.02, "max_position_embeddings": 16384, "rope_theta": 10000.0,
    "use_cache": True, "use_sliding_window": False, "sliding_window": 4096,
    "max_window_layers": 28, "head_dim": None, "rope_scaling": None, "pad_token_id": 126081,
    "num_experts": 16, "num_shared_experts": 0, "num_experts_per_tok": 2, "n_group": 8,
    "topk_group": 4, "routed_scaling_factor": 2.5, "moe_intermediate_size": None,
    "first_k_dense_replace": 0, "output_router_logits": False, "partial_rotary_factor": 0.5,
}


class LLaDA2MoeConfig(PreTrainedConfig):
    """The keys of the released LLaDA 2.x config.json (upstream ``LLaDA2MoeConfig``)."""

    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any) -> None:
        # The base class standardises the rope keys with `partial_rotary_factor` too.
        set_upstream_keys(self, UPSTREAM_DEFAULTS, kwargs)
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        # The released config.json keeps `sliding_window: 4096` with the window switched off
        # (`use_sliding_window: false`). Upstream's modeling code checks the flag; vLLM reads
        # `sliding_window` alone and would size the KV cache and attend as if windowed.
        if not self.use_sliding_window:
            self.sliding_window = None
        kwargs.setdefault("architectures", ["LLaDA2MoeModelLM"])
        super().__init__(**kwargs)
