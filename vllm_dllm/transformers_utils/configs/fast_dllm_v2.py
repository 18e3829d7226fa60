"""Fast-dLLM v2 configuration, readable without ``trust_remote_code``.

Efficient-Large-Model/Fast_dLLM_v2_1.5B / _7B are Qwen2.5 weights fine-tuned for block diffusion;
their config.json uses Qwen2 key names under model_type ``Fast_dLLM_Qwen`` with an ``auto_map`` to
their own ``configuration.py``, plus ``bd_size`` (the diffusion block length). Registering this
class lets transformers and vLLM read those files offline.
"""

from typing import Any

from transformers import PreTrainedConfig

from vllm_dllm.transformers_utils.configs.common import QWEN2_DEFAULTS, set_qwen2_keys

#: Upstream ``configuration.py``: Qwen2's defaults plus ``layer_types`` and ``bd_size``.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    **QWEN2_DEFAULTS, "layer_types": None, "bd_size": 32, "mask_token_id": None,
}


class FastDLLMV2Config(PreTrainedConfig):
    """The keys of the released Fast-dLLM v2 config.json.

    Defaults are those of the upstream ``configuration.py`` (Qwen2's, plus ``bd_size``), so a key
    missing from a config.json means what it means upstream. The release has no
    ``mask_token_id`` key: ``None`` here means "take the tokenizer's ``|<MASK>|``"; a config that
    sets it wins.
    """

    model_type = "Fast_dLLM_Qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any) -> None:
        set_qwen2_keys(self, UPSTREAM_DEFAULTS, kwargs)
        self.layer_types = self.layer_types or [
            "sliding_attention"
            if self.sliding_window is not None and i >= self.max_window_layers
            else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        super().__init__(**kwargs)
