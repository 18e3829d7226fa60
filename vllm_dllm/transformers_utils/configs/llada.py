"""LLaDA configuration, readable without ``trust_remote_code``.

The released checkpoints (GSAI-ML/LLaDA-8B-Instruct / -Base) ship an OLMo-style config.json
(``d_model``, ``n_heads``, ``n_layers``, ``mlp_hidden_size``, ``weight_tying``, ...) with an
``auto_map`` pointing at their own ``configuration_llada.py``. Registering this class under
model_type ``llada`` lets transformers and vLLM read those files offline, and the standard
aliases below let vLLM's ModelConfig size the KV cache and the vocabulary without knowing the
OLMo names.
"""

from typing import Any

from transformers import PreTrainedConfig


class LLaDAConfig(PreTrainedConfig):
    """The keys of the released LLaDA config.json, with vLLM's standard names on top.

    Defaults are those of the upstream ``ModelConfig`` dataclass, so a key missing from a
    config.json means what it means upstream. The released configs spell out every key.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Pure renames: reading or writing the standard name touches the OLMo field.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
    }

    def __init__(
        self,
        d_model: int = 768,
        n_heads: int = 12,
        n_kv_heads: int | None = None,
        n_layers: int = 12,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = None,
        activation_type: str = "swiglu",
        block_type: str = "sequential",
        block_group_size: int = 1,
        alibi: bool = False,
        alibi_bias_max: float = 8.0,
        rope: bool = False,
        rope_full_precision: bool = True,
        rope_theta: float = 10000.0,
        flash_attention: bool = False,
        attention_dropout: float = 0.1,
        multi_query_attention: bool | None = None,
        attention_layer_norm: bool = False,
        attention_layer_norm_with_affine: bool = True,
        residual_dropout: float = 0.1,
        embedding_dropout: float = 0.1,
        input_emb_norm: bool = False,
        layer_norm_type: str = "default",
        layer_norm_with_affine: bool = True,
        rms_norm_eps: float = 1e-5,
        bias_for_layer_norm: bool | None = None,
        max_sequence_length: int = 1024,
        include_qkv_bias: bool | None = False,
        include_bias: bool = False,
        scale_logits: bool = False,
        vocab_size: int = 50257,
        embedding_size: int | None = 50304,
        weight_tying: bool = True,
        eos_token_id: int = 50256,
        pad_token_id: int = 50256,
        mask_token_id: int | None = 50256,
        init_device: str | None = None,
        init_fn: str = "normal",
        init_std: float = 0.02,
        init_cutoff_factor: float | None = None,
        precision: str | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.activation_type = activation_type
        self.block_type = block_type
        self.block_group_size = block_group_size
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.rope = rope
        self.rope_full_precision = rope_full_precision
        self.rope_theta = rope_theta
        self.flash_attention = flash_attention
        self.attention_dropout = attention_dropout
        self.multi_query_attention = multi_query_attention
        self.attention_layer_norm = attention_layer_norm
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        self.input_emb_norm = input_emb_norm
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.rms_norm_eps = rms_norm_eps
        self.bias_for_layer_norm = bias_for_layer_norm
        self.max_sequence_length = max_sequence_length
        self.include_qkv_bias = include_qkv_bias
        self.include_bias = include_bias
        self.scale_logits = scale_logits
        # modeling_llada sizes both the embedding (wte) and the LM head (ff_out) with
        # `embedding_size or vocab_size`; vLLM reads `vocab_size` as the logits width, so it
        # must be that row count (equal to the tokenizer vocabulary, 126464, in the releases).
        self.vocab_size = embedding_size if embedding_size is not None else vocab_size
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.init_device = init_device
        self.init_fn = init_fn
        self.init_std = init_std
        self.init_cutoff_factor = init_cutoff_factor
        self.precision = precision
        self.use_cache = use_cache
        kwargs.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(**kwargs)

    @property
    def num_key_value_heads(self) -> int:
        """KV heads as modeling_llada's ``effective_n_kv_heads`` resolves them (MQA / GQA / MHA)."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def intermediate_size(self) -> int:
        """Width of ff_proj / up_proj: ``mlp_hidden_size``, else ``mlp_ratio * d_model``."""
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        return self.mlp_ratio * self.d_model

    @property
    def head_dim(self) -> int:
        """LLaDA has no separate head size: every head is ``d_model / n_heads`` wide."""
        return self.d_model // self.n_heads
