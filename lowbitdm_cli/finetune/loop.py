"""The one data-free distillation loop that serves every finetuning method.

Per epoch: draw class labels and initial noise (seeded by (seed, epoch)), run the FP
teacher's DDIM trajectory; at every step the student sees the same x_t and takes one
optimizer step on its losses; the next x_t follows the teacher (EfficientDM §3.3), or with
`trajectory="student"` the student's own prediction, so it learns on the states it reaches
when it samples (the teacher's ε at those states is the target).
Checkpoints hold the trainable tensors, the optimizer state and the epoch reached;
everything random is derived from (seed, epoch), so a resumed run reaches exactly the
weights of an uninterrupted one.

Data parallel under torchrun (`group`): the epoch's global batch is drawn as in one process
(labels, and noise per global sample index); each rank runs the teacher trajectory and the
student on its contiguous share of the rows, weights its losses by its share of the batch
(every loss is a mean over samples), and one all-reduce per step sums the gradients and the
loss. Every rank then takes the same optimizer step, so the result is one process's with the
same global batch, up to float summation order.

Memory: `teacher_dtype` ("bf16" / "fp16") runs the frozen teacher under autocast (its outputs
are used in float32); `checkpoint_blocks` makes the student recompute its blocks' activations
in the backward pass instead of keeping them.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.distributed import ProcessGroup
from lowbitdm_cli.errors import NonFiniteError
from lowbitdm_cli.finetune.losses import relation_kl
from lowbitdm_cli.finetune.methods import TrainPlan
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.quantizer import UniformQuantizer
from lowbitdm_cli.sampling import ddim_step, ddim_timesteps, initial_noise, sample_generators

__all__ = ["DistillConfig", "checkpoint_blocks", "distill", "optimizer_from_tensors", "optimizer_to_tensors"]

TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistillConfig:
    epochs: int
    batch_size: int
    steps: int
    eta: float
    guidance: float
    seed: int
    trajectory: str = "teacher"  # whose ε moves x_t on: "teacher" (EfficientDM) or "student"
    loss: str = "mse"  # "mse" or "trd"
    trd_weight: float = 100.0
    trd_window: int = 2
    local_weight: float = 1.0
    global_weight: float = 1.0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 1  # epochs
    teacher_dtype: str | None = None  # None (float32), "bf16" or "fp16": autocast for the frozen teacher
    history: list[float] = field(default_factory=list)


class _Hooks:
    """Captures module outputs by name (teacher and student side)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._make(n)) for n, m in modules.items()]

    def _make(self, name: str) -> Callable:
        def hook(_m: nn.Module, _inp: tuple, output: torch.Tensor) -> None:
            self.out[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _feature_module(den: nn.Module) -> nn.Module:
    """MPQ-DM's TRD hooks the output of the UNet's last up-block (a transformer's last block)."""
    blocks = getattr(den, "up_blocks", None) or getattr(den, "transformer_blocks", None)
    if not blocks:
        raise ValueError(f"TRD needs a UNet with up_blocks or a transformer with transformer_blocks, "
                         f"not {type(den).__name__}")
    return blocks[-1]


def checkpoint_blocks(den: nn.Module) -> int:
    """Activation checkpointing for `den`'s blocks (UNet down/mid/up blocks, transformer blocks):
    while gradients are on, each block keeps only its inputs and recomputes its activations in
    the backward pass (torch.utils.checkpoint, non-reentrant). Returns the number of blocks.

    The recomputation runs the same operations on the same inputs, so gradients are unchanged."""
    from torch.utils.checkpoint import checkpoint

    blocks = [*getattr(den, "down_blocks", []), *([den.mid_block] if getattr(den, "mid_block", None) else []),
              *getattr(den, "up_blocks", []), *getattr(den, "transformer_blocks", [])]
    if not blocks:
        raise ValueError(f"activation checkpointing needs a UNet (down/mid/up blocks) or a transformer "
                         f"(transformer_blocks), not {type(den).__name__}")
    for block in blocks:
        if getattr(block, "_lowbitdm_checkpointed", False):
            continue
        forward = block.forward

        def wrapped(*args, _forward=forward, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = wrapped
        block._lowbitdm_checkpointed = True
    return len(blocks)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Optimizer state as flat tensors plus JSON for the scalars (safetensors holds no pickles)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, json.dumps({"scalars": scalars, "param_groups": groups})


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: str) -> None:
    info = json.loads(meta)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in info["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def make_optimizer(plan: TrainPlan, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear learning-rate decay to zero (EfficientDM's schedule)."""
    groups = [{"params": g["params"], "lr": g["lr"]} for g in plan.groups]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / max(total_steps, 1)))
    return opt, sched


def distill(teacher: DiffusionModel, student: DiffusionModel, plan: TrainPlan, cfg: DistillConfig,
            opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, start_epoch: int,
            on_epoch_end: Callable[[int, list[float]], None],
            progress: Callable[[str, int, int], None] = lambda *_: None, group: ProcessGroup | None = None) -> None:
    """Run epochs `start_epoch`..`cfg.epochs`−1; `on_epoch_end(epoch, losses)` checkpoints."""
    group = group or ProcessGroup()
    lo, hi = group.shard(cfg.batch_size)
    if hi == lo:
        raise ValueError(f"finetune.batch_size ({cfg.batch_size}) must be at least the number of processes "
                         f"({group.world_size})")
    share = (hi - lo) / cfg.batch_size
    if (teacher.num_classes, teacher.null_class, getattr(teacher.conditioner, "prompts", None)) != \
            (student.num_classes, student.null_class, getattr(student.conditioner, "prompts", None)):
        raise ValueError("teacher and student must share their conditions (classes / prompts)")
    ts = ddim_timesteps(teacher.schedule.num_train_timesteps, cfg.steps)
    t_den, s_den = teacher.denoiser, student.denoiser
    t_mods = {n: m for n, m in t_den.named_modules() if n in plan.local_layers}
    s_mods = {n: m for n, m in s_den.named_modules() if n in plan.local_layers}
    if cfg.trajectory not in ("teacher", "student"):
        raise ValueError(f"trajectory must be 'teacher' or 'student', got {cfg.trajectory!r}")
    if cfg.loss == "trd":
        t_mods["__trd__"], s_mods["__trd__"] = _feature_module(t_den), _feature_module(s_den)
    t_hooks, s_hooks = _Hooks(t_mods), _Hooks(s_mods)
    scaled = [(g["params"], g.get("grad_scale", 1.0)) for g in plan.groups if g.get("grad_scale", 1.0) != 1.0]
    trainable = plan.parameters()
    total = cfg.epochs * len(ts)
    device = teacher.device
    # training mode only where lowbitdm relies on it (LSQ's gradient scale): the denoiser's own
    # train-time randomness (DiT's class-label dropout) must not reach the student
    s_den.eval()
    for m in s_den.modules():
        if isinstance(m, UniformQuantizer):
            m.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            base = cfg.seed * 100_003 + epoch
            label_gen = torch.Generator().manual_seed(base)
            cond = (torch.randint(0, teacher.num_classes, (cfg.batch_size,), generator=label_gen)[lo:hi].to(device)
                    if teacher.conditional else None)
            gens = sample_generators(base, list(range(lo, hi)))  # this rank's rows of the global batch
            x = initial_noise(gens, teacher.sample_shape).to(device)  # drawn on the CPU: the same on every device
            past_t: deque[torch.Tensor] = deque(maxlen=cfg.trd_window - 1)  # earlier steps' features
            past_s: deque[torch.Tensor] = deque(maxlen=cfg.trd_window - 1)
            losses = []
            for step, t in enumerate(ts):
                with torch.no_grad(), _teacher_autocast(device, cfg.teacher_dtype):
                    eps_t = teacher.eps(x, t, cond, cfg.guidance).float()
                eps_s = student.eps(x, t, cond, cfg.guidance)
                loss = cfg.global_weight * F.mse_loss(eps_s, eps_t)
                for name in plan.local_layers:
                    loss = loss + cfg.local_weight * F.mse_loss(s_hooks.out[name],
                                                                t_hooks.out[name].detach().float())
                if cfg.loss == "trd":
                    t_feat, s_feat = t_hooks.out["__trd__"].detach().float(), s_hooks.out["__trd__"]
                    # time smoothing: average over this and up to trd_window - 1 earlier steps (earlier
                    # student features are constants: their graphs went with their own steps)
                    t_avg = torch.stack([*past_t, t_feat]).mean(0)
                    s_avg = torch.stack([*past_s, s_feat]).mean(0)
                    loss = loss + cfg.trd_weight * relation_kl(s_avg, t_avg)
                    if cfg.trd_window > 1:
                        past_t.append(t_feat)
                        past_s.append(s_feat.detach())
                if group.world_size > 1:
                    loss = loss * share  # this rank's part of the batch mean
                opt.zero_grad(set_to_none=True)
                if group.world_size > 1:  # backward first: the loss is known only once summed over ranks
                    loss.backward()
                    total_loss = loss.detach().reshape(1).clone()
                    group.sync_grads(trainable, [total_loss])
                    loss = total_loss[0]
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"loss became {loss.item()} at epoch {epoch}, step {step} (t={t}): "
                                         f"lower the learning rate or check the calibration")
                if group.world_size == 1:
                    loss.backward()
                for params, scale in scaled:
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(scale)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
                t_prev = ts[step + 1] if step + 1 < len(ts) else -1
                if t_prev >= 0:
                    noise = initial_noise(gens, teacher.sample_shape).to(device) if cfg.eta > 0 else None
                    eps_next = eps_t if cfg.trajectory == "teacher" else eps_s.detach().float()
                    x = ddim_step(teacher.schedule, x, eps_next, t, t_prev, cfg.eta, noise).detach()
                progress("finetune", 1, total)
            on_epoch_end(epoch, losses)
    finally:
        t_hooks.close()
        s_hooks.close()
        s_den.eval()


def _teacher_autocast(device: torch.device | str, dtype: str | None):  # noqa: ANN202 - a context manager
    """Autocast to `dtype` ("bf16" / "fp16") on the teacher's device; a no-op context for None."""
    from contextlib import nullcontext

    if dtype is None:
        return nullcontext()
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=TEACHER_DTYPES[dtype])
