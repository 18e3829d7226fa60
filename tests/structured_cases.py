"""Constrained requests for the structured-output tests: JSON schemas (objects with enums,
bounded integers, bounded strings, arrays), regexes and choices, with a validator for each.

Strings are bounded by patterns over plain letters: the tiny checkpoints' byte tokenizer has
tokens whose text xgrammar reads differently from how they decode (control bytes), which a
pattern keeps out. Every constraint bounds its language's sentences, so a random-weight model
under it must end (the grammar leaves only end-of-text) within `MAX_TOKENS`; the test engines
and servers run with `disable_any_whitespace`, since free whitespace would let a random model
pad forever.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

MAX_TOKENS = 96

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["colour", "count"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": -9, "maximum": 9},
                "minItems": 1,
                "maxItems": 3,
            },
            "level": {"enum": ["low", "high"]},
        },
        "required": ["scores", "level"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-z]{0,3}$"},
                "maxItems": 2,
            },
            "id": {"type": "integer", "minimum": 100, "maximum": 999},
        },
        "required": ["tags", "id"],
        "additionalProperties": False,
    },
]
REGEXES = ["[0-9]{1,4}", "[a-f]{2,5}-[0-9]{2}", "(yes|no|maybe)", r"\d{3}\.\d{2}"]
CHOICES = [["alpha", "beta", "gamma"], ["1112", "42"], ["up", "down"]]


@dataclass(frozen=True)
class Case:
    """One constraint: its `structured_outputs` keyword arguments and a check of a text."""

    kind: str
    spec: dict[str, Any]
    valid: Callable[[str], bool]


def _schema_valid(schema: dict[str, Any]) -> Callable[[str], bool]:
    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    return valid


def cases(count: int) -> list[Case]:
    """`count` constraints cycling through the schemas, regexes and choices."""
    pool = (
        [Case("json", {"json": s}, _schema_valid(s)) for s in SCHEMAS]
        + [Case("regex", {"regex": r}, lambda t, r=r: re.fullmatch(r, t) is not None)
           for r in REGEXES]  # fmt: skip
        + [Case("choice", {"choice": c}, lambda t, c=c: t in c) for c in CHOICES]
    )
    return [pool[i % len(pool)] for i in range(count)]
