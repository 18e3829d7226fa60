"""Counter-based random numbers: each row's noise is a pure function of its own key.

A seeded request must draw the same numbers alone or in any batch, and every tensor-parallel rank
must draw the same numbers without talking to the others. A stateful `torch.Generator` gives
neither cheaply: one generator per request means one kernel launch per request per step, and
how far a generator advances depends on how many rows it was asked for. Here a row's numbers are
a hash of `(seed, step, canvas position, stream, vocabulary index)` instead: nothing is carried
between steps, the batch's layout does not matter, rows can be produced in any chunking, the
whole batch is one chain of element-wise integer kernels (CUDA-graph friendly, no host sync),
and CPU and GPU produce the same bits.

The hash is SplitMix64's finaliser (a bijection on 64-bit integers with full avalanche), applied
to int64 tensors whose multiplications wrap modulo 2**64 as unsigned arithmetic does; right
shifts are made logical by masking. `tests/test_sampling.py` checks the bits against a NumPy
`uint64` implementation. Vocabulary-sized work is done in place: the scratch memory of `gumbel`
is 16 bytes per element plus its float32 result (see `vllm_dllm.sampling.proposal`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Stream tags keep the proposal's Gumbel noise and the `random` remasking score independent.
GUMBEL_STREAM = 1
REMASK_STREAM = 2

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_POSITION_MUL = 0xD1B54A32D192ED03


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned `value`."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _xor_shr_(x: Tensor, bits: int, scratch: Tensor) -> None:
    """`x ^= x >>> bits` in place (logical shift: torch's `>>` is arithmetic on int64)."""
    torch.bitwise_right_shift(x, bits, out=scratch)
    x.bitwise_xor_(scratch.bitwise_and_((1 << (64 - bits)) - 1))


def mix64_(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on an int64 tensor, in place; one scratch tensor of its size."""
    scratch = torch.empty_like(x)
    _xor_shr_(x, 30, scratch)
    x.mul_(_signed(_MUL1))
    _xor_shr_(x, 27, scratch)
    x.mul_(_signed(_MUL2))
    _xor_shr_(x, 31, scratch)
    return x


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (returns a new tensor)."""
    return mix64_(x.clone())


def row_keys(seed: Tensor, step: Tensor, position: Tensor, stream: int) -> Tensor:
    """One int64 key per row from the request's seed, its step count and the row's position.

    All arguments are int64 tensors of one shape (broadcastable); `stream` separates uses.
    """
    key = mix64(seed ^ _signed((stream * _GOLDEN) & ((1 << 64) - 1)))
    key = mix64(key + step * _signed(_GOLDEN))
    return mix64(key + position * _signed(_POSITION_MUL))


#: The largest float32 below 1.
_BELOW_ONE = 1.0 - 2.0**-24


def _unit_interval_(bits: Tensor) -> Tensor:
    """float32 in the open interval (0, 1) from the top 24 bits of int64 `bits` (consumed):
    `(t + 0.5) / 2**24`. float32 has 24 significant bits, so `t + 0.5` rounds to an integer
    from `t = 2**23` on, and for the largest `t` to `2**24`: that one value (once in 2**24
    draws, about once per LLaDA vocabulary row in 130) would be 1, whose Gumbel noise is
    `+inf` (a NaN for a greedy row at temperature 0 or a filtered token, which `argmax` takes).
    It is clamped to the largest float32 below 1; every other value is unchanged."""
    top = bits.bitwise_right_shift_(40).bitwise_and_((1 << 24) - 1)
    return top.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 24)).clamp_(max=_BELOW_ONE)


def uniform(keys: Tensor) -> Tensor:
    """One float32 uniform in (0, 1) per key (the `random` remasking score)."""
    return _unit_interval_(mix64(keys))


def gumbel(keys: Tensor, vocab_size: int) -> Tensor:
    """Standard Gumbel noise `-log(-log U)`, float32 `[len(keys), vocab_size]`.

    `U` is never 0 or 1, so the noise is always finite: a greedy row multiplies it by temperature
    0 and gets exactly 0, never `0 * inf = nan`.
    """
    columns = torch.arange(1, vocab_size + 1, device=keys.device, dtype=torch.int64)
    bits = mix64_(keys.unsqueeze(-1) + columns * _signed(_GOLDEN))
    return _unit_interval_(bits).log_().neg_().log_().neg_()
