"""Dream configuration, readable without ``trust_remote_code``.

Dream-org/Dream-v0-Instruct-7B / -Base-7B are Qwen2.5 weights run bidirectionally; their
config.json uses Qwen2 key names under model_type ``Dream`` (capital D, as released) with an
``auto_map`` to their own ``configuration_dream.py``, plus ``mask_token_id``. Registering this
class lets transformers and vLLM read those files offline.
"""

from typing import Any

from transformers import PreTrainedConfig

from vllm_dllm.transformers_utils.configs.common import QWEN2_DEFAULTS, set_qwen2_keys

#: Upstream ``configuration_dream.py``: Qwen2's defaults, without the cache, plus the token ids.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    **QWEN2_DEFAULTS, "use_cache": False, "mask_token_id": 151666, "pad_token_id": 151643,
}


class DreamConfig(PreTrainedConfig):
    """The keys of the released Dream config.json.

    Defaults are those of the upstream ``configuration_dream.py``, so a key missing from a
    config.json means what it means upstream. The released configs spell out the model sizes.
    """

    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any) -> None:
        set_qwen2_keys(self, UPSTREAM_DEFAULTS, kwargs)
        super().__init__(**kwargs)
