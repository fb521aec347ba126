"""Naive PTQ: initialise weight quantizers from the weights, activation quantizers from
the inputs each layer sees on the calibration data (per timestep when temporal)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable

import torch

from lowbitdm_cli.calibration.data import CalibrationData, run_first_batches
from lowbitdm_cli.distributed import ProcessGroup
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.attention import MATMUL_INPUTS, attn_processors
from lowbitdm_cli.quant.init import InitMethod, init_quantizer, search_params, set_params
from lowbitdm_cli.quant.layers import QuantLayerMixin, quant_layers
from lowbitdm_cli.quant.model import set_quant_enabled
from lowbitdm_cli.quant.quantizer import UniformQuantizer

__all__ = ["ActivationRecorder", "init_activations", "init_weights"]


class ActivationRecorder:
    """Per (layer, timestep): exact min and max, plus (`keep_values`) a seeded subsample of values.

    Each observation's values are shuffled by a generator seeded by (seed, layer, timestep,
    batch) and at most `max_values` kept; a key's sample is its batches' values in global batch
    order, cut at `max_values`. So the sample does not depend on which process saw which batch:
    `merge` combines the recorders of all ranks into exactly what one process records.
    """

    def __init__(self, max_values: int, seed: int = 0, keep_values: bool = True) -> None:
        self.max_values = max_values
        self.seed = seed
        self.keep_values = keep_values
        self.step = 0
        self.batch = 0
        self.lo: dict[tuple[str, int], float] = {}
        self.hi: dict[tuple[str, int], float] = {}
        self.values: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        self.counts: dict[tuple[str, int], int] = defaultdict(int)

    def _generator(self, name: str) -> torch.Generator:
        digest = hashlib.sha256(f"lowbitdm-act/{self.seed}/{name}/{self.step}/{self.batch}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def observer(self, name: str) -> Callable[[QuantLayerMixin, torch.Tensor], None]:
        def observe(_layer: QuantLayerMixin, x: torch.Tensor) -> None:
            key = (name, self.step)
            flat = x.detach().reshape(-1).float()
            self.lo[key] = min(self.lo.get(key, float("inf")), flat.min().item())
            self.hi[key] = max(self.hi.get(key, float("-inf")), flat.max().item())
            if self.keep_values and self.counts[key] < self.max_values:  # later batches of this rank can't count
                flat = flat.cpu()
                flat = flat[torch.randperm(flat.numel(), generator=self._generator(name))[:self.max_values]]
                self.values[key].append((self.batch, flat))
                self.counts[key] += flat.numel()
        return observe

    def merge(self, group: ProcessGroup) -> None:
        """Combine every rank's records (min of minima, max of maxima, values in batch order)."""
        parts = group.all_gather((self.lo, self.hi, dict(self.values)))
        lo: dict[tuple[str, int], float] = {}
        hi: dict[tuple[str, int], float] = {}
        values: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for p_lo, p_hi, p_values in parts:
            for k, v in p_lo.items():
                lo[k] = min(lo.get(k, float("inf")), v)
            for k, v in p_hi.items():
                hi[k] = max(hi.get(k, float("-inf")), v)
            for k, v in p_values.items():
                values[k].extend(v)
        self.lo, self.hi, self.values = lo, hi, values
        for key, items in values.items():
            items.sort(key=lambda item: item[0])
            flat = torch.cat([v for _, v in items])[:self.max_values]
            values[key] = [(0, flat)]
            self.counts[key] = flat.numel()

    def sample(self, name: str, steps: list[int]) -> torch.Tensor:
        """Values seen by `name` at trajectory positions `steps`, with the exact extremes included."""
        parts = [v for s in steps for _, v in self.values[(name, s)]]
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
                     progress: Callable[[int], None] | None = None, group: ProcessGroup | None = None) -> None:
    """Run the model (weights quantized, activations in FP) over the calibration data and
    set every activation quantizer from the inputs its layer saw.

    Under torchrun (`group`) each rank runs every world_size-th batch, the records are merged,
    and the (Δ, z) searches are split across ranks and gathered: the result is the same bytes
    as one process's."""
    group = group or ProcessGroup()
    # per-token dynamic inputs need no range: their scales come from the values at run time
    layers = {n: m for n, m in quant_layers(model.denoiser).items() if m.a_quant is not None and not m.a_quant.dynamic}
    procs = attn_processors(model.denoiser)
    # minmax needs only the exact extremes; mse / percentile search over a sample of values
    recorder = ActivationRecorder(max_values, seed, keep_values=method != "minmax")
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
    n = data.xs.shape[1]
    batches = [(s, int(t), i) for s, t in enumerate(data.ts.tolist()) for i in range(0, n, batch_size)]
    try:
        for s, t, i in group.split(batches):
            recorder.step, recorder.batch = s, i // batch_size
            cond = data.conds[i:i + batch_size] if data.conds is not None else None
            x = data.xs[s, i:i + batch_size]
            model.eps(x, t, cond, guidance)
            if progress is not None:
                progress(x.shape[0])
    finally:
        for owner in (*layers.values(), *procs.values()):
            owner.observer = None
        set_quant_enabled(model.denoiser, weights=True, activations=True)
    recorder.merge(group)
    steps = list(range(len(data.ts)))
    # one (Δ, z) search per (quantizer, timestep slot); ranks search every world_size-th and share
    work = [(key, s, t) for key, q in targets.items()
            for s, t in (enumerate(data.ts.tolist()) if q.temporal else [(None, None)])]
    found = {}
    for key, s, t in group.split(work):
        q = targets[key]
        x = recorder.sample(key, steps if s is None else [s])
        found[(key, s)] = tuple(v.cpu() for v in search_params(x, q.bits, q.mode, q.channel_axis, method))
    for part in group.all_gather(found):
        for (key, s), (delta, zero) in part.items():
            q = targets[key]
            index = None
            if s is not None:
                q.set_timestep(int(data.ts[s]))
                index = q._index
            set_params(q, delta.to(q.delta.device), zero.to(q.delta.device), timestep_index=index)


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
        run_first_batches(model, data, guidance, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {n: err[n] / max(ref[n], 1e-30) for n in layers}
