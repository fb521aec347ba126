"""Naive PTQ: initialise weight quantizers from the weights, activation quantizers from
the inputs each layer sees on the calibration data (per timestep when temporal)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from lowbitdm_cli.calibration.data import CalibrationData, for_each_step
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.attention import MATMUL_INPUTS, attn_processors
from lowbitdm_cli.quant.init import InitMethod, init_quantizer
from lowbitdm_cli.quant.layers import QuantLayerMixin, quant_layers
from lowbitdm_cli.quant.model import set_quant_enabled
from lowbitdm_cli.quant.quantizer import UniformQuantizer

__all__ = ["ActivationRecorder", "init_activations", "init_weights"]


class ActivationRecorder:
    """Per (layer, timestep): exact min and max, plus a seeded random subsample of values."""

    def __init__(self, max_values: int, seed: int = 0) -> None:
        self.max_values = max_values
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.lo: dict[tuple[str, int], float] = {}
        self.hi: dict[tuple[str, int], float] = {}
        self.values: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.counts: dict[tuple[str, int], int] = defaultdict(int)

    def observer(self, name: str) -> Callable[[QuantLayerMixin, torch.Tensor], None]:
        def observe(_layer: QuantLayerMixin, x: torch.Tensor) -> None:
            key = (name, self.step)
            flat = x.detach().reshape(-1).float().cpu()
            self.lo[key] = min(self.lo.get(key, float("inf")), flat.min().item())
            self.hi[key] = max(self.hi.get(key, float("-inf")), flat.max().item())
            budget = self.max_values - self.counts[key]
            if budget > 0:
                if flat.numel() > budget:
                    flat = flat[torch.randperm(flat.numel(), generator=self.gen)[:budget]]
                self.values[key].append(flat)
                self.counts[key] += flat.numel()
        return observe

    def sample(self, name: str, steps: list[int]) -> torch.Tensor:
        """Values seen by `name` at trajectory positions `steps`, with the exact extremes included."""
        parts = [v for s in steps for v in self.values[(name, s)]]
        ext = [torch.tensor([self.lo[(name, s)], self.hi[(name, s)]]) for s in steps]
        return torch.cat(parts + ext)


@torch.no_grad()
def init_weights(model: DiffusionModel, method: InitMethod) -> None:
    for layer in quant_layers(model.denoiser).values():
        if layer.w_quant is not None:
            init_quantizer(layer.w_quant, layer.merged_weight().detach(), method)


@torch.no_grad()
def init_activations(model: DiffusionModel, data: CalibrationData, method: InitMethod, guidance: float,
                     batch_size: int, max_values: int, seed: int,
                     progress: Callable[[int], None] | None = None) -> None:
    """Run the model (weights quantized, activations in FP) over the calibration data and
    set every activation quantizer from the inputs its layer saw."""
    layers = {n: m for n, m in quant_layers(model.denoiser).items() if m.a_quant is not None}
    procs = attn_processors(model.denoiser)
    recorder = ActivationRecorder(max_values, seed)
    # recorder key -> the quantizer initialised from what was recorded under it
    targets: dict[str, UniformQuantizer] = {}
    for name, layer in layers.items():
        layer.observer = recorder.observer(name) if layer.a_quant_skip is None else _split_observer(recorder, name)
        targets[name] = layer.a_quant
        if layer.a_quant_skip is not None:
            targets[f"{name}{_SKIP}"] = layer.a_quant_skip
    for name, proc in procs.items():
        proc.observer = _matmul_observer(recorder, name)
        targets.update({f"{name}.{which}": proc.quantizer(which) for which in MATMUL_INPUTS})
    set_quant_enabled(model.denoiser, weights=True, activations=False)

    def run(step: int, t: int, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        recorder.step = step
        model.eps(x, t, cond, guidance)
        if progress is not None:
            progress(x.shape[0])

    try:
        for_each_step(data, batch_size, run)
    finally:
        for owner in (*layers.values(), *procs.values()):
            owner.observer = None
        set_quant_enabled(model.denoiser, weights=True, activations=True)
    steps = list(range(len(data.ts)))
    for key, q in targets.items():
        if q.temporal:
            for s, t in enumerate(data.ts.tolist()):
                q.set_timestep(t)
                init_quantizer(q, recorder.sample(key, [s]), method, timestep_index=q._index)
        else:
            init_quantizer(q, recorder.sample(key, steps), method)


_SKIP = "#skip"  # recorder key suffix of a split layer's skip half


def _matmul_observer(recorder: ActivationRecorder, name: str) -> Callable[[str, torch.Tensor], None]:
    """Record an attention processor's matmul inputs under ``<attention>.<q|k|p|v>``."""
    observers = {which: recorder.observer(f"{name}.{which}") for which in MATMUL_INPUTS}

    def observe(which: str, x: torch.Tensor) -> None:
        observers[which](None, x)  # type: ignore[arg-type]
    return observe


def _split_observer(recorder: ActivationRecorder, name: str) -> Callable[[QuantLayerMixin, torch.Tensor], None]:
    """Record a split layer's two channel halves separately (shortcut splitting)."""
    main, skip = recorder.observer(name), recorder.observer(f"{name}{_SKIP}")

    def observe(layer: QuantLayerMixin, x: torch.Tensor) -> None:
        k = layer.spec.a_split
        main(layer, x[:, :k])
        skip(layer, x[:, k:])
    return observe


@torch.no_grad()
def layer_output_errors(model: DiffusionModel, data: CalibrationData, guidance: float, batch_size: int,
                        fp_weights: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Relative output error of every quantized layer on one calibration batch per kept step:
    ‖layer_q(x) − layer_fp(x)‖² / ‖layer_fp(x)‖², each layer fed the same input x (the input
    the fully quantized model gives it), so the number isolates that layer's own error.
    `fp_weights` (by layer name) are the FP weights where the layer's own float weight is no
    longer the FP one (block reconstruction folds AdaRound's rounding into it)."""
    layers = quant_layers(model.denoiser)
    fp_weights = fp_weights or {}
    err: dict[str, float] = defaultdict(float)
    ref: dict[str, float] = defaultdict(float)

    def make(name: str, layer: QuantLayerMixin) -> Callable:
        def hook(_m, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            w = fp_weights[name].to(x) if name in fp_weights else layer.merged_weight()
            fp = (layer._conv_forward(x, w, layer.bias) if isinstance(layer, torch.nn.Conv2d)
                  else torch.nn.functional.linear(x, w, layer.bias))
            err[name] += (output - fp).pow(2).sum().item()
            ref[name] += fp.pow(2).sum().item()
        return hook

    handles = [layer.register_forward_hook(make(n, layer)) for n, layer in layers.items()]
    try:
        for s, t in enumerate(data.ts.tolist()):
            cond = data.conds[:batch_size] if data.conds is not None else None
            model.eps(data.xs[s, :batch_size], int(t), cond, guidance)
    finally:
        for h in handles:
            h.remove()
    return {n: err[n] / max(ref[n], 1e-30) for n in layers}
