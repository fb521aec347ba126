"""LoRA adapters on a loaded model: a float low-rank branch beside each layer, or folded into the weights.

`attach_loras` wraps each targeted layer (float, fake-quantized `QuantLinear`/`QuantConv2d` or integer
`IntLinear`/`IntConv2d`) in a `LoRABranch`: ``y = layer(x) + B(A(x))`` with B pre-multiplied by the
adapter's scale (a conv's A has the layer's kernel, stride, padding and dilation, B is 1x1). The layer
itself is untouched (packed weights stay packed), and the branch is the same float ops on every runtime:
given the same input, the integer and fake-quantized models stay equal bit for bit with adapters too.
`fold_loras` instead adds ``s·B·A`` to the float weights before they are quantized (merge --lora).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.adapters.lora_file import Adapter, LoraPair, match_adapter

__all__ = ["LoRABranch", "apply_loras", "attach_loras", "fold_loras"]


class LoRABranch(nn.Module):
    """`base` plus float low-rank branches: ``base(x) + Σ_i up_i(down_i(x))``, each up_i already scaled."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.conv = hasattr(base, "kernel_size")
        self.num_branches = 0

    def __getattr__(self, name: str):  # noqa: ANN204 - in_features, weight, ... of the wrapped layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name.startswith("__"):  # half-built (copy, unpickling): no fallback
                raise
            return getattr(base, name)

    def add(self, pair: LoraPair, multiplier: float) -> tuple[nn.Parameter, nn.Parameter]:
        """One more branch: down (A) as given, up (B) times `multiplier`; returns its (A, B) parameters,
        frozen (a training script sets requires_grad)."""
        i = self.num_branches
        down = nn.Parameter(pair.down.clone(), requires_grad=False)
        up = nn.Parameter((pair.up * multiplier).contiguous(), requires_grad=False)
        self.register_parameter(f"down_{i}", down)
        self.register_parameter(f"up_{i}", up)
        self.num_branches += 1
        return down, up

    def branch(self, x: torch.Tensor, i: int) -> torch.Tensor:
        down, up = getattr(self, f"down_{i}"), getattr(self, f"up_{i}")
        if self.conv:
            b = self.base
            return F.conv2d(F.conv2d(x, down, None, b.stride, b.padding, b.dilation), up)
        return F.linear(F.linear(x, down), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for i in range(self.num_branches):
            y = y + self.branch(x, i)
        return y


def _matched(denoiser: nn.Module, adapters: list) -> list[tuple[Adapter, dict[str, LoraPair]]]:
    """Every adapter matched first, so one that does not fit leaves the model as it was."""
    return [(a, match_adapter(denoiser, a)) for a in map(Adapter.of, adapters)]


def _record(adapter: Adapter, pairs: dict[str, LoraPair], how: str) -> dict:
    return {**adapter.record(), "layers": len(pairs), "rank": max(p.rank for p in pairs.values()), "applied": how}


def attach_loras(denoiser: nn.Module, adapters: list) -> list[dict]:
    """Wrap every layer the adapters target in a `LoRABranch` (in place); returns one record per adapter
    (path, sha256, scale, layers, rank). `adapters`: `Adapter`s, paths, or (path, scale) pairs."""
    matched = _matched(denoiser, adapters)
    for adapter, pairs in matched:
        modules = dict(denoiser.named_modules())
        for name, pair in pairs.items():
            layer = modules[name]
            if not isinstance(layer, LoRABranch):
                parent, _, leaf = name.rpartition(".")
                layer = LoRABranch(layer)
                setattr(modules[parent] if parent else denoiser, leaf, layer)
            ref = next(iter(layer.base.buffers()), None)
            pair = LoraPair(pair.down.to(ref.device) if ref is not None else pair.down,
                            pair.up.to(ref.device) if ref is not None else pair.up, pair.alpha)
            layer.add(pair, pair.multiplier(adapter.scale))
    return [_record(a, p, "branch") for a, p in matched]


@torch.no_grad()
def fold_loras(denoiser: nn.Module, adapters: list) -> list[dict]:
    """Add ``scale·(alpha/r)·B·A`` to each targeted layer's float weight (in place, before quantization)."""
    matched = _matched(denoiser, adapters)
    modules = dict(denoiser.named_modules())
    for adapter, pairs in matched:
        for name, pair in pairs.items():
            weight = modules[name].weight
            delta = pair.up.reshape(pair.up.shape[0], -1) @ pair.down.reshape(pair.rank, -1)
            weight.add_(delta.reshape(weight.shape).to(weight), alpha=pair.multiplier(adapter.scale))
    return [_record(a, p, "folded") for a, p in matched]


def apply_loras(model, adapters: list):  # noqa: ANN001, ANN201 - a DiffusionModel, returned
    """`attach_loras` on `model.denoiser`; the records land in ``model.meta["loras"]`` (none: unchanged)."""
    if adapters:
        model.meta["loras"] = model.meta.get("loras", []) + attach_loras(model.denoiser, list(adapters))
    return model
