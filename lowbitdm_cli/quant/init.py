"""Initialise a quantizer's (Δ, z) from data: `minmax`, `mse` (Lp search) or `percentile`."""

from __future__ import annotations

from typing import Literal

import torch

from lowbitdm_cli.quant.quantizer import QuantMode, UniformQuantizer, fake_quantize, quant_range

__all__ = ["InitMethod", "init_quantizer", "range_to_params", "search_params", "set_params"]

InitMethod = Literal["minmax", "mse", "percentile"]

MSE_CANDIDATES = 80
MSE_P = 2.4
PERCENTILES = (0.999, 0.9999, 0.99999)


def range_to_params(lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor, mode: QuantMode
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) covering [lo, hi]; the range always includes 0 so that 0 is exactly representable."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    q_min, q_max = quant_range(bits, mode)
    q_min, q_max = q_min.to(lo), q_max.to(lo)
    if mode == "symmetric":
        delta = torch.maximum(hi.abs(), lo.abs()) / q_max
        zero = torch.zeros_like(delta)
    elif mode == "unsigned":
        delta = hi / q_max
        zero = torch.zeros_like(delta)
    else:
        delta = (hi - lo) / (q_max - q_min)
        zero = torch.round(-lo / delta.clamp_min(1e-12)).clamp(q_min, q_max)
    return delta.clamp_min(1e-8), zero


def _reduce_dims(x: torch.Tensor, channel_axis: int | None) -> tuple[int, ...]:
    return tuple(d for d in range(x.ndim) if d != channel_axis)


def _lp_error(x: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor, mode: QuantMode,
              channel_axis: int | None, p: float) -> torch.Tensor:
    err = (fake_quantize(x, delta, zero, bits, mode) - x).abs().pow(p)
    dims = _reduce_dims(x, channel_axis)
    return err.mean(dim=dims, keepdim=True) if dims else err


def search_params(x: torch.Tensor, bits: torch.Tensor, mode: QuantMode, channel_axis: int | None,
                  method: InitMethod) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ and z for `x`, shaped like `bits` (per channel along `channel_axis` or per tensor)."""
    x = x.detach().float()
    bits = bits.to(x.device)
    dims = _reduce_dims(x, channel_axis)
    lo = x.amin(dim=dims, keepdim=True) if dims else x
    hi = x.amax(dim=dims, keepdim=True) if dims else x
    if channel_axis is None:
        lo, hi = lo.reshape(bits.shape), hi.reshape(bits.shape)
    if method == "minmax":
        return range_to_params(lo, hi, bits, mode)
    if method == "mse":
        # (1 − 0.01·i)·range for i in 0..79, minimise the L_2.4 error (Q-Diffusion/BRECQ).
        candidates = [(lo * (1 - 0.01 * i), hi * (1 - 0.01 * i)) for i in range(MSE_CANDIDATES)]
        p = MSE_P
    elif method == "percentile":
        flat = x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1) if channel_axis is not None \
            else x.reshape(1, -1)
        flat = flat[:, : 1_000_000] if flat.shape[1] > 1_000_000 else flat
        candidates = []
        for q in PERCENTILES:
            c_lo = torch.quantile(flat, 1 - q, dim=1).reshape(bits.shape)
            c_hi = torch.quantile(flat, q, dim=1).reshape(bits.shape)
            candidates.append((c_lo, c_hi))
        candidates.append((lo, hi))
        p = 2.0
    else:
        raise ValueError(f"unknown init method {method!r} (minmax, mse, percentile)")
    best_err, best = None, None
    for c_lo, c_hi in candidates:
        delta, zero = range_to_params(c_lo, c_hi, bits, mode)
        err = _lp_error(x, delta, zero, bits, mode, channel_axis, p)
        if channel_axis is None:
            err = err.reshape(bits.shape)
        if best_err is None:
            best_err, best = err, (delta, zero)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, delta, best[0]), torch.where(better, zero, best[1]))
    return best


@torch.no_grad()
def init_quantizer(quantizer: UniformQuantizer, x: torch.Tensor, method: InitMethod,
                   timestep_index: int | None = None) -> None:
    """Set the quantizer's (Δ, z) from sample `x` (for one timestep slot if temporal)."""
    delta, zero = search_params(x, quantizer.bits, quantizer.mode, quantizer.channel_axis, method)
    set_params(quantizer, delta, zero, timestep_index)


@torch.no_grad()
def set_params(quantizer: UniformQuantizer, delta: torch.Tensor, zero: torch.Tensor,
               timestep_index: int | None = None) -> None:
    """Set (Δ, z) as `search_params` returned them (for one timestep slot if temporal)."""
    if quantizer.temporal:
        if timestep_index is None:
            quantizer.delta.copy_(delta.expand_as(quantizer.delta))
            quantizer.zero_point.copy_(zero.expand_as(quantizer.zero_point))
        else:
            quantizer.delta[timestep_index].copy_(delta)
            quantizer.zero_point[timestep_index].copy_(zero)
    else:
        quantizer.delta.copy_(delta.reshape(quantizer.delta.shape))
        quantizer.zero_point.copy_(zero.reshape(quantizer.zero_point.shape))
    quantizer.initialized.fill_(True)
