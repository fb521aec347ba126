"""Train a LoRA adapter on the embedded digits UNet's FP weights: thicker strokes::

    python -m lowbitdm_cli.training.digits_lora --steps 300 --out tests/fixtures/lora

The style: the training images dilated with a 3x3 cross (each pixel the max of itself and its four
neighbours), so the adapter makes every digit's strokes thicker, which `benchmarks/lora.py` scores
(mean ink, FID-digits to a dilated reference). The loop is the digits denoisers' own
(`training.denoiser.train_denoiser`: ε-prediction, class dropout, EMA), on the LoRA factors only:
rank-r pairs beside the resnet convs and the attention projections, A kaiming-uniform and B zero, so
training starts from the FP model. Saved as a PEFT / diffusers adapter (``unet.<layer>.lora_A.weight``,
``lora_B.weight``; alpha = r in ``adapter_config.json``, so scale 1 applies B·A as trained). Seeded: the
same command on the same machine gives the same adapter; a few minutes of one CPU thread at the
defaults.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.adapters.branch import LoRABranch
from lowbitdm_cli.adapters.lora_file import LoraPair
from lowbitdm_cli.models.digits import load_digits_unet
from lowbitdm_cli.training.denoiser import train_denoiser

__all__ = ["TARGET_SUFFIXES", "dilate", "main", "train_digits_lora"]

# the layers that get a LoRA pair: resnet convs and attention projections
TARGET_SUFFIXES = (".conv1", ".conv2", ".to_q", ".to_k", ".to_v", ".to_out.0")


def dilate(images: torch.Tensor) -> torch.Tensor:
    """Grey-level dilation by a 3x3 cross: max of the pixel and its 4 neighbours ([N, 1, H, W], background −1)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    h, w = images.shape[-2:]
    shifts = [padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1),
                                                                                  (0, 1))]
    return torch.stack(shifts).amax(0)


def _attach_trainable(unet: nn.Module, rank: int, generator: torch.Generator) -> dict[str, tuple]:
    """A trainable rank-`rank` `LoRABranch` on every target layer; {layer name: (A, B) parameters}."""
    modules = dict(unet.named_modules())
    factors = {}
    for name in [n for n in modules if n.endswith(TARGET_SUFFIXES)]:
        layer = modules[name]
        w = layer.weight
        fan_in = w[0].numel()
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5), as PEFT initialises lora_A
        down = ((torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound).reshape(rank, *w.shape[1:])
        up = torch.zeros(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []))
        branch = LoRABranch(layer)
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else unet, leaf, branch)
        a, b = branch.add(LoraPair(down, up), 1.0)
        a.requires_grad_(True)
        b.requires_grad_(True)
        factors[name] = (a, b)
    return factors


def train_digits_lora(out_dir: Path, steps: int = 300, rank: int = 4, batch_size: int = 64, lr: float = 2e-3,
                      seed: int = 0) -> Path:
    """Train the thicker-strokes adapter and save ``digits_thick_lora.safetensors`` (+ adapter_config.json)."""
    torch.manual_seed(seed)
    unet, meta = load_digits_unet()
    unet.requires_grad_(False)
    names = list(_attach_trainable(unet, rank, torch.Generator().manual_seed(seed)))

    def export(ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"unet.{n}.{k}.weight": ema[f"{n}.{p}_0"] for n in names for k, p in (("lora_A", "down"),
                                                                                   ("lora_B", "up"))}

    info = {"adapter": "digits thicker strokes (3x3 cross dilation)", "base": "digits UNet", "rank": rank,
            "targets": list(TARGET_SUFFIXES), "unet": meta["unet"]}
    path = train_denoiser(unet, out_dir, "digits_thick_lora", info, steps=steps, batch_size=batch_size, lr=lr,
                          ema_decay=0.99, seed=seed, checkpoint_every=steps, warmup=min(20, steps // 10),
                          log=lambda line: print(line, flush=True), transform=dilate, export=export)
    (out_dir / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": rank, "peft_type": "LORA",
                                                             "target_modules": list(TARGET_SUFFIXES)}, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/lora"))
    args = parser.parse_args(argv)
    path = train_digits_lora(args.out, steps=args.steps, rank=args.rank, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
