"""What a layer policy costs: multiply-accumulates per layer and the MAC-weighted bit widths.

A recipe that keeps some layers at 8 bits (first and last layers, 1x1 shortcuts, OMQ's high
groups) is still called by its nominal width ("w4a4"); `bit_budget` says how much of the work
runs at which width, so two recipes of the same nominal width can be compared honestly.

A low-rank branch (SVDQuant, `quant.transforms`) is float32 work beside its layer: its
r·(K + O) MACs per token count at 32 bits on both sides ("fp" in the shares). Smoothing's
division, per-token scales and the Hadamard rotation are elementwise passes (the rotation
K·log2(block) additions per token), not multiply-accumulates, and are not counted.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from lowbitdm_cli.quant.policy import LayerSpec

__all__ = ["LOW_RANK_KEY", "bit_budget", "layer_macs"]

LOW_RANK_KEY = "{name}#low_rank"
"""`layer_macs` key of a layer's low-rank branch MACs."""


def layer_macs(model, names: list[str], low_rank: dict[str, int] | None = None  # noqa: ANN001 - DiffusionModel
               ) -> dict[str, int]:
    """Multiply-accumulates per sample of the conv / linear layers among `names` (other modules
    are skipped) in one denoiser call (one CFG branch), measured by running the denoiser once on a
    zero sample at the middle timestep. `low_rank` (layer name → rank r) adds each such linear's
    branch, r·(in + out) per token, under ``LOW_RANK_KEY``."""
    low_rank = low_rank or {}
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
            if name in low_rank:
                tokens = out.numel() // module.weight.shape[0]
                macs[LOW_RANK_KEY.format(name=name)] += tokens * low_rank[name] * sum(module.weight.shape)
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
    Attention-matmul specs (kind "matmul") are not conv / linear layers and are left out; a layer's
    low-rank branch (``LOW_RANK_KEY`` in `macs`) counts as float32 work on both sides."""
    specs = {n: s for n, s in specs.items() if s.kind != "matmul"}
    work = [(name, spec.w_bits, spec.a_bits) for name, spec in specs.items()]
    work += [(LOW_RANK_KEY.format(name=name), None, None) for name, spec in specs.items() if spec.low_rank]
    total = sum(macs.get(n, 0) for n, _, _ in work)
    if total == 0:
        return {}
    w_sum = a_sum = 0.0
    a_share: dict[str, float] = defaultdict(float)
    w_share: dict[str, float] = defaultdict(float)
    for name, w_bits, a_bits in work:
        m = macs.get(name, 0)
        w_sum += m * (w_bits or 32)
        a_sum += m * (a_bits or 32)
        a_share[str(a_bits or "fp")] += m / total
        w_share[str(w_bits or "fp")] += m / total
    return {"macs_per_sample": total, "mean_w_bits": round(w_sum / total, 3), "mean_a_bits": round(a_sum / total, 3),
            "w_bits_mac_share": {k: round(v, 4) for k, v in sorted(w_share.items())},
            "a_bits_mac_share": {k: round(v, 4) for k, v in sorted(a_share.items())}}
