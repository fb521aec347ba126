"""OMQ, outlier-driven mixed quantization (MPQ-DM, AAAI 2025): per-channel weight bits for one layer.

Per quantized layer with base weight width b:

1. κ_c = E[(w − μ)^4] / σ^4 of each output channel c (flattened over inputs and kernel);
2. the k channels with the highest κ get b+1 bits, the k lowest get b−1 bits, the rest b,
   so the layer's average width stays exactly b (at W2 the low group gets 1 bit);
3. k is searched over a grid of fractions f (see `group_size`), minimising
   ‖layer(X, Q(W)) − layer(X, W)‖² on the layer's calibration inputs X.

The result is held in the weight quantizer's `bits` buffer ([O, 1, ...]), which fake
quantization, `quant_state` and the packed checkpoint already handle per channel.

MPQ-DM's optional smoothing W' = W·s, X' = X/s with s_j = sqrt(max|X_j| / max|W_:,j|) is
SmoothQuant's with α = 0.5: the recipe option ``quant.smooth`` (`quant.transforms`, linear
layers) sets it before OMQ runs, which then searches on the smoothed weight and inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.quant.init import InitMethod, init_quantizer
from lowbitdm_cli.quant.layers import QuantLayerMixin
from lowbitdm_cli.quant.quantizer import fake_quantize

__all__ = ["PAPER_FRACTIONS", "channel_kurtosis", "group_size", "omq_bits", "omq_min_bits",
           "search_group_size"]

PAPER_FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
"""MPQ-DM's grid: 0 … 50 % of the channels change width, in steps of 10 %."""


def channel_kurtosis(weight: torch.Tensor) -> torch.Tensor:
    """κ_c = E[(w − μ)^4] / σ^4 per output channel (dim 0), population moments → [O].

    Equals ``scipy.stats.kurtosis(w.reshape(O, -1), axis=1, fisher=False, bias=True)``.
    A constant channel (σ = 0) gets κ = 0: it has no outliers and is exact at any width,
    so it belongs to the low-bit group.
    """
    w = weight.detach().reshape(weight.shape[0], -1).double()
    d = w - w.mean(dim=1, keepdim=True)
    m2 = d.pow(2).mean(dim=1)
    m4 = d.pow(4).mean(dim=1)
    kurt = torch.where(m2 > 0, m4 / m2.clamp_min(1e-300).pow(2), torch.zeros_like(m2))
    return kurt.float()


def group_size(fraction: float, num_channels: int) -> int:
    """k for fraction f: k = ⌊f·O/2⌋ channels go up and k go down, so 2k ≈ f·O channels
    (rounded down to an even count) change width. f = 0 gives k = 0 (uniform b bits)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"OMQ fraction must be in [0, 1], got {fraction}")
    return int(math.floor(fraction * num_channels / 2 + 1e-9))


def omq_bits(kurtosis: torch.Tensor, base_bits: int, k: int, min_bits: int = 1) -> torch.Tensor:
    """Per-channel widths [O]: the k highest-κ channels b+1, the k lowest b−1, the rest b.

    Ties in κ are broken by channel index (lower index first in each group). The mean is
    exactly b; a nonzero k therefore needs b+1 ≤ 8 and b−1 ≥ `min_bits` (1, or 2 for
    symmetric quantizers), and 2k ≤ O. Widths are returned as float (like `bits` buffers).
    """
    num = kurtosis.numel()
    if k < 0 or 2 * k > num:
        raise ValueError(f"OMQ group size k={k} needs 0 <= 2k <= {num} channels")
    bits = torch.full((num,), float(base_bits))
    if k == 0:
        return bits
    if base_bits + 1 > 8 or base_bits - 1 < min_bits:
        raise ValueError(f"OMQ at {base_bits} bits would leave {min_bits}..8 bits (b±1 must stay in range, "
                         f"so that the layer's average stays {base_bits}); keep such layers uniform")
    # stable sort on −κ: highest first, equal κ in channel order
    order = torch.sort(-kurtosis.reshape(-1).double(), stable=True).indices
    bits[order[:k]] = base_bits + 1
    bits[order[num - k:]] = base_bits - 1
    return bits


def omq_min_bits(layer: QuantLayerMixin) -> int:
    """Smallest width the layer's weight quantizer accepts (symmetric needs 2)."""
    return 2 if layer.w_quant is not None and layer.w_quant.mode == "symmetric" else 1


def _float_forward(layer: QuantLayerMixin, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's own op with `weight` and an unquantized input (no observer, no act quant)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


@torch.no_grad()
def search_group_size(layer: QuantLayerMixin, inputs: torch.Tensor | Sequence[torch.Tensor], base_bits: int,
                      fractions: Sequence[float] = PAPER_FRACTIONS, init_method: InitMethod = "minmax"
                      ) -> tuple[torch.Tensor, dict[float, float]]:
    """Choose the OMQ fraction of one layer; leave its weight quantizer at the best bits.

    For each f in `fractions`: set the per-channel bits (`omq_bits` with k = `group_size(f, O)`),
    re-initialise the weight quantizer with `init_method`, and measure the mean squared
    error between ``layer(X, Q(W))`` and ``layer(X, W)`` over `inputs` (activations
    unquantized). A larger f wins only with a strictly smaller error; fractions that give
    the same k as an earlier one reuse its error. Returns (bits [O], {f: error}).
    """
    q = layer.w_quant
    if q is None or q.channel_axis is None:
        raise ValueError("OMQ needs a per-channel weight quantizer (quant.w_per_channel = true)")
    if not fractions:
        raise ValueError("OMQ needs at least one fraction")
    xs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    weight = layer.merged_weight().detach()
    kurt = channel_kurtosis(weight)
    num = weight.shape[0]
    refs = [_float_forward(layer, x, weight) for x in xs]
    min_bits = omq_min_bits(layer)

    def error_at(bits: torch.Tensor) -> float:
        q.bits.copy_(bits.reshape(q.bits.shape).to(q.bits))
        init_quantizer(q, weight, init_method)
        wq = fake_quantize(weight, q.delta, q.zero_point, q.bits, q.mode)  # also when q is switched off
        total, count = 0.0, 0
        for x, ref in zip(xs, refs):
            total += float((_float_forward(layer, x, wq) - ref).double().pow(2).sum())
            count += ref.numel()
        return total / max(count, 1)

    errors: dict[float, float] = {}
    by_k: dict[int, float] = {}
    best_bits, best_err = None, math.inf
    for f in fractions:
        k = group_size(float(f), num)
        bits = omq_bits(kurt, base_bits, k, min_bits)
        if k not in by_k:
            by_k[k] = error_at(bits)
            if best_bits is None or by_k[k] < best_err:
                best_err, best_bits = by_k[k], bits
        errors[float(f)] = by_k[k]
    error_at(best_bits)  # leave the quantizer at the winner
    return best_bits, errors
