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


class LLaDA2MoeConfig(PreTrainedConfig):
    """The keys of the released LLaDA 2.x config.json (upstream ``LLaDA2MoeConfig``)."""

    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 30592,
        hidden_size: int = 1024,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 0,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_qk_norm: bool = True,
        use_bias: bool = True,
        rms_norm_eps: float = 1e-5,
        norm_head: bool = False,
        tie_word_embeddings: bool = False,
        embedding_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        output_dropout: float = 0.1,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 16384,
        rope_theta: float = 10000.0,
        use_cache: bool = True,
        use_sliding_window: bool = False,
        sliding_window: int = 4096,
        max_window_layers: int = 28,
        rope_scaling: dict[str, Any] | None = None,
        pad_token_id: int = 126081,
        num_experts: int = 16,
        num_shared_experts: int = 0,
        num_experts_per_tok: int = 2,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        moe_intermediate_size: int | None = None,
        first_k_dense_replace: int = 0,
        head_dim: int | None = None,
        output_router_logits: bool = False,
        partial_rotary_factor: float = 0.5,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Upstream keeps 0 as given (the releases state it); the attention divides by it.
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.norm_head = norm_head
        self.tie_word_embeddings = tie_word_embeddings
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.output_dropout = output_dropout
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.use_cache = use_cache
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.head_dim = head_dim or hidden_size // num_attention_heads
        # In transformers 5 `rope_scaling` is an alias of `rope_parameters`, which the base
        # class then standardises (with `rope_theta` and `partial_rotary_factor`).
        self.rope_scaling = rope_scaling
        self.pad_token_id = pad_token_id
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.output_router_logits = output_router_logits
        self.partial_rotary_factor = partial_rotary_factor
        kwargs.setdefault("architectures", ["LLaDA2MoeModelLM"])
        super().__init__(**kwargs)
