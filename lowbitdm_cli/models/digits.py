"""The embedded `digits` model: a small class-conditional DDPM trained on scikit-learn's digits.

It stands in for LDM-4 ImageNet (class-conditional, classifier-free guidance) so that the
whole chain runs on a CPU in minutes with nothing downloaded. Train it again with::

    python -m lowbitdm_cli.training.digits_unet --steps 3000

The trained EMA weights ship in ``lowbitdm_cli/models/weights/digits_unet.safetensors``
together with ``digits_unet.json`` (UNet config, noise schedule, training settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

__all__ = [
    "DIGITS_UNET_CONFIG",
    "DigitsSplit",
    "WEIGHTS_DIR",
    "DIGITS_DIT_CONFIG",
    "build_digits_dit",
    "build_digits_unet",
    "load_digits_split",
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

# diffusers DiTTransformer2DModel arguments of the embedded digits DiT: pixel space, patch 2 (an 8x8
# grid of 64 tokens: the digits' native resolution), 6 blocks of width 128 (4 heads of 32), adaLN-Zero
# conditioning on timestep and class (10 classes; the table's 11th row is the null class for CFG).
DIGITS_DIT_CONFIG: dict = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "num_layers": 6,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_num_groups": 32,
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


def build_digits_dit(config: dict | None = None):
    """An untrained diffusers DiTTransformer2DModel with the digits DiT architecture."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**(config or DIGITS_DIT_CONFIG))


def _alphas_cumprod(schedule: dict) -> torch.Tensor:
    betas = torch.linspace(
        schedule["beta_start"], schedule["beta_end"], schedule["num_train_timesteps"], dtype=torch.float64
    )
    return torch.cumprod(1.0 - betas, dim=0).float()


def load_digits_unet(weights_dir: Path = WEIGHTS_DIR):
    """Load the shipped digits UNet (no network) and its metadata."""
    meta = json.loads((weights_dir / "digits_unet.json").read_text())
    model = build_digits_unet(meta["unet"])
    model.load_state_dict(load_file(str(weights_dir / "digits_unet.safetensors")))
    model.eval()
    return model, meta


def load_digits_dit(weights_dir: Path = WEIGHTS_DIR, stem: str = "digits_dit"):
    """Load the shipped digits DiT (no network) and its metadata."""
    meta = json.loads((weights_dir / f"{stem}.json").read_text())
    model = build_digits_dit(meta["transformer"])
    model.load_state_dict(load_file(str(weights_dir / f"{stem}.safetensors")))
    model.eval()
    return model, meta


if __name__ == "__main__":  # the former training command: the training lives in lowbitdm_cli.training.digits_unet
    from lowbitdm_cli.training.digits_unet import main

    main(legacy=True)
