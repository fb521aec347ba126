"""Integer execution of a merged checkpoint: `IntConv2d` and `IntLinear`.

Each layer quantizes its float input to codes exactly as the fake quantizer does,
``u = clamp(round(x/Δx) + z, q_min, q_max)`` (same float ops, so the codes are identical),
multiplies codes by the stored weight codes with int8 ``torch._int_mm`` and returns
``((acc·Δx)·Δw[o]) + bias[o]`` in float32 with ``acc = Σ_k (u − zx)(w − zw[o])`` exact: the
arithmetic of the fake-quantized layer in inference (`quant.integer`), so the two agree bit
for bit, layer by layer and so over a whole sampling trajectory.

Kernel layout (chosen for CPU speed, exactness checked against `int_ops` in the tests):

- activations stay unsigned: ``_int_mm`` takes a uint8 ``mat1`` with an int8 ``mat2``;
- weights whose ``w − zw`` fits in int8 (every 2..7-bit weight, and 8-bit ones with a
  central zero point) are stored as that difference ("direct"); other 8-bit weights are
  stored as ``w − 128`` with one extra all-ones column, so the same product also yields the
  row sums of the activation codes needed for the ``128 − zw`` correction ("shifted");
- convs run as im2col on channels-last uint8 codes (the weight's K axis is reordered to
  (kh, kw, C) once at load), padded with the code ``zx`` that represents 0.

Then ``acc = mm[:, :O] + rowsum(u)·(128 − zw) − zx·Σ_k(w − zw)``; it stays in int32 while K
is small enough that no partial sum can overflow, else int64. The prepared weights are
buffers, built once from the codes.

On CPUs, where PyTorch ships oneDNN's int8 kernels (``torch.ops.onednn.qconv2d_pointwise`` /
``qlinear_pointwise``), the product runs there instead: uint8 activation codes with their
zero point, int8 weights (``w − zw``, or ``w − 128`` for the "shifted" 8-bit ones) with zero
weight zero point, without im2col. The weights are packed once, on the first call (the
packing does not depend on the activation scale, so one packed weight serves every timestep
slot). A "shifted" layer needs ``Σ_window(u − zx)`` for its correction: where oneDNN runs on AMX its
packed weights keep the all-ones row as one more output channel, so the same call also returns the
sums; elsewhere they are summed beside the call (`window_sums`, exact in float32), since oneDNN's
AVX-512 kernels block output channels by 64 and one more row costs a block (`window_sums_beside`).
A "direct" float32 layer takes its
float32 output ``Δx·Δw[o]·acc + bias[o]`` straight from the kernel (in the input's layout) when the
kernel's rescale is bit for bit
`quant.integer.rescale`, whose float order is the one this CPU's kernels use
(`quant.integer.rescale_order`; checked once per process, `onednn_rescale_matches`, and once per
layer and input shape, `IntLayer._run_onednn`);
otherwise, and for "shifted" layers, the kernel runs with unit scales and no bias, giving the
exact accumulator as float32, the shifted correction ``(128 − zw[o])·Σ_window(u − zx)`` is added
as integers (exact while the sums stay below 2^24), and `rescale` follows. Every conv returns its
input's memory layout (`quant.integer.layout_of`), as the fake layer does: NCHW in an NCHW model
(a channels-last output there made every following concat, upsample and GroupNorm copy or run a
slower kernel), channels-last in a channels-last one (`models.precision.use_layout`), where
oneDNN's channels-last output then needs no layout pass at all. `kernel` says which path a layer
takes.

Which kernel is exact depends on the CPU, so each layer picks its *lowering* from what the
kernels were found to compute in this process (`kernel_probe`, once per process at worst-case
codes): where they accumulate in int32 (VNNI, AMX) one call; where they add u8·s8 pairs in
saturating 16-bit lanes (AVX2, AVX-512 without VNNI) one call while ``2·u_max·|w| ≤ 32767``
(every layer with ≤ 7-bit activations, or weights within ±64), else the int8 weight split as
``w = hi·2^s + lo`` into two pair-safe calls combined exactly; where no integer kernel is exact,
the integer-exact float path of `quant.integer`. Where no one-call int8 lowering is exact, lowbitdm's
own int16 kernel (`export.s16`: one call, int32 sums, built on first use) is a candidate too, and the
layer's first forward times the candidates and keeps the fastest. `lowering` names the choice per
layer and the load report counts them.

Every path ends in the float ops of `quant.integer.rescale_to` on the exact accumulator (in bf16:
rounded to bf16 first, the bf16 rule), which is also what the fake-quantized model computes in
inference, so the two runtimes give the same bits (while the accumulators stay below 2^24, where
float32 holds them exactly).
The quantize and rescale passes around the kernels run as one C loop each where `export.passes`
is built (the same float ops in the same order; ``LOWBITDM_PASSES=0``: the eager ops); so do a shifted
layer's channel sums, and its correction runs inside the rescale pass. A conv's codes for oneDNN are
written channels-last whatever the model's layout (the kernel's own layout: it reorders nothing), its
output comes back in the model's layout from the rescale pass. Where the layer rescales in that pass
anyway, a conv calls oneDNN with activation zero point 0 and the pass adds −zx·(the valid taps' weight
sums) per output position (`IntConv2d.zero_point_free`: same bits, while float32 holds the terms).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbitdm_cli.export import fused_ops, passes, s16
from lowbitdm_cli.export.int_ops import _padded_int_mm
from lowbitdm_cli.export.kernel_probe import (
    KernelClass,
    amx_int8,
    pair16_weight_limit,
    probe_int_mm,
    probe_onednn_conv,
    probe_onednn_linear,
    probe_rescale_order,
)
from lowbitdm_cli.quant.integer import (
    EXACT_F32,
    accumulate,
    chunk_weight,
    conv_chunk_products,
    conv_products,
    exact_route,
    layout_of,
    linear_chunk_products,
    operand_layout,
    pair,
    per_row,
    rescale_order,
    rescale_to,
    sign_sums,
    split_weight,
    sum_chunks,
)
from lowbitdm_cli.quant.quantizer import TimestepSlots

__all__ = ["IntConv2d", "IntLayer", "IntLinear", "choose_split", "lowering_counts", "onednn_available",
           "onednn_rescale_matches", "window_sums", "window_sums_beside"]

_SHIFT = 128
# |u·w| ≤ 255·128 per product; with the corrections a partial sum is < K·255·(128+256+255),
# which stays below 2**31 for K ≤ 8192. Larger K accumulates in int64.
_K_INT32 = 8192
# One _int_mm over at most this many K with uint8 x int8 stays below 2**31.
_K_CHUNK = 1 << 15


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """int32 product of uint8 codes a [M, K] and int8 b [K, N] (K ≤ _K_CHUNK)."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    # CUDA's _int_mm wants int8 x int8: shift a to int8 and add back 128·colsum(b).
    shifted = torch.bitwise_xor(a, _SHIFT).view(torch.int8)
    return _padded_int_mm(shifted, b) + _SHIFT * b.sum(0, dtype=torch.int32)


def _mm_wide(a: Tensor, b: Tensor) -> Tensor:
    """int64 product for large K, chunked so that each int32 partial product is exact."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for k0 in range(0, a.shape[1], _K_CHUNK):
        out += _mm(a[:, k0 : k0 + _K_CHUNK].contiguous(), b[k0 : k0 + _K_CHUNK]).to(torch.int64)
    return out


# Autotuning (`IntLayer.autotune`): the most rows of the batch a timed forward sees, the growth of the batch
# past which a layer tunes again, the ratio to the best time past which a candidate is dropped, and the
# choices made in this process.
TUNE_ROWS = 64
RETUNE_GROWTH = 4
TUNE_DROP = 3.0
# Another lowering replaces the integer-exact float path (the reference every layer has) only where it is
# faster by more than this factor: on a 2-core Zen 3 VM the first forward's timings of the int16 kernel and
# the float path on digits' 4x4-8x8 convs came close in some processes and picked the int16 kernel, which
# timed again was clearly slower there; the kernels that win do so by far more (the split oneDNN calls over
# the float path on the 26 M UNet's 512-channel 3x3 convs; all timed by hand).
TUNE_MARGIN = 0.9
_TUNED: dict[tuple, tuple[str, int | None]] = {}
# What `IntLayer.set_lowering` sets and a lowering's first calls build: `autotune` keeps one copy per
# candidate, so that switching between candidates rebuilds nothing (keep in step with set_lowering).
_LOWERING_STATE = ("use_onednn", "float_exact", "split", "use_s16", "_mm_split", "wmat_hi", "wmat_lo",
                   "fused_rescale", "_onednn_cache", "_float_weight", "_chunk_cache", "_s16_packed", "_sums_beside",
                   "_fused_checked", "_tune")

# oneDNN accumulates in int32: with |u − zx| ≤ 255 and |w| ≤ 128 every K up to this is exact.
_K_ONEDNN = (2**31 - 1) // (255 * 128)


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's int8 conv/linear with float32 output (x86 CPU builds)."""
    return probe_onednn_linear() != "unavailable" and probe_onednn_conv() != "unavailable"


def choose_split(w: Tensor, limit: int, u_max: int, float_exact: bool) -> int | None:
    """The shift s of a weight split ``w = hi·2^s + lo`` whose two int8 parts both stay within
    ±`limit` (so a pair16 kernel adds them exactly); with `float_exact`, each part's product must
    also stay below 2^24 (the kernel returns it as float32), and the s with the smaller worst
    part wins. `w`: integer [O, K]. None when no s works."""
    best: tuple[float, int] | None = None
    for s in range(1, 8):
        hi, lo = split_weight(w.to(torch.float64), s)
        if hi.abs().max() > limit or lo.abs().max() > limit:
            continue
        if not float_exact:
            return s
        worst = u_max * max(float(hi.abs().sum(1).max()), float(lo.abs().sum(1).max()))
        if worst < EXACT_F32 and (best is None or worst < best[0]):
            best = (worst, s)
    return None if best is None else best[1]


def lowering_counts(module: nn.Module) -> dict[str, int]:
    """How many integer layers of `module` run on each lowering now (after any autotuning; the compiled
    runtime's layers report theirs too)."""
    from lowbitdm_cli.export.compiled_runtime import RefLayer

    counts: dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, (IntLayer, RefLayer)):
            counts[m.lowering] = counts.get(m.lowering, 0) + 1
    return dict(sorted(counts.items()))


class _Scratch(threading.local):
    """Per-thread scratch buffers for a layer's input codes (the float quotient x/Δx and the
    uint8 codes), reused by every integer layer in turn: a fresh multi-MB tensor per layer costs
    more in page faults than the division itself. A view has the input's shape and strides
    (contiguous or channels-last) and lives only until the next integer layer quantizes its input,
    which is within the layer that asked for it."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, int], Tensor] = {}

    def like(self, x: Tensor, dtype: torch.dtype, slot: int = 0) -> Tensor | None:
        """A view of a scratch buffer shaped and strided like `x` (None if `x` is not dense)."""
        dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        if not dense:
            return None
        key = (str(x.device), dtype, slot)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < x.numel():
            buf = self.buffers[key] = torch.empty(x.numel(), dtype=dtype, device=x.device)
        return buf[: x.numel()].as_strided(x.shape, x.stride())


_SCRATCH = _Scratch()
_ONE = torch.ones(1)
_CHECK_MIN_OUTPUTS = 64
"""The fewest outputs on which `IntLayer._run_onednn` trusts a bit-for-bit agreement of the kernel's
rescale with `rescale` (the two float orders differ on about a third of random outputs)."""


def onednn_rescale_matches(kernel: str) -> bool:
    """Whether oneDNN's float32 output of an int8 `kernel` ("conv" or "linear") is `rescale` of the
    exact accumulator bit for bit, i.e. whether its float order (`probe_rescale_order`, one typical
    shape, once per process) is this process's `rescale_order`. Where it is not, the layers run
    oneDNN with unit scales and rescale themselves; where it is, each layer still checks its own
    shapes once (`IntLayer._run_onednn`). (oneDNN's bf16 output is not used: on AVX2 it differs from
    the float32 output rounded to bf16 in rare outputs; the runtime rounds the float32 output itself.)"""
    order = probe_rescale_order(kernel)
    return order is not None and order == rescale_order(kernel)


def window_sums_beside(layer: IntLayer, in_kernel: bool | None = None) -> bool:
    """Whether a shifted layer's oneDNN call leaves out the all-ones weight row and its window sums
    Σ_window(u − zx) are taken beside it (`window_sums`). oneDNN's AVX-512 kernels block output channels
    by 64 (weights in ``AcdB64a4b``), so there one more row costs a whole block of outputs, and its
    tail; AMX tiles block by 16, and there the row is what was measured (`in_kernel` None: in the kernel
    where oneDNN runs on AMX, `kernel_probe.amx_int8`). Beside needs the sums exact in float32 (integers
    below 2²⁴: K·255) and a window `avg_pool2d` takes (no dilation, padding at most half the kernel)."""
    if layer.direct or (in_kernel if in_kernel is not None else amx_int8()):
        return False
    if layer.k * 255 >= EXACT_F32:
        return False
    if isinstance(layer, IntConv2d):
        return tuple(layer.dilation) == (1, 1) and all(2 * p <= k for p, k in zip(layer.padding, layer.kernel_size))
    return True


def window_sums(u: Tensor, zx: Tensor | int, window: tuple | None = None) -> Tensor:
    """Σ_window(u − zx) per output of a layer on uint8 codes `u`, exact in float32 (`window_sums_beside`):
    a linear's over its last dim ([rows, K] → [rows, 1]); a conv's (`window`: kernel size, stride,
    padding) over the channels, then over the window with zero padding (a padded position is code zx,
    as in the kernel): [N, C, H, W] → [N, 1, Ho, Wo]. The channel sums in one C pass (`passes.channel_sums`)
    where it applies."""
    one_pass = u.device.type == "cpu" and not torch.compiler.is_compiling() and passes.enabled()
    s = passes.channel_sums(u, int(zx)) if one_pass else None  # one C pass (the compiled runtime: its graph's ops)
    if window is None:
        return s if s is not None else u.sum(-1, keepdim=True, dtype=torch.float32) - u.shape[-1] * zx
    if s is None:
        s = u.sum(1, keepdim=True, dtype=torch.float32) - u.shape[1] * zx
    kernel_size, stride, padding = (tuple(v) for v in window)
    if kernel_size == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return s
    return F.avg_pool2d(s, kernel_size, stride, padding, divisor_override=1)  # window sums, not means


class IntLayer(TimestepSlots, nn.Module):
    """What `IntConv2d` and `IntLinear` share: prepared weights, activation codes, timestep slots.

    Args (tensors on one device):
        weight_codes: uint8 codes u, [O, K] (linear) or [O, C, kh, kw] (conv), W = Δw[o]·(u − zw[o]).
        weight_zero_point: [O] integer zero points zw in [0, 255].
        weight_scale: [O] float step sizes Δw.
        bias: [O] float or None.
        input_scale: [S] float Δx, one per timestep slot (S = 1 when not temporal).
        input_zero_point: [S] integer z (as the fake quantizer rounds it); ignored when symmetric.
        a_bits: activation bit width (1..8); a_symmetric: codes in [−2^(b−1), 2^(b−1)−1].
        timesteps: the S timestep values of a temporal layer, or None.
    """

    def __init__(self, weight_codes: Tensor, weight_zero_point: Tensor, weight_scale: Tensor,
                 bias: Tensor | None, input_scale: Tensor, input_zero_point: Tensor, a_bits: int,
                 a_symmetric: bool = False, timesteps: list[int] | None = None) -> None:
        super().__init__()
        out_ch = weight_codes.shape[0]
        if weight_codes.is_floating_point() or weight_codes.dim() not in (2, 4):
            raise ValueError("weight_codes must be integer codes of shape [O, K] or [O, C, kh, kw]")
        if weight_codes.numel() and (int(weight_codes.min()) < 0 or int(weight_codes.max()) > 255):
            raise ValueError("weight codes must lie in [0, 255]")
        zw = weight_zero_point.reshape(-1).to(torch.int64)
        if zw.numel() != out_ch or weight_scale.numel() != out_ch:
            raise ValueError(f"weight zero points and scales need {out_ch} entries")
        if zw.numel() and (int(zw.min()) < 0 or int(zw.max()) > 255):
            raise ValueError("weight zero points must lie in [0, 255] for the int8 kernels")
        if not 1 <= int(a_bits) <= 8 or (a_symmetric and int(a_bits) < 2):
            raise ValueError(f"unsupported activation bits {a_bits} (symmetric={a_symmetric})")
        slots = len(timesteps) if timesteps else 1
        input_scale = input_scale.reshape(-1).float()
        input_zero_point = torch.round(input_zero_point.reshape(-1).double()).to(torch.int64)
        if input_scale.numel() != slots or input_zero_point.numel() != slots:
            raise ValueError(f"activation parameters need {slots} entries (one per timestep slot)")
        self.a_bits, self.a_symmetric = int(a_bits), bool(a_symmetric)
        if self.a_symmetric:
            half = 1 << (self.a_bits - 1)
            self.q_min, self.q_max = float(-half), float(half - 1)
            # fake quantization ignores z when symmetric; the kernels see u = q + 2^(b−1), zx = 2^(b−1)
            self._z_add, self._offset, self._zx = [0.0] * slots, float(half), [half] * slots
        else:
            self.q_min, self.q_max = 0.0, float((1 << self.a_bits) - 1)
            zs = input_zero_point.tolist()
            if any(not 0 <= z <= 255 for z in zs):
                raise ValueError(f"activation zero points {zs} are outside [0, 255]: no uint8 code represents 0")
            self._z_add, self._offset, self._zx = [float(z) for z in zs], 0.0, [int(z) for z in zs]

        codes = weight_codes.to(torch.int16)
        if codes.dim() == 4:  # K ordered (kh, kw, C) to match channels-last im2col
            codes = codes.permute(0, 2, 3, 1)
        codes = codes.reshape(out_ch, -1)
        diff = codes - zw.to(torch.int16)[:, None]
        self.k = codes.shape[1]
        self.direct = bool(diff.numel() == 0 or (int(diff.min()) >= -128 and int(diff.max()) <= 127))
        if self.direct:
            wmat, w_off = diff, torch.zeros(0, dtype=torch.int32)
        else:
            ones = torch.ones(1, self.k, dtype=torch.int16)  # its output column is Σ_k u
            wmat = torch.cat([codes - _SHIFT, ones], 0)
            w_off = (_SHIFT - zw).to(torch.int32)
        self.register_buffer("wmat", wmat.t().to(torch.int8).contiguous())  # [K, O(+1)]
        self.register_buffer("w_off", w_off)
        self.register_buffer("w_col", diff.sum(1, dtype=torch.int64))  # Σ_k (w − zw)
        self.register_buffer("weight_scale", weight_scale.reshape(-1).float().contiguous())
        # unit-scale calls (one scale per kernel output channel: a shifted layer's has the sums' too)
        self.register_buffer("unit_scale", torch.ones(wmat.shape[0], dtype=torch.float32), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.reshape(-1).float().contiguous())
        self.register_buffer("input_scale", input_scale.contiguous())
        self.register_buffer("input_zero_point", input_zero_point)
        self.register_buffer("timesteps", torch.tensor(timesteps or [], dtype=torch.long))
        self.out_ch = out_ch
        self._index: int | None = None
        self.unmatched_timesteps: set[int] = set()
        self.u_max = (1 << self.a_bits) - 1  # the largest code u (symmetric codes are offset to u ≥ 0)
        self._onednn_cache: tuple[str, list[Tensor], Tensor] | None = None
        self._float_weight: Tensor | None = None
        self._w_off_f32: Tensor | None = None
        # [z, q_min, q_max, offset] per slot for the fused quantize loop (`fused_ops`)
        self._qparams = [torch.tensor([z, self.q_min, self.q_max, self._offset], dtype=torch.float32)
                         for z in self._z_add]
        self._tune: list[tuple[str, int | None]] | None = None
        lowering = self.choose_lowering()
        tune, self._tune = self._tune, None
        self.set_lowering(*lowering)
        self._tune = tune

    # --- lowering: which kernel runs the product, and how ------------------------------------------
    _probe_onednn: Callable[[], KernelClass] = staticmethod(probe_onednn_linear)
    rescale_kernel = "linear"  # whose float order `rescale` follows (`quant.integer.rescale_order`)

    def exact_lowerings(self) -> list[tuple[str, int | None]]:
        """Every (kernel, weight split) that computes this layer exactly with this process's kernels
        (`kernel_probe`), in the order they are usually fastest: oneDNN when it sums in int32, or sums
        pairs in 16 bits and this layer's pairs fit (2·u_max·|w| ≤ 32767), or with the weight split in
        two pair-safe halves whose float32 outputs are exact; ``torch._int_mm`` likewise (integer
        results: a split is always exact) where oneDNN has no exact lowering (on the AVX2 CPUs where
        both were timed, `torch._int_mm`'s CPU kernel took an order of magnitude longer than oneDNN's
        split, and timing it was most of a first forward); lowbitdm's int16 kernel where no one-call
        int8 lowering is exact; last the integer-exact float path, always exact."""
        w = self.int8_weight().to(torch.int16)  # int16: |−128| must not wrap
        limit = pair16_weight_limit(self.u_max)
        pair_safe = w.numel() == 0 or int(w.abs().max()) <= limit
        out: list[tuple[str, int | None]] = []
        onednn = self._probe_onednn() if self.k <= _K_ONEDNN else "unavailable"
        if onednn == "int32" or (onednn == "pair16" and pair_safe):
            out.append(("onednn", None))
        elif onednn == "pair16":
            split = choose_split(w, limit, self.u_max, float_exact=True)
            if split is not None:
                out.append(("onednn", split))
        if not out and probe_int_mm("cpu") in ("int32", "pair16"):  # CPU _int_mm: a fallback (see docstring)
            out.append(("int_mm", self._int_mm_split()))
        if (not out or out[0][1] is not None) and self.s16_exact():  # no one-call int8 lowering here
            out.append(("s16", None))
        return [*out, ("float", None)]

    def code_range(self) -> tuple[float, float]:
        """(a, b): every u − zx lies in [−a, b], over the timestep slots (what bounds the exact sums)."""
        return float(max(self._zx)), float(self.u_max - min(self._zx))

    def s16_exact(self) -> bool:
        """Whether `export.s16`'s int16 kernel runs here (built on first ask) and its int32 sums are exact for
        this layer's codes and weights."""
        return s16.available() and s16.exact(*self.code_range(), sign_sums(self.float_weight(), 1))

    def s16_weight(self) -> Tensor:
        """w − zw in the int16 kernel's packed layout (`s16.pack_weight`; built once per lowering)."""
        if self._s16_packed is None:
            self._s16_packed = s16.pack_weight(self.op_weight().to(torch.int16))
        return self._s16_packed

    def _s16_call_args(self, zx: int) -> tuple[Tensor, Tensor]:
        """The kernel's zero point tensor and packed weights."""
        if ("s16 zx", zx) not in self._chunk_cache:
            self._chunk_cache["s16 zx", zx] = torch.tensor([zx])
        return self._chunk_cache["s16 zx", zx], self.s16_weight()

    def choose_lowering(self) -> tuple[str, int | None]:
        """The first of `exact_lowerings`; where that is not one plain kernel call (a split, or the
        float path) the first forward times the candidates on its real input and keeps the fastest
        (`autotune`): they all give the same bits, so the choice changes speed only."""
        candidates = self.exact_lowerings()
        self._tune = candidates if len(candidates) > 1 and (candidates[0][1] is not None
                                                            or candidates[0][0] == "float") else None
        return candidates[0]

    def autotune(self, x: Tensor, rounds: int = 3) -> None:
        """Time each candidate lowering and keep the fastest; bounded so that a slow candidate costs little.

        The timed forwards see at most `TUNE_ROWS` rows of `x`'s first (batch) dimension. The choice holds for
        later batches up to `RETUNE_GROWTH` times the rows it was tuned on; a batch that much larger (up to
        `TUNE_ROWS`) has the layer tune again (`forward`), so a small first batch (a smoke test with one image)
        neither locks in choices for the real batches nor makes a user who samples one image at a time pay for
        tuning on many: tuned on one image, half the digits UNet's layers had taken the int16 kernel and batches
        of 64 ran clearly slower on Zen 3, while tuning a batch of one on 64 repeated rows made the 26 M UNet's
        first forward tens of seconds long (timed by hand). Every candidate first runs once untimed: a lowering's
        first call builds its weights and plans (packed or chunked weights, the exact route), which must not count
        against it. Then `rounds` rounds each time every candidate still in once, in an order rotated per round
        (so a slow moment of the machine does not always land on the same one); a candidate `TUNE_DROP`× slower
        than the best after a round is dropped; each keeps the fastest of its calls (interference on a shared
        machine only ever adds time), and the fastest wins, but over the float path only by `TUNE_MARGIN`. Each
        candidate's built pieces are kept while tuning (`_LOWERING_STATE`), so switching between them rebuilds
        nothing. The choice is kept per process for every layer of the same shapes and candidates (`_TUNED`), so
        repeated blocks and later batches time nothing. Every candidate gives the same bits: the choice changes
        speed only."""
        candidates, self._tune = self._tune or [], None
        if not candidates:
            return
        key = (self.tune_signature(), tuple(x.shape), x.dtype, x.device.type, tuple(candidates))
        built: dict[tuple[str, int | None], tuple] = {}

        def use(candidate: tuple[str, int | None]) -> None:
            if candidate in built:
                for name, value in zip(_LOWERING_STATE, built[candidate], strict=True):
                    setattr(self, name, value)
            else:
                self.set_lowering(*candidate)

        if key not in _TUNED:
            probe, best = x[:TUNE_ROWS], dict.fromkeys(candidates, float("inf"))

            def run(candidate: tuple[str, int | None]) -> float:
                use(candidate)
                start = time.perf_counter()
                self.forward(probe)
                elapsed = time.perf_counter() - start
                built[candidate] = tuple(getattr(self, name) for name in _LOWERING_STATE)
                return elapsed

            for candidate in candidates:
                run(candidate)
            alive = list(candidates)
            for r in range(rounds):
                for candidate in alive[r % len(alive):] + alive[:r % len(alive)]:
                    best[candidate] = min(best[candidate], run(candidate))
                fastest = min(best[c] for c in alive)
                alive = [c for c in alive if best[c] <= TUNE_DROP * fastest]
            choice = min(alive, key=best.__getitem__)
            if ("float", None) in alive and best[choice] > TUNE_MARGIN * best["float", None]:
                choice = ("float", None)  # the reference path, unless clearly beaten (`TUNE_MARGIN`)
            _TUNED[key] = choice
        use(_TUNED[key])
        self._candidates, self._tuned_rows = candidates, min(x.shape[0], TUNE_ROWS)  # `use` cleared them

    def _tune_if_due(self, x: Tensor) -> None:
        """`autotune` on `x` where the layer has not tuned yet, or where `x`'s batch is `RETUNE_GROWTH`× the rows
        the lowering was tuned on, or more (up to `TUNE_ROWS`): then among the same candidates (`forward`)."""
        if not self._tune and (self._candidates is None
                               or min(x.shape[0], TUNE_ROWS) < RETUNE_GROWTH * self._tuned_rows):
            return
        self._tune = self._tune or self._candidates
        self.autotune(x)

    def tune_signature(self) -> tuple:
        """What a lowering's speed depends on besides the input: the layer's kind and shapes."""
        return (type(self).__name__, tuple(self.wmat.shape), self.direct, self.a_bits)

    def _int_mm_split(self) -> int | None:
        """The weight split `torch._int_mm` needs here: None where it sums exactly as it is."""
        limit = pair16_weight_limit(self.u_max)
        wmat = self.wmat.to(torch.int16)  # int16: |−128| must not wrap
        if probe_int_mm("cpu") != "pair16" or wmat.numel() == 0 or int(wmat.abs().max()) <= limit:
            return None
        return choose_split(wmat.t(), limit, self.u_max, float_exact=False)

    def set_lowering(self, kernel: str, split: int | None = None) -> None:
        """Run the product on `kernel` (``onednn``, ``int_mm``, ``s16``, `export.s16`'s int16 kernel, or
        ``float``, the integer-exact float path) with the int8 weights split at 2^`split` into two calls
        (None: one call)."""
        if kernel not in ("onednn", "int_mm", "s16", "float"):
            raise ValueError(f"unknown kernel {kernel!r}")
        self._tune = None  # an explicit lowering is kept (autotune clears its list before trying each)
        self._candidates: list[tuple[str, int | None]] | None = None  # none to tune again among (`_tune_if_due`)
        self._tuned_rows = 0
        if kernel == "onednn" and not onednn_available():
            raise ValueError("this PyTorch has no oneDNN int8 kernels")
        if split is not None and kernel in ("float", "s16"):
            raise ValueError(f"the {kernel} path does not split weights")
        if kernel == "s16" and s16.load() is not None:
            raise ValueError(s16.load())
        self.use_onednn, self.float_exact, self.split = kernel == "onednn", kernel == "float", split
        self.use_s16 = kernel == "s16"
        self._onednn_cache, self._float_weight, self._chunk_cache, self._s16_packed = None, None, {}, None
        self._sums_beside: bool | None = None  # `sums_beside`, decided on first use (a conv's geometry is set last)
        # `accumulate` (the int_mm product) stays exact whichever kernel runs the layer
        mm_split = split if kernel == "int_mm" else self._int_mm_split()
        hi, lo = (None, None) if mm_split is None else split_weight(self.wmat.to(torch.int16), mm_split)
        self._mm_split = mm_split
        self.register_buffer("wmat_hi", None if hi is None else hi.to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("wmat_lo", None if lo is None else lo.to(torch.int8).contiguous(), persistent=False)
        # oneDNN rescales itself (float32 output of one kernel call) only where that is `rescale` exactly
        self.fused_rescale = self.use_onednn and self.direct and split is None and onednn_rescale_matches(
            self.rescale_kernel)
        self._fused_checked: set[tuple] = set()

    @property
    def kernel(self) -> str:
        """``onednn`` (CPU int8 kernels, float32 output), ``int_mm`` (torch._int_mm + im2col), ``s16`` (the
        int16 kernel of `export.s16`) or ``float`` (integer-exact float products)."""
        if self.float_exact:
            return "float"
        if self.use_s16 and self.wmat.device.type == "cpu":  # on another device: torch._int_mm
            return "s16"
        return "onednn" if self.use_onednn and self.wmat.device.type == "cpu" else "int_mm"

    @property
    def lowering(self) -> str:
        """What the load report records per layer: the kernel, ``-split<s>`` when the weight is split
        in two calls, ``-fused`` when oneDNN also rescales."""
        name = self.kernel + (f"-split{self.split}" if self.split is not None and self.kernel != "float" else "")
        return name + ("-fused" if self.fused_rescale and self.kernel == "onednn" else "")

    def _onednn_weights(self, device: torch.device, pack: Callable[[Tensor], Tensor]) -> tuple[list[Tensor], Tensor]:
        """The packed weights (one, or the split's hi and lo) and zero weight zero points, per device.
        A shifted layer's weights carry the all-ones row (`wmat`'s last column) as an extra output
        channel, unless `sums_beside`: the same call then also yields Σ_window (u − zx), its correction's
        sums."""
        if self._onednn_cache is None or self._onednn_cache[0] != str(device):
            w = self.wmat.t()[: self.out_ch if self.sums_beside else None].contiguous()  # [O(+1), K]
            parts = [w] if self.split is None else [p.to(torch.int8) for p in split_weight(w.to(torch.int16),
                                                                                          self.split)]
            self._onednn_cache = (str(device), [pack(p.contiguous()) for p in parts],
                                  torch.zeros(w.shape[0], dtype=torch.long, device=device))
        return self._onednn_cache[1], self._onednn_cache[2]

    @property
    def sums_beside(self) -> bool:
        """Whether this shifted layer's one oneDNN call leaves out the all-ones row, its window sums taken
        beside the kernel (`window_sums_beside`)."""
        if self._sums_beside is None:
            self._sums_beside = self.use_onednn and self.split is None and window_sums_beside(self)
        return self._sums_beside

    @property
    def _unit(self) -> Tensor:
        """Unit weight scales, one per kernel output (the all-ones row's included unless `sums_beside`)."""
        return self.unit_scale[: self.out_ch] if self.sums_beside else self.unit_scale

    def _combine(self, outs: list[Tensor]) -> Tensor:
        """One call's output, or hi·2^s + lo of a split (each exact: the add rounds once)."""
        return outs[0] if len(outs) == 1 else outs[0].mul_(float(1 << self.split)).add_(outs[1])

    def int8_weight(self) -> Tensor:
        """int8 [O, K] weights as oneDNN takes them (K in this layer's order): ``w − zw`` when
        direct, ``w − 128`` when shifted."""
        return self.wmat[:, : self.out_ch].t().contiguous()

    def _run_onednn(self, call: Callable[[float, Tensor, Tensor | None, torch.dtype], Tensor], delta: Tensor,
                    channel_dim: int, dtype: torch.dtype, shape: tuple,
                    layout: torch.memory_format = torch.contiguous_format, sums: Tensor | None = None,
                    border: Tensor | None = None) -> Tensor:
        """The layer output in `dtype` from ``call(x_scale, w_scale, bias, out_dtype)`` (one oneDNN call,
        or the two of a split weight combined): rescaled by the kernel when `fused_rescale`, else the exact
        accumulator (unit scales) through `_onednn_finish`.

        oneDNN picks its implementation per shape (and thread count), and implementations differ in
        the float order of their rescale (on AMX a linear with one or two rows rescales as
        ``(acc·Δx)·Δw``, with more as ``acc·(Δx·Δw)``). So the first call per input `shape` also runs
        the unit-scale route and keeps the kernel's rescale only where its float32 output agrees bit
        for bit (a wrong order differs on about a third of the outputs); where it does not, the layer
        rescales itself from then on. The kernel's float32 output is in `layout` here (no pass where it
        is already). A bf16 output always takes the unit-scale route: its rescale starts from the
        accumulator rounded to bf16 (`quant.integer.round_accumulator`), which no kernel's rescale does.
        `sums`: a shifted layer's window sums when taken beside the kernel (`sums_beside`); `border`: the map of a
        zero-point-free call (`IntConv2d.zero_point_free`), which never takes the kernel's rescale."""
        if not self.fused_rescale or dtype != torch.float32 or border is not None:
            return self._onednn_finish(call(1.0, self._unit, None, torch.float32), delta, channel_dim, dtype,
                                       layout, sums, border)
        key = (shape, torch.get_num_threads())
        if key in self._fused_checked:
            return call(float(delta), self.weight_scale, self.bias, torch.float32).to(memory_format=layout)
        own = call(float(delta), self.weight_scale, self.bias, torch.float32)
        ref = self._onednn_finish(call(1.0, self._unit, None, torch.float32), delta, channel_dim, torch.float32,
                                  layout)
        if own.numel() >= _CHECK_MIN_OUTPUTS and torch.equal(own, ref):
            self._fused_checked.add(key)
        else:  # another implementation, another order (or too few outputs to tell): rescale here from now on
            self.fused_rescale = False
        return ref.to(memory_format=layout)  # float32: other dtypes took the unit-scale route above

    def _onednn_finish(self, out: Tensor, delta: Tensor, channel_dim: int, dtype: torch.dtype,
                       layout: torch.memory_format = torch.contiguous_format, sums: Tensor | None = None,
                       border: Tensor | None = None) -> Tensor:
        """The layer output in `dtype` and memory `layout` (whatever oneDNN's layout), from
        oneDNN's exact accumulator (unit scales): through `rescale`, then `dtype`. A shifted layer's
        output has one more channel, Σ_window (u − zx) (its weights' all-ones row), or those sums come
        as `sums` (taken beside the kernel): ``acc = out[:O] + (128 − zw[o])·sums``, integers, so exact
        in float32. The first pass over the output writes the result in `layout` (no separate layout
        copy)."""
        if fused_ops.enabled() and out.device.type == "cpu":  # one pass: correction, rescale, dtype, layout
            view = [1] * out.dim()
            view[channel_dim] = -1
            bias = None if self.bias is None else self.bias.reshape(view)
            if delta.numel() > 1:  # per-token Δx: one per output row, as `rescale` takes it
                delta = per_row(delta, out.shape, channel_dim)
            w_scale = self.weight_scale.reshape(view)
            if rescale_order(self.rescale_kernel) == "combined":  # (acc·1)·(Δx·Δw) = acc·(Δx·Δw), bit for bit
                delta, w_scale = _ONE, delta * w_scale
            if self.direct:
                return fused_ops.rescale_to(out, delta, w_scale, bias, dtype, layout=layout)
            main, sums = (out, sums) if sums is not None else out.split([self.out_ch, 1], channel_dim)
            return fused_ops.rescale_to(main, delta, w_scale, bias, dtype, sums, self._w_off_float(view), layout)
        if self.direct:
            return self.rescale_to(out, delta, channel_dim, dtype, layout, border=border)
        view = [1] * out.dim()
        view[channel_dim] = self.out_ch
        main, sums = (out, sums) if sums is not None else out.split([self.out_ch, 1], channel_dim)
        # the sums one per position, dense (the one-pass correction's; a small copy where the kernel gave them)
        return self.rescale_to(main, delta, channel_dim, dtype, layout, (sums.contiguous(), self._w_off_float(view)),
                               border)

    def rescale_to(self, acc: Tensor, delta: Tensor, channel_dim: int, dtype: torch.dtype,
                   layout: torch.memory_format | None = None,
                   correction: tuple[Tensor, Tensor] | None = None, border: Tensor | None = None) -> Tensor:
        """`quant.integer.rescale_to` with this layer's scales and bias: the exact accumulator `acc`
        (channels on `channel_dim`; with a zero-point-free call's `border` map and a shifted layer's `correction`,
        ``(acc + border) + w_off·sums``) rescaled, then `dtype`, in memory `layout` (None: that of `acc`); in one
        pass unless the Inductor loops of `fused_ops` were asked for."""
        return rescale_to(acc, delta, self.weight_scale, self.bias, channel_dim, self.rescale_kernel, dtype, layout,
                          one_pass=not fused_ops.enabled(), correction=correction, border=border)

    @staticmethod
    def _passes_apply(t: Tensor) -> bool:
        """Whether `passes` runs the passes around the kernels (CPU, built and checked here, and the
        Inductor loops of `fused_ops` not asked for)."""
        return t.device.type == "cpu" and not fused_ops.enabled() and passes.enabled()

    def _w_off_float(self, view: list[int]) -> Tensor:
        """float32 ``128 − zw[o]`` shaped to broadcast over the output (cached per device)."""
        if self._w_off_f32 is None or self._w_off_f32.device != self.w_off.device or \
                list(self._w_off_f32.shape) != view:
            self._w_off_f32 = self.w_off.to(torch.float32).reshape(view)
        return self._w_off_f32

    def float_weight(self) -> Tensor:
        """float32 ``w − zw`` [O, K] (K in this layer's order), for the integer-exact float path."""
        if self._float_weight is None or self._float_weight.device != self.wmat.device:
            w = self.int8_weight().to(torch.float32)
            self._float_weight = w if self.direct else w + self.w_off.to(torch.float32)[:, None]
            self._chunk_cache = {}  # derived from the float weight
        return self._float_weight

    def op_weight(self) -> Tensor:
        """`float_weight` in the shape the layer's float op takes ([O, K] for a linear)."""
        return self.float_weight()

    def _float_exact(self, op: Callable[[Tensor, Tensor], Tensor], x: Tensor, zx: int, weight: Tensor,
                     delta: Tensor, channel_dim: int, dtype: torch.dtype,
                     layout: torch.memory_format = torch.contiguous_format,
                     chunked: Callable[[Tensor, int, dict], list[Tensor]] | None = None) -> Tensor:
        """`rescale_to` of the exact accumulator from float products of the integer values x = u − zx
        (`float_operand`; `quant.integer`): one product where float32 holds its sums, else
        `chunked(x, g, cache)` (the g input-channel chunks' products) where the layer has it, else the
        weight split (`quant.integer.exact_route`)."""
        cache = self._chunk_cache

        def sums(g: int) -> tuple[Tensor, Tensor]:
            if ("sums", g) not in cache:
                cache["sums", g] = sign_sums(weight, g)
            return cache["sums", g]

        if ("route", zx) not in cache:  # per zero point: fixed per slot
            cache["route", zx] = exact_route(float(zx), float(self.u_max - zx), weight.shape[1], self.k, sums,
                                             chunked is not None)
        chunks, plan = cache["route", zx]
        acc = sum_chunks(chunked(x, chunks, cache)) if chunks is not None else accumulate(op, x, weight, plan)
        # out in `layout`, written by the rescale's first pass
        return self.rescale_to(acc, delta, channel_dim, dtype, layout)

    def _slot(self) -> int:
        if not self.temporal:
            return 0
        if self._index is None:
            raise RuntimeError("temporal integer layer used before set_timestep(t)")
        return self._index

    # --- math ---------------------------------------------------------------------------------
    def quantize_input(self, x: Tensor, layout: torch.memory_format | None = None) -> tuple[Tensor, int, Tensor]:
        """(uint8 codes u, kernel zero point zx, Δx [1]) of float input `x`, in the layout of `x`, or in
        `layout` (4-D) where `passes` writes them (one pass in either layout; else the layout of `x`).

        The float ops are those of `fake_quantize`: round(x/Δ) + z, then the clamp. `u` is a view
        of a per-thread scratch buffer (or a fresh tensor from `passes`): valid until the next integer
        layer quantizes its input.
        """
        i = self._slot()
        delta = self.input_scale[i : i + 1]
        if fused_ops.enabled() and x.device.type == "cpu" and (x.is_contiguous() or x.dim() == 4 and
                                                                x.is_contiguous(memory_format=torch.channels_last)):
            u = fused_ops.quantize(x, delta, self._z_add[i], self.q_min, self.q_max, self._offset, self._qparams[i])
            return u, self._zx[i], delta
        if self._passes_apply(x):
            u = passes.quantize(x, float(delta), self._z_add[i], self.q_min, self.q_max, self._offset, layout)
            if u is not None:
                return u, self._zx[i], delta
        q, u = _SCRATCH.like(x, torch.float32), _SCRATCH.like(x, torch.uint8, slot=1)
        q = torch.div(x, delta, out=q) if q is not None else torch.div(x, delta)
        q.round_().add_(self._z_add[i]).clamp_(self.q_min, self.q_max)  # in place: one float buffer
        if self._offset:
            q.add_(self._offset)
        return (u.copy_(q) if u is not None else q.to(torch.uint8)), self._zx[i], delta

    def float_operand(self, x: Tensor, layout: torch.memory_format | None = None) -> tuple[Tensor, int, Tensor]:
        """(float32 u − zx, zx, Δx) for the float path: `quantize_input`'s codes minus the kernel zero
        point, in memory `layout` (4-D; None: that of `x`), in one pass (`passes`) where it applies."""
        if self._passes_apply(x):
            i = self._slot()
            delta = self.input_scale[i : i + 1]
            xf = passes.operand(x, float(delta), self._z_add[i], self.q_min, self.q_max, self._offset, self._zx[i],
                                layout)
            if xf is not None:
                return xf, self._zx[i], delta
        return self.operand_from_codes(x, layout)

    def operand_from_codes(self, x: Tensor, layout: torch.memory_format | None = None) -> tuple[Tensor, int, Tensor]:
        """`float_operand` from `quantize_input`'s uint8 codes (two more passes)."""
        u, zx, delta = self.quantize_input(x)
        xf = u.to(torch.float32) - zx  # in [−zx, u_max − zx]
        return (xf if layout is None else xf.contiguous(memory_format=layout)), zx, delta

    def accumulate(self, cols: Tensor, zx: int) -> Tensor:
        """Exact Σ_k (cols[m, k] − zx)(w[o, k] − zw[o]) as int32 (int64 for large K), [M, O]."""
        mm_fn = _mm_wide if self.k > _K_INT32 else _mm
        if self.wmat_hi is None:
            mm = mm_fn(cols, self.wmat)
        else:  # a pair16 kernel: two products with pair-safe weights, combined as integers
            mm = mm_fn(cols, self.wmat_hi).mul_(1 << self._mm_split).add_(mm_fn(cols, self.wmat_lo))
        if self.direct:
            acc = mm
        else:
            w_off = self.w_off.to(mm.dtype)
            acc = torch.addr(mm[:, : self.out_ch], mm[:, self.out_ch], w_off)
        return acc.sub_((zx * self.w_col).to(acc.dtype))


class IntLinear(IntLayer):
    """Linear layer on integer codes; input [..., K] float, output [..., O] float32."""

    def __init__(self, *args, **kwargs) -> None:  # arguments: see IntLayer
        super().__init__(*args, **kwargs)
        self.in_features, self.out_features = self.k, self.out_ch

    def forward(self, x: Tensor) -> Tensor:
        self._tune_if_due(x)
        kernel = self.kernel
        if kernel == "float":
            xf, zx, delta = self.float_operand(x)
            return self._float_exact(F.linear, xf, zx, self.float_weight(), delta, -1, x.dtype,
                                     chunked=self._chunk_products)
        u, zx, delta = self.quantize_input(x)
        if kernel == "onednn":
            return self._onednn(u.reshape(-1, self.k), zx, delta, x.dtype).reshape(*x.shape[:-1], self.out_ch)
        if kernel == "s16":
            acc = s16.linear(u.reshape(-1, self.k), *self._s16_call_args(zx), self.out_ch)
        else:
            acc = self.accumulate(u.reshape(-1, self.k), zx)
        return self.rescale_to(acc, delta, -1, x.dtype).reshape(*x.shape[:-1], self.out_ch)

    def _chunk_products(self, x: Tensor, g: int, cache: dict) -> list[Tensor]:
        """The float path's products over `g` feature chunks (strided slices of x: no copy)."""
        if ("chunks", g) not in cache:
            cache["chunks", g] = tuple(p.contiguous() for p in self.float_weight().chunk(g, dim=1))
        return linear_chunk_products(x, cache["chunks", g])

    def _onednn(self, u: Tensor, zx: int, delta: Tensor, dtype: torch.dtype) -> Tensor:
        packed, w_zero = self._onednn_weights(u.device, lambda w: torch.ops.onednn.qlinear_prepack(w, None))
        u = u.contiguous()

        def call(x_scale: float, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
            return self._combine([torch.ops.onednn.qlinear_pointwise(u, x_scale, int(zx), p, w_scale, w_zero, bias,
                                                                     1.0, 0, out_dtype, "none", [], "")
                                  for p in packed])
        sums = window_sums(u, int(zx)) if self.sums_beside else None
        return self._run_onednn(call, delta, 1, dtype, tuple(u.shape), sums=sums)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, a_bits={self.a_bits}, "
                f"{'direct' if self.direct else 'shifted'}, slots={self.input_scale.numel()}, "
                f"lowering={self.lowering}")


class IntConv2d(IntLayer):
    """Conv2d (groups = 1, zero padding) on integer codes; NCHW float in, NCHW float32 out."""

    _probe_onednn = staticmethod(probe_onednn_conv)
    rescale_kernel = "conv"
    preferred_layout = torch.contiguous_format  # the output layout for an input that is both (`use_layout` sets it)

    def __init__(self, weight_codes: Tensor, *args, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 **kwargs) -> None:  # other arguments: see IntLayer
        if weight_codes.dim() != 4:
            raise ValueError("IntConv2d needs weight codes of shape [O, C, kh, kw]")
        super().__init__(weight_codes, *args, **kwargs)
        self.in_channels, self.out_channels = weight_codes.shape[1], weight_codes.shape[0]
        self.kernel_size = (weight_codes.shape[2], weight_codes.shape[3])
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)

    def im2col(self, u: Tensor, zx: int) -> tuple[Tensor, int, int]:
        """uint8 NCHW codes → columns [N·Ho·Wo, kh·kw·C] (channels last), padded with code zx."""
        n, c, h, w = u.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError("padded input is smaller than the (dilated) kernel")
        nhwc = u.permute(0, 2, 3, 1)
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
            return nhwc.reshape(n * h * w, c), h, w
        if ph or pw:
            padded = torch.full((n, h + 2 * ph, w + 2 * pw, c), zx, dtype=torch.uint8, device=u.device)
            padded[:, ph : ph + h, pw : pw + w] = nhwc
        else:
            padded = nhwc
        taps = [padded[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                for i in range(kh) for j in range(kw)]
        cols = taps[0].contiguous() if len(taps) == 1 else torch.cat(taps, 3)
        return cols.reshape(n * ho * wo, -1), ho, wo

    def forward(self, x: Tensor) -> Tensor:
        self._tune_if_due(x)
        layout = layout_of(x, self.preferred_layout)  # the output keeps it, as the fake layer's does
        kernel = self.kernel
        if kernel == "float":
            weight = self.op_weight()
            geometry = (self.stride, self.padding, self.dilation)
            operand = operand_layout(weight, *geometry, layout)  # as the fake layer's
            xf, zx, delta = self.float_operand(x, operand)

            def conv(xi: Tensor, wi: Tensor) -> Tensor:
                return conv_products(xi.contiguous(memory_format=operand), wi, *geometry)

            def chunked(xi: Tensor, g: int, cache: dict) -> list[Tensor]:  # one conv, groups=g (`chunk_weight`)
                if ("chunks", g) not in cache:
                    cache["chunks", g] = chunk_weight(weight, g).contiguous()
                return conv_chunk_products(xi.contiguous(memory_format=operand), cache["chunks", g], g, *geometry)

            return self._float_exact(conv, xf, zx, weight, delta, 1, x.dtype, layout, chunked)
        if kernel == "onednn":  # codes in channels-last, oneDNN's own layout: no reorder inside the kernel
            u, zx, delta = self.quantize_input(x, torch.channels_last)
            return self._onednn(u, zx, delta, x.dtype, layout)
        u, zx, delta = self.quantize_input(x)
        if kernel == "s16":  # int32, channels-last
            acc = s16.conv(u, *self._s16_call_args(zx), self.kernel_size, self.stride, self.padding, self.dilation,
                           self.out_ch)
        else:
            cols, ho, wo = self.im2col(u, zx)
            acc = self.accumulate(cols, zx).reshape(x.shape[0], ho, wo, self.out_ch).permute(0, 3, 1, 2)
        # out in the input's layout, the layout every runtime hands to the float ops after a conv
        return self.rescale_to(acc, delta, 1, x.dtype, layout)

    def _onednn(self, u: Tensor, zx: int, delta: Tensor, dtype: torch.dtype,
                layout: torch.memory_format = torch.contiguous_format) -> Tensor:
        geometry = ([*self.stride], [*self.padding], [*self.dilation], 1)

        def pack(w: Tensor) -> Tensor:
            return torch.ops.onednn.qconv_prepack(self.conv_weight(w).contiguous(), self._unit, 1.0, 0, *geometry,
                                                  None)

        packed, w_zero = self._onednn_weights(u.device, pack)
        border = self.zero_point_free(u, int(zx), dtype)
        x_zp = 0 if border is not None else int(zx)

        def call(x_scale: float, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
            return self._combine([torch.ops.onednn.qconv2d_pointwise(u, x_scale, x_zp, p, w_scale, w_zero, bias,
                                                                     *geometry, 1.0, 0, out_dtype, "none", [], "")
                                  for p in packed])
        sums = window_sums(u, int(zx), (self.kernel_size, self.stride, self.padding)) if self.sums_beside else None
        return self._run_onednn(call, delta, 1, dtype, tuple(u.shape), layout, sums, border)

    def zero_point_free(self, u: Tensor, zx: int, dtype: torch.dtype) -> Tensor | None:
        """The map that lets oneDNN run this conv with activation zero point 0, or None where the layer passes zx.

        oneDNN's int8 conv with a nonzero source zero point ran clearly slower on the digits UNet's small 3x3
        convs, little on the 26 M UNet's (by hand on Zen 4; `benchmarks/merged_runtime.py --zero-points` measures
        the whole effect). With zero point 0 the kernel returns
        Σ_valid u·w', w' its int8 weight, padded positions adding nothing; the exact accumulator is that plus
        −zx·Σ_valid w' (the valid taps' weight sums at each output position): a [1, O, Ho, Wo] map per input
        size and zero point, which the rescale pass adds (`passes.rescale(..., border=)`). Both terms and their
        sum are exact in float32 while u_max·max_o Σ|w'_o| < 2^24, so the bits are those of the call with zx.
        Only where the layer rescales in the C pass anyway (not the kernel's own rescale; one call; a shifted
        layer's window sums beside the kernel) and zx ≠ 0; ``LOWBITDM_ZERO_POINT_FREE=0`` (read per call) passes
        zx everywhere (`benchmarks/merged_runtime.py --zero-points`)."""
        if (zx == 0 or os.environ.get("LOWBITDM_ZERO_POINT_FREE", "1") == "0" or self.split is not None
                or not (self.direct or self.sums_beside) or not self._passes_apply(u)
                or (self.fused_rescale and dtype == torch.float32)):
            return None
        if not self._zero_point_free_exact:
            return None
        key = ("border", zx, tuple(u.shape[1:]))
        if key not in self._chunk_cache:
            w = self.conv_weight(self.int8_weight().to(torch.float64))
            ones = torch.ones(1, *u.shape[1:], dtype=torch.float64)
            valid = F.conv2d(ones, w, None, self.stride, self.padding, self.dilation)  # Σ_valid w', exact
            self._chunk_cache[key] = (-zx * valid).float().contiguous(memory_format=torch.channels_last)
        return self._chunk_cache[key]

    @functools.cached_property
    def _zero_point_free_exact(self) -> bool:
        """Whether a zero-point-free call's terms are exact in float32: u_max·max_o Σ|w'_o| < 2^24 (the int8
        weight's, which no lowering changes)."""
        w = self.int8_weight().to(torch.float64)  # [O, K]
        return bool(w.numel()) and self.u_max * float(w.abs().sum(1).max()) < EXACT_F32

    def tune_signature(self) -> tuple:
        return (*super().tune_signature(), self.kernel_size, self.stride, self.padding, self.dilation)

    def conv_weight(self, w: Tensor) -> Tensor:
        """A weight in this layer's [O, K] order (K as (kh, kw, C)) as the conv's [O, C, kh, kw] (a view)."""
        kh, kw = self.kernel_size
        return w.reshape(w.shape[0], kh, kw, self.in_channels).permute(0, 3, 1, 2)

    def op_weight(self) -> Tensor:
        """`float_weight` as the conv's [O, C, kh, kw] (a view: its K order is (kh, kw, C))."""
        return self.conv_weight(self.float_weight())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, a_bits={self.a_bits}, {'direct' if self.direct else 'shifted'}, "
                f"slots={self.input_scale.numel()}, lowering={self.lowering}")
