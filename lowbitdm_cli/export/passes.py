"""The integer runtime's passes around its kernels as one loop each, in C (``kernels/passes.c``).

In eager PyTorch, quantizing a layer's input takes five passes over it (divide, round, add the zero
point, clamp, convert to uint8), the float path's operand two more (back to float32, minus the zero
point) and often a layout change, and the rescale after the kernel three to five (×Δx, ×Δw, +b, the
conversion to the compute dtype and to the output layout), and a shifted 8-bit layer's correction two
more (its channel sums, and ``acc + (128 − zw)·sums``, now inside the rescale). On the digits UNet these passes took
about as long as all its products. Here each is one loop over memory with the same IEEE operations
in the same order (`kernels/passes.c`; no FMA contraction, no unsafe math), so the bits are those of
the eager ops, which is what the fake runtime computes; `available` checks that once per process on
inputs with exact rounding ties, and the eager ops run where it fails.

The library is a few hundred lines of C with no PyTorch headers: the machine's C compiler builds it
in about a second on first use and it is cached (`native.build`); it is called through ctypes and
takes its threads from the OpenMP runtime PyTorch has loaded. ``LOWBITDM_PASSES=0`` turns it off
(read per call: `enabled`).
Unlike `fused_ops` (Inductor-generated loops, ``LOWBITDM_FUSED=1``) there is nothing to compile per
process. Every function returns None where it does not apply (another device or dtype, a layout
other than contiguous or channels-last, per-token scales): the caller then runs the eager ops.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor

from lowbitdm_cli.export import native

__all__ = ["available", "build_flags", "channel_sums", "enabled", "load", "operand", "quantize", "rescale"]

_SOURCE = Path(__file__).with_name("kernels") / "passes.c"
_DTYPES = (torch.float32, torch.bfloat16)
_OUT_KINDS = {torch.uint8: 0, torch.float32: 1, torch.bfloat16: 2}  # `_quantize`'s outputs (passes.c OUT_*)
_ACC_KINDS = {torch.float32: 0, torch.int32: 1, torch.bfloat16: 2}  # `rescale`'s accumulators (passes.c ACC_*)
_ACC_SHIFTED = 3  # a float32 accumulator plus a shifted layer's correction (passes.c ACC_SHIFTED)
_ACC_BORDER = 4  # plus a zero-point-free kernel call's map (ACC_BORDER; 5: both, ACC_BORDER_SHIFTED)


def build_flags() -> list[str]:
    """The C compiler flags the library is built with: no FMA contraction, no unsafe math (the eager ops'
    bits); AVX2 where the CPU has it (vectorised division, rounding and tile transposes; -mfma is not given)."""
    flags = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_avx2_supported():
        flags.append("-mavx2")
    return flags


@functools.cache
def load() -> ctypes.CDLL | str:
    """The library (built once per machine), or why it cannot run here (one line)."""
    if not sys.platform.startswith("linux"):
        return "the fused passes are built for Linux"
    compiler = native.compiler("c")
    if compiler is None:
        return "no C compiler to build the fused passes (set CC)"
    try:
        lib = ctypes.CDLL(str(native.build(_SOURCE, compiler, build_flags())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return f"could not build the fused passes: {err}"
    i64, f32, ptr, i = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.lbd_quantize.argtypes = [ptr, i, i, i64, i64, i64, f32, f32, f32, f32, f32, f32, ptr, i, i]
    lib.lbd_rescale.argtypes = [ptr, i, i, i64, i64, i64, f32, ptr, ptr, i, ptr, i, i, ptr, ptr, ptr]
    lib.lbd_channel_sums.argtypes = [ptr, i, i64, i64, i64, ctypes.c_int32, ptr]
    lib.lbd_quantize.restype = lib.lbd_rescale.restype = lib.lbd_channel_sums.restype = None
    return lib


def _view(t: Tensor) -> tuple[int, int, int, bool] | None:
    """(n, c, hw, channels_last) of a CPU tensor as the loops see it: 4-D contiguous or channels-last
    ([N, C, H, W]), any contiguous [..., C] (rows of a linear), or [N, T, C] with [N, C, T] memory (a
    diffusers attention's tokens, transposed from its NCHW input); None for anything else."""
    if t.device.type != "cpu":
        return None
    if t.dim() == 4:
        n, c, h, w = t.shape
        if t.is_contiguous():
            return n, c, h * w, False
        if t.is_contiguous(memory_format=torch.channels_last):
            return n, c, h * w, True
        return None
    if t.dim() >= 1 and t.is_contiguous():
        c = t.shape[-1]
        return (t.numel() // c if c else 0), c, 1, True
    if t.dim() == 3 and t.transpose(1, 2).is_contiguous():  # [N, T, C] viewed from [N, C, T] memory (attention)
        n, hw, c = t.shape
        return n, c, hw, False
    return None


def _empty(x: Tensor, dtype: torch.dtype, layout: torch.memory_format | None) -> Tensor:
    if x.dim() == 4 and layout is not None:
        return torch.empty(x.shape, dtype=dtype, memory_format=layout)
    return torch.empty(x.shape, dtype=dtype)


def _quantize(x: Tensor, delta: float, z: float, q_min: float, q_max: float, offset: float, sub: float | None,
              layout: torch.memory_format | None, out_dtype: torch.dtype = torch.float32) -> Tensor | None:
    lib = load()
    seen = _view(x)
    if isinstance(lib, str) or seen is None or x.dtype not in _DTYPES:
        return None
    n, c, hw, x_cl = seen
    if layout is None:
        layout = torch.channels_last if x.dim() == 4 and x_cl else torch.contiguous_format
    out = _empty(x, torch.uint8 if sub is None else out_dtype, layout)
    out_cl = x.dim() != 4 or layout == torch.channels_last
    if x.numel():
        lib.lbd_quantize(x.data_ptr(), int(x.dtype == torch.bfloat16), int(x_cl), n, c, hw, delta, z, q_min, q_max,
                         offset, 0.0 if sub is None else sub, out.data_ptr(), _OUT_KINDS[out.dtype], int(out_cl))
    return out


def quantize(x: Tensor, delta: float, z: float, q_min: float, q_max: float, offset: float,
             layout: torch.memory_format | None = None) -> Tensor | None:
    """uint8 ``clamp(round(x/Δ) + z, q_min, q_max) + offset`` of float32 or bfloat16 `x`, in `layout` (4-D only;
    None: the layout of `x`, contiguous for a transposed [N, T, C] view), in one pass whatever the layout of `x`."""
    return _quantize(x, delta, z, q_min, q_max, offset, None, layout)


def channel_sums(u: Tensor, zx: int) -> Tensor | None:
    """float32 Σ_c (u − zx) over the channels of uint8 codes `u` at each position: [N, 1, H, W] (contiguous) of a
    4-D `u` in either layout, [..., 1] of a linear's [..., K] rows; what `int_runtime.window_sums` starts from,
    in one pass. None where it does not apply (or C·255 reaches 2^24, where float32 would round)."""
    lib = load()
    seen = _view(u)
    channels = u.shape[1 if u.dim() == 4 else -1] if u.dim() else 0
    if isinstance(lib, str) or seen is None or u.dtype != torch.uint8 or channels * 255 >= 2**24:
        return None
    n, c, hw, u_cl = seen
    if u.dim() != 4 and not u_cl:
        return None  # a transposed view: its rows are not its channels
    out = torch.empty(*u.shape[:-1], 1) if u.dim() != 4 else torch.empty(u.shape[0], 1, *u.shape[2:])
    if out.numel():
        lib.lbd_channel_sums(u.data_ptr(), int(u_cl), n, c, hw, int(zx), out.data_ptr())
    return out


def operand(x: Tensor, delta: float, z: float, q_min: float, q_max: float, offset: float, zx: int,
            layout: torch.memory_format | None = None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """The float path's operand: ``u − zx`` with u the codes of `quantize`, in `layout` (4-D only; None: the
    layout of `x`), written in one pass whatever the layout of `x`, as float32 or as bfloat16 (`dtype`; exact
    where |u − zx| ≤ 256, which the caller checks: 8-bit codes)."""
    if dtype not in _DTYPES:
        return None
    return _quantize(x, delta, z, q_min, q_max, offset, float(zx), layout, dtype)


def rescale(acc: Tensor, x_scale: float, w_scale: Tensor, bias: Tensor | None, combined: bool,
            dtype: torch.dtype, layout: torch.memory_format | None = None,
            correction: tuple[Tensor, Tensor] | None = None, border: Tensor | None = None) -> Tensor | None:
    """``((acc·Δx)·Δw[c]) + b[c]`` (or ``(acc·(Δx·Δw[c])) + b[c]`` when `combined`) of a float32, int32 or
    bfloat16 accumulator whose channels are its dim 1 (4-D) or its last dim, in float32, then `dtype`,
    written in `layout` (4-D; None: the layout of `acc`): `quant.integer.round_accumulator` (for a bf16
    output, the accumulator rounded to bf16 first), `quant.integer.rescale` and the cast in one pass.
    `correction`: (sums, w_off) of a shifted layer, a float32 `acc` then standing for ``acc + w_off[c]·sums[p]``
    (``torch.addcmul``'s float ops: the product, then the sum): sums one per position ([N, 1, H, W] contiguous
    of a 4-D `acc`, [..., 1] of rows), w_off one per channel. `border`: [1, C, H, W] float32 added to every image
    of a 4-D float32 `acc` first (``(acc + border) + w_off·sums``: a zero-point-free kernel call's map,
    `int_runtime.IntConv2d`)."""
    lib = load()
    seen = _view(acc)
    if (isinstance(lib, str) or seen is None or acc.dtype not in _ACC_KINDS or dtype not in _DTYPES
            or w_scale.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)):
        return None
    n, c, hw, acc_cl = seen
    kind, w_off, sums = _ACC_KINDS[acc.dtype], None, None
    if correction is not None:
        sums, w_off = correction[0], correction[1].reshape(-1).contiguous()
        if (acc.dtype != torch.float32 or sums.dtype != torch.float32 or w_off.dtype != torch.float32
                or not sums.is_contiguous() or sums.numel() != n * hw or w_off.numel() != c):
            return None
        kind = _ACC_SHIFTED
    if border is not None:
        border = border.contiguous(memory_format=torch.channels_last)  # [hw, c] per image
        if (acc.dtype != torch.float32 or border.dtype != torch.float32 or acc.dim() != 4
                or tuple(border.shape) != (1, *acc.shape[1:])):
            return None
        kind = _ACC_BORDER + (1 if correction is not None else 0)
    if layout is None:
        layout = torch.channels_last if acc.dim() == 4 and acc_cl else torch.contiguous_format
    w_scale = w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = _empty(acc, dtype, layout)
    if acc.numel():
        lib.lbd_rescale(acc.data_ptr(), kind, int(acc_cl), n, c, hw, x_scale, w_scale.data_ptr(),
                        None if bias is None else bias.data_ptr(), int(combined), out.data_ptr(),
                        int(dtype == torch.bfloat16), int(acc.dim() != 4 or layout == torch.channels_last),
                        None if w_off is None else w_off.data_ptr(), None if sums is None else sums.data_ptr(),
                        None if border is None else border.data_ptr())
    return out


def _self_check() -> bool:
    """The loops against the eager ops (`IntLayer.quantize_input`, `quant.integer.rescale`, a shifted layer's
    correction and channel sums) on values with exact rounding ties, both dtypes, both layouts, with and without
    a layout change."""
    from lowbitdm_cli.quant.integer import rescale as eager_rescale
    from lowbitdm_cli.quant.integer import round_accumulator

    gen = torch.Generator().manual_seed(0)
    delta = 0.0123
    k = torch.randint(-300, 300, (2, 24, 5, 7), generator=gen).float()
    ties = (k + 0.5) * torch.tensor(delta)  # x/Δ lands on (or within an ulp of) .5: the rounding mode shows
    x = torch.where(torch.rand(ties.shape, generator=gen) < 0.5, ties, torch.randn(ties.shape, generator=gen) * 3)
    acc = torch.randint(-2**20, 2**20, (2, 24, 5, 7), generator=gen)
    ws, bias = torch.rand(24, generator=gen) * 1e-3, torch.randn(24, generator=gen)
    layouts = (torch.contiguous_format, torch.channels_last)
    for dtype in _DTYPES:
        for z, q_min, q_max, offset in ((37.0, 0.0, 255.0, 0.0), (0.0, -8.0, 7.0, 8.0)):
            xs = x.to(dtype)
            q = torch.div(xs, torch.tensor([delta])).round_().add_(z).clamp_(q_min, q_max).add_(offset)
            for lin, lout in itertools.product(layouts, layouts):
                xi = xs.contiguous(memory_format=lin)
                if not torch.equal(quantize(xi, delta, z, q_min, q_max, offset), q.to(torch.uint8)):
                    return False
                for op_dtype in _DTYPES:
                    got = operand(xi, delta, z, q_min, q_max, offset, 37, lout, op_dtype)
                    if not (got.is_contiguous(memory_format=lout) and got.dtype == op_dtype
                            and torch.equal(got, (q - 37).to(op_dtype))):
                        return False
        codes = torch.randint(0, 256, (2, 24, 5, 7), generator=gen).to(torch.uint8)
        for lin in layouts:
            got = channel_sums(codes.contiguous(memory_format=lin), 37)
            if not torch.equal(got, codes.sum(1, keepdim=True, dtype=torch.float32) - 24 * 37):
                return False
        if not torch.equal(channel_sums(codes[0, 0], 5), codes[0, 0].sum(-1, keepdim=True, dtype=torch.float32) - 35):
            return False
        sums = torch.randint(-2**12, 2**12, (2, 1, 5, 7), generator=gen).float()  # a shifted layer's correction
        w_off = torch.randint(-128, 129, (24,), generator=gen).float()
        border = torch.randint(-2**12, 2**12, (1, 24, 5, 7), generator=gen).float()  # a zero-point-free call's map
        for acc_dtype in (*_ACC_KINDS, "shifted"):
            shift = acc_dtype == "shifted"
            acc_dtype = torch.float32 if shift else acc_dtype
            for combined in (False, True):
                order = "combined" if combined else "sequential"
                for b in (bias, None):
                    for lin, lout in itertools.product(layouts, layouts):
                        ai = acc.to(acc_dtype).contiguous(memory_format=lin)
                        for bd in (None, border) if acc_dtype == torch.float32 else (None,):
                            ref = ai.clone() if bd is None else ai + bd
                            ref = torch.addcmul(ref, sums, w_off.reshape(1, -1, 1, 1)) if shift else ref
                            expected = eager_rescale(round_accumulator(ref, dtype), torch.tensor([delta]), ws, b, 1,
                                                     "conv", order=order).to(dtype)
                            got = rescale(ai, delta, ws, b, combined, dtype, lout, (sums, w_off) if shift else None,
                                          bd)
                            if not (got.is_contiguous(memory_format=lout) and torch.equal(got, expected)):
                                return False
                rows = acc.permute(0, 2, 3, 1).reshape(-1, 24).to(acc_dtype)
                row_sums = sums.reshape(-1, 1)
                ref = torch.addcmul(rows, row_sums, w_off) if shift else rows.clone()
                expected = eager_rescale(round_accumulator(ref, dtype), torch.tensor([delta]), ws, bias, -1, "linear",
                                         order=order).to(dtype)
                got = rescale(rows, delta, ws, bias, combined, dtype, correction=(row_sums, w_off) if shift else None)
                if not torch.equal(got, expected):
                    return False
    return True


@functools.cache
def available() -> bool:
    """Whether the loops run here and give the eager ops' bits (built and checked once per process)."""
    if isinstance(load(), str):
        return False
    try:
        return _self_check()
    except (RuntimeError, ValueError, OSError):
        return False


def enabled() -> bool:
    """Whether the integer runtime runs its passes here now: not turned off by ``LOWBITDM_PASSES=0``
    (read per call), and `available` (built and checked on first ask)."""
    return os.environ.get("LOWBITDM_PASSES", "1") != "0" and available()
