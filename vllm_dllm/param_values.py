"""Reading `dllm_*` values as they arrive: wire types, ranges, the names a family takes, and
the keys that nothing reads.

Numbers may arrive as Python/JSON numbers or as strings, because `vllm_xargs` is typed
`str | int | float | list` and clients (e.g. `curl`, form data) often send strings. A string is
accepted when it is exactly a decimal literal (surrounding whitespace allowed); an integral float
such as `32.0` is accepted for an integer parameter (JSON does not distinguish `32` from `32.0`).
Bools, lists, non-finite numbers and anything else are rejected. A value of `None` counts as not
given. Unknown `dllm_` keys are errors, and so (`check_extra_args`) is any other key that nothing
reads: not one of the keys vLLM itself reads (`VLLM_EXTRA_ARGS`), while no other logits
processor, which could read any key, is configured. The errors suggest the parameter meant
(`alg` -> `dllm_alg`). Where the model's family is known, a value list in an error is the
family's (`dllm_remasking` on a Dream checkpoint lists no SDAR value).

Every error is a `DllmParamError` (a `ValueError`, which vLLM's server turns into a 400) whose
message starts with the offending parameter's name. How the values combine into one request's
parameters is `vllm_dllm.config`'s.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from vllm_dllm.families import FAMILIES, Family
from vllm_dllm.infill import SUFFIX_KEY, DllmSuffixError, block_causal_refusal, to_suffix
from vllm_dllm.param_docs import (
    CACHE_MODES,
    DLLM_PARAM_DOCS,
    DLLM_PARAM_NAMES,
    DREAM_ALGS,
    REMASKING_MODES,
)

#: `extra_args` keys that vLLM itself reads (`vllm/v1/request.py`, `output_processor.py`: the KV
#: and encoder-cache transfer parameters of disaggregated serving, the KV-cache report mode).
#: They pass untouched; any other key that is not ours is refused unless another logits
#: processor is configured (`check_extra_args`).
VLLM_EXTRA_ARGS = frozenset({"kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode"})

_PREFIX = "dllm_"
_INT_LITERAL = re.compile(r"[+-]?[0-9]+")
_FLOAT_LITERAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")



class DllmParamError(ValueError):
    """An invalid diffusion parameter; the message names the parameter."""


def check_dllm_args(extra_args: Mapping[str, Any] | None) -> None:
    """The checks that need neither the model nor `max_tokens`: known keys, types, ranges.

    Which names `dllm_cache` and `dllm_remasking` take depends on the family, so those values
    are left to `check_extra_args`, which lists the family's own in its error.
    """
    read_dllm_args(extra_args, source="", check_choices=False)


def check_extra_args(
    extra_args: Mapping[str, Any] | None, family: Family, other_readers: bool = False
) -> None:
    """A request's `extra_args` for a model of `family`: every `dllm_*` key known, taken by the
    family, of the right type and value; and every other key read by someone.

    `other_readers`: another logits processor is configured, which may read any key, so keys
    that are not ours pass. Otherwise a key must be ours or one of `VLLM_EXTRA_ARGS`.
    """
    read_dllm_args(extra_args, source="", family=family)
    if other_readers or not extra_args:
        return
    for key in extra_args:
        if isinstance(key, str) and (key.startswith(_PREFIX) or key in VLLM_EXTRA_ARGS):
            continue
        accepted = [k for k in DLLM_PARAM_NAMES if k in family.params]
        raise DllmParamError(
            f"{key} is not a known parameter{did_you_mean(str(key), accepted)} "
            f"({family.name} models accept {', '.join(accepted)})"
        )


def did_you_mean(key: str, names: list[str]) -> str:
    """`; did you mean NAME?` for the parameter of `names` closest to `key`, or `""`.

    `key` is compared with the names and with the names without their `dllm_` prefix, after
    dropping a prefix of its own (`alg`, `block_length`, `diffusion_steps`, `dllm_treshold`).
    """
    bare = {name.removeprefix(_PREFIX): name for name in names}
    word = key.strip().lower().replace("-", "_")
    for prefix in (_PREFIX, "diffusion_", "dllm"):
        word = word.removeprefix(prefix)
    close = difflib.get_close_matches(word, list(bare), n=1, cutoff=0.75)
    return f"; did you mean {bare[close[0]]}?" if close else ""


def read_dllm_args(
    args: Mapping[str, Any] | None,
    source: str,
    family: Family | None = None,
    check_choices: bool = True,
) -> dict[str, Any]:
    """The `dllm_` entries of `args` (None values dropped), converted to their Python types.

    With the model's `family`: a key the family does not take is an error, and so is a name
    (`dllm_cache`, `dllm_remasking`) that it does not take, listing the family's. Without it,
    names are checked against every family's (listed by family) unless `check_choices` is
    false. Server defaults (`source`) hold `dllm_` keys only: any other key is an error.
    """
    if not args:
        return {}
    out: dict[str, Any] = {}
    for key, raw in args.items():
        if not isinstance(key, str) or not key.startswith(_PREFIX):
            if source:
                hint = did_you_mean(str(key), list(DLLM_PARAM_NAMES))
                raise DllmParamError(
                    f"{source}{key} is not a known parameter{hint} (the defaults are dllm_* "
                    f"parameters)"
                )
            continue
        if key not in DLLM_PARAM_DOCS:
            names = [k for k in DLLM_PARAM_NAMES if family is None or k in family.params]
            hint = did_you_mean(key, list(DLLM_PARAM_NAMES))
            raise DllmParamError(
                f"{source}{key} is not a known parameter{hint} (known: {', '.join(names)})"
            )
        if raw is None:
            continue
        if family is not None and key not in family.params:
            if key == SUFFIX_KEY:
                raise DllmParamError(block_causal_refusal(family.name))
            accepted = ", ".join(k for k in DLLM_PARAM_NAMES if k in family.params)
            raise DllmParamError(
                f"{source}{key} does not apply to {family.name} models (they accept {accepted})"
            )
        convert, _, _ = _PARAM_RULES[key]
        out[key] = convert(key, raw, source)
        if key in _NAMED:
            if family is not None or check_choices:
                _check_choice(key, out[key], source, family)
        else:
            check_value(key, out[key], source)
    return out


#: Parameters whose value is one of the names a family takes (`Family.caches`, `.remasking`).
_NAMED = {"dllm_cache": "caches", "dllm_remasking": "remasking"}


def _check_choice(key: str, value: str, source: str, family: Family | None) -> None:
    """Raise unless `value` is a name that `family` (any family if None) takes for `key`; the
    error lists the family's names, or each family's."""
    families = [family] if family is not None else [f for f in FAMILIES if key in f.params]
    if any(value in getattr(f, _NAMED[key]) for f in families):
        return
    allowed = "; ".join(
        f"{', '.join(getattr(f, _NAMED[key]))} for {f.name} models" for f in families
    )
    raise DllmParamError(f"{source}{key} must be one of {allowed}, got {value!r}")


def _to_int(key: str, raw: Any, source: str) -> int:
    if isinstance(raw, str) and _INT_LITERAL.fullmatch(raw.strip()):
        return int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
        return int(raw)
    raise DllmParamError(f"{source}{key} must be an integer, got {raw!r}")


def _to_float(key: str, raw: Any, source: str) -> float:
    is_literal = isinstance(raw, str) and _FLOAT_LITERAL.fullmatch(raw.strip()) is not None
    is_number = isinstance(raw, int | float) and not isinstance(raw, bool)
    try:
        value = float(raw) if is_literal or is_number else math.nan
    except OverflowError:  # an int too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise DllmParamError(f"{source}{key} must be a finite number, got {raw!r}")
    return value


def _to_str(key: str, raw: Any, source: str) -> str:
    if not isinstance(raw, str):
        raise DllmParamError(f"{source}{key} must be a string, got {raw!r}")
    return raw


def as_param_error(convert: Callable[..., Any], *args: Any) -> Any:
    """`convert(*args)`, its `DllmSuffixError` raised as the `DllmParamError` it is."""
    try:
        return convert(*args)
    except DllmSuffixError as err:
        raise DllmParamError(str(err)) from err


def _to_suffix(key: str, raw: Any, source: str) -> str | tuple[int, ...]:
    return as_param_error(to_suffix, raw, source)


#: Parameter name -> (converter from the wire value, validity predicate, its wording).
_PARAM_RULES: dict[str, tuple[Callable[[str, Any, str], Any], Callable[[Any], bool], str]] = {
    "dllm_block_length": (_to_int, lambda v: v >= 1, "must be >= 1"),
    "dllm_cache": (_to_str, lambda v: v in CACHE_MODES, f"must be one of {', '.join(CACHE_MODES)}"),
    "dllm_threshold": (_to_float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "dllm_factor": (_to_float, lambda v: v > 0.0, "must be > 0"),
    "dllm_steps": (_to_int, lambda v: v >= 1, "must be >= 1"),
    "dllm_sub_block_length": (_to_int, lambda v: v >= 1, "must be >= 1"),
    "dllm_editing_threshold": (_to_float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "dllm_max_post_steps": (_to_int, lambda v: v >= 0, "must be >= 0"),
    "dllm_eb_threshold": (_to_float, lambda v: v > 0.0, "must be > 0"),
    "dllm_alg": (_to_str, lambda v: v in DREAM_ALGS, f"must be one of {', '.join(DREAM_ALGS)}"),
    "dllm_alg_temp": (_to_float, lambda v: v >= 0.0, "must be >= 0"),
    SUFFIX_KEY: (_to_suffix, lambda v: True, ""),
    "dllm_remasking": (
        _to_str,
        lambda v: v in REMASKING_MODES,
        f"must be one of {', '.join(REMASKING_MODES)}",
    ),
}


def check_value(key: str, value: Any, source: str) -> None:
    """Raise unless `value` (already of the right type) is in the valid range of `key`."""
    _, valid, requirement = _PARAM_RULES[key]
    if not valid(value):
        raise DllmParamError(f"{source}{key} {requirement}, got {value!r}")
