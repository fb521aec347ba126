"""BRECQ-style block reconstruction: Q-Diffusion (arXiv 2302.04304) and PQD (arXiv 2501.00124).

Blocks, in forward order, are the outermost diffusers `ResnetBlock2D`, `Attention`,
`Downsample2D`, `Upsample2D` or `BasicTransformerBlock` modules that hold quantized
layers, plus every quantized layer outside them (conv_in, conv_out, the time-embedding
linears) as a block of its own. For each block in turn:

1. run the calibration data (``model.eps`` per stored step batch, so both CFG branches
   and each temporal quantizer's timestep are covered) through an untouched FP copy of
   the model and keep the block's output (the target), then through the quantized model,
   earlier blocks already reconstructed, and keep the block's inputs (args and kwargs); a
   seeded subsample of at most `recon_samples` rows is kept. The target must come from
   the copy: the quantized model's earlier blocks hold folded AdaRound weights, so
   switching its quantizers off does not give the FP model back;
2. attach AdaRound (`quant.adaround`) to its weight quantizers and optimise, with Adam,
   the rounding variables V (lr `recon_lr`) and its activation steps Δ (LSQ, lr
   `recon_act_lr`) on random mini-batches to minimise the output error
   ‖f_q(x_q) − f_fp(x_fp)‖² (summed over channels, averaged over rows and positions, as
   BRECQ) + `recon_reg_weight` · Σ 1 − |2h(V) − 1|^β, the regulariser off for the first
   20 % of iterations, then β annealed 20 → 2;
3. fold the hard rounding into the float weights (`detach_adaround`).

QDrop (PQD): with `qdrop_prob` p > 0, during the optimisation each activation
quantizer's output is replaced element-wise by its float input with probability p.

Every random draw of block `index` comes from generators seeded by (seed, index), so a
run resumed from per-block checkpoints gives bit-identical results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbitdm_cli.calibration.data import CalibrationData
from lowbitdm_cli.distributed import ProcessGroup, pack_grads, unpack_grads
from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.models.wrapper import DiffusionModel, set_timestep
from lowbitdm_cli.quant.adaround import attach_adaround, beta_schedule, detach_adaround
from lowbitdm_cli.quant.attention import QuantAttnProcessor
from lowbitdm_cli.quant.layers import QuantLayerMixin, quant_layers
from lowbitdm_cli.quant.model import act_quantizers
from lowbitdm_cli.recipes import CalibrateSection

__all__ = ["BLOCK_TYPES", "Block", "block_generator", "block_state", "find_blocks", "plan_blocks",
           "qdrop", "reconstruct_block", "shortcut_splits"]

BLOCK_TYPES = ("ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D", "BasicTransformerBlock")
"""diffusers class names that form one reconstruction block (the outermost one wins)."""


@dataclass
class Block:
    """A reconstruction unit: `module` (named `name` in the denoiser) and its quantized layers."""

    name: str
    module: nn.Module
    layers: dict[str, QuantLayerMixin] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass once the block was seen."""


def block_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, block index) only, so resuming at any block repeats its draws."""
    digest = hashlib.sha256(f"lowbitdm-recon/{seed}/{index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def find_blocks(denoiser: nn.Module) -> list[Block]:
    """Blocks in module-registration order (see the module docstring); `plan_blocks` orders them."""
    layers = quant_layers(denoiser)
    blocks: list[Block] = []
    owner: dict[str, Block] = {}
    for name, module in denoiser.named_modules():
        if type(module).__name__ not in BLOCK_TYPES or any(name.startswith(b.name + ".") for b in blocks):
            continue
        inside = {n: m for n, m in layers.items() if n.startswith(name + ".")}
        if inside:
            block = Block(name, module, inside)
            blocks.append(block)
            owner.update(dict.fromkeys(inside, block))
    blocks += [Block(n, m, {n: m}) for n, m in layers.items() if n not in owner]
    return blocks


def _call(model: DiffusionModel, x: torch.Tensor, t: int, cond: torch.Tensor | None, guidance: float) -> None:
    try:
        model.eps(x, t, cond, guidance)
    except _Stop:
        pass


def _call_hooked(model: DiffusionModel, handle: Any, x: torch.Tensor, t: int, cond: torch.Tensor | None,
                 guidance: float) -> None:
    """`_call` with a hook that was just registered, removed afterwards whatever happens."""
    try:
        _call(model, x, t, cond, guidance)
    finally:
        handle.remove()


@torch.no_grad()
def plan_blocks(model: DiffusionModel, data: CalibrationData, guidance: float) -> tuple[list[Block], int]:
    """(blocks in the order the forward pass first calls them, denoiser rows per calibration sample).

    One probe forward on one calibration sample; rows per sample are 2 under CFG, else 1.
    Blocks the forward never calls are left out.
    """
    blocks = find_blocks(model.denoiser)
    order: list[int] = []
    rows: list[int] = []

    def seen(i: int) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if i not in order:
                order.append(i)
                first = next(iter(args), None)
                first = first if isinstance(first, torch.Tensor) else next(
                    v for v in kwargs.values() if isinstance(v, torch.Tensor))
                rows.append(first.shape[0])
        return hook

    handles = [b.module.register_forward_pre_hook(seen(i), with_kwargs=True) for i, b in enumerate(blocks)]
    _probe_forward(model, data, guidance, handles)
    return [blocks[i] for i in order], max(rows, default=1)


@torch.no_grad()
def shortcut_splits(model: DiffusionModel, data: CalibrationData, guidance: float) -> dict[str, int]:
    """Q-Diffusion shortcut splitting: {conv_shortcut name: channels before the concatenated skip}.

    In a diffusers up-block, resnet i sees ``cat([h, skips[-1 - i]], dim=1)``; one probe
    forward reads the skip widths from each up-block's `res_hidden_states_tuple`.
    """
    found: dict[str, int] = {}
    handles = []
    for name, module in model.denoiser.named_modules():
        if not (name.startswith("up_blocks.") and name.count(".") == 1 and hasattr(module, "resnets")):
            continue

        def hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name, module: nn.Module = module) -> None:
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if skips is None:
                return
            for i, resnet in enumerate(module.resnets):
                shortcut = getattr(resnet, "conv_shortcut", None)
                if shortcut is None or i >= len(skips):
                    continue
                split = shortcut.in_channels - skips[-1 - i].shape[1]
                if 0 < split < shortcut.in_channels:
                    found[f"{name}.resnets.{i}.conv_shortcut"] = split
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    _probe_forward(model, data, guidance, handles)
    return found


# --- captured block data ----------------------------------------------------------------------
@dataclass
class _Captured:
    """Block inputs and FP targets, row-aligned. Row tensors are concatenated over calls;
    other arguments (None, flags, tensors without the batch dimension) are kept from the first call."""

    args: list[Any]
    kwargs: dict[str, Any]
    row_args: list[int]
    row_kwargs: list[str]
    ts: torch.Tensor
    target: torch.Tensor

    def rows(self, idx: torch.Tensor) -> tuple[list[Any], dict[str, Any]]:
        args = [a[idx] if i in self.row_args else a for i, a in enumerate(self.args)]
        kwargs = {k: v[idx] if k in self.row_kwargs else v for k, v in self.kwargs.items()}
        return args, kwargs


def _row_split(args: tuple, kwargs: dict) -> tuple[int, list[int], list[str]]:
    first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if first is None:
        raise ValueError("block called without any tensor input")
    n = first.shape[0]
    row_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == n]
    row_kwargs = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n]
    return n, row_args, row_kwargs


@torch.no_grad()
def _capture(model: DiffusionModel, fp_model: DiffusionModel, data: CalibrationData, block: Block,
             guidance: float, batch_size: int, num_samples: int, gen: torch.Generator,
             group: ProcessGroup | None = None) -> _Captured:
    """Block inputs from the quantized `model` and the block's outputs from `fp_model` (the
    unquantized original, same module names) on the same `num_samples` (step, sample) pairs,
    drawn with `gen`. Under torchrun each rank runs every world_size-th forward call and the
    captures are gathered in call order: every rank ends with the same rows as one process."""
    group = group or ProcessGroup()
    num_steps, n = data.xs.shape[0], data.xs.shape[1]
    pairs = torch.randperm(num_steps * n, generator=gen)[:num_samples].sort().values
    inputs: list[tuple[tuple, dict]] = []
    outputs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []

    def grab_input(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                       {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        raise _Stop

    def grab_output(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"block {block.name} returns {type(out).__name__}; reconstruction needs a tensor")
        outputs.append(out.detach().clone())
        raise _Stop

    fp_block = fp_model.denoiser.get_submodule(block.name)
    calls = []
    for s in range(num_steps):
        idx = pairs[(pairs // n) == s] % n
        calls += [(s, idx[i:i + batch_size]) for i in range(0, idx.numel(), batch_size)]
    for s, sel in group.split(calls):
        t = int(data.ts[s])
        x = data.xs[s, sel].to(model.device)
        cond = data.conds[sel].to(model.device) if data.conds is not None else None
        _call_hooked(fp_model, fp_block.register_forward_hook(grab_output, with_kwargs=True),
                     x, t, cond, guidance)
        _call_hooked(model, block.module.register_forward_pre_hook(grab_input, with_kwargs=True),
                     x, t, cond, guidance)
        ts.append(torch.full((outputs[-1].shape[0],), t, dtype=torch.long))
    if group.world_size > 1:  # call k ran on rank k % world_size: interleave the ranks' captures back
        cpu = [(_to(i, "cpu"), o.cpu(), t) for i, o, t in zip(inputs, outputs, ts)]
        mine = group.all_gather(cpu)
        ordered = [mine[k % group.world_size][k // group.world_size] for k in range(len(calls))]
        inputs = [_to(i, model.device) for i, _, _ in ordered]
        outputs = [o.to(model.device) for _, o, _ in ordered]
        ts = [t for _, _, t in ordered]
    if len(inputs) != len(outputs) or not inputs:
        raise RuntimeError(f"block {block.name} was not reached by the calibration forward pass")
    _, row_args, row_kwargs = _row_split(*inputs[0])
    args = [torch.cat([c[0][i] for c in inputs]) if i in row_args else a for i, a in enumerate(inputs[0][0])]
    kwargs = {k: torch.cat([c[1][k] for c in inputs]) if k in row_kwargs else v for k, v in inputs[0][1].items()}
    return _Captured(args, kwargs, row_args, row_kwargs, torch.cat(ts), torch.cat(outputs))


def _to(captured: tuple[tuple, dict], device: torch.device | str) -> tuple[tuple, dict]:
    args, kwargs = captured
    return (tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args),
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


# --- optimisation -----------------------------------------------------------------------------
@dataclass
class RowShare:
    """Rows [lo, hi) of a mini-batch of `total` rows that this rank computes (all of them in one process)."""

    total: int = 0
    lo: int = 0
    hi: int = 0


def qdrop(quantizers: list[nn.Module], prob: float, gen: torch.Generator, share: RowShare | None = None
          ) -> list[Any]:
    """QDrop: each quantizer's output is replaced by its input element-wise with probability `prob`.

    Returns the hook handles (call ``.remove()`` on each to stop). Masks come from `gen`
    in call order, so a run is deterministic given the generator's seed. With a `share`
    (data parallel), each mask is drawn for the whole mini-batch and this rank's rows are
    cut from it, so every rank's generator stays in step and the masks are one process's.
    """

    def hook(_q: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if share is None or share.hi - share.lo == share.total:
            keep_fp = torch.rand(out.shape, generator=gen, device=gen.device) < prob
        else:  # out holds k rows per mini-batch row, batch-major (attention heads: [B·heads, ...])
            k = out.shape[0] // (share.hi - share.lo)
            full = torch.rand((share.total * k, *out.shape[1:]), generator=gen, device=gen.device)
            keep_fp = full[share.lo * k:share.hi * k] < prob
        return torch.where(keep_fp.to(out.device), args[0], out)

    return [q.register_forward_hook(hook) for q in quantizers]


def _forward(block: Block, cap: _Captured, idx: torch.Tensor) -> torch.Tensor:
    args, kwargs = cap.rows(idx)
    return block.module(*args, **kwargs)


def _draw(cap: _Captured, batch_size: int, per_timestep: bool, gen: torch.Generator) -> torch.Tensor:
    """Row indices of one mini-batch; all of one timestep when the block has temporal quantizers."""
    total = cap.ts.numel()
    if not per_timestep:
        return torch.randperm(total, generator=gen)[:batch_size]
    t = cap.ts[int(torch.randint(total, (1,), generator=gen))]
    rows = (cap.ts == t).nonzero().flatten()
    return rows[torch.randperm(rows.numel(), generator=gen)[:batch_size]]


@torch.no_grad()
def _mse(block: Block, cap: _Captured, batch_size: int) -> float:
    """Mean squared error of the block's output against the FP target over all captured rows."""
    total, count = 0.0, 0
    for t in cap.ts.unique().tolist():
        rows = (cap.ts == t).nonzero().flatten()
        set_timestep(block.module, int(t))
        for i in range(0, rows.numel(), batch_size):
            idx = rows[i:i + batch_size]
            diff = _forward(block, cap, idx) - cap.target[idx]
            total += float(diff.double().pow(2).sum())
            count += diff.numel()
    return total / max(count, 1)


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's output loss: squared error summed over channels (dim 1), averaged over the rest."""
    err = (out - target).pow(2)
    return err.sum(1).mean() if err.ndim > 1 else err.mean()


def reconstruct_block(model: DiffusionModel, fp_model: DiffusionModel, data: CalibrationData, block: Block,
                      index: int, cfg: CalibrateSection, guidance: float, rows_per_sample: int = 1,
                      progress: Callable[[int, int], None] | None = None,
                      group: ProcessGroup | None = None) -> dict[str, Any]:
    """Reconstruct `block` (the `index`-th) of `model` in place, against the outputs of the
    same block in `fp_model` (the unquantized original); returns its record.

    Record: ``{"mse_before": …, "mse_after": …, "rows": …, "layers": [...]}``, the MSEs
    of the block output against the FP target on the captured rows, before (PTQ start,
    round-to-nearest) and after (hard AdaRound folded, learned Δ, no QDrop).
    `progress(advance, total)` is called once per iteration. Captures run
    ``recon_batch_size // rows_per_sample`` calibration samples per forward call.

    Under torchrun (`group`) the capture's forward calls are split across ranks, and each
    mini-batch too. With `cfg.recon_micro_batch` set, the mini-batch is cut into micro-batches of
    that many rows whose gradients are summed in index order on every rank (`_ordered_grads`):
    the same bits for any process count. Unset, every rank computes the loss on its contiguous
    share of the rows, weighted by its share, and one all-reduce sums the gradients (the
    regulariser counts on rank 0): one process's result up to float summation order.
    """
    group = group or ProcessGroup()
    gen = block_generator(cfg.seed, index)
    num_samples = max(1, cfg.recon_samples // max(rows_per_sample, 1))
    per_call = max(1, cfg.recon_batch_size // max(rows_per_sample, 1))
    cap = _capture(model, fp_model, data, block, guidance, per_call, num_samples, gen, group)
    layers = block.layers
    act_qs = [q for q in act_quantizers(block.module) if q.enabled]  # layers' inputs and attention matmuls
    per_timestep = any(q.temporal for q in act_qs)
    before = _mse(block, cap, cfg.recon_batch_size)

    adas = {}
    handles: list[Any] = []
    was_training = block.module.training
    learned = [q for q in act_qs if not q.dynamic]  # per-token quantizers have no step to learn
    grads = [(q.delta, q.delta.requires_grad) for q in learned]
    finished = False
    try:
        for name, layer in layers.items():
            if layer.w_quant is not None and layer.w_quant.enabled:
                adas[name] = attach_adaround(layer)
        groups = []
        if adas:
            groups.append({"params": [a.alpha for a in adas.values()], "lr": cfg.recon_lr})
        if learned and cfg.recon_act_lr > 0:
            for q in learned:
                q.delta.requires_grad_(True)
            groups.append({"params": [q.delta for q in learned], "lr": cfg.recon_act_lr})
        share = RowShare()
        qdrop_gen = block_generator(cfg.seed, index, model.device) if cfg.qdrop_prob > 0 else None
        if qdrop_gen is not None:
            handles = qdrop(act_qs, cfg.qdrop_prob, qdrop_gen, share)
        block.module.train()
        opt = torch.optim.Adam(groups) if groups else None
        params = [p for g in groups for p in g["params"]]
        for it in range(cfg.recon_iters if opt is not None else 0):
            idx = _draw(cap, cfg.recon_batch_size, per_timestep, gen)
            set_timestep(block.module, int(cap.ts[idx[0]]))
            beta = beta_schedule(it, cfg.recon_iters)
            if cfg.recon_micro_batch is not None:
                _ordered_grads(block, cap, idx, cfg.recon_micro_batch, params, share, qdrop_gen, group)
                if beta is not None and cfg.recon_reg_weight > 0 and adas:  # the same on every rank, added last
                    (cfg.recon_reg_weight * sum(a.regularizer(beta) for a in adas.values())).backward()
                opt.step()
                if progress is not None:
                    progress(1, cfg.recon_iters)
                continue
            share.total = idx.numel()
            share.lo, share.hi = group.shard(idx.numel())
            if share.hi == share.lo and cfg.qdrop_prob > 0:
                raise RecipeError(f"block {block.name}: a mini-batch of {idx.numel()} rows cannot be split over "
                                  f"{group.world_size} processes with QDrop: raise calibrate.recon_batch_size "
                                  f"or calibrate.recon_samples, or use fewer processes")
            loss = torch.zeros((), device=model.device)
            if share.hi > share.lo:
                mine = idx[share.lo:share.hi]
                loss = _rec_loss(_forward(block, cap, mine), cap.target[mine])
                if group.world_size > 1:  # this rank's part of the mini-batch mean
                    loss = loss * ((share.hi - share.lo) / share.total)
            if beta is not None and cfg.recon_reg_weight > 0 and adas and group.is_main:
                loss = loss + cfg.recon_reg_weight * sum(a.regularizer(beta) for a in adas.values())
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            group.sync_grads(params)
            opt.step()
            if progress is not None:
                progress(1, cfg.recon_iters)
        finished = True
    finally:
        for h in handles:
            h.remove()
        for p, flag in grads:
            p.requires_grad_(flag)
        block.module.train(was_training)
        for name in adas:  # an interrupted block keeps its PTQ weights
            detach_adaround(layers[name], fold=finished)
    return {"mse_before": before, "mse_after": _mse(block, cap, cfg.recon_batch_size),
            "rows": int(cap.ts.numel()), "layers": sorted(layers)}


def _ordered_grads(block: Block, cap: _Captured, idx: torch.Tensor, micro: int, params: list[torch.Tensor],
                   share: RowShare, qdrop_gen: torch.Generator | None, group: ProcessGroup) -> None:
    """The gradients of one mini-batch's loss, its micro-batches of `micro` rows summed in index
    order (`ProcessGroup.ordered_sum`): each rank backpropagates its share of whole micro-batches,
    weighted by their share of the rows, and every rank gets the same bits for any process count.

    QDrop draws its masks for the whole mini-batch (`share`): every micro-batch starts from the
    same generator state and cuts its rows, and the generator ends where one forward leaves it."""
    n = idx.numel()
    count = -(-n // micro)
    lo, hi = group.shard(count)
    if hi == lo:
        raise RecipeError(f"a reconstruction mini-batch of {n} rows in micro-batches of calibrate.recon_micro_batch "
                          f"({micro}) gives {count}, fewer than the {group.world_size} processes: lower "
                          f"recon_micro_batch or use fewer processes")
    start = qdrop_gen.get_state() if qdrop_gen is not None else None
    after = None
    parts = []
    for j in range(lo, hi):
        a, b = j * micro, min(n, (j + 1) * micro)
        share.total, share.lo, share.hi = n, a, b
        if start is not None:
            qdrop_gen.set_state(start)
        loss = _rec_loss(_forward(block, cap, idx[a:b]), cap.target[idx[a:b]])
        if count > 1:
            loss = loss * ((b - a) / n)  # its part of the mini-batch mean
        if after is None and qdrop_gen is not None:
            after = qdrop_gen.get_state()
        for p in params:
            p.grad = None
        if loss.requires_grad:
            loss.backward()
        parts.append(pack_grads(params))
    unpack_grads(params, group.ordered_sum(parts, count), 0)
    if after is not None:
        qdrop_gen.set_state(after)


def block_state(block: Block) -> dict[str, torch.Tensor]:
    """Everything the block's quantized layers and attention matmul quantizers hold (weights,
    biases, quantizer state), by model key."""
    state = {f"{name}.{k}": v.detach().clone() for name, layer in block.layers.items()
             for k, v in layer.state_dict().items()}
    for name, module in block.module.named_modules():
        if isinstance(module, QuantAttnProcessor):
            prefix = f"{block.name}.{name}" if name else block.name
            state.update({f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return state


def _probe_forward(model: DiffusionModel, data: CalibrationData, guidance: float, handles: list) -> None:
    """One forward on the first calibration row with the probe `handles` installed, then remove them."""
    try:
        cond = data.conds[:1] if data.conds is not None else None
        _call(model, data.xs[0, :1], int(data.ts[0]), cond, guidance)
    finally:
        for h in handles:
            h.remove()
