"""The embedded `digits` model: a small class-conditional DDPM trained on scikit-learn's digits.

It stands in for LDM-4 ImageNet (class-conditional, classifier-free guidance) so that the
whole chain runs on a CPU in minutes with nothing downloaded. Train it again with::

    python -m lowbitdm_cli.models.digits train --steps 3000

The trained EMA weights ship in ``lowbitdm_cli/models/weights/digits_unet.safetensors``
together with ``digits_unet.json`` (UNet config, noise schedule, training settings).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

__all__ = [
    "DIGITS_UNET_CONFIG",
    "DigitsSplit",
    "WEIGHTS_DIR",
    "build_digits_unet",
    "load_digits_split",
    "train_digits_unet",
]

WEIGHTS_DIR = Path(__file__).with_name("weights")
NUM_CLASSES = 10
IMAGE_SIZE = 16
HELD_OUT_PER_CLASS = 30  # 300 held-out images, 1497 for training
SPLIT_SEED = 0

# diffusers UNet2DModel arguments. Three resolutions (16, 8, 4), self-attention at 8x8,
# a time embedding MLP and a class embedding with one extra (null) class for CFG.
DIGITS_UNET_CONFIG: dict = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "num_class_embeds": NUM_CLASSES + 1,
    "attention_head_dim": 32,
    "norm_num_groups": 16,
}

# DDPM schedule (Ho et al. 2020): 1000 steps, linear betas.
DIGITS_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [-1, 1], shape [N, 1, 16, 16], and integer labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor


def load_digits_split() -> DigitsSplit:
    """Load sklearn's bundled digits, upsample 8x8 -> 16x16, scale to [-1, 1], split.

    The split is fixed: for each class, `HELD_OUT_PER_CLASS` images chosen by a
    seeded permutation are held out; everything else is training data.
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0)
    labels = torch.tensor(raw.target, dtype=torch.long)
    rng = np.random.default_rng(SPLIT_SEED)
    held = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(raw.target == c)
        held[rng.permutation(idx)[:HELD_OUT_PER_CLASS]] = True
    held_t = torch.from_numpy(held)
    return DigitsSplit(images[~held_t], labels[~held_t], images[held_t], labels[held_t])


def build_digits_unet(config: dict | None = None):
    """An untrained diffusers UNet2DModel with the digits architecture."""
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or DIGITS_UNET_CONFIG))


def _alphas_cumprod(schedule: dict) -> torch.Tensor:
    betas = torch.linspace(
        schedule["beta_start"], schedule["beta_end"], schedule["num_train_timesteps"], dtype=torch.float64
    )
    return torch.cumprod(1.0 - betas, dim=0).float()


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
    """Train the digits UNet (epsilon prediction, class dropout for CFG, EMA) and save it.

    Writes ``digits_unet.safetensors`` (EMA weights) and ``digits_unet.json`` into
    `out_dir`, overwriting them at every checkpoint so a long run can be inspected.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_split()
    x_all, y_all = data.train_images, data.train_labels
    model = build_digits_unet()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    acp = _alphas_cumprod(DIGITS_SCHEDULE)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        # Small random translations (+-1 px) keep the tiny data set from being memorised.
        shift = torch.randint(-1, 2, (2,), generator=gen)
        x0 = torch.roll(x0, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        drop = torch.rand(batch_size, generator=gen) < cond_drop
        y[drop] = NUM_CLASSES
        t = torch.randint(0, DIGITS_SCHEDULE["num_train_timesteps"], (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(x_t, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 50 == 0:
            rate = (step + 1) / (time.time() - start)
            print(f"step {step + 1}/{steps} loss {running:.4f} lr {lr_at(step):.2e} ({rate:.2f} it/s)", flush=True)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            _save(out_dir, ema, step + 1, dict(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                                               cond_drop=cond_drop, seed=seed))
    return out_dir / "digits_unet.safetensors"


def _save(out_dir: Path, state: dict, step: int, training: dict) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "digits_unet.safetensors"))
    meta = {"unet": DIGITS_UNET_CONFIG, "schedule": DIGITS_SCHEDULE, "num_classes": NUM_CLASSES,
            "training": {**training, "completed_steps": step}}
    (out_dir / "digits_unet.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_digits_unet(weights_dir: Path = WEIGHTS_DIR):
    """Load the shipped digits UNet (no network) and its metadata."""
    meta = json.loads((weights_dir / "digits_unet.json").read_text())
    model = build_digits_unet(meta["unet"])
    model.load_state_dict(load_file(str(weights_dir / "digits_unet.safetensors")))
    model.eval()
    return model, meta


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the digits UNet and write it into the weights folder")
    tr.add_argument("--steps", type=int, default=3000)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args()
    if args.cmd == "train":
        path = train_digits_unet(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        print(f"wrote {path}")


if __name__ == "__main__":
    _main()
