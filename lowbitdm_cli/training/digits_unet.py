"""Train the embedded digits UNet (epsilon prediction, class dropout for CFG, EMA) into the weights folder::

    python -m lowbitdm_cli.training.digits_unet --steps 3000

Seeded and reproducible; 3000 steps take most of an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lowbitdm_cli.models.digits import DIGITS_SCHEDULE, DIGITS_UNET_CONFIG, NUM_CLASSES, WEIGHTS_DIR, build_digits_unet
from lowbitdm_cli.training.denoiser import train_denoiser

__all__ = ["main", "train_digits_unet"]


def train_digits_unet(
    out_dir: Path,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    cond_drop: float = 0.1,
    seed: int = 0,
    checkpoint_every: int = 500,
) -> Path:
    """Train the digits UNet (`training.denoiser.train_denoiser`) and save it as
    ``digits_unet.safetensors`` (EMA weights) and ``digits_unet.json`` in `out_dir`."""
    torch.manual_seed(seed)
    model = build_digits_unet()
    meta = {"unet": DIGITS_UNET_CONFIG, "schedule": DIGITS_SCHEDULE, "num_classes": NUM_CLASSES}
    return train_denoiser(model, out_dir, "digits_unet", meta, steps=steps, batch_size=batch_size, lr=lr,
                          ema_decay=ema_decay, cond_drop=cond_drop, seed=seed, checkpoint_every=checkpoint_every,
                          log=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None, legacy: bool = False) -> None:
    """The command line; `legacy` accepts the former ``python -m lowbitdm_cli.models.digits train ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if legacy:
        if argv[:1] != ["train"]:
            sys.exit("usage: python -m lowbitdm_cli.training.digits_unet [--steps N] ... "
                     "(formerly python -m lowbitdm_cli.models.digits train)")
        argv = argv[1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    path = train_digits_unet(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
