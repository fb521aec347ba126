"""DDIM sampling with per-sample seeds, so an image depends only on (seed, sample index)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule

__all__ = [
    "SamplerSettings",
    "balanced_labels",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "initial_noise",
    "random_labels",
    "sample_generators",
    "save_grid",
    "to_uint8",
]

TrajectoryHook = Callable[[int, int, torch.Tensor], None]
_LABEL_STREAM = 0x1ABE15  # tags the label generators' seeds apart from anything else seeded per index


@dataclass(frozen=True)
class SamplerSettings:
    """DDIM settings: number of steps, η (0 = deterministic), CFG scale, x0 clipping."""

    steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0
    clip_x0: bool = False


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """DDIM's uniform sub-sequence, descending: e.g. 1000, 50 → 980, 960, …, 0."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return list(range(0, stride * steps, stride))[::-1]


def seed_for(seed: int, index: int) -> int:
    """The generator seed of global sample `index` (independent of batch and process layout)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def sample_generators(seed: int, indices: list[int] | torch.Tensor) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_for(seed, int(i))) for i in indices]


def initial_noise(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, eta: float,
              noise: torch.Tensor | None, clip_x0: bool = False) -> torch.Tensor:
    """One DDIM update x_t → x_{t_prev} (t_prev = −1 means the final step to x0)."""
    acp = schedule.alphas_cumprod
    a_t = acp[t].item()
    a_prev = acp[t_prev].item() if t_prev >= 0 else 1.0
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("η > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def ddim_sample(model: DiffusionModel, cond: torch.Tensor | None, indices: list[int] | torch.Tensor, seed: int,
                settings: SamplerSettings, hook: TrajectoryHook | None = None) -> torch.Tensor:
    """Sample a batch; returns x0 as float [B, C, H, W].

    Sample i's initial noise and every η-noise come from its own generator seeded by
    (seed, indices[i]). `hook(step, t, x_t)` sees every x_t the denoiser is called on.
    """
    gens = sample_generators(seed, indices)
    device = model.device
    x = initial_noise(gens, model.sample_shape).to(device)
    if cond is not None:
        cond = cond.to(device)
    ts = ddim_timesteps(model.schedule.num_train_timesteps, settings.steps)
    for step, t in enumerate(ts):
        if hook is not None:
            hook(step, t, x)
        eps = model.eps(x, t, cond, settings.guidance)
        t_prev = ts[step + 1] if step + 1 < len(ts) else -1
        noise = initial_noise(gens, model.sample_shape).to(device) if settings.eta > 0 and t_prev >= 0 else None
        x = ddim_step(model.schedule, x, eps, t, t_prev, settings.eta, noise, settings.clip_x0)
    return x


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, …, C−1, 0, 1, … so any prefix of whole rounds is class-balanced."""
    return torch.arange(num_samples) % num_classes


def random_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Uniformly random labels; label i depends only on (seed, i), like sample i's noise.

    Drawn from numpy generators keyed by (seed_for(seed, i), stream tag), a stream separate from
    the torch generators that make the noise."""
    return torch.tensor([int(np.random.default_rng([seed_for(seed, i), _LABEL_STREAM]).integers(num_classes))
                         for i in range(num_samples)], dtype=torch.long)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] NCHW → uint8 NHWC (the ADM `.npz` layout)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, nrow: int, scale: int = 2, pad: int = 1) -> None:
    """Write uint8 NHWC images as one PNG grid with `nrow` images per row."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
