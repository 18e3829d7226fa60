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

from vllm_dllm.transformers_utils.configs.common import set_upstream_keys

#: Upstream's ``ModelConfig`` dataclass defaults (configuration_llada.py), so a key missing
#: from a config.json means what it means upstream. The released configs spell out every key.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4,
    "mlp_hidden_size": None, "activation_type": "swiglu", "block_type": "sequential",
    "block_group_size": 1, "alibi": False, "alibi_bias_max": 8.0, "rope": False,
    "rope_full_precision": True, "flash_attention": False, "attention_dropout": 0.1,
    "multi_query_attention": None, "attention_layer_norm": False, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "input_emb_norm": False, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "rms_norm_eps": 1e-5,
    "attention_layer_norm_with_affine": True, "max_sequence_length": 1024,
    "rope_theta": 10000.0, "include_qkv_bias": False, "include_bias": False,
    "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257,
    "embedding_size": 50304, "weight_tying": True, "eos_token_id": 50256,
    "pad_token_id": 50256, "mask_token_id": 50256, "init_device": None, "init_fn": "normal",
    "init_std": 0.02, "init_cutoff_factor": None, "precision": None, "use_cache": False,
}


class LLaDAConfig(PreTrainedConfig):
    """The keys of the released LLaDA config.json, with vLLM's standard names on top."""

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

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PreTrainedConfig:
        """The config of ``config_dict``: LLaDA-MoE's class where its ``architectures`` say so.

        LLaDA-MoE's release declares the dense model's ``model_type`` (``llada``), so
        transformers finds this class for both; the architecture tells them apart.
        """
        if cls is LLaDAConfig and "LLaDAMoEModelLM" in (config_dict.get("architectures") or ()):
            from vllm_dllm.transformers_utils.configs.llada_moe import LLaDAMoEConfig

            return LLaDAMoEConfig.from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    def __init__(self, **kwargs: Any) -> None:
        # As upstream's LLaDAConfig does: its ModelConfig's defaults, updated by the file's keys.
        set_upstream_keys(self, UPSTREAM_DEFAULTS, kwargs)
        # modeling_llada sizes both the embedding (wte) and the LM head (ff_out) with
        # `embedding_size or vocab_size`; vLLM reads `vocab_size` as the logits width, so it
        # must be that row count (equal to the tokenizer vocabulary, 126464, in the releases).
        if self.embedding_size is not None:
            self.vocab_size = self.embedding_size
        # The base class standardises this (with `rope_theta`) into the v5 layout vLLM and the
        # model read: {"rope_type": "default", "rope_theta": ...}.
        self.rope_parameters: dict[str, Any] | None = None
        kwargs.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(**kwargs)

    @property
    def num_key_value_heads(self) -> int:
        """KV heads as upstream's ``effective_n_kv_heads`` resolves them (MQA / GQA / MHA)."""
        if self.multi_query_attention is None:
            return self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        implied = 1 if self.multi_query_attention else self.n_heads
        if self.n_kv_heads not in (None, implied):
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} contradicts "
                f"multi_query_attention={self.multi_query_attention}"
            )
        return implied

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
