"""What this process's int8 kernels really compute, found by running them once at worst-case codes.

The integer runtime multiplies uint8 activation codes by int8 weights on vendor kernels
(oneDNN's ``qlinear_pointwise`` / ``qconv2d_pointwise``, ``torch._int_mm``). Whether the
product is exact depends on the instructions the kernel was dispatched to, not on the API:

- ``int32``: every product accumulates in int32 (AVX-512 VNNI / AVX-VNNI ``vpdpbusd``, AMX,
  CUDA). Exact for all codes (while the sum fits int32).
- ``pair16``: products are added in pairs into a *saturating* 16-bit lane first
  (``vpmaddubsw`` on AVX2 and AVX-512 without VNNI), so a pair ``u₁w₁ + u₂w₂`` beyond ±32767
  clips. Exact while ``2·u_max·|w|_max ≤ 32767`` (e.g. |w| ≤ 64 with u ≤ 255); the runtime
  splits larger weights as ``w = hi·2^s + lo`` into two exact calls.
- ``inexact``: wrong even inside that bound, or the kernel failed: the runtime does not use it.
- ``unavailable``: this PyTorch has no such kernel (non-x86 builds without oneDNN's int8 ops).

Each path is probed once per process (``functools.cache``): ``ONEDNN_MAX_CPU_ISA`` and the CPU
cannot change while it runs. The probes use saturating codes (all 255 × ±127/−128, K ≥ 64)
and random full-range codes, with and without an activation zero point, for several M (the
kernels pick different inner loops for one row and for many), on linear, 3×3 and 1×1 conv.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbitdm_cli.quant.integer import rescale_order

__all__ = ["PAIR16_LIMIT", "KernelClass", "amx_bf16", "amx_int8", "cpu_description", "cpu_flags", "kernel_report",
           "pair16_weight_limit", "probe_int_mm", "probe_onednn_conv", "probe_onednn_linear",
           "probe_rescale_order"]

KernelClass = Literal["int32", "pair16", "inexact", "unavailable"]

PAIR16_LIMIT = 32767
"""The largest |u₁w₁ + u₂w₂| a saturating 16-bit pair sum holds."""


def pair16_weight_limit(u_max: int) -> int:
    """The largest |w| for which every pair ``u₁w₁ + u₂w₂`` with codes u ≤ `u_max` fits 16 bits."""
    return PAIR16_LIMIT // (2 * max(int(u_max), 1))


# An int8 kernel under test: (uint8 codes [M, K] or [N, C, H, W], activation zero point,
# int8 weights [O, K] or [O, C, kh, kw]) -> float64 outputs to compare with the exact sums.
_Kernel = Callable[[Tensor, int, Tensor], Tensor]


def _cases(kind: str, w_limit: int, gen: torch.Generator) -> list[tuple[Tensor, int, Tensor]]:
    """Worst-case and random (codes, zx, weights) for one kernel kind, weights within ±w_limit."""
    hi, lo = min(w_limit, 127), -min(w_limit, 128)
    out: list[tuple[Tensor, int, Tensor]] = []
    if kind == "linear":
        shapes = [((1, 64), (8, 64)), ((64, 96), (16, 96))]
    elif kind == "conv3x3":
        shapes = [((2, 32, 6, 6), (8, 32, 3, 3))]
    else:
        shapes = [((2, 64, 5, 5), (8, 64, 1, 1))]
    for u_shape, w_shape in shapes:
        full = torch.full(u_shape, 255, dtype=torch.uint8)
        for w_value in (hi, lo):
            out.append((full, 0, torch.full(w_shape, w_value, dtype=torch.int8)))
        u = torch.randint(0, 256, u_shape, generator=gen).to(torch.uint8)
        w = torch.randint(lo, hi + 1, w_shape, generator=gen).to(torch.int8)
        out.extend([(u, 0, w), (u, 37, w)])
    return out


def _exact(kind: str, u: Tensor, zx: int, w: Tensor) -> Tensor:
    if kind == "linear":
        return (u.double() - zx) @ w.double().t()
    return F.conv2d(u.double() - zx, w.double(), None, 1, 1 if kind == "conv3x3" else 0)


def _classify(kinds: tuple[str, ...], kernel: _Kernel) -> KernelClass:
    """int32 if exact at full range, pair16 if exact once weights stay pair-safe, else inexact."""
    gen = torch.Generator().manual_seed(0)

    def exact_at(w_limit: int) -> bool:
        for kind in kinds:
            for u, zx, w in _cases(kind, w_limit, gen):
                if not torch.equal(kernel(u, zx, w), _exact(kind, u, zx, w)):
                    return False
        return True

    try:
        if exact_at(128):
            return "int32"
        return "pair16" if exact_at(pair16_weight_limit(255)) else "inexact"
    except (RuntimeError, NotImplementedError):
        return "inexact"


def _onednn_ops() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and all(hasattr(ops, n) for n in ("qconv2d_pointwise", "qlinear_pointwise",
                                                      "qconv_prepack", "qlinear_prepack")))
    except (AttributeError, RuntimeError):
        return False


def _onednn_op(u: Tensor, zx: int, w: Tensor) -> Callable[[float, Tensor, Tensor | None, torch.dtype], Tensor]:
    """oneDNN's int8 linear (codes [M, K], weights [O, K]) or conv (codes [N, C, H, W], weights
    [O, C, k, k]: stride 1, padding k // 2) on these operands, weights packed once, as
    ``run(x_scale, w_scale, bias, out_dtype)``."""
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    if w.dim() == 2:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        return lambda x_scale, w_scale, bias, dtype: torch.ops.onednn.qlinear_pointwise(
            u, x_scale, zx, packed, w_scale, zeros, bias, 1.0, 0, dtype, "none", [], "")
    pad = w.shape[2] // 2
    geometry = ([1, 1], [pad, pad], [1, 1], 1)
    packed = torch.ops.onednn.qconv_prepack(w, torch.ones(w.shape[0]), 1.0, 0, *geometry, None)
    return lambda x_scale, w_scale, bias, dtype: torch.ops.onednn.qconv2d_pointwise(
        u, x_scale, zx, packed, w_scale, zeros, bias, *geometry, 1.0, 0, dtype, "none", [], "")


def _onednn_unit(u: Tensor, zx: int, w: Tensor) -> Tensor:
    """The exact accumulator as oneDNN returns it with unit scales (float32 out), in float64."""
    return _onednn_op(u, zx, w)(1.0, torch.ones(w.shape[0]), None, torch.float32).double()


def _int_mm_kernel(device: str) -> _Kernel:
    def run(u: Tensor, zx: int, w: Tensor) -> Tensor:
        from lowbitdm_cli.export.int_ops import _padded_int_mm

        a, b = u.to(device), w.t().contiguous().to(device)
        if device == "cpu":
            acc = torch._int_mm(a, b)
        else:  # CUDA's _int_mm takes int8 x int8: shift u by 128 and add back 128·colsum
            acc = _padded_int_mm(torch.bitwise_xor(a, 128).view(torch.int8), b) + 128 * b.sum(0, dtype=torch.int32)
        return acc.double().cpu() - zx * w.double().sum(1)

    return run


@functools.cache
def probe_onednn_linear() -> KernelClass:
    """The class of oneDNN's ``qlinear_pointwise`` in this process."""
    return _classify(("linear",), _onednn_unit) if _onednn_ops() else "unavailable"


@functools.cache
def probe_onednn_conv() -> KernelClass:
    """The class of oneDNN's ``qconv2d_pointwise`` (3×3 and 1×1) in this process."""
    return _classify(("conv3x3", "conv1x1"), _onednn_unit) if _onednn_ops() else "unavailable"


@functools.cache
def probe_int_mm(device: str = "cpu") -> KernelClass:
    """The class of ``torch._int_mm`` (uint8 × int8 on CPU, int8 × int8 elsewhere) on `device`'s type."""
    if not hasattr(torch, "_int_mm"):
        return "unavailable"
    return _classify(("linear",), _int_mm_kernel(device))


@functools.cache
def probe_rescale_order(kernel: str) -> str | None:
    """The float order in which oneDNN's int8 `kernel` ("conv" or "linear") rescales its exact
    accumulator into float32 here: "sequential" ``((acc·Δx)·Δw[o]) + b[o]`` or "combined"
    ``(acc·(Δx·Δw[o])) + b[o]``; None where there is no such kernel, it is inexact, or its order is
    neither. Measured (torch 2.14): sequential on AVX-512 / VNNI, combined on AVX2 and AMX (where a
    linear of one or two rows runs another kernel, sequential). Checked on one typical shape per
    kind (the integer runtime checks each layer's own shapes once, `IntLayer._run_onednn`) with
    random codes within the pair-safe bound (so the sums are exact on every class), random
    scales, with and without a bias."""
    probe = {"conv": probe_onednn_conv, "linear": probe_onednn_linear}[kernel]
    if probe() in ("unavailable", "inexact"):
        return None
    gen = torch.Generator().manual_seed(0)
    out_ch, chans = 24, 40
    limit = pair16_weight_limit(255)
    u = torch.randint(0, 256, (2, chans, 6, 6), generator=gen).to(torch.uint8)
    w = torch.randint(-limit, limit + 1, (out_ch, chans, 3, 3), generator=gen).to(torch.int8)
    zx = 37
    x_scale = float(torch.rand(1, generator=gen) * 0.1 + 1e-3)
    w_scale = torch.rand(out_ch, generator=gen) * 0.05 + 1e-4
    if kernel == "conv":
        acc, view = F.conv2d(u.double() - zx, w.double(), None, 1, 1).float(), [1, -1, 1, 1]
    else:
        # 64 rows: on AMX a linear with one or two rows runs another kernel, with the other order
        u = torch.randint(0, 256, (64, chans * 9), generator=gen).to(torch.uint8)
        w = w.flatten(1).contiguous()
        acc, view = ((u.double() - zx) @ w.double().t()).float(), [1, -1]
    xs, ws = torch.tensor(x_scale, dtype=torch.float32), w_scale.reshape(view)
    matches = {"sequential": True, "combined": True}
    try:
        run = _onednn_op(u, zx, w)
        for bias in (torch.randn(out_ch, generator=gen), None):
            out = run(x_scale, w_scale, bias, torch.float32)
            b = 0.0 if bias is None else bias.reshape(view)
            matches["sequential"] &= torch.equal(out, (acc * xs) * ws + b)
            matches["combined"] &= torch.equal(out, acc * (xs * ws) + b)
    except RuntimeError:
        return None
    found = [k for k, v in matches.items() if v]
    return found[0] if len(found) == 1 else None


@functools.cache
def _cpuinfo() -> tuple[str, list[str] | None]:
    """(model name, flags) from /proc/cpuinfo; ("", None) where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return model, next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), None)


def cpu_flags() -> list[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return _cpuinfo()[1] or []


def amx_int8() -> bool:
    """Whether oneDNN's int8 kernels run on AMX here (`_onednn_amx`)."""
    return _onednn_amx("amx_int8")


def amx_bf16() -> bool:
    """Whether oneDNN's bf16 kernels (and float32 ones in fpmath mode bf16) run on AMX here (`_onednn_amx`)."""
    return _onednn_amx("amx_bf16")


def _onednn_amx(flag: str) -> bool:
    """The CPU has the AMX `flag` and ``ONEDNN_MAX_CPU_ISA``, if set, does not cap oneDNN below AMX."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return flag in cpu_flags() and (not cap or cap == "ALL" or "AMX" in cap)


@functools.cache
def cpu_description() -> dict[str, str]:
    """The CPU's model name, the vector ISA PyTorch dispatches to, and oneDNN's cap if one is set."""
    model, flags = _cpuinfo()
    vnni = flags is not None and any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return {"model": model or platform.processor() or platform.machine(),
            "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "vnni_flag": "yes" if vnni else ("no" if flags is not None else "unknown"),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def kernel_report() -> dict[str, object]:
    """What a manifest records about the integer kernels: the CPU and each path's probed class."""
    return {"cpu": cpu_description(),
            "kernel_probes": {"onednn_linear": probe_onednn_linear(), "onednn_conv": probe_onednn_conv(),
                              "int_mm": probe_int_mm("cpu")},
            "rescale_order": {k: rescale_order(k) for k in ("conv", "linear")}}
