"""What the tiny-checkpoint writers share: JSON files as the releases lay them out, and random
tensors drawn by kind so that every sublayer matters.

The usual std-0.02 init leaves the residual stream dominated by the token embedding, so all
MASK positions would get near-identical logits (ties everywhere, position-independent argmax).
Unit-variance embeddings and ``gain / sqrt(fan_in)`` matrices give each sublayer an O(1) share
of the residual stream; each writer picks the gains (q and k drawn 4x larger make attention
sharp enough that positions differ). Norm weights and biases are perturbed away from 1 and 0 so
a loader that drops one fails the logits comparison.
"""

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

#: A tensor to draw: (name, shape, kind); kind picks the initialisation in `draw`.
TensorSpec = tuple[str, tuple[int, ...], str]


def write_json(file: Path, content: dict[str, Any]) -> None:
    """A JSON file laid out as the released ones are (two-space indent, final newline)."""
    file.write_text(json.dumps(content, indent=2) + "\n")


def release_config(
    shape: Any, vocab_size: int, code: tuple[str, str, str, str], family_keys: dict[str, Any]
) -> dict[str, Any]:
    """config.json of a Qwen-style release (Fast-dLLM v2, SDAR, LLaDA 2.x): the keys they share,
    sized by ``shape`` (``hidden_size``, ``intermediate_size``, ``num_heads``, ``num_kv_heads``,
    ``num_layers``), and the family's own; keys sorted, as ``save_pretrained`` writes them.

    ``code`` = (configuration module, modeling module, class prefix, LM class): the release's
    own code, named by ``architectures`` and by ``auto_map`` (``{prefix}Config`` in the
    configuration module, ``{prefix}Model`` and the LM class in the modeling module).
    """
    configuration, modeling, prefix, lm_class = code
    shared = {
        "architectures": [lm_class],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": f"{configuration}.{prefix}Config",
            "AutoModel": f"{modeling}.{prefix}Model",
            "AutoModelForCausalLM": f"{modeling}.{lm_class}",
        },
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    return dict(sorted({**shared, **family_keys}.items()))


def draw(
    size: tuple[int, ...],
    kind: str,
    gen: torch.Generator,
    gains: Mapping[str, float],
    final_norm_scale: float = 1.0,
) -> torch.Tensor:
    """One tensor of ``kind``; a matrix kind not named here is drawn with ``gains[kind]``.

    The final norm carries ``final_norm_scale``: logits are linear in it, for tied and untied
    heads alike. q/k norm weights sit near 2 (sharper attention); an MoE expert bias is of the
    order of sigmoid router scores, so dropping it changes some expert choices.
    """
    noise = torch.randn(size, generator=gen, dtype=torch.float32)
    if kind == "embedding":
        return noise
    if kind == "norm":
        return 1.0 + 0.1 * noise
    if kind == "final_norm":
        return final_norm_scale * (1.0 + 0.1 * noise)
    if kind == "qk_norm":
        return 2.0 + 0.2 * noise
    if kind == "bias":
        return 0.2 * noise
    if kind == "expert_bias":
        return 0.3 * noise
    return gains[kind] * size[1] ** -0.5 * noise


def save_random_tensors(
    file: Path,
    specs: Iterable[TensorSpec],
    *,
    seed: int,
    gains: Mapping[str, float],
    final_norm_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """A safetensors file of the ``specs``, drawn in order from ``seed`` and stored as ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: draw(size, kind, gen, gains, final_norm_scale).to(dtype)
        for name, size, kind in specs
    }
    save_file(tensors, str(file), metadata={"format": "pt"})
