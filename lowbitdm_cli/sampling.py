"""Samplers with per-sample seeds, so an image depends only on (seed, sample index).

DDIM (Song et al. 2021; η = 0 deterministic, η > 0 stochastic) and DPM-Solver++(2M)
(Lu et al. 2022: multistep second-order solver of the probability-flow ODE in data prediction,
deterministic). Both run on the same timestep grid (`ddim_timesteps`) and call the denoiser
once per step (twice under classifier-free guidance, as one batch).
"""

from __future__ import annotations

import math
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
    "dpmpp2m_sample",
    "dpmpp2m_step",
    "initial_noise",
    "random_labels",
    "run_sampler",
    "sample_generators",
    "save_grid",
    "to_uint8",
]

TrajectoryHook = Callable[[int, int, torch.Tensor], None]
_LABEL_STREAM = 0x1ABE15  # tags the label generators' seeds apart from anything else seeded per index


SAMPLERS = ("ddim", "dpmpp2m")


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler settings: number of steps, η (DDIM only; 0 = deterministic), CFG scale, x0
    clipping, and which sampler ("ddim" or "dpmpp2m")."""

    steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0
    clip_x0: bool = False
    sampler: str = "ddim"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.sampler == "dpmpp2m" and self.eta != 0:
            raise ValueError(f"the dpmpp2m sampler is deterministic: it needs eta = 0, got {self.eta}")


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


def _start(model: DiffusionModel, cond: torch.Tensor | None, indices: list[int] | torch.Tensor, seed: int,
           settings: SamplerSettings) -> tuple[list[torch.Generator], torch.Tensor, torch.Tensor | None, list[int]]:
    """What every sampler starts from: per-index generators, their initial noise and the condition on
    the model's device, and DDIM's timestep grid."""
    gens = sample_generators(seed, indices)
    x = initial_noise(gens, model.sample_shape).to(model.device)
    return gens, x, None if cond is None else cond.to(model.device), ddim_timesteps(
        model.schedule.num_train_timesteps, settings.steps)


@torch.no_grad()
def ddim_sample(model: DiffusionModel, cond: torch.Tensor | None, indices: list[int] | torch.Tensor, seed: int,
                settings: SamplerSettings, hook: TrajectoryHook | None = None) -> torch.Tensor:
    """Sample a batch; returns x0 as float [B, C, H, W].

    Sample i's initial noise and every η-noise come from its own generator seeded by
    (seed, indices[i]). `hook(step, t, x_t)` sees every x_t the denoiser is called on.
    """
    gens, x, cond, ts = _start(model, cond, indices, seed, settings)
    for step, t in enumerate(ts):
        if hook is not None:
            hook(step, t, x)
        eps = model.eps(x, t, cond, settings.guidance)
        t_prev = ts[step + 1] if step + 1 < len(ts) else -1
        noise = initial_noise(gens, model.sample_shape).to(x.device) if settings.eta > 0 and t_prev >= 0 else None
        x = ddim_step(model.schedule, x, eps, t, t_prev, settings.eta, noise, settings.clip_x0)
    return x


def _lambda(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t = log α_t/σ_t) of timestep t; t = −1 is the clean end (α = 1, σ = 0, λ = ∞)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    a = float(schedule.alphas_cumprod[t])
    alpha, sigma = a**0.5, (1 - a) ** 0.5
    return alpha, sigma, math.log(alpha / sigma)


def dpmpp2m_step(schedule: NoiseSchedule, x_s: torch.Tensor, x0: torch.Tensor, s: int, t: int,
                 x0_prev: torch.Tensor | None = None, s_prev: int | None = None) -> torch.Tensor:
    """One DPM-Solver++(2M) update x_s → x_t (t < s; t = −1 is the final step to x0).

    `x0` is the data prediction at s; with `x0_prev` (the data prediction at the previous
    grid point `s_prev`) the update is second order, without it first order (which is DDIM's
    η = 0 step). With h = λ_t − λ_s, r = (λ_s − λ_{s_prev}) / h and
    D = (1 + 1/(2r))·x0 − 1/(2r)·x0_prev:  x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·D.
    The step to x0 (σ_t = 0) is always first order and returns `x0`."""
    alpha_t, sigma_t, lam_t = _lambda(schedule, t)
    _, sigma_s, lam_s = _lambda(schedule, s)
    if t < 0:  # λ_t = ∞: the first-order update is exactly the data prediction
        return x0
    h = lam_t - lam_s
    d = x0
    if x0_prev is not None:
        if s_prev is None:
            raise ValueError("a second-order step needs s_prev, the timestep of x0_prev")
        r = (lam_s - _lambda(schedule, s_prev)[2]) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (sigma_t / sigma_s) * x_s - alpha_t * math.expm1(-h) * d


def _data_prediction(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int,
                     clip_x0: bool) -> torch.Tensor:
    a_t = float(schedule.alphas_cumprod[t])
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


@torch.no_grad()
def dpmpp2m_sample(model: DiffusionModel, cond: torch.Tensor | None, indices: list[int] | torch.Tensor, seed: int,
                   settings: SamplerSettings, hook: TrajectoryHook | None = None) -> torch.Tensor:
    """Sample a batch with DPM-Solver++(2M) on DDIM's timestep grid; returns x0 as float [B, C, H, W].

    Deterministic: sample i's only randomness is its initial noise, drawn from its own generator
    seeded by (seed, indices[i]) exactly as `ddim_sample` draws it. The first step and the last
    two are first order (as DPM-Solver's ``lower_order_final``): the uniform grid ends with a
    jump in λ several times the previous step (t = 50 → 0 at 20 steps: λ 1.7 → 4.6), over which
    the second-order extrapolation of the data prediction overshoots; the others are second
    order. CFG and x0 clipping act on the denoiser's ε and on the data prediction as in DDIM."""
    _, x, cond, ts = _start(model, cond, indices, seed, settings)
    x0_prev, s_prev = None, None
    for step, t in enumerate(ts):
        if hook is not None:
            hook(step, t, x)
        eps = model.eps(x, t, cond, settings.guidance)
        x0 = _data_prediction(model.schedule, x, eps, t, settings.clip_x0)
        t_next = ts[step + 1] if step + 1 < len(ts) else -1
        second = step < len(ts) - 2  # the last two steps (into the grid's end and to x0) are first order
        x = dpmpp2m_step(model.schedule, x, x0, t, t_next, x0_prev if second else None, s_prev)
        x0_prev, s_prev = x0, t
    return x


def run_sampler(model: DiffusionModel, cond: torch.Tensor | None, indices: list[int] | torch.Tensor, seed: int,
                settings: SamplerSettings, hook: TrajectoryHook | None = None) -> torch.Tensor:
    """Sample a batch with `settings.sampler` (DDIM or DPM-Solver++(2M))."""
    fn = dpmpp2m_sample if settings.sampler == "dpmpp2m" else ddim_sample
    return fn(model, cond, indices, seed, settings, hook=hook)


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
