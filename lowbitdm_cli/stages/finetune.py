"""Stage `finetune`: calibrated model → finetuned model, by data-free distillation from FP.

The method (`none`, `qalora`, `quest`, `qat`) only chooses what trains, at which learning
rate, under which losses; one loop (`finetune.loop.distill`) runs them all. Checkpoints
every `checkpoint_every` epochs land in the partial folder, and `--resume` continues to
the same final weights as an uninterrupted run. `none` is an explicit pass-through that
still writes a proper artifact.

Under `torchrun` the ranks share out each global batch's micro-batches (data parallel, gradients
summed in micro-batch order: the same bits for any process count, see `finetune.loop`) and rank 0
writes checkpoints and the artifact; `--resume` continues with any number of processes (a
checkpoint holds the global state).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowbitdm_cli.artifacts import Artifact, StageRun
from lowbitdm_cli.distributed import ProcessGroup, rank_device
from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.finetune.loop import (
    TEACHER_DTYPES,
    DistillConfig,
    checkpoint_blocks,
    distill,
    make_optimizer,
    micro_batches,
    optimizer_from_tensors,
    optimizer_to_tensors,
)
from lowbitdm_cli.finetune.methods import plan_method
from lowbitdm_cli.models.registry import sampler_defaults
from lowbitdm_cli.quant.model import quant_state
from lowbitdm_cli.recipes import Recipe
from lowbitdm_cli.stages.common import (
    check_model,
    device_options,
    load_fp_model,
    load_quantized_from,
    prompt_options,
    run_on_ranks,
    work_device,
)

__all__ = ["finetune"]

CHECKPOINT = "checkpoint.safetensors"
OPTIMIZER = "optimizer.safetensors"


def finetune(parent: Artifact, recipe: Recipe, out: Path, resume: bool = False, force: bool = False,
             replace_stale: bool = False, progress: Callable[[str, int, int], None] = lambda *_: None,
             device: str = "cpu", grad_checkpoint: bool = False, teacher_dtype: str | None = None) -> Artifact:
    """Finetune the quantized model of `parent` with `recipe.finetune`; write the artifact to `out`.

    `device` is where teacher and student run (``cuda``/``cuda:N``; under torchrun ``cuda`` is
    each rank's own GPU); checkpoints and the artifact are written from the CPU copies of the
    tensors. `grad_checkpoint` recomputes the student's block activations in the backward pass
    (less memory, same result); `teacher_dtype` ("bf16"/"fp16") runs the frozen teacher under
    autocast (less memory and time on a GPU; it changes the result, so it is an input of the stage).
    """
    recipe = recipe.resolved(sampler_defaults(parent.manifest.model.name))
    cfg = recipe.finetune
    device = work_device(device)
    if teacher_dtype is not None and teacher_dtype not in TEACHER_DTYPES:
        raise RecipeError(f"--teacher-dtype must be one of {', '.join(TEACHER_DTYPES)}, got {teacher_dtype!r}")
    options = {**prompt_options(recipe), **device_options(device),
               **({"teacher_dtype": teacher_dtype} if teacher_dtype else {})}
    def work(group: ProcessGroup, run: StageRun, shared: dict) -> Artifact | None:
        if cfg.method != "none":
            try:
                micro_batches(cfg.batch_size, cfg.micro_batch, group.world_size)
            except ValueError as e:
                raise RecipeError(str(e)) from None
        return _finetune(run, parent, recipe, shared["checkpoint"], group, rank_device(device, group),
                         progress if group.is_main else (lambda *_: None), grad_checkpoint, teacher_dtype)

    return run_on_ranks(
        out, device,
        lambda: StageRun.start(out, "finetune", parent.manifest.model, recipe.model_dump(mode="json"), parent=parent,
                               options=options, resume=resume, force=force, replace_stale=replace_stale),
        lambda run: {"checkpoint": run.has(CHECKPOINT)}, work)


def _finetune(run: StageRun, parent: Artifact, recipe: Recipe, from_checkpoint: bool, group: ProcessGroup,
              device: str, progress: Callable[[str, int, int], None], grad_checkpoint: bool,
              teacher_dtype: str | None) -> Artifact | None:
    """The stage's work on one rank (every rank of a torchrun job; rank 0 returns the artifact)."""
    cfg = recipe.finetune
    teacher = load_fp_model(parent.manifest.model.name, recipe)
    check_model(parent, teacher)
    student = load_quantized_from(parent)
    student = student.with_conditioner(teacher.conditioner)  # one frozen FP conditioner, this stage's prompts
    teacher.to(device)
    student.denoiser.to(device)  # its conditioner is the teacher's, already moved
    fp_state = {k: v.clone() for k, v in teacher.denoiser.state_dict().items()}
    plan = plan_method(cfg, student.denoiser, cfg.seed)
    if grad_checkpoint and plan.groups:
        checkpoint_blocks(student.denoiser)
    history: list[float] = []
    step_losses: list[float] = []
    t0 = time.time()
    if plan.groups:
        dc = DistillConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, steps=cfg.steps or recipe.sample.steps,
                           eta=cfg.eta, trajectory=cfg.trajectory,
                           guidance=cfg.guidance if cfg.guidance is not None else recipe.sample.guidance,
                           seed=cfg.seed, loss=cfg.loss, trd_weight=cfg.trd_weight, trd_window=cfg.trd_window,
                           local_weight=1.0 if cfg.method == "quest" else 0.0,
                           global_weight=2.0 if cfg.method == "quest" else 1.0,
                           grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
                           teacher_dtype=teacher_dtype, micro_batch=cfg.micro_batch)
        opt, sched = make_optimizer(plan, dc.epochs * dc.steps)
        start = 0
        if from_checkpoint:
            state = run.load_tensors(CHECKPOINT)
            student.denoiser.load_state_dict(state, strict=False)
            meta = json.loads(run.path("checkpoint.json").read_text())
            optimizer_from_tensors(opt, run.load_tensors(OPTIMIZER), meta["optimizer"])
            start, history, step_losses = meta["epoch"] + 1, meta["history"], meta["step_losses"]
            # the restored param groups already carry the decayed learning rates of that position
            sched.last_epoch = start * dc.steps

        def on_epoch_end(epoch: int, losses: list[float]) -> None:
            history.append(sum(losses) / len(losses))
            step_losses.extend(losses)
            if group.is_main and ((epoch + 1) % dc.checkpoint_every == 0 or epoch + 1 == dc.epochs):
                trainable = {n: p.detach() for n, p in student.denoiser.named_parameters() if p.requires_grad}
                run.save_tensors(CHECKPOINT, trainable)
                opt_t, opt_meta = optimizer_to_tensors(opt)
                run.save_tensors(OPTIMIZER, opt_t)
                run.save_bytes("checkpoint.json", json.dumps({"epoch": epoch, "history": history,
                                                              "step_losses": step_losses,
                                                              "optimizer": opt_meta}).encode())
                run.checkpoint(epochs_done=epoch + 1)

        distill(teacher, student, plan, dc, opt, sched, start, on_epoch_end, progress, group=group)
    if not group.is_main:
        return None
    with torch.no_grad():
        run.save_tensors("quant_state.safetensors", quant_state(student.denoiser, fp_state))
    files = ["quant_state.safetensors"]
    if step_losses:
        # the loss of every optimizer step (the report's loss curve); per-epoch means are in info
        run.save_tensors("loss_curve.safetensors", {"step_loss": torch.tensor(step_losses, dtype=torch.float64)})
        files.append("loss_curve.safetensors")
    info = {"method": cfg.method, "loss": cfg.loss, **plan.info, "loss_history": history,
            "epochs": cfg.epochs if plan.groups else 0}
    if group.world_size > 1:
        info["processes"] = group.world_size
    if teacher_dtype:
        info["teacher_dtype"] = teacher_dtype
    return run.commit(files, info=info,
                      timings={"train_s": round(time.time() - t0, 3)},
                      metrics={"final_loss": history[-1]} if history else None)
