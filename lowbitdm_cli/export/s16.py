"""One exact integer call per 8-bit layer on AVX2-only CPUs: int16 products, int32 sums (``lowbitdm::conv_s16``).

On a CPU without VNNI (AMD Zen 1–3, Intel before Ice Lake) every int8 kernel PyTorch ships multiplies
uint8 codes by int8 weights with ``vpmaddubsw``, which adds each pair of products into a saturating
16-bit lane (`kernel_probe`: "pair16"). An 8-bit layer with 8-bit activations then needs the weight
split into two pair-safe calls, or a float32 product (the integer runtime's float path, the compiled
runtime's float route), neither faster than the FP32 model. ``vpmaddwd`` multiplies int16 by int16
and adds each pair into 32 bits: with |u − zx| and |w − zw| at most 255 a pair is at most 2·255·255,
nothing saturates, and one pass gives the exact Σ(u − zx)(w − zw) in int32 while that sum fits
(`exact`). 16 products per instruction against a float32 FMA's 8; but on AMD Zen 3 it issued at half
the FMA's rate (a throughput loop timed by hand), so there it can at best match float32, and measured
slower than the float route (docs/integer-runtime.md); CPUs with two integer multiply ports may differ.

The kernel (``kernels/s16_conv.cpp``, AVX2 intrinsics, threads from PyTorch's pool) is compiled on
first use with the machine's C++ compiler (about 15 s, once: the library is cached per source, PyTorch
version and compiler under ``$LOWBITDM_KERNEL_CACHE``, default ``~/.cache/lowbitdm/kernels``) and
registered as the operator ``torch.ops.lowbitdm.conv_s16``, with a shape function so that Inductor
calls it from a compiled graph. It is integer arithmetic, so it gives the same bits on every CPU, at
any thread count. `available` says why not where it cannot run (no AVX2, no compiler, a failed
build, ``LOWBITDM_S16=0``).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbitdm_cli.export import native

__all__ = ["EXACT_I32", "available", "conv", "exact", "linear", "load", "pack_weight"]

EXACT_I32 = 2**31
"""The kernel's sums are exact while every output's |Σ(u − zx)(w − zw)| stays below this (int32)."""

_SOURCE = Path(__file__).with_name("kernels") / "s16_conv.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++20", "-fPIC", "-shared"]


def exact(x_neg: float, x_pos: float, sums: tuple[Tensor, Tensor]) -> bool:
    """Whether the kernel's int32 sums are exact for inputs in [−x_neg, x_pos] and a weight whose rows'
    positive and negative sums are `sums` (`quant.integer.sign_sums` with one chunk): the result must
    fit in int32 (partial sums may wrap: two's complement addition is exact modulo 2^32)."""
    from lowbitdm_cli.quant.integer import partial_sum_bound

    return partial_sum_bound(x_neg, x_pos, sums) < EXACT_I32


def _build(compiler: str) -> Path:
    """The compiled library for this source, PyTorch and compiler (`native.build`: once, then reused)."""
    from torch.utils import cpp_extension

    flags = [*_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{p}" for p in cpp_extension.include_paths())]
    lib = cpp_extension.library_paths()[0]
    return native.build(_SOURCE, compiler, flags, [f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"])


@functools.cache
def load() -> str | None:
    """Build (once per machine) and register ``torch.ops.lowbitdm.conv_s16``; None when it runs here,
    else why not (one line)."""
    if os.environ.get("LOWBITDM_S16", "1") == "0":
        return "disabled by LOWBITDM_S16=0"
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return "the int16 kernel is built for x86-64 Linux"
    if not torch.cpu._is_avx2_supported():
        return "this CPU has no AVX2"
    compiler = native.compiler()
    if compiler is None:
        return "no C++ compiler to build the int16 kernel (set CXX)"
    try:
        torch.ops.load_library(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return f"could not build the int16 kernel: {err}"
    _register_fake()
    return None


def available() -> bool:
    """Whether ``lowbitdm::conv_s16`` runs here (builds it on first call)."""
    return load() is None


def _register_fake() -> None:
    """The operator's output shape for torch.compile (the kernel itself is opaque to Inductor)."""

    @torch.library.register_fake("lowbitdm::conv_s16")
    def _(u, zx, w, kh, kw, sh, sw, ph, pw, dh, dw, out_ch):
        n, _, h, wd = u.shape
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return u.new_empty((n, ho, wo, out_ch), dtype=torch.int32)


def pack_weight(w: Tensor) -> Tensor:
    """Integer weights w − zw ([O, C, kh, kw], or [O, K] for a linear; |w − zw| ≤ 255) in the kernel's
    layout: int16 [⌈O/16⌉, kh·kw, ⌈C/2⌉, 16, 2], zero-padded to an even C and whole blocks of 16 outputs.
    Builds and registers the kernel on first use (`load`); RuntimeError where it cannot run here."""
    why = load()
    if why is not None:
        raise RuntimeError(why)
    if w.dim() == 2:
        w = w[:, :, None, None]
    if w.is_floating_point() or (w.numel() and int(w.abs().max()) > 255):
        raise ValueError("pack_weight takes integer weights w − zw within ±255")
    o, c, kh, kw = w.shape
    w = F.pad(w.to(torch.int16), (0, 0, 0, 0, 0, c % 2, 0, -o % 16))
    blocks, cp = w.shape[0] // 16, w.shape[1]
    return w.reshape(blocks, 16, cp // 2, 2, kh * kw).permute(0, 4, 2, 1, 3).contiguous()


def conv(u: Tensor, zx: Tensor, packed: Tensor, kernel_size, stride, padding, dilation, out_ch: int) -> Tensor:
    """Σ(u − zx)(w − zw) of a conv (zero padding, groups 1) on uint8 codes `u` [N, C, H, W] (any layout),
    `zx` a one-element integer tensor: int32 [N, O, Ho, Wo] in channels-last memory."""
    y = torch.ops.lowbitdm.conv_s16(u, zx, packed, *kernel_size, *stride, *padding, *dilation, out_ch)
    return y.permute(0, 3, 1, 2)


def linear(u: Tensor, zx: Tensor, packed: Tensor, out_ch: int) -> Tensor:
    """Σ(u − zx)(w − zw) of a linear on uint8 codes `u` [M, K]: int32 [M, O]."""
    y = torch.ops.lowbitdm.conv_s16(u.t()[None, :, None, :], zx, packed, 1, 1, 1, 1, 0, 0, 1, 1, out_ch)
    return y.reshape(u.shape[0], out_ch)
