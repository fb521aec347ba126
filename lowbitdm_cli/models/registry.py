"""Model registry: names → loaders with each family's sampler defaults.

``digits`` ships inside the package and loads with no network. ``tiny-random`` is a
seeded, randomly initialised digits-shaped UNet for smoke tests of the chain. The paper
models are listed with their defaults; they need a local copy (see `ModelEntry.needs`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowbitdm_cli.artifacts import ModelRef
from lowbitdm_cli.errors import ModelNotFoundError
from lowbitdm_cli.models import digits
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule

__all__ = ["MODELS", "ModelEntry", "load_model", "model_entry", "model_ref"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    sampler: dict = field(default_factory=dict)  # steps, eta, guidance, clip_x0
    evaluator: str = "digits-features"
    loader: Callable[[], DiffusionModel] | None = None
    needs: str = ""  # what the user must provide when there is no loader

    @property
    def available(self) -> bool:
        return self.loader is not None


def _load_digits() -> DiffusionModel:
    unet, meta = digits.load_digits_unet()
    return DiffusionModel(denoiser=unet, schedule=NoiseSchedule.from_config(meta["schedule"]),
                          sample_shape=(1, digits.IMAGE_SIZE, digits.IMAGE_SIZE), conditioning="class",
                          num_classes=meta["num_classes"], null_class=meta["num_classes"], name="digits", meta=meta)


TINY_CONFIG = {**digits.DIGITS_UNET_CONFIG, "block_out_channels": [16, 32],
               "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
               "attention_head_dim": 8, "norm_num_groups": 8}


def _load_tiny_random() -> DiffusionModel:
    torch.manual_seed(0)
    unet = digits.build_digits_unet(TINY_CONFIG).eval()
    return DiffusionModel(denoiser=unet, schedule=NoiseSchedule.from_config(digits.DIGITS_SCHEDULE),
                          sample_shape=(1, digits.IMAGE_SIZE, digits.IMAGE_SIZE), conditioning="class",
                          num_classes=digits.NUM_CLASSES, null_class=digits.NUM_CLASSES, name="tiny-random",
                          meta={"unet": TINY_CONFIG})


_PAPER = "the paper-scale checkpoint; not bundled and not downloadable here. Loaders for it are tracked in issue 8"

MODELS: dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry("digits", "embedded class-conditional DDPM on sklearn digits (16x16, 2.6M params)",
               sampler={"steps": 50, "eta": 0.0, "guidance": 1.25, "clip_x0": True}, loader=_load_digits),
    ModelEntry("tiny-random", "randomly initialised digits-shaped UNet (seeded) for smoke tests",
               sampler={"steps": 10, "eta": 0.0, "guidance": 2.0, "clip_x0": True}, loader=_load_tiny_random),
    ModelEntry("ldm-4", "LDM-4 ImageNet 256, class-conditional (CompVis cin256-v2)",
               sampler={"steps": 20, "eta": 0.0, "guidance": 3.0, "clip_x0": False}, evaluator="inception",
               needs=_PAPER),
    ModelEntry("ldm-bedroom", "LDM-4 LSUN-Bedroom 256, unconditional",
               sampler={"steps": 200, "eta": 1.0, "guidance": 1.0, "clip_x0": False}, evaluator="inception",
               needs=_PAPER),
    ModelEntry("ldm-church", "LDM-8 LSUN-Church 256, unconditional",
               sampler={"steps": 500, "eta": 0.0, "guidance": 1.0, "clip_x0": False}, evaluator="inception",
               needs=_PAPER),
    ModelEntry("ddpm-cifar10", "DDPM CIFAR-10 32x32, unconditional",
               sampler={"steps": 100, "eta": 0.0, "guidance": 1.0, "clip_x0": True}, evaluator="inception",
               needs=_PAPER),
    ModelEntry("sd-v1-4", "Stable Diffusion v1.4, text-to-image 512",
               sampler={"steps": 50, "eta": 0.0, "guidance": 7.5, "clip_x0": False}, evaluator="clip",
               needs=_PAPER),
    ModelEntry("dit-xl-2-256", "DiT-XL/2 ImageNet 256, class-conditional transformer",
               sampler={"steps": 50, "eta": 0.0, "guidance": 1.5, "clip_x0": False}, evaluator="inception",
               needs=_PAPER),
]}
MODELS["ldm-4-imagenet"] = MODELS["ldm-4"]


def model_entry(name: str) -> ModelEntry:
    entry = MODELS.get(name)
    if entry is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))} "
                                 f"(see `lowbitdm models`)")
    if not entry.available:
        raise ModelNotFoundError(f"model {name!r} needs {entry.needs}")
    return entry


def load_model(name: str) -> DiffusionModel:
    """Load a registered model in eval mode with gradients off (no network access)."""
    model = model_entry(name).loader()  # type: ignore[misc]
    model.denoiser.eval().requires_grad_(False)
    return model


def model_ref(model: DiffusionModel) -> ModelRef:
    """Name, source and a digest of the model's weights (so an artifact knows what it came from)."""
    h = hashlib.sha256()
    for key, value in sorted(model.denoiser.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return ModelRef(name=model.name, source="embedded" if model.name in MODELS else "path", digest=h.hexdigest())

