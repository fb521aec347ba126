"""Run MPQ-DM's OMQ (outlier-driven mixed quantization, AAAI 2025) over a calibrated model.

The per-layer math lives in `lowbitdm_cli.quant.mixed`; this module feeds it each layer's
inputs X, taken from the FP model (all fake quantization off) on a few calibration batches.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from lowbitdm_cli.calibration.data import CalibrationData, select_steps
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.layers import QuantLayerMixin, quant_layers
from lowbitdm_cli.quant.mixed import channel_kurtosis, group_size, omq_min_bits, search_group_size
from lowbitdm_cli.quant.model import set_quant_enabled
from lowbitdm_cli.recipes import Recipe

__all__ = ["OMQ_MAX_BATCHES", "apply_omq", "omq_layers"]

OMQ_MAX_BATCHES = 4
"""Calibration batches whose layer inputs the search uses: one per trajectory position,
at up to this many evenly spaced positions, each the first `calibrate.batch_size` samples."""


def omq_layers(model: DiffusionModel) -> dict[str, QuantLayerMixin]:
    """Layers OMQ applies to: per-channel weight quantizer below 8 bits, with room for b−1.

    Layers kept at 8 bit are skipped, and so are those where b−1 would fall below the
    quantizer's minimum (1 bit; 2 for symmetric), since the average must stay b.
    """
    out = {}
    for name, layer in quant_layers(model.denoiser).items():
        q = layer.w_quant
        if q is None or q.channel_axis is None:
            continue
        b = layer.spec.w_bits
        if b is not None and b < 8 and b - 1 >= omq_min_bits(layer):
            out[name] = layer
    return out


@torch.no_grad()
def _collect_inputs(model: DiffusionModel, data: CalibrationData, layers: dict[str, QuantLayerMixin],
                    guidance: float, batch_size: int, max_batches: int) -> dict[str, list[torch.Tensor]]:
    """Inputs each layer sees in the FP model (both CFG branches), on up to `max_batches` batches."""
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)

    def observer(name: str):  # noqa: ANN202
        def observe(_layer: QuantLayerMixin, x: torch.Tensor) -> None:
            inputs[name].append(x.detach().clone())
        return observe

    for name, layer in layers.items():
        layer.observer = observer(name)
    set_quant_enabled(model.denoiser, weights=False, activations=False)
    try:
        for s in select_steps(len(data.ts), max_batches):
            cond = data.conds[:batch_size] if data.conds is not None else None
            model.eps(data.xs[s, :batch_size], int(data.ts[s]), cond, guidance)
    finally:
        for layer in layers.values():
            layer.observer = None
        set_quant_enabled(model.denoiser, weights=True, activations=True)
    return inputs


def apply_omq(model: DiffusionModel, data: CalibrationData, recipe: Recipe,
              max_batches: int = OMQ_MAX_BATCHES) -> dict[str, dict[str, Any]]:
    """Give every eligible layer (`omq_layers`) its OMQ per-channel weight bits, in place.

    Weight quantizers must already be initialised; each searched layer's quantizer is
    re-initialised at its chosen bits with `recipe.quant.weight_init`. `recipe` must be
    resolved (its `sample.guidance` set). Returns, per layer,
    ``{"kurtosis": [κ_c], "bits": [b_c], "fraction": f, "k": k, "errors": {f: mse}}``
    with the fraction keys written as in the grid (e.g. "0.1").
    """
    guidance = recipe.sample.guidance
    if guidance is None:
        raise ValueError("apply_omq needs a resolved recipe (sample.guidance is unset)")
    layers = omq_layers(model)
    fractions = list(recipe.calibrate.omq_fractions)
    inputs = _collect_inputs(model, data, layers, guidance, recipe.calibrate.batch_size, max_batches)
    record: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        xs = inputs.pop(name)
        bits, errors = search_group_size(layer, xs, layer.spec.w_bits, fractions, recipe.quant.weight_init)
        best = min(errors.values())
        chosen = next(f for f in fractions if errors[float(f)] == best)
        kurt = channel_kurtosis(layer.merged_weight())
        record[name] = {
            "kurtosis": [float(f"{v:.5g}") for v in kurt.tolist()],
            "bits": [int(b) for b in bits.tolist()],
            "fraction": float(chosen),
            "k": group_size(float(chosen), bits.numel()),
            "errors": {f"{f:g}": errors[float(f)] for f in fractions},
        }
    return record
