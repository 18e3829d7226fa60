"""What the block-diffusion families (Fast-dLLM v2, SDAR, LLaDA 2.x) share on top of the body.

Their released configs may not name their MASK token: Fast-dLLM v2's and LLaDA 2.x's never do,
SDAR's 1.7B does and its larger releases do not. Their generation code then falls back to
a constant that is the id of the mask token in the released tokenizer. The model classes resolve
the id once, here, in the order the oracle (`tests/reference/block_model.py`) does, so the engine
masks and refuses to propose the very token the checkpoint was trained with.
"""

from __future__ import annotations

import json
from typing import ClassVar

from transformers import PretrainedConfig
from transformers.utils import cached_file
from vllm.config import VllmConfig

from vllm_dllm.model_executor.models.bidirectional_transformer import DiffusionLM
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape


def resolve_mask_token_id(
    config: PretrainedConfig,
    tokenizer: str,
    revision: str | None,
    mask_token: str | None,
    release_default: int,
) -> int:
    """The MASK id: config `mask_token_id` if set, else the id of `mask_token` (None: the
    tokenizer's own `mask_token`) among the tokenizer's added tokens, else `release_default`
    (the constant of the release's code).

    `tokenizer` is a directory or a hub id (vLLM's `model_config.tokenizer`); its
    `tokenizer_config.json` names the mask token and lists the added tokens under
    `added_tokens_decoder`.
    """
    configured = getattr(config, "mask_token_id", None)
    if configured is not None:
        return int(configured)
    file = cached_file(
        tokenizer,
        "tokenizer_config.json",
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if file is not None:
        with open(file) as f:
            tokenizer_config = json.load(f)
        if mask_token is None:
            mask_token = tokenizer_config.get("mask_token")
            if isinstance(mask_token, dict):  # a serialised AddedToken
                mask_token = mask_token.get("content")
        for token_id, entry in tokenizer_config.get("added_tokens_decoder", {}).items():
            if mask_token is not None and entry.get("content") == mask_token:
                return int(token_id)
    return release_default


class BlockDiffusionLM(DiffusionLM):
    """Base of the Fast-dLLM v2, SDAR and LLaDA 2.x model classes.

    Subclasses name their tokenizer's MASK token (None: the one the tokenizer config calls its
    `mask_token`) and the release's fallback id, and whether q/k/v carry biases and a per-head
    norm; the body, loader and TP are `DiffusionLM`'s.
    """

    mask_token: ClassVar[str | None]
    release_mask_token_id: ClassVar[int]
    qkv_bias: ClassVar[bool]
    qk_norm: ClassVar[bool] = False

    @classmethod
    def shape_from_config(cls, config: PretrainedConfig) -> TransformerShape:
        cls.check_config(config)
        return TransformerShape.from_config(config, qkv_bias=cls.qkv_bias, qk_norm=cls.qk_norm)

    @classmethod
    def mask_token_id_from(cls, vllm_config: VllmConfig) -> int:
        model_config = vllm_config.model_config
        return resolve_mask_token_id(
            model_config.hf_config,
            model_config.tokenizer,
            model_config.tokenizer_revision,
            cls.mask_token,
            cls.release_mask_token_id,
        )

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuse what the releases never use and the body would silently ignore."""
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_scaling of type {rope_type!r} is not supported")
