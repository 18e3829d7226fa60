"""Where a request's diffusion defaults come from: the checkpoint, then the server.

A request's own `dllm_*` values win over the server's defaults (`--dllm-defaults`, stored in the
`VLLM_DLLM_DEFAULTS` environment variable), which win over the checkpoint's, which win over the
plugin's own (`vllm_dllm.param_docs`, `vllm_dllm.families`). For LLaDA and Dream a level that
names a selection rule replaces a lower level's rule of another kind instead of conflicting
with it; block-diffusion values merge key by key (`layered`).

**The checkpoint's defaults** are the `dllm_*` keys of its `generation_config.json`, read the way
vLLM reads a model's sampling defaults from the same file (`ModelConfig.try_get_generation_config`):
`--generation-config vllm` ignores them, `--generation-config DIR` reads DIR's file, and
`--override-generation-config '{"dllm_block_length": 16}'` sets or replaces keys. Why that file:
it is where a release keeps how its model should be sampled (Dream's `generation_utils` reads
`alg`, `steps` and `alg_temp` from it), and vLLM already reads it; a model trained for one block
length and rule can say so, where the plugin's defaults (block 32, threshold 0.9, no cache) may
not fit it at all. The releases' own names are not read as diffusion defaults: what a block-
diffusion release fixes in `config.json` (Fast-dLLM v2's `bd_size`, SDAR's `block_size`) is the
family's trained block (`vllm_dllm.families.family_of`), and LLaDA's and LLaDA 2.x's releases
pass their generation settings as arguments, in no file.

Every level is checked at start-up against the served family (`check_defaults`), so a bad
default fails the engine's start with one line naming where it came from, never a request.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_dllm.config import RULE_KEYS, parse_dllm_params
from vllm_dllm.families import Family
from vllm_dllm.infill import SUFFIX_KEY
from vllm_dllm.param_values import DllmParamError, read_dllm_args

if TYPE_CHECKING:
    from vllm.config import ModelConfig

#: Environment variable with the server-wide defaults: a JSON object of `dllm_*` keys. An
#: environment variable because every vLLM process that reads parameters (the front end that
#: validates, the scheduler that sizes canvases, the workers that decode) inherits it.
DEFAULTS_ENV = "VLLM_DLLM_DEFAULTS"

#: Where the checkpoint's defaults live, as start-up messages name it.
CHECKPOINT_FILE = "generation_config.json"

_PREFIX = "dllm_"

#: The generation config files' `dllm_*` keys by (source, revision), read once per process:
#: every request's defaults are built from them.
_FILE_DEFAULTS: dict[tuple[Any, ...], dict[str, Any]] = {}



@functools.cache
def server_defaults() -> dict[str, Any]:
    """The server-wide defaults from `VLLM_DLLM_DEFAULTS` (empty when unset), each value checked.

    Checks that depend on the model family run at start-up (`check_defaults`) and with every
    request.
    """
    raw = os.environ.get(DEFAULTS_ENV, "").strip()
    if not raw:
        return {}
    try:
        defaults = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DllmParamError(f"{DEFAULTS_ENV} must be a JSON object: {err}") from err
    if not isinstance(defaults, dict):
        raise DllmParamError(f"{DEFAULTS_ENV} must be a JSON object, got {raw!r}")
    read_dllm_args(defaults, "server default ")
    if defaults.get(SUFFIX_KEY) is not None:
        raise DllmParamError(f"{DEFAULTS_ENV} must not set {SUFFIX_KEY}: a suffix is per request")
    return defaults


def check_server_defaults(family: Family) -> None:
    """Fail unless the server defaults suit a model of `family`."""
    parse_dllm_params(None, family.block_length, server_defaults(), family)


def checkpoint_defaults(model_config: ModelConfig, family: Family) -> dict[str, Any]:
    """The `dllm_*` defaults of the served checkpoint: its `generation_config.json` (unless
    `--generation-config vllm`) under `--override-generation-config`'s."""
    return layered(checkpoint_file_defaults(model_config), _overrides(model_config), family)


def _overrides(model_config: ModelConfig) -> dict[str, Any]:
    overrides = model_config.override_generation_config or {}
    return {k: v for k, v in overrides.items() if k.startswith(_PREFIX)}


def checkpoint_file_defaults(model_config: ModelConfig) -> dict[str, Any]:
    """The `dllm_*` keys of the generation config file that vLLM reads for this model: the
    model's own (`--generation-config auto`, vLLM's default) or that of the directory given.

    The file is read as JSON, not through transformers' `GenerationConfig`, which drops every key
    it does not know from a file marked `_from_model_config` (as many releases' are)."""
    where = model_config.generation_config
    if where == "vllm":
        return {}
    source = str(model_config.hf_config_path or model_config.model) if where == "auto" else where
    key = (source, model_config.revision)
    if key not in _FILE_DEFAULTS:
        _FILE_DEFAULTS[key] = {
            k: v for k, v in _read_generation_config(source, model_config.revision).items()
            if isinstance(k, str) and k.startswith(_PREFIX)
        }
    return dict(_FILE_DEFAULTS[key])


def _read_generation_config(source: str, revision: str | None) -> dict[str, Any]:
    """`generation_config.json` of a local directory or a Hub repository ({} if it has none)."""
    local = Path(source)
    if local.is_dir():
        path = local / CHECKPOINT_FILE
        return json.loads(path.read_text()) if path.is_file() else {}
    from vllm.transformers_utils.repo_utils import get_hf_file_to_dict

    return get_hf_file_to_dict(CHECKPOINT_FILE, source, revision) or {}


def layered(lower: Mapping[str, Any], higher: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """`higher`'s defaults over `lower`'s. For LLaDA and Dream, a selection rule in `higher`
    replaces a rule in `lower` (as a request's own rule replaces a default one), since exactly
    one rule applies; block-diffusion loops combine a threshold and steps, so keys merge one by
    one."""
    if not family.block_causal and any(key in higher for key in RULE_KEYS):
        lower = {k: v for k, v in lower.items() if k not in RULE_KEYS}
    return {**lower, **higher}


def request_defaults(model_config: ModelConfig, family: Family) -> dict[str, Any]:
    """The defaults under every request to this model: the server's over the checkpoint's."""
    return layered(checkpoint_defaults(model_config, family), server_defaults(), family)


def default_sources(model_config: ModelConfig, family: Family) -> list[tuple[str, Any, str]]:
    """(key, value, where it comes from) of each default in force, for the start-up line."""
    server = server_defaults()
    overrides = _overrides(model_config)
    out = []
    for key, value in request_defaults(model_config, family).items():
        if key in server:
            source = "--dllm-defaults"
        elif key in overrides:
            source = "--override-generation-config"
        else:
            source = CHECKPOINT_FILE
        out.append((key, value, source))
    return out


def check_defaults(model_config: ModelConfig, family: Family) -> tuple[str, DllmParamError] | None:
    """The first level of defaults that does not suit the served family, with its error: the
    checkpoint's file, `--override-generation-config`, the server's, or their combination
    (named after the highest level that is set). None when all are fine."""
    file_defaults = checkpoint_file_defaults(model_config)
    overrides = _overrides(model_config)
    levels = (
        (CHECKPOINT_FILE, file_defaults),
        ("override_generation_config", overrides),
        (DEFAULTS_ENV, None),
    )
    for name, values in levels:
        try:
            if values is None:
                check_server_defaults(family)
            else:
                _check_level(values, family)
        except DllmParamError as err:
            return name, err
    try:
        parse_dllm_params(None, family.block_length, request_defaults(model_config, family), family)
    except DllmParamError as err:
        highest = DEFAULTS_ENV if server_defaults() else (
            "override_generation_config" if overrides else CHECKPOINT_FILE
        )
        return highest, err
    return None


def _check_level(values: Mapping[str, Any], family: Family) -> None:
    """Check one level on its own, its errors without the "server default" prefix that
    `parse_dllm_params` gives its defaults' errors."""
    if values.get(SUFFIX_KEY) is not None:
        raise DllmParamError(f"{SUFFIX_KEY} cannot be a default: a suffix is per request")
    read_dllm_args(values, "", family=family)
    parse_dllm_params(None, family.block_length, values, family)
