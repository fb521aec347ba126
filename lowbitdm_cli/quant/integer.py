"""Integer-exact evaluation of a quantized conv/linear: the arithmetic both runtimes share.

A quantized layer computes ``y[o] = Δx·Δw[o]·acc[o] + b[o]`` with the integer accumulator
``acc[o] = Σ_k (qx_k − zx)(qw_ok − zw_o)``. Computing ``acc`` exactly and rescaling it with
one fixed sequence of float32 operations makes the fake-quantized model (inference) and the
integer runtime produce the same bits, so their samples agree pixel for pixel instead of
drifting apart wherever an activation sits within float rounding of a rounding tie.

- `accumulate`: the exact accumulator as float32. Integer-valued float32 operands give
  exact products and partial sums in any summation order while every partial sum stays
  below 2^24 in magnitude; `exact_in_float32` checks a bound on that, otherwise the product
  runs in float64 (exact far beyond any layer here). The float32 result is then the
  round-to-nearest-even of the exact integer, as the int32 → float32 conversion of the
  integer kernels gives.
- `rescale`: ``((acc · Δx) · Δw[o]) + b[o]``, three float32 roundings in this order: the
  order oneDNN's int8 kernels use for their float32 output on the CPUs we checked
  (`tests/export/test_int_runtime.py` verifies it, and the integer runtime falls back to
  unit kernel scales plus this function wherever it does not hold).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["EXACT_F32", "accumulate", "exact_in_float32", "rescale"]

EXACT_F32 = 2**24
"""Integers up to this magnitude are exact in float32."""


def exact_in_float32(x_max: float, w_abs_row_sum_max: float) -> bool:
    """Whether every partial sum of Σ_k x_k·w_ok is below 2^24: |x| ≤ `x_max` and
    max_o Σ_k |w_ok| = `w_abs_row_sum_max` bound each partial sum by their product."""
    return x_max * w_abs_row_sum_max < EXACT_F32


def accumulate(op: Callable[[Tensor, Tensor], Tensor], x_int: Tensor, w_int: Tensor, exact32: bool) -> Tensor:
    """float32 ``op(x_int, w_int)`` of integer-valued operands, computed exactly
    (in float32 when `exact32`, else in float64) and rounded once to float32."""
    if exact32:
        return op(x_int, w_int)
    return op(x_int.double(), w_int.double()).float()


def rescale(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None, channel_dim: int) -> Tensor:
    """float32 ``((acc · Δx) · Δw[o]) + b[o]`` with the output channel o on `channel_dim`.

    `x_scale` is a one-element tensor, `w_scale` and `bias` have one entry per output channel.
    """
    view = [1] * acc.dim()
    view[channel_dim] = -1
    out = (acc * x_scale.reshape(())) * w_scale.reshape(view)
    return out if bias is None else out + bias.reshape(view)
