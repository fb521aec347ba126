"""The one data-free distillation loop that serves every finetuning method.

Per epoch: draw class labels and initial noise (seeded by (seed, epoch)), run the FP
teacher's DDIM trajectory; at every step the student sees the same x_t and takes one
optimizer step on its losses; the next x_t follows the teacher (EfficientDM §3.3), or with
`trajectory="student"` the student's own prediction, so it learns on the states it reaches
when it samples (the teacher's ε at those states is the target).
Checkpoints hold the trainable tensors, the optimizer state and the epoch reached;
everything random is derived from (seed, epoch), so a resumed run reaches exactly the
weights of an uninterrupted one.

Micro-batches (`micro_batch` rows; None = the whole batch): the epoch's global batch (labels,
and noise per global sample index) is cut into micro-batches by index, each with its own
trajectory state; at every step each micro-batch's loss, weighted by its share of the batch
(every loss is a mean over samples), is backpropagated on its own, and the step's gradient and
loss are the sum of the micro-batches' in index order (`ProcessGroup.ordered_sum`). Under
torchrun (`group`) each rank takes a contiguous share of whole micro-batches and the sum is
taken over all of them on every rank, in the same order: every rank takes the same optimizer
step, and 1, 2 or N processes give the same bits (a micro-batch's forward and backward are the
same operations on the same shapes whichever rank runs them).

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

from lowbitdm_cli.distributed import ProcessGroup, pack_grads, unpack_grads
from lowbitdm_cli.errors import NonFiniteError
from lowbitdm_cli.finetune.losses import relation_kl
from lowbitdm_cli.finetune.methods import TrainPlan
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.quantizer import UniformQuantizer
from lowbitdm_cli.sampling import ddim_step, ddim_timesteps, initial_noise, sample_generators

__all__ = ["DistillConfig", "checkpoint_blocks", "distill", "micro_batches", "optimizer_from_tensors",
           "optimizer_to_tensors"]

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
    micro_batch: int | None = None  # rows per forward/backward pass (divides batch_size); None = the whole batch
    history: list[float] = field(default_factory=list)


@dataclass
class _Micro:
    """One micro-batch's trajectory: its rows' conditions, noise generators, x_t and TRD features."""

    cond: torch.Tensor | None
    gens: list[torch.Generator]
    x: torch.Tensor
    past_t: deque[torch.Tensor]  # earlier steps' features (TRD time smoothing)
    past_s: deque[torch.Tensor]
    eps_next: torch.Tensor | None = None  # the ε that moves x on


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


def micro_batches(batch_size: int, micro_batch: int | None, processes: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per batch); an error unless every process gets one."""
    micro = micro_batch or batch_size
    if batch_size % micro:
        raise ValueError(f"finetune.micro_batch ({micro}) must divide finetune.batch_size ({batch_size})")
    if batch_size // micro < processes:
        raise ValueError(f"{processes} processes share out whole micro-batches: finetune.batch_size ({batch_size}) "
                         f"in micro-batches of finetune.micro_batch ({micro_batch or 'unset: the whole batch'}) "
                         f"gives {batch_size // micro}; set finetune.micro_batch to a divisor of batch_size of at "
                         f"most {batch_size // processes} (the result depends on micro_batch, not on the number "
                         f"of processes)")
    return micro, batch_size // micro


def distill(teacher: DiffusionModel, student: DiffusionModel, plan: TrainPlan, cfg: DistillConfig,
            opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, start_epoch: int,
            on_epoch_end: Callable[[int, list[float]], None],
            progress: Callable[[str, int, int], None] = lambda *_: None, group: ProcessGroup | None = None) -> None:
    """Run epochs `start_epoch`..`cfg.epochs`−1; `on_epoch_end(epoch, losses)` checkpoints."""
    group = group or ProcessGroup()
    micro, n_micro = micro_batches(cfg.batch_size, cfg.micro_batch, group.world_size)
    lo, hi = group.shard(n_micro)  # this rank's micro-batches
    if (teacher.num_classes, teacher.null_class, getattr(teacher.conditioner, "prompts", None)) != \
            (student.num_classes, student.null_class, getattr(student.conditioner, "prompts", None)):
        raise ValueError("teacher and student must share their conditions (classes / prompts)")
    if cfg.trajectory not in ("teacher", "student"):
        raise ValueError(f"trajectory must be 'teacher' or 'student', got {cfg.trajectory!r}")
    ts = ddim_timesteps(teacher.schedule.num_train_timesteps, cfg.steps)
    t_den, s_den = teacher.denoiser, student.denoiser
    t_mods = {n: m for n, m in t_den.named_modules() if n in plan.local_layers}
    s_mods = {n: m for n, m in s_den.named_modules() if n in plan.local_layers}
    if cfg.loss == "trd":
        t_mods["__trd__"], s_mods["__trd__"] = _feature_module(t_den), _feature_module(s_den)
    t_hooks, s_hooks = _Hooks(t_mods), _Hooks(s_mods)
    scaled = [(g["params"], g.get("grad_scale", 1.0)) for g in plan.groups if g.get("grad_scale", 1.0) != 1.0]
    trainable = plan.parameters()
    total = cfg.epochs * len(ts)
    device = teacher.device
    # training mode only where lowbitdm relies on it (LSQ's gradient scale, which counts the whole
    # batch's elements): the denoiser's own train-time randomness (DiT's class-label dropout) must
    # not reach the student
    s_den.eval()
    quantizers = [m for m in s_den.modules() if isinstance(m, UniformQuantizer)]
    for q in quantizers:
        q.train()
        q.lsq_batch_factor = n_micro
    try:
        for epoch in range(start_epoch, cfg.epochs):
            base = cfg.seed * 100_003 + epoch
            label_gen = torch.Generator().manual_seed(base)
            labels = (torch.randint(0, teacher.num_classes, (cfg.batch_size,), generator=label_gen)
                      if teacher.conditional else None)
            micros = []
            for k in range(lo, hi):
                rows = list(range(k * micro, (k + 1) * micro))
                gens = sample_generators(base, rows)
                micros.append(_Micro(cond=labels[rows[0]:rows[-1] + 1].to(device) if labels is not None else None,
                                     gens=gens,  # drawn on the CPU: the same on every device
                                     x=initial_noise(gens, teacher.sample_shape).to(device),
                                     past_t=deque(maxlen=cfg.trd_window - 1), past_s=deque(maxlen=cfg.trd_window - 1)))
            losses = []
            for step, t in enumerate(ts):
                parts = []
                for mb in micros:
                    loss = _micro_loss(teacher, student, plan, cfg, t, mb, t_hooks, s_hooks)
                    if n_micro > 1:
                        loss = loss * (micro / cfg.batch_size)  # its part of the batch mean
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    parts.append(pack_grads(trainable, [loss.detach()]))
                loss = unpack_grads(trainable, group.ordered_sum(parts, n_micro), 1)[0]
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"loss became {loss.item()} at epoch {epoch}, step {step} (t={t}): "
                                         f"lower the learning rate or check the calibration")
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
                    for mb in micros:
                        noise = initial_noise(mb.gens, teacher.sample_shape).to(device) if cfg.eta > 0 else None
                        mb.x = ddim_step(teacher.schedule, mb.x, mb.eps_next, t, t_prev, cfg.eta, noise).detach()
                progress("finetune", 1, total)
            on_epoch_end(epoch, losses)
    finally:
        t_hooks.close()
        s_hooks.close()
        for q in quantizers:
            q.lsq_batch_factor = 1
        s_den.eval()


def _micro_loss(teacher: DiffusionModel, student: DiffusionModel, plan: TrainPlan, cfg: DistillConfig, t: int,
                mb: _Micro, t_hooks: _Hooks, s_hooks: _Hooks) -> torch.Tensor:
    """The distillation loss of one micro-batch at timestep `t` (a mean over its rows); sets `mb.eps_next`."""
    with torch.no_grad(), _teacher_autocast(teacher.device, cfg.teacher_dtype):
        eps_t = teacher.eps(mb.x, t, mb.cond, cfg.guidance).float()
    eps_s = student.eps(mb.x, t, mb.cond, cfg.guidance)
    loss = cfg.global_weight * F.mse_loss(eps_s, eps_t)
    for name in plan.local_layers:
        loss = loss + cfg.local_weight * F.mse_loss(s_hooks.out[name], t_hooks.out[name].detach().float())
    if cfg.loss == "trd":
        t_feat, s_feat = t_hooks.out["__trd__"].detach().float(), s_hooks.out["__trd__"]
        # time smoothing: average over this and up to trd_window - 1 earlier steps (earlier
        # student features are constants: their graphs went with their own steps)
        t_avg = torch.stack([*mb.past_t, t_feat]).mean(0)
        s_avg = torch.stack([*mb.past_s, s_feat]).mean(0)
        loss = loss + cfg.trd_weight * relation_kl(s_avg, t_avg)
        if cfg.trd_window > 1:
            mb.past_t.append(t_feat)
            mb.past_s.append(s_feat.detach())
    mb.eps_next = eps_t if cfg.trajectory == "teacher" else eps_s.detach().float()
    return loss


def _teacher_autocast(device: torch.device | str, dtype: str | None):  # noqa: ANN202 - a context manager
    """Autocast to `dtype` ("bf16" / "fp16") on the teacher's device; a no-op context for None."""
    from contextlib import nullcontext

    if dtype is None:
        return nullcontext()
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher dtype must be one of {', '.join(TEACHER_DTYPES)}, got {dtype!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=TEACHER_DTYPES[dtype])
