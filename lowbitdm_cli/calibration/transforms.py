"""Set the input transforms of the transformer methods (smoothing, rotation, low-rank branch) from
calibration data: the step between wrapping the layers and initialising their weight quantizers.

Per linear layer whose spec names a transform (`quant.policy`), in the order of SVDQuant:

1. smoothing: s_j = max|X_j|^α / max|W_:,j|^(1−α), with max|X_j| the largest |input| of channel j
   the FP model's layer sees on the calibration data (one batch of `calibrate.batch_size` samples at
   every kept trajectory position, both CFG branches); W ← W·s;
2. rotation: W ← W·H (H the block Hadamard of `quant.transforms`), data-free;
3. low-rank branch: W = L1·L2 + R (top-r SVD); the branch keeps L1 and L2 with the smoothing and
   rotation folded into L2 (so it runs on the raw input), and W ← R.

The layer's float ``weight`` then holds what is quantized; weight quantizers are initialised from it
afterwards and everything later (OMQ, activation ranges, reconstruction, finetuning, merge) sees the
transformed layer. Every rank of a torchrun job computes the same factors from the same data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lowbitdm_cli.calibration.data import CalibrationData, run_first_batches
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.layers import QuantLayerMixin, quant_layers
from lowbitdm_cli.quant.model import set_quant_enabled
from lowbitdm_cli.quant.transforms import fold_into_down, hadamard_transform, low_rank_split, smoothing_factors

__all__ = ["apply_transforms", "input_absmax", "transform_weight", "transformed_layers"]


def transformed_layers(model: DiffusionModel) -> dict[str, QuantLayerMixin]:
    """The quantized layers whose spec names an input transform."""
    return {n: m for n, m in quant_layers(model.denoiser).items() if m.spec.transformed}


@contextmanager
def _as_float_model(layers: dict[str, QuantLayerMixin], model: DiffusionModel) -> Iterator[None]:
    """No fake quantization and no rotation (the weights are not rotated yet): the FP model."""
    blocks = {n: m.rotate_block for n, m in layers.items()}
    set_quant_enabled(model.denoiser, weights=False, activations=False)
    for m in layers.values():
        m.rotate_block = None
    try:
        yield
    finally:
        for n, m in layers.items():
            m.rotate_block = blocks[n]
        set_quant_enabled(model.denoiser, weights=True, activations=True)


@torch.no_grad()
def input_absmax(model: DiffusionModel, data: CalibrationData, layers: dict[str, QuantLayerMixin], guidance: float,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel j of each layer's raw input in the FP model, over one batch at every
    kept trajectory position."""
    found: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            found[name] = m if name not in found else torch.maximum(found[name], m)
        return record

    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    try:
        with _as_float_model(layers, model):
            run_first_batches(model, data, guidance, batch_size)
    finally:
        for h in handles:
            h.remove()
    return found


def transform_weight(weight: torch.Tensor, smooth: torch.Tensor | None, rotate: int | None, rank: int | None
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(what is quantized: W·s·H minus the branch, the branch's (down on the raw input, up) or None),
    in float64 up to the final rounding to float32."""
    w = weight.detach().double()
    if smooth is not None:
        w = w * smooth.double()
    if rotate is not None:
        w = hadamard_transform(w, rotate)
    if rank is None:
        return w.float(), None
    up, down, residual = low_rank_split(w, rank)
    return residual, (fold_into_down(down, smooth, rotate), up)


@torch.no_grad()
def apply_transforms(model: DiffusionModel, data: CalibrationData, alpha: float, guidance: float,
                     batch_size: int) -> dict[str, dict]:
    """Give every transformed layer its factors and transformed weight, in place (see the module
    docstring). Returns, per layer, what was set: ``{"smooth": [min s, max s], "rotate": block,
    "low_rank": r, "low_rank_energy": ‖L1·L2‖² / ‖W'‖²}`` (keys only for the transforms it has)."""
    layers = transformed_layers(model)
    smoothed = {n: m for n, m in layers.items() if m.smooth is not None}
    absmax = input_absmax(model, data, smoothed, guidance, batch_size) if smoothed else {}
    record: dict[str, dict] = {}
    for name, layer in layers.items():
        rec: dict = {}
        s = None
        if layer.smooth is not None:
            s = smoothing_factors(absmax[name], layer.weight, alpha).to(layer.smooth)
            layer.smooth.copy_(s)
            rec["smooth"] = [float(s.min()), float(s.max())]
        full = None
        if layer.low_rank_down is not None:
            full, _ = transform_weight(layer.weight, s, layer.rotate_block, None)
        residual, branch = transform_weight(layer.weight, s, layer.rotate_block, layer.spec.low_rank)
        if branch is not None:
            layer.low_rank_down.copy_(branch[0])
            layer.low_rank_up.copy_(branch[1])
            rec["low_rank"] = layer.spec.low_rank
            rec["low_rank_energy"] = round(1.0 - float(residual.double().pow(2).sum() / full.double().pow(2).sum()
                                                       .clamp_min(1e-30)), 6)
        if layer.rotate_block is not None:
            rec["rotate"] = layer.rotate_block
        layer.weight.copy_(residual.to(layer.weight))
        record[name] = rec
    return record
