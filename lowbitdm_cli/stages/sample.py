"""Stage `sample`: a model (FP name or calibrate/finetune/merge artifact) → `samples.npz` + grid.

Images are generated in shards of `batch_size`; every shard is saved as it completes,
so an interrupted run resumes from the shards already written. Seeds are per global
sample index, so the images do not depend on the batch size or on which run made them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lowbitdm_cli.artifacts import Artifact, StageRun
from lowbitdm_cli.models.registry import model_entry
from lowbitdm_cli.npz import write_npz
from lowbitdm_cli.recipes import Recipe
from lowbitdm_cli.sampling import balanced_labels, ddim_sample, save_grid, to_uint8
from lowbitdm_cli.stages.common import Source, sampler_settings

__all__ = ["sample"]


def sample(source: Source, recipe: Recipe, out: Path, resume: bool = False, force: bool = False, replace_stale: bool = False,
           progress: Callable[[str, int, int], None] = lambda *_: None) -> Artifact:
    """Generate `recipe.sample.num_samples` class-balanced images from `source`."""
    recipe = recipe.resolved(model_entry(source.ref.name).sampler)
    cfg = recipe.sample
    options = {"source": source.label, **({"runtime": source.runtime} if source.runtime else {})}
    run = StageRun.start(out, "sample", source.ref, recipe.model_dump(mode="json"), parent=source.artifact,
                         options=options, resume=resume, force=force,
                         replace_stale=replace_stale,
                         recipe_sections=("model", "sample"))
    if run.done:
        return run.artifact  # type: ignore[return-value]
    model = source.model
    settings = sampler_settings(cfg)
    labels = balanced_labels(cfg.num_samples, model.num_classes) if model.conditioning == "class" else None
    num_shards = math.ceil(cfg.num_samples / cfg.batch_size)
    images, all_labels = [], []
    for s in range(num_shards):
        name = f"shard_{s:05d}.safetensors"
        lo, hi = s * cfg.batch_size, min((s + 1) * cfg.batch_size, cfg.num_samples)
        if not run.has(name):
            cond = labels[lo:hi] if labels is not None else None
            x = ddim_sample(model, cond, list(range(lo, hi)), cfg.seed, settings)
            shard = {"images": torch.from_numpy(to_uint8(x))}
            if cond is not None:
                shard["labels"] = cond
            run.save_tensors(name, shard)
            run.checkpoint(shards_done=s + 1)
        shard = run.load_tensors(name)
        images.append(shard["images"].numpy())
        if "labels" in shard:
            all_labels.append(shard["labels"].numpy())
        progress("sampling", hi - lo, cfg.num_samples)
    arr = np.concatenate(images)
    arrays = {"arr_0": arr}
    if all_labels:
        arrays["labels"] = np.concatenate(all_labels).astype(np.int64)
    write_npz(run.path("samples.npz"), arrays)
    files = ["samples.npz"]
    if cfg.grid_samples > 0:
        nrow = model.num_classes if model.conditioning == "class" else 10
        save_grid(arr[: cfg.grid_samples], run.path("grid.png"), nrow=nrow)
        files.append("grid.png")
    unmatched = unmatched_timesteps(model)
    info = {"source": source.label, "runtime": source.runtime, "num_samples": cfg.num_samples,
            "sampler": settings.__dict__,
            "unmatched_timesteps": unmatched}
    return run.commit(files, info=info)


def unmatched_timesteps(model) -> list[int]:  # noqa: ANN001 - DiffusionModel
    """Sampler timesteps that had no trained temporal quantizer slot (mapped to the nearest)."""
    seen: set[int] = set()
    for m in model.denoiser.modules():
        seen |= getattr(m, "unmatched_timesteps", set())
    return sorted(seen)
