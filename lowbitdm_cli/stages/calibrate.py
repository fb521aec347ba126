"""Stage `calibrate`: FP model → calibrated low-bit model (quantizer parameters).

1. Collect calibration data from the FP model's own DDIM trajectories (data-free), one
   checkpointed batch at a time, so an interrupted run resumes where it stopped. Positions
   are uniform or normal (PTQ4DM); optionally keep a k-centre representative subset (PQD).
2. Wrap every layer the policy names, set the input transforms of the transformer methods
   (smoothing, rotation, low-rank branch: `calibration.transforms`), initialise weight quantizers from the weights,
   optionally give them OMQ per-channel bits (MPQ-DM), then initialise activation
   quantizers from what each layer sees on the calibration data. Q-Diffusion's shortcut
   splitting (`quant.split_shortcut`) gives concatenated-skip inputs two quantizers.
3. `qdiffusion` / `pqd`: BRECQ block reconstruction (AdaRound + LSQ, QDrop for PQD), block
   by block, each block checkpointed (`recon_block_NNN.safetensors`) so --resume skips it.
4. Store the calibration data and the quantizer state (nothing the FP model already has).

Under `torchrun` the ranks share the work and rank 0 writes the artifact: each rank makes
every world_size-th trajectory batch (seeded per global sample index, so the data are the same
bytes for any process count), runs every world_size-th batch of the range pass (records merged
across ranks: exact min/max, the same value samples as one process) and its share of each
reconstruction mini-batch (gradients summed in micro-batch order with `calibrate.recon_micro_batch`:
the same bytes for any process count; all-reduced without it). `--resume` works with any process count.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from lowbitdm_cli.artifacts import Artifact, StageRun
from lowbitdm_cli.calibration.data import CalibrationData, collect_batch, select_steps
from lowbitdm_cli.calibration.omq import apply_omq
from lowbitdm_cli.calibration.ptq import init_activations, init_weights, layer_output_errors
from lowbitdm_cli.calibration.reconstruct import block_state, plan_blocks, reconstruct_block, shortcut_splits
from lowbitdm_cli.calibration.selection import k_center, normal_steps
from lowbitdm_cli.calibration.transforms import apply_transforms
from lowbitdm_cli.distributed import ProcessGroup, rank_device
from lowbitdm_cli.errors import ArtifactError
from lowbitdm_cli.models.registry import model_ref, sampler_defaults
from lowbitdm_cli.models.text import prompts_digest
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.cost import bit_budget, layer_macs
from lowbitdm_cli.quant.model import load_quant_state, quant_state, quantize_denoiser
from lowbitdm_cli.quant.policy import build_layer_specs
from lowbitdm_cli.recipes import CalibrateSection, Recipe
from lowbitdm_cli.sampling import ddim_timesteps
from lowbitdm_cli.stages.common import (
    device_options,
    load_fp_model,
    prompt_options,
    run_on_ranks,
    sampler_settings,
    work_device,
)

__all__ = ["calibrate"]

Progress = Callable[[str, int, int], None]  # (task description, advance, total)
RECONSTRUCTING = ("qdiffusion", "pqd")  # methods that run block reconstruction


def _noop(_desc: str, _advance: int, _total: int) -> None:
    pass


def _representative(data: CalibrationData, num: int, seed: int) -> tuple[CalibrationData, list[int]]:
    """PQD's representative subset: greedy k-centre on each sample's x_t at the middle kept
    step, average-pooled to 4x4 per channel and flattened (a cheap, resolution-free feature)."""
    mid = data.xs[data.xs.shape[0] // 2].float()
    feats = torch.nn.functional.adaptive_avg_pool2d(mid, 4).flatten(1)
    idx = sorted(k_center(feats, num, seed))
    conds = data.conds[idx] if data.conds is not None else None
    return CalibrationData(data.xs[:, idx].contiguous(), data.ts, conds), idx


def _reconstruct(run: StageRun, model: DiffusionModel, fp_model: DiffusionModel, data: CalibrationData,
                 cfg: CalibrateSection, guidance: float, progress: Progress,
                 group: ProcessGroup) -> dict[str, dict]:
    """Reconstruct every block in forward order against `fp_model`'s block outputs; a block
    already checkpointed is loaded instead (rank 0 writes the checkpoints)."""
    blocks, rows_per_sample = plan_blocks(model, data, guidance)
    record: dict[str, dict] = {}
    for i, block in enumerate(blocks):
        name = f"recon_block_{i:03d}.safetensors"
        desc = f"reconstruct {block.name}"
        if group.broadcast(run.has(name)):
            with safe_open(str(run.path(name)), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("block") != block.name:
                raise ArtifactError(f"{run.path(name)} holds block {meta.get('block')!r}, expected {block.name!r}: "
                                    f"rerun with --force")
            load_quant_state(model.denoiser, run.load_tensors(name))
            record[block.name] = json.loads(meta["record"])
            progress(desc, cfg.recon_iters, cfg.recon_iters)
            continue
        rec = reconstruct_block(model, fp_model, data, block, i, cfg, guidance, rows_per_sample,
                                progress=lambda advance, total, desc=desc: progress(desc, advance, total),
                                group=group)
        if group.is_main:
            run.save_tensors(name, block_state(block), metadata={"block": block.name, "record": json.dumps(rec)})
            run.checkpoint(recon_blocks_done=i + 1)
        record[block.name] = rec
    return record


def calibrate(recipe: Recipe, out: Path, resume: bool = False, force: bool = False, replace_stale: bool = False,
              progress: Progress = _noop, device: str = "cpu") -> Artifact:
    """Calibrate `recipe.model.name` at `recipe.quant.bits`; write the artifact to `out`.

    `device` is where the model runs (``cuda``/``cuda:N``); calibration data stays on the CPU
    and is moved batch by batch, and everything written goes back to the CPU.
    """
    recipe = recipe.resolved(sampler_defaults(recipe.model.name))
    device = work_device(device)
    model = load_fp_model(recipe.model.name, recipe)
    cfg = recipe.calibrate
    num_batches = math.ceil(cfg.num_samples / cfg.batch_size)
    return run_on_ranks(
        out, device,
        lambda: StageRun.start(out, "calibrate", model_ref(model), recipe.model_dump(mode="json"),
                               options={**prompt_options(recipe), **device_options(device)}, resume=resume,
                               force=force, replace_stale=replace_stale),
        lambda run: {"missing": [b for b in range(num_batches) if not run.has(_part_name(b))]},
        lambda group, run, shared: _calibrate(run, recipe, model, shared["missing"], group,
                                              rank_device(device, group), progress if group.is_main else _noop))


def _part_name(b: int) -> str:
    return f"calib_part_{b:04d}.safetensors"


def _calibrate(run: StageRun, recipe: Recipe, model: DiffusionModel, missing: list[int], group: ProcessGroup,
               device: str, progress: Progress) -> Artifact | None:
    """The stage's work on one rank (every rank of a torchrun job; rank 0 returns the artifact)."""
    model.to(device)
    cfg = recipe.calibrate
    settings = sampler_settings(recipe.sample)
    if cfg.timestep_selection == "normal":
        num_train = model.schedule.num_train_timesteps
        keep = normal_steps(settings.steps, cfg.num_timesteps, cfg.seed,
                            timesteps=ddim_timesteps(num_train, settings.steps), num_train_timesteps=num_train)
    else:
        keep = select_steps(settings.steps, cfg.num_timesteps)

    t0 = time.time()
    num_batches = math.ceil(cfg.num_samples / cfg.batch_size)
    mine = group.split(missing)  # rank r makes every world_size-th missing batch
    for b in mine:
        indices = list(range(b * cfg.batch_size, min((b + 1) * cfg.batch_size, cfg.num_samples)))
        run.save_tensors(_part_name(b), collect_batch(model, indices, cfg.seed, settings, keep).to_tensors())
        if group.is_main:
            run.checkpoint(calib_batches_done=sum(run.has(_part_name(i)) for i in range(num_batches)))
        progress("calibration trajectories", 1, len(mine))
    group.barrier()  # every batch is on disk
    if group.is_main:
        run.checkpoint(calib_batches_done=num_batches)
    parts = [CalibrationData.from_tensors(run.load_tensors(_part_name(b))) for b in range(num_batches)]
    data = CalibrationData.concat(parts)
    representatives = None
    if cfg.representative == "kcenter":
        data, representatives = _representative(data, cfg.num_representative, cfg.seed)
    if group.is_main:
        run.save_tensors("calib_data.safetensors", data.to_tensors())
    t_data = time.time() - t0

    t0 = time.time()
    fp_state = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    # reconstruction targets come from an untouched copy (folded AdaRound weights change `model`)
    fp_model = replace(model, denoiser=copy.deepcopy(model.denoiser)) if cfg.method in RECONSTRUCTING else None
    specs = build_layer_specs(model.denoiser, recipe.quant)
    # the FP model's MACs (one denoiser call), before its layers are wrapped; rank 0 writes the manifest
    low_rank = {n: s.low_rank for n, s in specs.items() if s.low_rank}
    budget = bit_budget(specs, layer_macs(model, list(specs), low_rank)) if group.is_main else None
    if recipe.quant.split_shortcut:
        splits = shortcut_splits(model, data, settings.guidance)
        specs = {n: s.model_copy(update={"a_split": splits[n]}) if n in splits and s.a_bits else s
                 for n, s in specs.items()}
    quantize_denoiser(model.denoiser, specs, timesteps=data.ts.tolist())
    transforms = (apply_transforms(model, data, recipe.quant.smooth_alpha, settings.guidance, cfg.batch_size)
                  if any(s.transformed for s in specs.values()) else None)
    init_weights(model, recipe.quant.weight_init)
    omq = apply_omq(model, data, recipe) if cfg.mixed == "omq" else None
    total = data.xs.shape[0] * data.xs.shape[1]
    init_activations(model, data, recipe.quant.act_init, settings.guidance, cfg.batch_size,
                     cfg.max_values_per_step, cfg.seed,
                     progress=lambda n: progress("activation ranges", n, total), group=group)
    t_init = time.time() - t0
    t0 = time.time()
    recon = None
    if fp_model is not None:
        recon = _reconstruct(run, model, fp_model, data, cfg, settings.guidance, progress, group)
        del fp_model
    if not group.is_main:
        return None
    with torch.no_grad():
        run.save_tensors("quant_state.safetensors", quant_state(model.denoiser, fp_state))
    # reconstruction folded AdaRound's rounding into the float weights, and input transforms hold
    # transformed ones: measure against the FP weights
    fp_weights = ({n: fp_state[f"{n}.weight"] for n in specs if f"{n}.weight" in fp_state}
                  if recon is not None or transforms else None)
    errors = layer_output_errors(model, data, settings.guidance, cfg.batch_size, fp_weights)
    info = {
        "method": cfg.method,
        "bits": recipe.quant.bits,
        "layers": {n: s.model_dump() for n, s in specs.items()},
        "bit_budget": budget,
        "timesteps": data.ts.tolist(),
        "num_calibration_samples": cfg.num_samples,
        "layer_output_error": errors,
    }
    prompts = getattr(model.conditioner, "prompts", None)
    if prompts is not None:
        info["num_prompts"], info["prompts_sha256"] = len(prompts), prompts_digest(prompts)
    if representatives is not None:
        info["representative_indices"] = representatives
    if omq is not None:
        info["omq"] = omq
    if transforms:
        info["transforms"] = transforms
    timings = {"calibration_data_s": round(t_data, 3), "init_s": round(t_init, 3)}
    if recon is not None:
        info["reconstruction"] = recon
        timings["reconstruct_s"] = round(time.time() - t0, 3)
    return run.commit(["calib_data.safetensors", "quant_state.safetensors"], info=info, timings=timings)
