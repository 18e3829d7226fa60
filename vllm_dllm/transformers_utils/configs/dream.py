"""Dream configuration, readable without ``trust_remote_code``.

Dream-org/Dream-v0-Instruct-7B / -Base-7B are Qwen2.5 weights run bidirectionally; their
config.json uses Qwen2 key names under model_type ``Dream`` (capital D, as released) with an
``auto_map`` to their own ``configuration_dream.py``, plus ``mask_token_id``. Registering this
class lets transformers and vLLM read those files offline.
"""

from typing import Any

from transformers import PreTrainedConfig


class DreamConfig(PreTrainedConfig):
    """The keys of the released Dream config.json.

    Defaults are those of the upstream ``configuration_dream.py``, so a key missing from a
    config.json means what it means upstream. The released configs spell out the model sizes.
    """

    model_type = "Dream"
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
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int = 151666,
        pad_token_id: int = 151643,
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
        # In transformers 5 `rope_scaling` is an alias of `rope_parameters`, which the base
        # class then standardises (with `rope_theta`) into the v5 layout vLLM reads.
        self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        # Sliding window is never used by Dream; upstream drops it unless enabled.
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)
