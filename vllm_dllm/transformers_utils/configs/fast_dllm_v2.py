"""Fast-dLLM v2 configuration, readable without ``trust_remote_code``.

Efficient-Large-Model/Fast_dLLM_v2_1.5B / _7B are Qwen2.5 weights fine-tuned for block diffusion;
their config.json uses Qwen2 key names under model_type ``Fast_dLLM_Qwen`` with an ``auto_map`` to
their own ``configuration.py``, plus ``bd_size`` (the diffusion block length). Registering this
class lets transformers and vLLM read those files offline.
"""

from typing import Any

from transformers import PreTrainedConfig


class FastDLLMV2Config(PreTrainedConfig):
    """The keys of the released Fast-dLLM v2 config.json.

    Defaults are those of the upstream ``configuration.py`` (Qwen2's, plus ``bd_size``), so a key
    missing from a config.json means what it means upstream. The release has no
    ``mask_token_id`` key: ``None`` here means "take the tokenizer's ``|<MASK>|``"; a config that
    sets it wins.
    """

    model_type = "Fast_dLLM_Qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        layer_types: list[str] | None = None,
        attention_dropout: float = 0.0,
        bd_size: int = 32,
        mask_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Upstream backward compatibility: no GQA unless stated.
        self.num_key_value_heads = (
            num_attention_heads if num_key_value_heads is None else num_key_value_heads
        )
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_theta = rope_theta
        # transformers 5 standardises `rope_scaling` (an alias of `rope_parameters`) and
        # `rope_theta` into the `rope_parameters` dict vLLM and the model read.
        self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        # As upstream: the window exists only when enabled (vLLM would otherwise apply it).
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.layer_types = layer_types or [
            "sliding_attention"
            if self.sliding_window is not None and i >= max_window_layers
            else "full_attention"
            for i in range(num_hidden_layers)
        ]
        self.attention_dropout = attention_dropout
        self.bd_size = bd_size
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
