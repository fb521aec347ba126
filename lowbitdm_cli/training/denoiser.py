"""The one training loop of the embedded digits denoisers (the UNet and the DiT).

ε-prediction on sklearn's digits (training split), class dropout for classifier-free guidance
(the null class is `NUM_CLASSES`), random ±1 px translations, AdamW with warm-up and cosine decay
to 5 %, gradient clipping and an EMA of the weights; the EMA weights are what is saved. Seeded:
the same command on the same machine gives the same weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lowbitdm_cli.models.digits import DIGITS_SCHEDULE, NUM_CLASSES, _alphas_cumprod, load_digits_split

__all__ = ["train_denoiser"]


def train_denoiser(
    model: nn.Module,
    out_dir: Path,
    stem: str,
    meta: dict,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    cond_drop: float = 0.1,
    seed: int = 0,
    checkpoint_every: int = 500,
    warmup: int | None = None,
    log: Callable[[str], None] = print,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    export: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Train `model` (called as ``model(x_t, timestep=t, class_labels=y).sample``) and save its EMA
    weights as ``<stem>.safetensors`` and `meta` plus the training settings as ``<stem>.json`` in
    `out_dir`, overwritten at every checkpoint so a long run can be inspected (and sampled) midway.
    `transform` maps the training images (all at once, [N, 1, 16, 16] in [-1, 1]) before training
    (e.g. a style to learn); `export` maps the EMA state to the tensors saved (e.g. a LoRA's factors)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_split()
    x_all, y_all = data.train_images, data.train_labels
    if transform is not None:
        x_all = transform(x_all)
    # train mode would let a model drop labels by itself (DiT's class_dropout_prob) with the global
    # RNG: the dropout here is the only one, drawn from the seeded generator
    model.eval()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10) if warmup is None else warmup

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    settings = dict(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, cond_drop=cond_drop, seed=seed,
                    warmup=warmup)
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
        pred = model(x_t, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred[:, : noise.shape[1]], noise)
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
            log(f"step {step + 1}/{steps} loss {running:.4f} lr {lr_at(step):.2e} ({rate:.2f} it/s)")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            saved = export(ema) if export is not None else ema
            save_file({k: v.contiguous() for k, v in saved.items()}, str(out_dir / f"{stem}.safetensors"))
            (out_dir / f"{stem}.json").write_text(json.dumps(
                {**meta, "training": {**settings, "completed_steps": step + 1}}, indent=2) + "\n")
    return out_dir / f"{stem}.safetensors"
