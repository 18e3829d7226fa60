"""SDAR configuration, readable without ``trust_remote_code``.

JetLM/SDAR-*-Chat are Qwen3 weights trained for block diffusion; their config.json uses Qwen3 key
names (``head_dim``, ``attention_bias``) under model_type ``sdar`` with an ``auto_map`` to their
own ``configuration_sdar.py``. The 1.7B release adds ``block_size`` and ``mask_token_id``; the
larger ones do not, and their generation code then uses block 4 and the tokenizer's
``<|MASK|>``. Registering this class lets transformers and vLLM read those files offline.
"""

from typing import Any

from transformers import PreTrainedConfig


class SDARConfig(PreTrainedConfig):
    """The keys of the released SDAR config.json.

    Defaults are those of the upstream ``configuration_sdar.py`` (Qwen3's), so a key missing from
    a config.json means what it means upstream; ``block_size`` defaults to the generation code's
    4, and ``mask_token_id`` to ``None`` ("take the tokenizer's ``<|MASK|>``").
    """

    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 22016,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 32,
        head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        attention_bias: bool = False,
        use_sliding_window: bool = False,
        sliding_window: int | None = 4096,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        block_size: int = 4,
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
        self.head_dim = head_dim
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
        self.attention_bias = attention_bias
        self.use_sliding_window = use_sliding_window
        # Upstream keeps the value and checks `use_sliding_window` in the modeling code; vLLM
        # reads `sliding_window` alone, so it is dropped unless enabled.
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
