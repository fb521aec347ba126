"""The one quantizer family: uniform affine fake quantization with learnable step size.

Q_b(x; Δ, z) = (clamp(round(x/Δ) + z, q_min, q_max) − z) · Δ, with the straight-through
estimator for round. Every variant used by lowbitdm is a configuration of `UniformQuantizer`:

- per-tensor or per-channel (`channel_axis`), symmetric, asymmetric or unsigned;
- any bit width 1..8, or a per-channel bit width (OMQ mixed precision);
- temporal: one (Δ, z) per denoising timestep, selected by the timestep *value*
  (``set_timestep(t)``), stored as parameters with the timestep values as a buffer;
- LSQ (Esser et al. 2020) learnable Δ, optionally with gradient scale 1/√(N·Q_p);
- dynamic per token (ViDiT-Q): symmetric, Δ = max|x| / (2^(b−1) − 1) of each token (the last dim
  is the channel dim), computed at run time from the (detached) values (`token_scale`); such a
  quantizer has no learned Δ, no timestep slots and needs no calibration.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["QuantMode", "TimestepSlots", "UniformQuantizer", "grad_scale", "quant_range", "round_ste", "token_scale"]

QuantMode = Literal["asymmetric", "symmetric", "unsigned"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the forward pass, gradient multiplied by `scale` in the backward pass."""
    return (x - x * scale).detach() + x * scale


def quant_range(bits: torch.Tensor | int, mode: QuantMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer code range [q_min, q_max] for `bits` (scalar or per-channel tensor)."""
    b = torch.as_tensor(bits, dtype=torch.float32)
    if mode == "symmetric":
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return torch.zeros_like(b), 2**b - 1


def token_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric step Δ = max_k |x[..., k]| / (2^(bits−1) − 1), shape [..., 1], no gradient;
    at least 1e-8 (an all-zero token). Elementwise IEEE operations and an exact max: every
    runtime that calls this gets the same bits."""
    with torch.no_grad():
        return x.detach().abs().amax(-1, keepdim=True).div_(float(2 ** (bits - 1) - 1)).clamp_min_(1e-8)


class TimestepSlots:
    """Selection of a per-timestep parameter slot by timestep *value* (never a call counter).

    The host module keeps the slot values in a `timesteps` buffer; `set_timestep(t)` picks the
    slot of `t`, or the nearest one when `t` was never calibrated or trained (recorded in
    `unmatched_timesteps`, so a sampler with other steps can report it).
    """

    timesteps: torch.Tensor
    _index: int | None
    unmatched_timesteps: set[int]

    @property
    def temporal(self) -> bool:
        return self.timesteps.numel() > 0

    def set_timestep(self, t: int | None) -> None:
        if not self.temporal or t is None:
            self._index = None
            return
        dist = (self.timesteps - int(t)).abs()
        self._index = int(dist.argmin())
        if int(dist[self._index]) != 0:
            self.unmatched_timesteps.add(int(t))


class UniformQuantizer(TimestepSlots, nn.Module):
    """Fake quantizer with parameters Δ (`delta`) and z (`zero_point`).

    Shapes: `delta` and `zero_point` are [S, *param_shape] when temporal (S timesteps,
    values in the `timesteps` buffer) and [*param_shape] otherwise; `param_shape` is
    all ones except the channel axis (e.g. [O, 1, 1, 1] for a conv weight). `bits` is
    a buffer of shape `param_shape`, so per-channel bit widths need no special case.
    """

    def __init__(self, bits: int, mode: QuantMode = "asymmetric", channel_axis: int | None = None,
                 num_channels: int = 1, ndim: int = 1, timesteps: list[int] | None = None,
                 lsq_grad_scale: bool = False, dynamic: bool = False) -> None:
        super().__init__()
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        if mode == "symmetric" and int(bits) < 2:
            raise ValueError("symmetric quantization needs at least 2 bits")
        if dynamic and (mode != "symmetric" or channel_axis is not None or timesteps):
            raise ValueError("a dynamic (per-token) quantizer is symmetric, with no channel axis and no timesteps")
        self.dynamic = dynamic
        self.mode: QuantMode = mode
        self.channel_axis = channel_axis
        self.lsq_grad_scale = lsq_grad_scale
        # LSQ's gradient scale counts the elements of the whole batch; a loop that runs it in k
        # equal micro-batches sets k here (finetune.loop), so the scale stays the batch's
        self.lsq_batch_factor = 1
        shape = [1] * max(ndim, 1)
        if channel_axis is not None:
            shape[channel_axis] = num_channels
        self.param_shape = tuple(shape)
        self.register_buffer("bits", torch.full(self.param_shape, float(bits)))
        lead = (len(timesteps),) if timesteps else ()
        self.register_buffer("timesteps", torch.tensor(timesteps or [], dtype=torch.long))
        self.delta = nn.Parameter(torch.ones(lead + self.param_shape))
        self.zero_point = nn.Parameter(torch.zeros(lead + self.param_shape), requires_grad=mode == "asymmetric")
        self.register_buffer("initialized", torch.tensor(dynamic))
        self.enabled = True
        self._index: int | None = None
        self.unmatched_timesteps: set[int] = set()

    def current_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ, z) for the selected timestep (or the only ones)."""
        if not self.temporal:
            return self.delta, self.zero_point
        if self._index is None:
            raise RuntimeError("temporal quantizer used before set_timestep(t)")
        return self.delta[self._index], self.zero_point[self._index]

    # --- forward ------------------------------------------------------------------------
    @property
    def max_bits(self) -> int:
        return int(self.bits.max().item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.dynamic:
            return fake_quantize(x, token_scale(x, self.max_bits), self.zero_point, self.bits, self.mode)
        delta, zero = self.current_params()
        if self.lsq_grad_scale and self.training:
            _, q_max = quant_range(self.max_bits, self.mode)
            per_param = x.numel() * self.lsq_batch_factor / max(delta.numel(), 1)
            delta = grad_scale(delta, 1.0 / math.sqrt(per_param * float(q_max)))
        return fake_quantize(x, delta, zero, self.bits, self.mode)

    def quantize_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes q = clamp(round(x/Δ) + z, q_min, q_max) (as float, no gradient)."""
        delta, zero = self.current_params()
        q_min, q_max = quant_range(self.bits, self.mode)
        with torch.no_grad():
            return torch.clamp(torch.round(x / delta) + torch.round(zero), q_min.to(x), q_max.to(x))

    def plain_step(self) -> tuple[torch.Tensor, float, float, float] | None:
        """(Δ as a one-element tensor, z, q_min, q_max) where this quantizer has one static step, one
        zero point and one bit width for the selected timestep (what `export.passes` quantizes with);
        else None. z is the rounded zero point (0 when symmetric), as `integer_values` uses it."""
        if self.dynamic:
            return None
        delta, zero = self.current_params()
        if delta.numel() != 1 or zero.numel() != 1 or self.bits.numel() != 1:
            return None
        q_min, q_max = quant_range(self.bits, self.mode)
        z = float(torch.round(zero)) if self.mode == "asymmetric" else 0.0
        return delta.detach().reshape(()), z, float(q_min), float(q_max)

    def integer_values(self, x: torch.Tensor, divisor: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """(q − z as float, Δ, (a, b): every q − z lies in [−a, b]) for the selected timestep, no gradient
        (the range bounds the exact sums of `quant.integer.partial_sum_bound`).

        q = clamp(round(x/Δ) + round(z), q_min, q_max) with the float operations of
        `fake_quantize`, so ``(q − z)·Δ`` is bit for bit what `forward` returns. A dynamic
        quantizer returns Δ per token ([..., 1]). `divisor` (smoothing's s, one per input channel,
        static Δ only): q = clamp(round(x / (Δ·s)) + z, …), the quantization of x/s in one pass.
        """
        if self.dynamic:
            delta = token_scale(x, self.max_bits)
            half = float(2 ** (self.max_bits - 1))
            with torch.no_grad():
                return torch.div(x, delta).round_().clamp_(-half, half - 1), delta, (half, half - 1)
        delta, zero = self.current_params()
        q_min, q_max = quant_range(self.bits, self.mode)
        with torch.no_grad():
            z = torch.round(zero) if self.mode == "asymmetric" else torch.zeros_like(zero)
            # clamp(round(x/Δ) + z, q_min, q_max) − z == clamp(round(x/Δ), q_min − z, q_max − z) for an
            # integer z: exact in float32 (a rounded quotient beyond 2^24 clamps either way; NaN stays
            # NaN), so three passes in place on one new tensor give fake_quantize's values
            lo, hi = (q_min.to(z) - z).to(x), (q_max.to(z) - z).to(x)
            q = torch.div(x, delta if divisor is None else delta * divisor).round_().clamp_(lo, hi)
            neg, pos = torch.stack([(-lo).max(), hi.max()]).clamp(min=0).tolist()  # one read-back
            return q, delta, (neg, pos)

    def extra_repr(self) -> str:
        bits = self.bits.unique().tolist()
        gran = "tensor" if self.channel_axis is None else f"channel(axis={self.channel_axis})"
        gran = "token(dynamic)" if self.dynamic else gran
        temporal = f", timesteps={self.timesteps.numel()}" if self.temporal else ""
        return f"bits={bits if len(bits) > 1 else int(bits[0])}, mode={self.mode}, {gran}{temporal}"


def fake_quantize(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, bits: torch.Tensor,
                  mode: QuantMode) -> torch.Tensor:
    """(clamp(round(x/Δ) + round(z), q_min, q_max) − round(z)) · Δ with STE rounding.

    Gradients: LSQ's ∂/∂Δ (round(x/Δ) − x/Δ inside the range, q_max − z or q_min − z
    outside it) and ∂/∂z = −Δ outside the range, 0 inside (through the STE).
    """
    q_min, q_max = quant_range(bits, mode)
    q_min, q_max = q_min.to(x), q_max.to(x)
    zero = round_ste(zero_point) if mode == "asymmetric" else zero_point.detach() * 0
    q = round_ste(x / delta) + zero
    # torch.where, not clamp: clamp with tensor bounds splits the gradient on ties (q == q_max),
    # which would halve LSQ's gradient for exactly the values min-max init puts on the boundary.
    q = torch.where(q < q_min, q_min, torch.where(q > q_max, q_max, q))
    return (q - zero) * delta
