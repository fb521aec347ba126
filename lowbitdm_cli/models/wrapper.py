"""`DiffusionModel`: one interface over every denoiser family.

Calibration, finetuning and sampling only ever call ``eps(x_t, t, cond, guidance)``, so
quantization code never special-cases a family. Temporal (per-timestep) quantizers are
told the current timestep through ``set_timestep`` before each denoiser call.

What differs between families lives in the wrapper's parts, never in the callers:

- the denoiser: diffusers `UNet2DModel`, `UNet2DConditionModel`, `DiTTransformer2DModel` or
  `Transformer2DModel`, all called as ``denoiser(x_t, timestep=t, **conditioner_kwargs)``;
  a learned-sigma output (2C channels, DiT) is cut to its first C channels (ε);
- the conditioner (`models.conditioning`): none, class labels, a class-embedding context,
  or prompt embeddings; a condition is always an index tensor, `null_class` the CFG branch;
- the autoencoder of latent models (VQModel / AutoencoderKL, full precision): x_t lives in
  latent space everywhere except `decode`, which `sample` calls to make images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from lowbitdm_cli.errors import ModelFormatError, RecipeError
from lowbitdm_cli.models.conditioning import ClassLabels, Conditioner, NoCondition

__all__ = ["BETA_SCHEDULES", "DiffusionModel", "NoiseSchedule", "set_timestep"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (diffusers ``squaredcos_cap_v2``): β from ᾱ(t) = cos²."""
    def alpha_bar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete DDPM schedule: ``alphas_cumprod[t]`` for t in [0, num_train_timesteps)."""

    alphas_cumprod: torch.Tensor
    prediction_type: Literal["epsilon"] = "epsilon"

    @classmethod
    def from_config(cls, cfg: dict) -> NoiseSchedule:
        """From a diffusers scheduler config (DDPM/DDIM/PNDM/...: only the β schedule is read)."""
        prediction = cfg.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ModelFormatError(f"prediction_type {prediction!r} is not supported: lowbitdm's samplers and "
                                   f"distillation use epsilon-prediction models only")
        n = int(cfg.get("num_train_timesteps", 1000))
        kind = cfg.get("beta_schedule", "linear")
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        elif kind == "linear":
            betas = torch.linspace(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), n, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise ModelFormatError(f"beta_schedule {kind!r} is not supported ({', '.join(BETA_SCHEDULES)})")
        return cls(torch.cumprod(1.0 - betas, dim=0).float())

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def set_timestep(module: nn.Module, t: int | None) -> None:
    """Tell every submodule with a ``set_timestep`` method (temporal quantizers) the current t."""
    for m in module.modules():
        fn = getattr(m, "set_timestep", None)
        if fn is not None and m is not module:
            fn(t)


@dataclass(eq=False)
class DiffusionModel:
    """A denoiser plus its noise schedule, conditioning and (latent models) autoencoder.

    `conditioning` is ``"class"`` (labels 0..num_classes-1), ``"text"`` (prompt indices
    0..num_classes-1 into the model's prompt list) or ``"none"``; `null_class` is the index of
    the unconditional CFG branch (null class / empty prompt). `sample_shape` is (C, H, W) of
    x_t (latent shape for latent models). `conditioner` defaults to class labels passed as
    ``class_labels`` (or nothing for ``"none"``). `latent_scale` is the autoencoder's scaling
    factor: images decode from ``latents / latent_scale``.
    """

    denoiser: nn.Module
    schedule: NoiseSchedule
    sample_shape: tuple[int, int, int]
    conditioning: Literal["class", "none", "text"] = "class"
    num_classes: int = 0
    null_class: int | None = None
    name: str = "model"
    meta: dict = field(default_factory=dict)
    conditioner: Conditioner | None = None
    autoencoder: nn.Module | None = None
    latent_scale: float = 1.0
    dtype: torch.dtype = torch.float32  # what the denoiser computes in (`models.precision`); ε returns float32
    # the memory layout of the denoiser's 4-D activations (`models.precision.use_layout`); ε returns NCHW
    memory_format: torch.memory_format = torch.contiguous_format

    def __post_init__(self) -> None:
        if self.conditioner is None:
            if self.conditioning == "text":
                raise ValueError("a text-conditioned model needs its prompt conditioner")
            self.conditioner = (ClassLabels(self.num_classes, self.null_class) if self.conditioning == "class"
                                else NoCondition())

    @property
    def conditional(self) -> bool:
        """Whether samples take a condition index (class label or prompt index)."""
        return self.conditioning != "none"

    def eps(self, x_t: torch.Tensor, t: int, cond: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        """Predicted noise at integer timestep `t` (shared by the batch), after CFG.

        With `guidance` != 1 and a conditional model, both branches run in one batch:
        ε = ε_u + g · (ε_c − ε_u).
        """
        if self.conditional and guidance != 1.0:
            if self.null_class is None:
                raise RecipeError(f"{self.name} has no unconditional (null) condition, so no classifier-free "
                                  f"guidance: set sample.guidance=1 (and finetune.guidance=1)")
            null = torch.full_like(cond, self.null_class)
            out = self.forward(torch.cat([x_t, x_t]), t, torch.cat([cond, null]))
            eps_c, eps_u = out.chunk(2)
            return eps_u + guidance * (eps_c - eps_u)
        return self.forward(x_t, t, cond)

    def forward(self, x_t: torch.Tensor, t: int, cond: torch.Tensor | None) -> torch.Tensor:
        """One raw denoiser call (no guidance); returns ε with x_t's shape, on the model's device
        (inputs elsewhere, e.g. calibration data kept on the CPU, are moved there)."""
        device = self.device
        x_t = x_t.to(device, self.dtype)
        if x_t.dim() == 4:
            x_t = x_t.contiguous(memory_format=self.memory_format)
        cond = cond.to(device) if cond is not None else None
        set_timestep(self.denoiser, int(t))
        t_vec = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        kwargs = self.conditioner.denoiser_kwargs(cond if self.conditional else None)
        if self.dtype != torch.float32:  # prompt embeddings and the like, in the denoiser's dtype
            kwargs = {k: v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                      for k, v in kwargs.items()}
        out = self.denoiser(x_t, timestep=t_vec, **kwargs).sample.float().contiguous()
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:  # learned σ (DiT, improved DDPM): the first C channels are ε
            out = out[:, :channels]
        return out

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Final x0 → images in [-1, 1]: pixel models return it, latent models decode it
        (`batch_size` latents at a time, to bound memory; float kernels may round differently per
        batch size, which is why `sample.decode_batch_size` is part of the recipe)."""
        if self.autoencoder is None:
            return x
        step = batch_size or x.shape[0]
        images = []
        for i in range(0, x.shape[0], step):
            out = self.autoencoder.decode(x[i:i + step] / self.latent_scale)
            images.append(out.sample if hasattr(out, "sample") else out)
        return torch.cat(images)

    def with_conditioner(self, conditioner: Conditioner) -> DiffusionModel:
        """The same denoiser (shared, not copied) under another conditioner, e.g. other prompts."""
        return replace(self, conditioner=conditioner, conditioning=conditioner.kind,
                       num_classes=conditioner.num_conditions, null_class=conditioner.null)

    def parts(self) -> dict[str, nn.Module]:
        """The full-precision modules beside the denoiser (autoencoder, conditioner), by name."""
        return {name: m for name, m in (("autoencoder", self.autoencoder), ("conditioner", self.conditioner))
                if m is not None}

    def cfg_conditions(self, cond: torch.Tensor) -> torch.Tensor:
        """Conditions of both CFG branches as the denoiser sees them (for calibration data)."""
        return torch.cat([cond, torch.full_like(cond, self.null_class)])

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> DiffusionModel:
        self.denoiser.to(device)
        for part in self.parts().values():
            part.to(device)
        return self
