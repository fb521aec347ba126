"""Train the embedded digits UNet (epsilon prediction, class dropout for CFG, EMA) into the weights folder::

    python -m lowbitdm_cli.training.digits_unet --steps 3000

Seeded and reproducible; 3000 steps take most of an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lowbitdm_cli.models.digits import (
    DIGITS_SCHEDULE,
    DIGITS_UNET_CONFIG,
    NUM_CLASSES,
    WEIGHTS_DIR,
    _alphas_cumprod,
    build_digits_unet,
    load_digits_split,
)

__all__ = ["main", "train_digits_unet"]


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


def main(argv: list[str] | None = None, legacy: bool = False) -> None:
    """The command line; `legacy` accepts the former ``python -m lowbitdm_cli.models.digits train ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if legacy:
        if argv[:1] != ["train"]:
            sys.exit("usage: python -m lowbitdm_cli.training.digits_unet [--steps N] ... "
                     "(formerly python -m lowbitdm_cli.models.digits train)")
        argv = argv[1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    path = train_digits_unet(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
