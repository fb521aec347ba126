"""Train the embedded digits DiT (a pixel-space class-conditional `DiTTransformer2DModel`) into the
weights folder::

    python -m lowbitdm_cli.training.digits_dit --steps 4000

Same data, splits, schedule and loop as the digits UNet (`training.denoiser`); seeded and reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbitdm_cli.models.digits import DIGITS_DIT_CONFIG, DIGITS_SCHEDULE, NUM_CLASSES, WEIGHTS_DIR, build_digits_dit
from lowbitdm_cli.training.denoiser import train_denoiser

__all__ = ["main", "train_digits_dit"]


def train_digits_dit(out_dir: Path, config: dict | None = None, stem: str = "digits_dit", steps: int = 4000,
                     batch_size: int = 128, lr: float = 6e-4, seed: int = 0, checkpoint_every: int = 250) -> Path:
    """Train a digits DiT (`config`: the embedded one by default) and save its EMA weights as
    ``<stem>.safetensors`` with ``<stem>.json`` (config, schedule, training settings) in `out_dir`."""
    torch.manual_seed(seed)
    config = config or DIGITS_DIT_CONFIG
    model = build_digits_dit(config)
    meta = {"transformer": config, "schedule": DIGITS_SCHEDULE, "num_classes": NUM_CLASSES}
    return train_denoiser(model, out_dir, stem, meta, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          checkpoint_every=checkpoint_every, log=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--stem", default="digits_dit", help="file names: <stem>.safetensors and <stem>.json")
    parser.add_argument("--config", type=str, default=None,
                        help="JSON of DiTTransformer2DModel arguments overriding the embedded DiT's "
                             "(e.g. '{\"num_layers\": 4, \"attention_head_dim\": 48}' for a validation model)")
    args = parser.parse_args(argv)
    config = {**DIGITS_DIT_CONFIG, **json.loads(args.config)} if args.config else None
    path = train_digits_dit(args.out, config=config, stem=args.stem, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
