"""Per-request diffusion parameters: defaults, parsing and validation.

Requests carry the parameters in `SamplingParams.extra_args` (the OpenAI server's `vllm_xargs`)
under the keys of `DLLM_PARAM_DOCS` (`vllm_dllm.param_docs`); the checkpoint and the server may
set defaults for the same keys (`vllm_dllm.defaults`). A request's own value wins over a
default, and (LLaDA, Dream) a request that names a selection rule replaces a default rule of
another kind instead of conflicting with it; for block diffusion, where the threshold and the
steps combine into one rule, values merge key by key.

How each value is read (wire types, ranges, the names a family takes, keys that nothing reads)
is `vllm_dllm.param_values`'s. Every error is a `DllmParamError` (a `ValueError`, which vLLM's
server turns into a 400) whose message starts with the offending parameter's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_dllm.families import (
    BIDIRECTIONAL,
    DEFAULT_MAX_POST_STEPS,
    DEFAULT_SUB_BLOCK_LENGTH,
    Family,
    Loop,
)
from vllm_dllm.infill import (
    SUFFIX_KEY,
    block_causal_refusal,
    suffix_ids,
)
from vllm_dllm.param_docs import (
    DEFAULT_BLOCK_LENGTH,
    DEFAULT_CACHE,
    DEFAULT_EB_THRESHOLD,
    DEFAULT_REMASKING,
    DLLM_PARAM_NAMES,
    RULES,
)
from vllm_dllm.param_values import (
    DllmParamError,
    as_param_error,
    check_value,
    read_dllm_args,
)

_PREFIX = "dllm_"
RULE_KEYS = tuple(_PREFIX + rule for rule in RULES)
@dataclass(frozen=True)
class DllmParams:
    """The validated diffusion parameters of one request, for one model family.

    LLaDA and Dream (`vllm_dllm.families.BIDIRECTIONAL`): exactly one selection rule is active
    (`rule`); its parameter is set and the other two rule parameters are `None`; `threshold` may
    be left out for the threshold rule (0.9 is filled in). Block-diffusion families: the rule is
    the family's own (`threshold` always set, SDAR's `steps` and `remasking` give its quota).
    Construction validates everything, so a `DllmParams` in hand is always consistent; the
    error messages use the `dllm_` request keys because they reach users unchanged.
    """

    max_tokens: int
    block_length: int = DEFAULT_BLOCK_LENGTH
    cache: str = DEFAULT_CACHE
    rule: str = "threshold"
    threshold: float | None = None
    factor: float | None = None
    steps: int | None = None
    remasking: str = DEFAULT_REMASKING
    sub_block_length: int | None = None
    editing_threshold: float | None = None
    max_post_steps: int | None = None
    eb_threshold: float | None = None
    alg: str | None = None
    alg_temp: float | None = None
    #: Infilling: the canvas tokens after the gap (`vllm_dllm.infill`); empty without a suffix.
    suffix: tuple[int, ...] = ()
    family: Family = BIDIRECTIONAL

    def __post_init__(self) -> None:
        if (self.remasking == "entropy_bounded") != (self.eb_threshold is not None):
            raise DllmParamError(
                "dllm_eb_threshold applies with dllm_remasking entropy_bounded only (which needs "
                "it: parse_dllm_params fills in 0.35)"
            )
        if self.alg is None and self.alg_temp is not None:
            raise DllmParamError("dllm_alg_temp needs dllm_alg")
        if self.rule == "threshold" and self.threshold is None:
            object.__setattr__(self, "threshold", self.family.default_threshold)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise DllmParamError(f"max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise DllmParamError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if self.rule not in RULES:
            raise DllmParamError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for key in DLLM_PARAM_NAMES:
            value = getattr(self, key.removeprefix(_PREFIX))
            if value is not None:
                check_value(key, value, source="")
        if getattr(self, self.rule) is None:
            raise DllmParamError(
                f"dllm_{self.rule} must be set when the selection rule is {self.rule}"
            )
        if self.remasking not in self.family.remasking:
            raise DllmParamError(
                f"dllm_remasking must be one of {', '.join(self.family.remasking)} for "
                f"{self.family.name} models, got {self.remasking!r}"
            )
        if self.family.block_causal:
            if self.suffix:
                raise DllmParamError(block_causal_refusal(self.family.name))
            self._check_block_diffusion()
            return
        _check_exclusive([_PREFIX + r for r in RULES if getattr(self, r) is not None], source="")
        if self.steps is not None and self.steps % self.num_blocks:
            raise DllmParamError(
                f"dllm_steps ({self.steps}) must be a multiple of the number of blocks "
                f"({self.num_blocks} = ceil(max_tokens / dllm_block_length))"
            )
        if self.alg is not None:
            self._check_dream_alg()

    def _check_dream_alg(self) -> None:
        """Which of Dream's samplers combine with which loop (docs/design.md, "Dream's sampler").

        With its schedule (no rule named: `rule` steps), `origin` runs only as Dream's own
        `diffusion_generate` (one block, no cache); the three scored samplers also run inside
        Fast-dLLM's block loop (several blocks or a cache). With `dllm_threshold` (or
        `dllm_factor`) the alg only names the score the rule compares.
        """
        alg = self.alg
        if self.remasking != "low_confidence":
            raise DllmParamError(
                f"dllm_remasking does not apply with dllm_alg (the alg names the score and "
                f"dllm_steps its schedule), got {self.remasking!r}"
            )
        if alg == "origin":
            self._check_origin()
            return
        if self.rule != "steps":
            self._check_alg_rule()
            return
        steps_per_block = self.steps_per_block or 0
        if not self.dream_loop and self.block_length > 1 and steps_per_block < 2:
            raise DllmParamError(
                f"dllm_steps ({self.steps}) must give every block at least 2 steps with dllm_alg "
                f"and {self.num_blocks} block(s) or a cache (at least {2 * self.num_blocks}): in "
                f"Fast-dLLM's Dream block loop a block's first forward commits only its first "
                f"token, and Dream's schedule commits the rest over the block's other steps"
            )

    def _check_origin(self) -> None:
        """`origin` has no block form: the released block loop scores every alg by negative
        entropy, and a uniform draw per position has no threshold or quota to meet."""
        why = ("Dream's origin sampler runs only as its diffusion_generate loop (one block, every "
               "step a full forward); Fast-dLLM's Dream block loop has no origin form")
        if self.rule != "steps":
            raise DllmParamError(f"dllm_{self.rule} does not apply with dllm_alg origin: {why}")
        if self.block_length < self.max_tokens:
            raise DllmParamError(
                f"dllm_block_length ({self.block_length}) must cover max_tokens "
                f"({self.max_tokens}) with dllm_alg origin: {why}"
            )
        if self.cache != "none":
            raise DllmParamError(
                f"dllm_cache must be none with dllm_alg origin, got {self.cache!r}: {why}"
            )
        if self.alg_temp:
            raise DllmParamError("dllm_alg_temp does not apply to dllm_alg origin")

    def _check_alg_rule(self) -> None:
        """The threshold (or factor) rule scored by the alg: only where the score compares with
        the rule's bounds, which are probabilities."""
        key = f"dllm_{self.rule}"
        if self.alg == "entropy":
            raise DllmParamError(
                f"{key} does not apply with dllm_alg entropy: a negative entropy (nats, <= 0) is "
                f"not comparable with the rule's probability bound; dllm_alg topk_margin or "
                f"maskgit_plus take a threshold, and dllm_remasking entropy_bounded (without "
                f"dllm_alg) bounds the entropy of a step's commits"
            )
        if self.alg == "topk_margin" and self.rule == "factor":
            raise DllmParamError(
                "dllm_factor does not apply with dllm_alg topk_margin: the factor rule's bounds "
                "1 - factor / (i + 1) are Fast-dLLM's condition on the probabilities of the "
                "tokens committed together, which a top-1 minus top-2 margin is not; "
                "dllm_threshold compares a margin with a threshold"
            )
        if self.alg_temp:
            raise DllmParamError(
                f"dllm_alg_temp does not apply with {key}: it draws the positions of each step "
                f"of Dream's schedule, and the {self.rule} rule has no quota to draw"
            )

    @property
    def dream_loop(self) -> bool:
        """Dream's own `diffusion_generate` loop: `dllm_alg` with its schedule over a single
        block (the whole generation) and full forwards. Otherwise, with `dllm_alg`, Fast-dLLM's
        block loop runs (`vllm_dllm.denoising.dream_alg`)."""
        return (self.alg is not None and self.rule == "steps" and self.num_blocks == 1
                and self.cache == "none")  # fmt: skip

    def _check_block_diffusion(self) -> None:
        family = self.family
        if self.rule != "threshold" or self.factor is not None:
            raise DllmParamError(f"dllm_factor does not apply to {family.name} models")
        if self.block_length != family.block_length and not family.block_length_overridable:
            raise DllmParamError(
                f"dllm_block_length must be {family.block_length} for {family.name} models (the "
                f"block their attention was trained with), got {self.block_length}"
            )
        if self.cache not in family.caches and self.cache != family.default_cache:
            raise DllmParamError(
                f"dllm_cache must be one of {', '.join(family.caches)} for {family.name} models, "
                f"got {self.cache!r}"
            )
        if self.editing_threshold is not None and self.steps is not None:
            raise DllmParamError(
                "dllm_steps does not apply with dllm_editing_threshold: LLaDA 2.1's editing "
                "loop commits by the threshold with a quota of one token per step"
            )
        if self.max_post_steps is not None and self.editing_threshold is None:
            raise DllmParamError("dllm_max_post_steps needs dllm_editing_threshold")
        if self.sub_block_length is not None and self.block_length % self.sub_block_length:
            raise DllmParamError(
                f"dllm_sub_block_length ({self.sub_block_length}) must divide the block length "
                f"({self.block_length})"
            )

    @property
    def num_blocks(self) -> int:
        """Blocks in a bidirectional canvas: `ceil(max_tokens / block_length)`."""
        return -(-self.max_tokens // self.block_length)

    @property
    def gen_length(self) -> int:
        """Generated positions of a bidirectional canvas: `max_tokens` rounded up to whole blocks.

        Derived rather than stored so it can never disagree with `max_tokens` and `block_length`.
        """
        return self.num_blocks * self.block_length

    def canvas_length(self, prompt_len: int) -> int:
        """Length of a request's canvas, the one definition of it.

        Bidirectional: the prompt plus `gen_length` MASK positions (blocks start after the
        prompt), plus the suffix of an infilling request. Block diffusion: blocks are aligned
        to position 0, so the canvas is `prompt + max_tokens` rounded up to whole blocks. The
        scheduler allocates KV for this many positions and the worker decodes within them, so
        they can never disagree.
        """
        if not self.family.block_causal:
            return prompt_len + self.gen_length + len(self.suffix)
        return -(-(prompt_len + self.max_tokens) // self.block_length) * self.block_length

    def fitting_max_tokens(self, prompt_len: int, max_canvas_len: int) -> int:
        """The largest `max_tokens` whose canvas fits `max_canvas_len` (< 1: none fits)."""
        if not self.family.block_causal:
            gap = max_canvas_len - prompt_len - len(self.suffix)
            return gap // self.block_length * self.block_length
        return max_canvas_len // self.block_length * self.block_length - prompt_len

    @property
    def steps_per_block(self) -> int | None:
        """The denoising steps of each block (`m` of the quota schedule), None without steps.

        Bidirectional families: `dllm_steps` counts steps over the whole generation (LLaDA's
        `steps`), split evenly over the blocks. Block diffusion: `dllm_steps` is per block, as
        the SDAR and LLaDA 2.x releases' `steps` (so one value fits every prompt length), at
        most one step per position: more would only add quota-0 steps after the block is full.
        """
        if self.steps is None:
            return None
        if self.family.block_causal:
            return min(self.steps, self.block_length)
        return self.steps // self.num_blocks


def parse_dllm_params(
    extra_args: Mapping[str, Any] | None,
    max_tokens: int,
    defaults: Mapping[str, Any] | None = None,
    family: Family = BIDIRECTIONAL,
) -> DllmParams:
    """Build a request's `DllmParams` from its `extra_args` and the server-wide `defaults`.

    `max_tokens` is the request's resolved generation budget (an int >= 1). Errors in
    `defaults` are reported with a "server default" prefix, since the user cannot fix them.
    A key that the model's `family` does not accept is an error naming it.
    """
    request = read_dllm_args(extra_args, source="", family=family)
    server = read_dllm_args(defaults, source="server default ", family=family)
    request_rules = [key for key in RULE_KEYS if key in request]
    if family.block_causal:
        # Threshold and steps combine here (one rule), so request and server values merge key by
        # key; LLaDA 2.1's editing loop has its own quota, so it drops a server's steps.
        dropped = ("dllm_steps",) if "dllm_editing_threshold" in request else ()
    else:
        _check_exclusive(request_rules, source="")
        _check_exclusive([key for key in RULE_KEYS if key in server], "server default ")
        # A request that names a rule replaces the server's rule rather than conflicting with it.
        dropped = RULE_KEYS if request_rules else ()
    values = {k: v for k, v in server.items() if k not in dropped}
    values.update(request)
    remasking = values.get("dllm_remasking", family.remasking[0])
    eb_threshold = values.get("dllm_eb_threshold")
    if remasking == "entropy_bounded":
        eb_threshold = DEFAULT_EB_THRESHOLD if eb_threshold is None else eb_threshold
        for key in RULE_KEYS:
            if key in request:
                raise DllmParamError(
                    f"{key} does not apply with dllm_remasking entropy_bounded: the entropy "
                    f"bound (dllm_eb_threshold) decides how many positions a step commits"
                )
        # It replaces a server's default rule, as a request's own rule would.
        values = {k: v for k, v in values.items() if k not in RULE_KEYS}
    elif eb_threshold is not None:
        raise DllmParamError("dllm_eb_threshold needs dllm_remasking entropy_bounded")
    if values.get("dllm_alg") is not None:
        values = _dream_alg_values(values, request, max_tokens)
    if family.block_causal:
        rule_key = "dllm_threshold"
    else:
        rule_key = next((key for key in RULE_KEYS if key in values), "dllm_threshold")
    editing = values.get("dllm_editing_threshold")
    max_post_steps = values.get("dllm_max_post_steps")
    if editing is not None and max_post_steps is None:
        max_post_steps = DEFAULT_MAX_POST_STEPS
    sub_block = values.get("dllm_sub_block_length")
    if family.loop is Loop.FAST_DLLM_V2 and sub_block is None:
        sub_block = DEFAULT_SUB_BLOCK_LENGTH
    return DllmParams(
        max_tokens=max_tokens,
        block_length=values.get("dllm_block_length", family.block_length),
        cache=values.get("dllm_cache", family.default_cache),
        rule=rule_key.removeprefix(_PREFIX),
        threshold=values.get("dllm_threshold"),
        factor=values.get("dllm_factor"),
        steps=values.get("dllm_steps"),
        remasking=remasking,
        sub_block_length=sub_block,
        editing_threshold=editing,
        max_post_steps=max_post_steps,
        eb_threshold=eb_threshold,
        alg=values.get("dllm_alg"),
        alg_temp=values.get("dllm_alg_temp"),
        suffix=as_param_error(suffix_ids, values.get(SUFFIX_KEY)),
        family=family,
    )


def _dream_alg_values(
    values: dict[str, Any], request: Mapping[str, Any], max_tokens: int
) -> dict[str, Any]:
    """The merged values of a request with `dllm_alg`, with the alg's defaults filled in.

    A request that names `dllm_alg` itself gets Dream's defaults, not the server's rule, block
    and cache defaults (set for the other requests): one block over the generation
    (`dllm_block_length` max_tokens), full forwards (`dllm_cache` none) and Dream's schedule
    (`dllm_steps`: max_tokens for its own loop, one step per position otherwise), unless the
    request says otherwise; a `dllm_threshold` or `dllm_factor` of the request replaces the
    schedule. An alg among the server's defaults comes with the server's other defaults.
    """
    if "dllm_alg" in request:
        values = {k: v for k, v in values.items()
                  if k in request or k not in (*RULE_KEYS, "dllm_block_length", "dllm_cache")}
    values.setdefault("dllm_block_length", max_tokens)
    values.setdefault("dllm_cache", "none")
    if not any(key in values for key in RULE_KEYS):
        block = values["dllm_block_length"]
        num_blocks = -(-max_tokens // block)
        one_loop = num_blocks == 1 and values["dllm_cache"] == "none"
        values["dllm_steps"] = max_tokens if one_loop else num_blocks * block
    return values


def _check_exclusive(rule_keys: list[str], source: str) -> None:
    if len(rule_keys) > 1:
        names = ", ".join(rule_keys[:-1]) + " and " + rule_keys[-1]
        raise DllmParamError(f"{source}{names} are mutually exclusive: pick one selection rule")
