"""What a layer policy costs: multiply-accumulates per layer and the MAC-weighted bit widths.

A recipe that keeps some layers at 8 bits (first and last layers, 1x1 shortcuts, OMQ's high
groups) is still called by its nominal width ("w4a4"); `bit_budget` says how much of the work
runs at which width, so two recipes of the same nominal width can be compared honestly.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from lowbitdm_cli.quant.policy import LayerSpec

__all__ = ["bit_budget", "layer_macs"]


def layer_macs(model, names: list[str]) -> dict[str, int]:  # noqa: ANN001 - DiffusionModel
    """Multiply-accumulates per sample of the conv / linear layers among `names` (other modules
    are skipped) in one denoiser call (one CFG branch), measured by running the denoiser once on a
    zero sample at the middle timestep."""
    modules = dict(model.denoiser.named_modules())
    macs: dict[str, int] = defaultdict(int)

    def hook(name: str):  # noqa: ANN202
        def count(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(module, nn.Conv2d):
                per_out = module.weight[0].numel()  # in_channels / groups * kh * kw
            else:
                per_out = module.weight.shape[1]
            macs[name] += out.numel() * per_out
        return count

    handles = [modules[n].register_forward_hook(hook(n)) for n in names
               if isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
    try:
        device = next(model.denoiser.parameters()).device
        x = torch.zeros(1, *model.sample_shape, device=device)
        cond = torch.zeros(1, dtype=torch.long, device=device) if model.conditional else None
        with torch.no_grad():
            model.eps(x, model.schedule.num_train_timesteps // 2, cond, 1.0)
    finally:
        for h in handles:
            h.remove()
    return dict(macs)


def bit_budget(specs: dict[str, LayerSpec], macs: dict[str, int]) -> dict:
    """MAC-weighted mean weight and activation bits over the quantized conv / linear layers, and
    the share of their MACs at each activation width ("fp" where the input stays float).
    Attention-matmul specs (kind "matmul") are not conv / linear layers and are left out."""
    specs = {n: s for n, s in specs.items() if s.kind != "matmul"}
    total = sum(macs.get(n, 0) for n in specs)
    if total == 0:
        return {}
    w_sum = a_sum = 0.0
    a_share: dict[str, float] = defaultdict(float)
    w_share: dict[str, float] = defaultdict(float)
    for name, spec in specs.items():
        m = macs.get(name, 0)
        w_sum += m * (spec.w_bits or 32)
        a_sum += m * (spec.a_bits or 32)
        a_share[str(spec.a_bits or "fp")] += m / total
        w_share[str(spec.w_bits or "fp")] += m / total
    return {"macs_per_sample": total, "mean_w_bits": round(w_sum / total, 3), "mean_a_bits": round(a_sum / total, 3),
            "w_bits_mac_share": {k: round(v, 4) for k, v in sorted(w_share.items())},
            "a_bits_mac_share": {k: round(v, 4) for k, v in sorted(a_share.items())}}
