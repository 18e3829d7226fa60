"""The plain-torch oracle of the decoding algorithm (docs/design.md): dense model, generator."""

import json
from pathlib import Path

from tests.reference.generate import Result, generate
from tests.reference.llada_moe_model import LLaDAMoEReferenceModel
from tests.reference.model import KVCache, ModelSpec, ReferenceModel


def bidirectional_oracle(checkpoint_dir: str | Path) -> ReferenceModel | LLaDAMoEReferenceModel:
    """The oracle model of a bidirectional checkpoint: LLaDA-MoE's where its architecture says
    so (it shares the dense LLaDA's model_type), else the dense LLaDA / Dream one."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    if "LLaDAMoEModelLM" in config.get("architectures", ()):
        return LLaDAMoEReferenceModel(checkpoint_dir)
    return ReferenceModel(checkpoint_dir)


__all__ = [
    "KVCache",
    "LLaDAMoEReferenceModel",
    "ModelSpec",
    "ReferenceModel",
    "Result",
    "bidirectional_oracle",
    "generate",
]
