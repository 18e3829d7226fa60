"""What the config classes share: upstream defaults kept as a table and set from a config.json.

Each class names the keys of its release with upstream's defaults, so a key missing from a
config.json means what it means upstream; keys the table does not name stay attributes through
the base class, as they do upstream.
"""

from typing import Any

from transformers import PreTrainedConfig

#: Qwen2's configuration defaults, which Dream, Fast-dLLM v2 and SDAR keep upstream.
QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "use_cache": True, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "use_sliding_window": False,
    "sliding_window": 4096, "max_window_layers": 28, "attention_dropout": 0.0,
}


def set_upstream_keys(
    config: PreTrainedConfig, defaults: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    """Set every key of ``defaults`` on ``config``, from ``kwargs`` where given.

    The keys are popped from ``kwargs``, which then holds what the base class still has to see.
    In transformers 5 ``rope_scaling`` is an alias of ``rope_parameters``, which the base class
    then standardises (with ``rope_theta``) into the layout vLLM and the models read.
    """
    for key, default in defaults.items():
        setattr(config, key, kwargs.pop(key, default))


def set_qwen2_keys(
    config: PreTrainedConfig, defaults: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    """:func:`set_upstream_keys`, then resolve two keys as upstream's Qwen-style configs do.

    ``num_key_value_heads`` ``None`` means no GQA (upstream backward compatibility). The sliding
    window exists only when ``use_sliding_window`` is set: upstream checks that flag in the
    modeling code, vLLM reads ``sliding_window`` alone and would otherwise apply it.
    """
    set_upstream_keys(config, defaults, kwargs)
    if config.num_key_value_heads is None:
        config.num_key_value_heads = config.num_attention_heads
    if not config.use_sliding_window:
        config.sliding_window = None
