"""Integer-exact evaluation of a quantized conv/linear: the arithmetic both runtimes share.

A quantized layer computes ``y[o] = Δx·Δw[o]·acc[o] + b[o]`` with the integer accumulator
``acc[o] = Σ_k (qx_k − zx)(qw_ok − zw_o)``. Computing ``acc`` exactly and rescaling it with
one fixed sequence of float32 operations makes the fake-quantized model (inference) and the
integer runtime produce the same bits, so their samples agree pixel for pixel instead of
drifting apart wherever an activation sits within float rounding of a rounding tie.

- `accumulate`: the exact accumulator as float32. Integer-valued float32 operands give
  exact products and partial sums in any summation order while every partial sum stays
  below 2^24 in magnitude. `split_plan` checks a bound on that: one float32 product when it
  holds; else the weight is split as ``w = hi·2^s + lo`` (|lo| ≤ 2^(s−1)) so that both
  products are exact in float32, and ``hi_acc·2^s + lo_acc`` rounds once; float64 only when no
  split works. The bound per output row is `partial_sum_bound`: with inputs in [−x_neg, x_pos]
  and the row's positive and negative weight sums P and N, every partial sum lies within
  max(x_pos·P + x_neg·N, x_neg·P + x_pos·N) (`exact_route` picks the route). Cheaper than the
  split where the layer can run it (`chunk_plan`): the input channels in g equal chunks, each
  chunk's sums exact in float32, all chunks in one grouped call (a conv's ``groups``) and
  `sum_chunks` adding the g exact partial sums with one rounding: the product's FLOPs once
  instead of twice. The float32 result is the
  round-to-nearest-even of the exact integer, as the int32 → float32 conversion of the
  integer kernels gives.
- `rescale`: ``Δx·Δw[o]·acc + b[o]`` in float32, in the order of this machine's int8 kernel of
  the layer's kind (`rescale_order`): ``((acc · Δx) · Δw[o]) + b[o]`` ("sequential", three
  roundings: oneDNN on AVX-512 / VNNI CPUs) or ``(acc · (Δx · Δw[o])) + b[o]`` ("combined", the
  scales multiplied first: oneDNN on AVX2 and AMX CPUs). Both runtimes use the order the process
  found, so the kernel can rescale (and round to bf16) itself where its order is that one
  (the integer runtime checks each layer's shapes once), and int == fake holds bit for bit on
  every class (`tests/export/test_int_runtime.py`); where oneDNN is absent or matches neither
  order, "sequential", and the runtime rescales the kernel's exact accumulator itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbitdm_cli.export import passes

__all__ = ["BF16_EXACT", "EXACT_F32", "KERNELS", "MAX_CHUNKS", "RESCALE_ORDERS", "accumulate", "bf16_math",
           "bf16_math_enabled", "bf16_products",
           "chunk_limit", "chunk_plan", "chunk_weight", "conv_chunk_products", "conv_products", "exact_route",
           "layout_of", "linear_chunk_products", "operand_layout", "pair", "partial_sum_bound", "per_row", "pointwise",
           "rescale", "rescale_order", "rescale_to", "round_accumulator", "sign_sums", "split_plan", "split_weight",
           "sum_chunks"]

EXACT_F32 = 2**24
"""Integers up to this magnitude are exact in float32."""
BF16_EXACT = 2**8
"""Integers up to this magnitude are exact in bf16 (8 significant bits): every 8-bit code minus its zero point."""
_BF16_PRODUCTS_ENV = "LOWBITDM_BF16_PRODUCTS"


def bf16_products() -> bool:
    """Whether a bf16 model's fake-quantized layers run their exact products on bf16 operands on the CPU
    (`QuantLayerMixin._integer_forward`): ``$LOWBITDM_BF16_PRODUCTS`` (1, 0 or auto, read per call); by
    default (auto) where the CPU runs bf16 natively (`models.precision.bf16_native`), elsewhere a bf16
    product is emulated and slower than the float32 one. Either product gives the same bits (the bf16
    rule of `rescale_to`)."""
    forced = _switch(_BF16_PRODUCTS_ENV)
    if forced is not None:
        return forced
    from lowbitdm_cli.models.precision import bf16_native

    return bf16_native()


def _switch(name: str) -> bool | None:
    """``$name`` as 1 (True), 0 (False) or auto / unset (None: the caller's default); anything else a ValueError."""
    env = os.environ.get(name, "auto")
    if env not in ("0", "1", "auto"):
        raise ValueError(f"${name} must be 0, 1 or auto, got {env!r}")
    return None if env == "auto" else env == "1"


_BF16_MATH_ENV = "LOWBITDM_BF16_MATH"


def bf16_math_enabled() -> bool:
    """Whether `bf16_math` lets oneDNN compute float32 products of integer values with bf16 multiplies:
    ``$LOWBITDM_BF16_MATH`` (1, 0 or auto, read per call); by default (auto) where oneDNN runs on AMX-BF16
    (the CPU has it and ``ONEDNN_MAX_CPU_ISA``, if set, does not cap below it). Elsewhere oneDNN keeps its
    float32 kernels in this mode (AVX512-BF16 on AMD Zen 4: its convs and matmuls stay ``avx512_core``,
    checked with ``ONEDNN_VERBOSE=1``), so auto leaves the flags alone there."""
    forced = _switch(_BF16_MATH_ENV)
    if forced is not None:
        return forced
    from lowbitdm_cli.export.kernel_probe import amx_bf16

    return amx_bf16()


@contextlib.contextmanager
def bf16_math(enabled: bool = True) -> Iterator[None]:
    """Within it, oneDNN's float32 convs and matmuls may multiply in bf16 with float32 sums (its fpmath mode
    bf16: ``torch.backends.mkldnn.{conv,matmul}.fp32_precision = "bf16"``; on AMX-BF16 they then run as bf16
    tile products, several times faster). For the exact products of `accumulate` and `chunk_plan` that is
    exact as well: every operand is an integer of magnitude at most `BF16_EXACT` (8-bit codes minus their
    zero point, weights w − zw and their split halves), which bf16 holds exactly, each product of two is
    exact in float32, and the float32 sums are exact while the route's bound keeps them below 2^24. The caller
    checks the operands; nothing else may run inside (the flags are process-wide: restored on exit)."""
    if not enabled:
        yield
        return
    mkldnn = torch.backends.mkldnn
    before = mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision
    mkldnn.conv.fp32_precision = mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision = before

RESCALE_ORDERS = ("sequential", "combined")
KERNELS = ("conv", "linear")
_ORDER_ENV = "LOWBITDM_RESCALE_ORDER"


def rescale_order(kernel: str) -> str:
    """The float order of `rescale` for a `kernel` ("conv" or "linear") layer in this process:
    ``$LOWBITDM_RESCALE_ORDER`` (sequential | combined | auto) or, by default (auto), the order of
    this CPU's oneDNN int8 kernel of that kind (`export.kernel_probe.probe_rescale_order`, run once
    per process), "sequential" where there is none or it matches neither. A fake-quantized model's
    samples therefore differ in the last bit of some rescales between CPU classes (as its float
    kernels' summation orders already make them differ); set the variable to get one order everywhere."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    order = os.environ.get(_ORDER_ENV, "auto")
    if order == "auto":
        from lowbitdm_cli.export.kernel_probe import probe_rescale_order

        return probe_rescale_order(kernel) or "sequential"
    if order not in RESCALE_ORDERS:
        raise ValueError(f"${_ORDER_ENV} must be auto, sequential or combined, got {order!r}")
    return order


def split_plan(x_max: float, w_abs_row_sum_max: float, k: int) -> int | None:
    """How to get Σ_k x_k·w_ok exactly in float32, for |x| ≤ `x_max`, max_o Σ_k |w_ok| =
    `w_abs_row_sum_max` and `k` terms: 0 = one product (every partial sum < 2^24); s > 0 = split
    the weight at 2^s (`split_weight`); None = no split keeps both products exact (use float64)."""
    if x_max * w_abs_row_sum_max < EXACT_F32:
        return 0
    for s in range(1, 9):
        lo_bound = x_max * k * 2 ** (s - 1)
        hi_bound = x_max * (w_abs_row_sum_max / 2**s + k / 2)
        if lo_bound < EXACT_F32 and hi_bound < EXACT_F32:
            return s
    return None


def split_weight(w_int: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) with ``w_int = hi·2^s + lo``, lo = w − 2^s·round(w/2^s) ∈ [−2^(s−1), 2^(s−1)]
    (every operation exact on integer-valued floats)."""
    step = float(2**s)
    hi = torch.round(w_int / step)
    return hi, w_int - hi * step


MAX_CHUNKS = 16
"""`chunk_plan` tries at most this many chunks (more: the split of `split_plan`, or float64)."""


def sign_sums(w_int: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """(P, N), each [O, g] float64: per output row o and chunk j of the input channels (dim 1: a conv's
    [O, C, kh, kw], a linear's [O, K]) cut into `g` equal chunks, Σ_{k ∈ chunk j} max(w_ok, 0) and
    Σ_{k ∈ chunk j} max(−w_ok, 0)."""
    w = w_int.detach().reshape(w_int.shape[0], g, -1).to(torch.float64)
    return w.clamp(min=0).sum(-1), (-w).clamp(min=0).sum(-1)


def partial_sum_bound(x_neg: float, x_pos: float, sums: tuple[Tensor, Tensor]) -> float:
    """The largest magnitude any partial sum of Σ_{k ∈ chunk} x_k·w_ok can take, in any order, over rows
    and chunks (`sums` from `sign_sums`), for inputs x ∈ [−x_neg, x_pos]: a term with w > 0 lies in
    [−x_neg·w, x_pos·w], one with w < 0 in [−x_pos·|w|, x_neg·|w|], so every partial sum lies in
    [−(x_neg·P + x_pos·N), x_pos·P + x_neg·N]. One-sided inputs (after a SiLU: x_neg ≪ x_pos) have a
    bound up to twice as tight as ``max(x_neg, x_pos) · Σ|w|``."""
    p, n = sums
    if p.numel() == 0:
        return 0.0
    return float(torch.maximum(x_pos * p + x_neg * n, x_neg * p + x_pos * n).max())


def chunk_plan(x_neg: float, x_pos: float, units: int, sums: Callable[[int], tuple[Tensor, Tensor]],
               max_chunks: int = MAX_CHUNKS) -> int | None:
    """The fewest equal chunks g (1: one product) of the `units` input channels, g dividing `units` and
    at most `max_chunks`, whose every partial sum is exact in float32 for inputs in [−x_neg, x_pos]
    (`partial_sum_bound` of `sums(g)`, the weight's `sign_sums`, which a caller may cache); None where
    none is."""
    for g in range(1, max(1, min(max_chunks, units)) + 1):
        if units % g == 0 and partial_sum_bound(x_neg, x_pos, sums(g)) < EXACT_F32:
            return g
    return None


def exact_route(x_neg: float, x_pos: float, units: int, k: int, sums: Callable[[int], tuple[Tensor, Tensor]],
                chunkable: bool = True) -> tuple[int | None, int | None]:
    """How to compute Σ_k x_k·w_ok exactly in float32 for x ∈ [−x_neg, x_pos] over `k` terms in `units`
    input channels: (g, 0) for g ≥ 2 chunk products (`chunk_plan`, where the layer is `chunkable`: two at
    most where the weight split works, `chunk_limit`; then `sum_chunks`), else (None, plan) for
    `accumulate`: 0 one product, s the weight split, None float64. Depends on the weight and the input
    range only: a caller may cache it per range."""
    g = chunk_plan(x_neg, x_pos, units, sums, 2 if chunkable else 1)
    if g == 1:
        return None, 0
    if g is not None:
        return g, 0
    p, n = sums(1)
    plan = split_plan(max(x_neg, x_pos), float((p + n).max()), k)
    if chunkable and chunk_limit(plan) > 2:
        g = chunk_plan(x_neg, x_pos, units, sums, chunk_limit(plan))
        if g is not None:
            return g, 0
    return None, plan


def chunk_limit(plan: int | None) -> int:
    """The most chunks worth running in place of `split_plan`'s `plan` (not 0): two where the weight split
    works (one grouped product and one float32 add cost about one product; the split costs two), up to
    `MAX_CHUNKS` where only float64 would (more chunks add a float64 pass over every chunk's output)."""
    return 2 if plan is not None else MAX_CHUNKS


def chunk_weight(w_int: Tensor, g: int) -> Tensor:
    """The weight of a `g`-group conv whose group j multiplies input-channel chunk j with every
    output row: [O, C, ...] → [g·O, C/g, ...] (group j = rows j·O … (j+1)·O − 1)."""
    out_ch, in_ch = w_int.shape[:2]
    return w_int.unflatten(1, (g, in_ch // g)).transpose(0, 1).reshape(g * out_ch, in_ch // g, *w_int.shape[2:])


def pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """A conv geometry value (stride, padding, dilation) given as an int or a pair, as a pair of ints."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pointwise(w: Tensor, stride, padding, dilation) -> bool:
    """Whether a conv with weight `w` ([O, C/groups, kh, kw]) and this geometry (ints or pairs) is a plain 1x1
    one: stride 1, no padding, so output position p is Σ_c w[o, c]·x[c, p], a matmul (`conv_products`)."""
    return tuple(w.shape[2:]) == (1, 1) and pair(stride) == pair(dilation) == (1, 1) and pair(padding) == (0, 0)


def operand_layout(w: Tensor, stride, padding, dilation, out_layout: torch.memory_format) -> torch.memory_format:
    """The layout an integer-exact conv wants its integer operand in: that of its output (`layout_of`) for a
    plain 1x1 conv (`pointwise`: one matmul in either layout, so an NCHW model changes no layout at all),
    channels-last for every other (oneDNN's float convs compute in it: no reorder of input and output
    per call). Every exact product gives the same bits in either layout; this is speed only."""
    return out_layout if pointwise(w, stride, padding, dilation) else torch.channels_last


def conv_products(x: Tensor, w: Tensor, stride, padding, dilation, groups: int = 1) -> Tensor:
    """The bias-free conv of integer-valued `x` and `w` (``F.conv2d``), as one batched matmul on NCHW-contiguous
    `x` where the conv is `pointwise` (groups g: g blocks of input channels, each with its O/g output rows):
    [N, O, H, W] in `x`'s layout, so a 1x1 conv in an NCHW model needs no layout change (oneDNN's float
    conv computes in channels-last and reorders NCHW input and output per call)."""
    if not (x.dim() == 4 and x.is_contiguous() and pointwise(w, stride, padding, dilation)):
        return F.conv2d(x, w, None, stride, padding, dilation, groups)
    n, c, h, wd = x.shape
    o = w.shape[0] // groups
    y = torch.matmul(w.reshape(groups, o, c // groups), x.reshape(n, groups, c // groups, h * wd))
    return y.reshape(n, groups * o, h, wd)


def conv_chunk_products(x: Tensor, w_chunked: Tensor, g: int, stride, padding, dilation) -> list[Tensor]:
    """The `g` input-channel chunks' products of a conv in one call with ``groups=g`` (`w_chunked` from
    `chunk_weight`; `conv_products`): its [N, g·O, ...] output viewed as the g chunks' [N, O, ...], for
    `sum_chunks`."""
    y = conv_products(x, w_chunked, stride, padding, dilation, g)
    return list(y.unflatten(1, (g, y.shape[1] // g)).unbind(1))


def linear_chunk_products(x: Tensor, w_chunks: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """The products of a linear's g feature chunks (`w_chunks`: the weight's g column blocks [O, K/g],
    or them stacked [g, O, K/g]) with the matching slices of x (strided views: no copy), for `sum_chunks`."""
    k = x.shape[-1] // len(w_chunks)
    return [F.linear(x[..., j * k:(j + 1) * k], w) for j, w in enumerate(w_chunks)]


def sum_chunks(parts: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Σ of the chunks' exact float32 partial sums, rounded once to float32: for two, one float32 add
    (IEEE addition rounds the exact sum once); for more, in float64 (exact: |Σ| < g·2^24 ≪ 2^53),
    then one rounding to float32."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return torch.add(parts[0], parts[1])
    total = parts[0].to(torch.float64)
    for part in parts[1:]:
        total += part
    return total.to(torch.float32)


def accumulate(op: Callable[[Tensor, Tensor], Tensor], x_int: Tensor, w_int: Tensor, plan: int | None,
               split: Callable[[int], tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """float32 ``op(x_int, w_int)`` of integer-valued operands, computed exactly and rounded once.

    `plan` comes from `split_plan`; `split(s)` returns `split_weight(w_int, s)` (a caller may cache it).
    """
    if plan == 0:
        return op(x_int, w_int)
    if plan is None:
        return op(x_int.double(), w_int.double()).float()
    hi, lo = split(plan) if split is not None else split_weight(w_int, plan)
    return op(x_int, hi) * float(2**plan) + op(x_int, lo)  # ×2^s is exact: one rounding, in the add


def per_row(x_scale: Tensor, shape: torch.Size | list[int], channel_dim: int) -> Tensor:
    """Per-token activation scales (one per output row, in row order) shaped to broadcast over an
    output of `shape`: the output channel dim gets 1, the others are the rows."""
    rows = list(shape)
    rows[channel_dim] = 1
    return x_scale.reshape(rows)


def layout_of(x: Tensor, ambiguous: torch.memory_format = torch.contiguous_format) -> torch.memory_format:
    """The memory layout a conv layer's output keeps: its 4-D input's, channels-last or contiguous;
    `ambiguous` where the input is both (a single channel, or 1x1 spatial: a one-channel image
    entering a channels-last model), else contiguous. Fake and integer runtimes alike, so the float
    ops after the layer (norms, adds, concats) see the same layout, and so round alike, in both."""
    if x.dim() != 4:
        return torch.contiguous_format
    channels_last, contiguous = x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()
    if channels_last and contiguous:
        return ambiguous
    return torch.channels_last if channels_last else torch.contiguous_format


def rescale(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None, channel_dim: int, kernel: str,
            layout: torch.memory_format | None = None, order: str | None = None) -> Tensor:
    """float32 ``((acc · Δx) · Δw[o]) + b[o]`` (`order` "sequential") or ``(acc · (Δx · Δw[o])) + b[o]``
    ("combined"; None: `rescale_order(kernel)`, `kernel` "conv" or "linear" being the layer's kind)
    with the output channel o on `channel_dim`, computed
    in place in `acc` (a float32 temporary of the caller's: no new buffers on the hot path). With a
    `layout` (``torch.contiguous_format`` or, for 4-D, ``torch.channels_last``) the result has that
    memory layout whatever the layout of `acc`: where `acc` has another, the first pass writes a new
    tensor in `layout`, so the layout change costs no extra pass.

    `x_scale` is a one-element tensor, or one entry per output position (per-token dynamic
    activations: one per row of a linear's output, in row order); `w_scale` and `bias` have one
    entry per output channel.
    """
    view = [1] * acc.dim()
    view[channel_dim] = -1
    dest = acc if layout is None or acc.is_contiguous(memory_format=layout) else \
        torch.empty(acc.shape, dtype=acc.dtype, device=acc.device, memory_format=layout)
    x_scale = x_scale.reshape(()) if x_scale.numel() == 1 else per_row(x_scale, acc.shape, channel_dim)
    if (order or rescale_order(kernel)) == "combined":
        out = torch.mul(acc, x_scale * w_scale.reshape(view), out=dest)
    else:
        out = torch.mul(acc, x_scale, out=dest).mul_(w_scale.reshape(view))
    return out if bias is None else out.add_(bias.reshape(view))


def round_accumulator(acc: Tensor, dtype: torch.dtype) -> Tensor:
    """The accumulator as a rescale to `dtype` takes it: float32 (int32 → float32 rounds to nearest even
    past 2^24), and for a bf16 output rounded to bf16 first (as a bf16 product of the exact integer operands
    returns it: float32 sums, one rounding; `rescale_to`), back in float32 (exact). A new tensor where it
    converts or rounds, else `acc` itself."""
    if acc.dtype != torch.float32:
        acc = acc.to(torch.float32)
    if dtype == torch.bfloat16:
        return acc.to(torch.bfloat16).to(torch.float32)
    return acc


def rescale_to(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None, channel_dim: int, kernel: str,
               dtype: torch.dtype, layout: torch.memory_format | None = None, one_pass: bool = True,
               correction: tuple[Tensor, Tensor] | None = None, border: Tensor | None = None) -> Tensor:
    """`rescale` of an exact accumulator `acc` (float32, int32, int64, or bf16 from a bf16 product), then
    `dtype`, in memory `layout` (None: that of `acc`). For a bf16 output the accumulator is rounded to bf16
    first (`round_accumulator`): the rule that lets a bf16 model's fake-quantized layers run their exact
    products as bf16 products (float32 sums, the output rounded once to bf16: the 8-bit codes are exact in
    bf16) at bf16 speed, while the integer runtime rounds its exact int32 accumulator the same way, so the
    two stay equal bit for bit (it is also the error a bf16 FP conv makes: one bf16 rounding of the sum).
    One pass (`export.passes`, the same float ops) where `one_pass` allows it and it applies (a CPU tensor,
    one `x_scale`, channels on dim 1 of a 4-D `acc` or on its last dim); else the eager ops, in place in a
    float32 `acc` (the integer and the fake runtime both rescale here). `correction`: (sums, w_off) of a
    shifted integer layer (`export.int_runtime.IntLayer`), whose exact accumulator is ``acc + w_off·sums``
    (``torch.addcmul``; w_off broadcast over the channels, sums over the positions), added in the same pass;
    `border`: a [1, C, H, W] map added to a float32 4-D `acc` before it
    (`export.int_runtime.IntConv2d.zero_point_free`)."""
    if (one_pass and acc.device.type == "cpu" and x_scale.numel() == 1
            and channel_dim in ((1,) if acc.dim() == 4 else (-1, acc.dim() - 1)) and passes.enabled()):
        combined = rescale_order(kernel) == "combined"
        out = passes.rescale(acc, float(x_scale), w_scale, bias, combined, dtype, layout, correction, border)
        if out is not None:
            return out
    if border is not None:
        acc = acc + border
    if correction is not None:
        out = (torch.empty_like(acc, dtype=torch.float32) if layout is None
               else torch.empty(acc.shape, dtype=torch.float32, device=acc.device, memory_format=layout))
        acc = torch.addcmul(acc, *correction, out=out)
    if acc.dtype != torch.float32:
        acc = acc.to(torch.float32, memory_format=layout or torch.preserve_format)
    return rescale(round_accumulator(acc, dtype), x_scale, w_scale, bias, channel_dim, kernel, layout).to(dtype)
