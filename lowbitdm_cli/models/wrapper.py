"""`DiffusionModel`: one interface over every denoiser family.

Calibration, finetuning and sampling only ever call ``eps(x_t, t, cond, guidance)``, so
quantization code never special-cases a family. Temporal (per-timestep) quantizers are
told the current timestep through ``set_timestep`` before each denoiser call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

__all__ = ["DiffusionModel", "NoiseSchedule", "set_timestep"]


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete DDPM schedule: ``alphas_cumprod[t]`` for t in [0, num_train_timesteps)."""

    alphas_cumprod: torch.Tensor
    prediction_type: Literal["epsilon"] = "epsilon"

    @classmethod
    def from_config(cls, cfg: dict) -> NoiseSchedule:
        n = int(cfg["num_train_timesteps"])
        kind = cfg.get("beta_schedule", "linear")
        if kind == "linear":
            betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r} (linear, scaled_linear)")
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"only epsilon prediction is supported, got {cfg.get('prediction_type')!r}")
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
    """A denoiser plus its noise schedule and conditioning.

    `conditioning` is ``"class"`` (labels 0..num_classes-1, `null_class` for the
    unconditional CFG branch) or ``"none"``. `sample_shape` is (C, H, W) of x_t.
    """

    denoiser: nn.Module
    schedule: NoiseSchedule
    sample_shape: tuple[int, int, int]
    conditioning: Literal["class", "none"] = "class"
    num_classes: int = 0
    null_class: int | None = None
    name: str = "model"
    meta: dict = field(default_factory=dict)

    def eps(self, x_t: torch.Tensor, t: int, cond: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
        """Predicted noise at integer timestep `t` (shared by the batch), after CFG.

        With `guidance` != 1 and class conditioning, both branches run in one batch:
        ε = ε_u + g · (ε_c − ε_u).
        """
        use_cfg = self.conditioning == "class" and guidance != 1.0
        if use_cfg:
            null = torch.full_like(cond, self.null_class)
            out = self.forward(torch.cat([x_t, x_t]), t, torch.cat([cond, null]))
            eps_c, eps_u = out.chunk(2)
            return eps_u + guidance * (eps_c - eps_u)
        return self.forward(x_t, t, cond)

    def forward(self, x_t: torch.Tensor, t: int, cond: torch.Tensor | None) -> torch.Tensor:
        """One raw denoiser call (no guidance)."""
        set_timestep(self.denoiser, int(t))
        t_vec = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        labels = cond if self.conditioning == "class" else None
        return self.denoiser(x_t, t_vec, class_labels=labels).sample

    def cfg_conditions(self, cond: torch.Tensor) -> torch.Tensor:
        """Conditions of both CFG branches as the denoiser sees them (for calibration data)."""
        return torch.cat([cond, torch.full_like(cond, self.null_class)])

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> DiffusionModel:
        self.denoiser.to(device)
        return self
