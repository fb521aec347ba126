"""Stage `sample`: a model (FP name or calibrate/finetune/merge artifact) → `samples.npz` + grid.

Images are generated in shards of `batch_size`; every shard is saved as it completes,
so an interrupted run resumes from the shards already written. Seeds are per global
sample index, so the images do not depend on the batch size, on which run made them, or on
how many processes made them: under `torchrun` each rank takes its share of the missing
shards, rank 0 alone owns the artifact (manifest, lock) and, after a barrier, assembles
`samples.npz` (ADM layout: `arr_0` uint8 NHWC + `labels`) from the shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lowbitdm_cli.adapters.lora_file import lora_inputs
from lowbitdm_cli.artifacts import Artifact, StageRun
from lowbitdm_cli.distributed import ProcessGroup, rank_device
from lowbitdm_cli.errors import RuntimeUnavailableError
from lowbitdm_cli.export.int_runtime import lowering_counts
from lowbitdm_cli.models.precision import DTYPES, use_dtype, use_layout
from lowbitdm_cli.models.registry import sampler_defaults
from lowbitdm_cli.models.text import prompts_digest
from lowbitdm_cli.quant.integer import KERNELS, rescale_order
from lowbitdm_cli.npz import ChunkedArray, write_npz
from lowbitdm_cli.recipes import Recipe
from lowbitdm_cli.sampling import balanced_labels, random_labels, run_sampler, save_grid, to_uint8
from lowbitdm_cli.stages.common import Source, prompt_options, run_on_ranks, sampler_settings, text_prompts

__all__ = ["sample"]


def _shard_name(s: int) -> str:
    return f"shard_{s:05d}.safetensors"


def sample(source: Source, recipe: Recipe, out: Path, resume: bool = False, force: bool = False, replace_stale: bool = False,
           progress: Callable[[str, int, int], None] = lambda *_: None, device: str = "cpu") -> Artifact:
    """Generate `recipe.sample.num_samples` images from `source` (class-balanced labels by default).

    `device` is where the model runs (``cuda`` = each torchrun rank's own GPU). Under
    `torchrun` every rank calls this; all of them return the committed artifact.
    """
    if source.runtime == "compiled" and device != "cpu":
        raise RuntimeUnavailableError("the compiled runtime lowers to x86 CPU int8 kernels (oneDNN): sample it "
                                      "with --device cpu, or use --runtime int / fake on a GPU")
    recipe = recipe.resolved(sampler_defaults(source.ref.name)).with_sample_dtype()
    cfg = recipe.sample
    options = {"source": source.label, **({"runtime": source.runtime} if source.runtime else {}),
               **({"device": device} if device != "cpu" else {}), **prompt_options(recipe),
               **({"loras": lora_inputs(source.loras)} if source.loras else {})}
    num_shards = math.ceil(cfg.num_samples / cfg.batch_size)

    def work(group: ProcessGroup, run: StageRun, shared: dict) -> Artifact | None:
        # the other ranks only write shards into rank 0's partial folder; they never touch its manifest
        model = use_layout(use_dtype(source.model, DTYPES[cfg.dtype]), cfg.layout)  # around the quantized layers
        if source.runtime == "compiled":  # after the dtype: Inductor compiles the model as it will run
            from lowbitdm_cli.export.compiled_runtime import compile_runtime

            model = compile_runtime(model)
        if model.conditioning == "text":  # the recipe's prompts, also for an artifact calibrated on others
            model = model.with_conditioner(model.conditioner.with_prompts(text_prompts(recipe)))
        work_device = rank_device(device, group)
        if work_device != "cpu":
            model.to(work_device)
        settings = sampler_settings(cfg)
        labels = None
        if model.conditional:  # class labels, or prompt indices of a text model
            labels = (balanced_labels(cfg.num_samples, model.num_classes) if cfg.labels == "balanced"
                      else random_labels(cfg.num_samples, model.num_classes, cfg.seed))
        bounds = [(s * cfg.batch_size, min((s + 1) * cfg.batch_size, cfg.num_samples)) for s in range(num_shards)]
        mine = group.split(shared["missing"])
        todo = sum(bounds[s][1] - bounds[s][0] for s in mine)
        for s in mine:
            lo, hi = bounds[s]
            cond = labels[lo:hi] if labels is not None else None
            x = run_sampler(model, cond, list(range(lo, hi)), cfg.seed, settings)
            x = model.decode(x, cfg.decode_batch_size)  # latent models: latents → images
            shard = {"images": torch.from_numpy(to_uint8(x))}
            if cond is not None:
                shard["labels"] = cond
            run.save_tensors(_shard_name(s), shard)
            if group.is_main:
                run.checkpoint(shards_done=sum(run.has(_shard_name(i)) for i in range(num_shards)))
            progress("sampling", hi - lo, todo)
        group.barrier()  # every shard is on disk
        return _assemble(run, model, source, cfg, settings, labels, num_shards) if group.is_main else None

    return run_on_ranks(
        out, device,
        lambda: StageRun.start(out, "sample", source.ref, recipe.model_dump(mode="json"), parent=source.artifact,
                               options=options, resume=resume, force=force, replace_stale=replace_stale,
                               recipe_sections=("model", "sample")),
        lambda run: {"missing": [s for s in range(num_shards) if not run.has(_shard_name(s))]}, work)


def _assemble(run: StageRun, model, source: Source, cfg, settings, labels: torch.Tensor | None,  # noqa: ANN001
              num_shards: int) -> Artifact:
    """Stream the shards, in order, into `samples.npz`; write the grid; commit."""
    names = [_shard_name(s) for s in range(num_shards)]
    first = run.load_tensors(names[0])["images"]

    def chunks():  # noqa: ANN202
        for name in names:
            yield run.load_tensors(name)["images"].numpy()

    arrays: dict = {"arr_0": ChunkedArray((cfg.num_samples, *first.shape[1:]), np.dtype(np.uint8), chunks)}
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
    write_npz(run.path("samples.npz"), arrays)
    files = ["samples.npz"]
    if cfg.grid_samples > 0:
        grid, count = [], 0
        for name in names:
            if count >= cfg.grid_samples:
                break
            grid.append(run.load_tensors(name)["images"].numpy())
            count += len(grid[-1])
        nrow = min(model.num_classes, 10) if model.conditional else 10
        save_grid(np.concatenate(grid)[: cfg.grid_samples], run.path("grid.png"), nrow=nrow)
        files.append("grid.png")
    unmatched = unmatched_timesteps(model)
    info = {"source": source.label, "runtime": source.runtime, "num_samples": cfg.num_samples,
            "sampler": settings.__dict__, "dtype": cfg.dtype, "layout": cfg.layout, "shards_done": num_shards,
            "unmatched_timesteps": unmatched, **({"loras": source.loras} if source.loras else {})}
    report = (getattr(model, "meta", None) or {}).get("runtime")
    if isinstance(report, dict):  # the integer runtime: which CPU, what its kernels compute, which lowerings ran
        info["int_runtime"] = {**{k: report[k] for k in ("cpu", "kernel_probes", "rescale_order") if k in report},
                               "lowerings": lowering_counts(model.denoiser)}  # as sampled (after autotuning)
    if source.artifact is not None:  # a quantized model: both runtimes rescale in this order (last bits, per CPU)
        info["rescale_order"] = {k: rescale_order(k) for k in KERNELS}
    prompts = getattr(model.conditioner, "prompts", None)
    if prompts is not None:  # labels are indices into these prompts (clip_score pairs them again)
        info["prompts_sha256"] = prompts_digest(prompts)
    return run.commit(files, info=info)


def unmatched_timesteps(model) -> list[int]:  # noqa: ANN001 - DiffusionModel
    """Sampler timesteps that had no trained temporal quantizer slot (mapped to the nearest)."""
    seen: set[int] = set()
    for m in model.denoiser.modules():
        seen |= getattr(m, "unmatched_timesteps", set())
    return sorted(seen)
