"""Data-free calibration data: x_t, t and conditions from the FP model's own DDIM trajectories."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.sampling import SamplerSettings, balanced_labels, ddim_sample, ddim_timesteps

__all__ = ["CalibrationData", "collect_batch", "run_first_batches", "select_steps"]


@dataclass
class CalibrationData:
    """`xs` [S, N, C, H, W] at timestep values `ts` [S]; `conds` [N] condition indices (or None).

    Conditions are class labels, or for text models prompt indices into the recipe's prompt
    list (the embeddings are recomputed from the prompts by the frozen text encoder, so the
    data stays small; the stage's inputs digest covers the prompts' sha256).

    Under classifier-free guidance the denoiser sees both branches (cond and null); the
    calibration forward goes through `DiffusionModel.eps` with the same guidance, so
    both branches are covered without storing them twice.
    """

    xs: torch.Tensor
    ts: torch.Tensor
    conds: torch.Tensor | None

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"xs": self.xs, "ts": self.ts}
        if self.conds is not None:
            out["conds"] = self.conds
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> CalibrationData:
        return cls(t["xs"], t["ts"], t.get("conds"))

    @classmethod
    def concat(cls, parts: list[CalibrationData]) -> CalibrationData:
        conds = None if parts[0].conds is None else torch.cat([p.conds for p in parts])
        return cls(torch.cat([p.xs for p in parts], dim=1), parts[0].ts, conds)


@torch.no_grad()
def run_first_batches(model: DiffusionModel, data: CalibrationData, guidance: float, batch_size: int) -> None:
    """Run the model on the first `batch_size` calibration samples at every kept step (hooks observe)."""
    for s, t in enumerate(data.ts.tolist()):
        cond = data.conds[:batch_size] if data.conds is not None else None
        model.eps(data.xs[s, :batch_size], int(t), cond, guidance)


def select_steps(num_steps: int, keep: int | None) -> list[int]:
    """Trajectory positions to keep: all, or `keep` uniformly spaced ones (Q-Diffusion)."""
    if keep is None or keep >= num_steps:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / max(keep - 1, 1)) for i in range(keep)})


@torch.no_grad()
def collect_batch(model: DiffusionModel, indices: list[int], seed: int, settings: SamplerSettings,
                  keep_steps: list[int]) -> CalibrationData:
    """Run the FP sampler for samples `indices` and keep x_t at positions `keep_steps`."""
    conds = balanced_labels(max(indices) + 1, model.num_classes)[indices] if model.conditional else None
    kept: dict[int, torch.Tensor] = {}
    wanted = set(keep_steps)

    def hook(step: int, t: int, x: torch.Tensor) -> None:
        if step in wanted:
            kept[step] = x.detach().cpu().clone()

    ddim_sample(model, conds, indices, seed, settings, hook=hook)
    ts_all = ddim_timesteps(model.schedule.num_train_timesteps, settings.steps)
    return CalibrationData(xs=torch.stack([kept[s] for s in keep_steps]),
                           ts=torch.tensor([ts_all[s] for s in keep_steps]), conds=conds)


def for_each_step(data: CalibrationData, batch_size: int, fn: Callable[[int, int, torch.Tensor,
                                                                         torch.Tensor | None], None]) -> None:
    """Call ``fn(step_index, t, x_t, cond)`` over the data in batches, step by step."""
    n = data.xs.shape[1]
    for s, t in enumerate(data.ts.tolist()):
        for i in range(0, n, batch_size):
            cond = data.conds[i:i + batch_size] if data.conds is not None else None
            fn(s, int(t), data.xs[s, i:i + batch_size], cond)
