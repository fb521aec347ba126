"""Random LoRA adapters for a denoiser, written in the layouts people's tools save (PEFT / diffusers,
kohya, diffusers' attention processors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = ["TARGETS", "random_factors", "write_adapter"]

# a linear in attention, 3x3 convs with stride 1 and 2, a 1x1 conv and a linear of the time embedding
TARGETS = ("down_blocks.1.attentions.0.to_q", "down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv",
           "up_blocks.0.resnets.0.conv_shortcut",
           "time_embedding.linear_1")


def random_factors(denoiser: nn.Module, rank: int = 2, seed: int = 0, targets=TARGETS, std: float = 0.3
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per target module: A [r, in(, kh, kw)], B [out, r(, 1, 1)]."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(denoiser.named_modules())
    out = {}
    for name in targets:
        w = modules[name].weight
        if w.dim() == 4:
            a = torch.randn(rank, w.shape[1], w.shape[2], w.shape[3], generator=g) * std / w[0].numel() ** 0.5
            b = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
        else:
            a = torch.randn(rank, w.shape[1], generator=g) * std / w.shape[1] ** 0.5
            b = torch.randn(w.shape[0], rank, generator=g) * std
        out[name] = (a, b)
    return out


def write_adapter(path: Path, factors: dict, layout: str = "peft", alpha: float | None = None,
                  extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Save `factors` as `layout`: peft (unet.<m>.lora_A.weight, alpha in adapter_config.json),
    kohya (lora_unet_<m with _>.lora_down.weight + .alpha) or processor (<attn>.processor.to_q_lora.down.weight)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        if layout == "peft":
            tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = a, b
        elif layout == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = a, b
            if alpha is not None:
                tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
        elif layout == "processor":
            attn, _, proj = name.removesuffix(".0").rpartition(".")  # to_out.0 is saved as to_out_lora
            tensors[f"{attn}.processor.{proj}_lora.down.weight"] = a
            tensors[f"{attn}.processor.{proj}_lora.up.weight"] = b
        else:
            raise ValueError(layout)
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    if layout == "peft" and alpha is not None:
        rank = next(iter(factors.values()))[0].shape[0]
        path.with_name("adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha}))
    return path
