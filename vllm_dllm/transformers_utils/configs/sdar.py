"""SDAR configuration, readable without ``trust_remote_code``.

JetLM/SDAR-*-Chat are Qwen3 weights trained for block diffusion; their config.json uses Qwen3 key
names (``head_dim``, ``attention_bias``) under model_type ``sdar`` with an ``auto_map`` to their
own ``configuration_sdar.py``. The 1.7B release adds ``block_size`` and ``mask_token_id``; the
larger ones do not, and their generation code then uses block 4 and the tokenizer's
``<|MASK|>``. Registering this class lets transformers and vLLM read those files offline.
"""

from typing import Any

from transformers import PreTrainedConfig

from vllm_dllm.transformers_utils.configs.common import QWEN2_DEFAULTS, set_qwen2_keys

#: Upstream ``configuration_sdar.py`` (Qwen3's: Qwen2's plus ``head_dim`` and
#: ``attention_bias``), with the generation code's block 4 and no mask id of its own.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    **QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False, "block_size": 4,
    "mask_token_id": None,
}


class SDARConfig(PreTrainedConfig):
    """The keys of the released SDAR config.json.

    Defaults are those of the upstream ``configuration_sdar.py`` (Qwen3's), so a key missing from
    a config.json means what it means upstream; ``block_size`` defaults to the generation code's
    4, and ``mask_token_id`` to ``None`` ("take the tokenizer's ``<|MASK|>``").
    """

    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any) -> None:
        set_qwen2_keys(self, UPSTREAM_DEFAULTS, kwargs)
        super().__init__(**kwargs)
