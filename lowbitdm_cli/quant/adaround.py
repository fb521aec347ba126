"""AdaRound: learned up/down rounding of a weight over a fixed quantizer (Nagel et al. 2020).

Used only during block reconstruction (`calibration.reconstruct`): `attach_adaround`
swaps a layer's weight quantizer for an `AdaRoundQuantizer`, and `detach_adaround`
restores it after folding the chosen rounding into the float weight, so the rest of
lowbitdm (merge, integer runtime, fake quantization) sees ordinary weights whose plain
round-to-nearest codes are exactly the AdaRound codes.

    W_q = Δ · (clamp(⌊W/Δ⌋ + h(V) + z, q_min, q_max) − z),
    h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1,
    regulariser Σ 1 − |2h(V) − 1|^β  (β annealed 20 → 2 after a 20 % warm-up).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbitdm_cli.quant.quantizer import UniformQuantizer, quant_range

__all__ = ["BETA_END", "BETA_START", "GAMMA", "WARMUP", "ZETA", "AdaRoundQuantizer", "attach_adaround",
           "beta_schedule", "detach_adaround"]

ZETA = 1.1
GAMMA = -0.1
BETA_START = 20.0
BETA_END = 2.0
WARMUP = 0.2


def beta_schedule(it: int, iters: int, warmup: float = WARMUP, start: float = BETA_START,
                  end: float = BETA_END) -> float | None:
    """β at iteration `it` of `iters`: None during the warm-up (regulariser off), then linear start → end.

    The decay runs over the iterations after the warm-up and reaches `end` at the last one
    (BRECQ's `LinearTempDecay`).
    """
    first = int(warmup * iters)
    if it < first:
        return None
    span = max(iters - 1 - first, 1)
    rel = min((it - first) / span, 1.0)
    return end + (start - end) * (1.0 - rel)


class AdaRoundQuantizer(nn.Module):
    """Soft (training) or hard (h ≥ 0.5) learned rounding of one weight tensor.

    `base` is the layer's initialised weight quantizer; its (Δ, z, bits) stay fixed. The
    weight is fixed at construction (⌊W/Δ⌋ is stored), so `forward(w)` ignores the
    values of `w`. V starts where h(V) equals the fractional part of W/Δ, so the soft
    weight starts at the float weight (up to clipping).
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        if base.temporal:
            raise ValueError("AdaRound needs a non-temporal weight quantizer")
        self.base = base
        delta, _ = base.current_params()
        w = weight.detach() / delta.detach()
        floor = torch.floor(w)
        frac = (w - floor).clamp(0.0, 1.0)
        self.register_buffer("w_floor", floor)
        # h(V) = frac  ⇔  σ(V) = (frac − γ)/(ζ − γ)  ⇔  V = −log((ζ − γ)/(frac − γ) − 1)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0))
        self.soft = True
        self.enabled = True

    def h(self) -> torch.Tensor:
        """Rectified sigmoid h(V) ∈ [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def hard(self) -> torch.Tensor:
        """The chosen rounding: 1 (up) where h(V) ≥ 0.5, else 0 (down)."""
        return (self.h() >= 0.5).to(self.w_floor.dtype)

    def _zero(self) -> torch.Tensor:
        _, zero = self.base.current_params()
        return torch.round(zero.detach()) if self.base.mode == "asymmetric" else torch.zeros_like(zero)

    def _clamp(self, q: torch.Tensor) -> torch.Tensor:
        q_min, q_max = quant_range(self.base.bits, self.base.mode)
        q_min, q_max = q_min.to(q), q_max.to(q)
        return torch.where(q < q_min, q_min, torch.where(q > q_max, q_max, q))

    def codes(self) -> torch.Tensor:
        """Integer codes of the hard rounding, clamp(⌊W/Δ⌋ + [h ≥ 0.5] + z, q_min, q_max)."""
        with torch.no_grad():
            return self._clamp(self.w_floor + self.hard() + self._zero())

    def folded_weight(self) -> torch.Tensor:
        """Δ · (codes − z): a float weight whose round-to-nearest codes are `codes()`."""
        delta, _ = self.base.current_params()
        with torch.no_grad():
            return (self.codes() - self._zero()) * delta.detach()

    def regularizer(self, beta: float) -> torch.Tensor:
        """Σ 1 − |2h(V) − 1|^β: zero only when every h is 0 or 1."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        delta, _ = self.base.current_params()
        zero = self._zero()
        r = self.h() if self.soft else self.hard()
        return (self._clamp(self.w_floor + r + zero) - zero) * delta.detach()

    def extra_repr(self) -> str:
        return f"soft={self.soft}, numel={self.alpha.numel()}"


def attach_adaround(layer: nn.Module) -> AdaRoundQuantizer:
    """Replace `layer.w_quant` (a `QuantLayerMixin`'s) by AdaRound over its merged weight."""
    if layer.w_quant is None:
        raise ValueError("layer has no weight quantizer")
    if isinstance(layer.w_quant, AdaRoundQuantizer):
        raise TypeError("AdaRound is already attached to this layer")
    if layer.lora_A is not None:
        raise ValueError("AdaRound cannot fold into a layer with LoRA factors")
    ada = AdaRoundQuantizer(layer.w_quant, layer.merged_weight())
    ada.enabled = layer.w_quant.enabled
    layer.w_quant = ada
    return ada


def detach_adaround(layer: nn.Module, fold: bool = True) -> None:
    """Restore the layer's own weight quantizer; with `fold`, first store the hard rounding
    in the float weight (Δ·(code − z)), so round-to-nearest reproduces the AdaRound codes."""
    ada = layer.w_quant
    if not isinstance(ada, AdaRoundQuantizer):
        raise TypeError("no AdaRound attached to this layer")
    if fold:
        with torch.no_grad():
            layer.weight.copy_(ada.folded_weight().to(layer.weight))
    layer.w_quant = ada.base

