"""The plain-torch oracle of DESIGN.md section 2: dense reference model and generator."""

from tests.reference.generate import Result, generate
from tests.reference.model import KVCache, ModelSpec, ReferenceModel

__all__ = ["KVCache", "ModelSpec", "ReferenceModel", "Result", "generate"]
