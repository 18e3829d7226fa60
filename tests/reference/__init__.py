"""The plain-torch oracle of the decoding algorithm (docs/design.md): dense model, generator."""

from tests.reference.generate import Result, generate
from tests.reference.model import KVCache, ModelSpec, ReferenceModel

__all__ = ["KVCache", "ModelSpec", "ReferenceModel", "Result", "generate"]
