"""Train the validation models: digits denoisers of other shapes than the embedded ones, which no
recipe default is tuned on. Recipes are chosen on the embedded `digits` UNet and `digits-dit`, then
confirmed on these (``--model PATH`` in the benchmarks)::

    python -m lowbitdm_cli.training.validation_models --out runs/validation-models

Writes diffusers pipeline folders, scored with the digits evaluator like the embedded models
(``model_index.json``'s ``"lowbitdm"`` object names the evaluator and the sampler):

- ``digits-dit-val``: a pixel-space DiTPipeline, DiTTransformer2DModel of 4 blocks x width 192
  (3 heads of 64) instead of 6 x 128, patch 2;
- ``digits-unet-val``: a DDPMPipeline, class-conditional UNet2DModel with channels 48-96-96 and
  attention at the 4x4 level instead of 32-64-128 with attention at 8x8.

Same data, splits, schedule and training loop as the embedded models (`training.denoiser`), seeded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbitdm_cli.models.digits import (
    DIGITS_DIT_CONFIG,
    DIGITS_SCHEDULE,
    DIGITS_UNET_CONFIG,
    NUM_CLASSES,
    build_digits_dit,
    build_digits_unet,
)
from lowbitdm_cli.models.registry import MODELS
from lowbitdm_cli.training.denoiser import train_denoiser

__all__ = ["VALIDATION_MODELS", "main", "train_validation_model"]

# name: (pipeline class, denoiser folder, builder, config, training steps, the embedded model whose sampler it uses)
VALIDATION_MODELS = {
    "digits-dit-val": ("DiTPipeline", "transformer", build_digits_dit,
                       {**DIGITS_DIT_CONFIG, "num_layers": 4, "num_attention_heads": 3, "attention_head_dim": 64},
                       3000, "digits-dit"),
    "digits-unet-val": ("DDPMPipeline", "unet", build_digits_unet,
                        {**DIGITS_UNET_CONFIG, "block_out_channels": [48, 96, 96],
                         "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                         "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
                        2000, "digits"),
}


def train_validation_model(name: str, out: Path, steps: int | None = None, seed: int = 0) -> Path:
    """Train validation model `name` and write its pipeline folder ``out/name``."""
    pipeline, component, build, config, default_steps, sampled_like = VALIDATION_MODELS[name]
    torch.manual_seed(seed)
    model = build(config)
    with tempfile.TemporaryDirectory() as tmp:
        weights = train_denoiser(model, Path(tmp), "weights", {"config": config}, steps=steps or default_steps,
                                 seed=seed, log=lambda line: print(f"{name}: {line}", flush=True))
        model.load_state_dict(load_file(str(weights)))
        training = json.loads((Path(tmp) / "weights.json").read_text())["training"]
    folder = out / name
    model.save_pretrained(folder / component, safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", **DIGITS_SCHEDULE}, indent=1) + "\n")
    index = {"_class_name": pipeline, component: ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", "DDIMScheduler"],
             "lowbitdm": {"num_classes": NUM_CLASSES, "null_class": NUM_CLASSES, "evaluator": "digits-features",
                          "sampler": MODELS[sampled_like].sampler, "training": training}}
    if pipeline == "DiTPipeline":
        index["vae"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/validation-models"))
    parser.add_argument("--models", nargs="*", default=list(VALIDATION_MODELS), choices=list(VALIDATION_MODELS))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: each model's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.models:
        print(f"wrote {train_validation_model(name, args.out, args.steps, args.seed)}", flush=True)


if __name__ == "__main__":
    main()
