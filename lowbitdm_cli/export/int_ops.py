"""Exact integer linear/conv2d/matmul on asymmetric uint8 codes via int8 ``torch._int_mm``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PreparedWeight",
    "prepare_weight",
    "int_linear_acc",
    "int_linear",
    "int_conv2d_acc",
    "int_conv2d",
    "int_matmul",
]

# Method.  Codes q in [0, 255] are shifted to int8 as s = q - 128, so q - z = s + c with the
# constant c = 128 - z.  Hence, per output element,
#     sum_k (qx - zx)(qw - zw) = sum_k sx*sw + cw*sum_k sx + cx*sum_k sw + K*cx*cw,
# where sum_k sx*sw is one int8 x int8 -> int32 ``torch._int_mm`` and the rest are int64
# corrections.  Everything is integer arithmetic, so the result is exact.
#
# ``torch._int_mm`` on CPU (torch 2.14, checked empirically): both operands 2-D, mat1 int8
# or uint8, mat2 int8, any M/K/N >= 0 (no multiple-of-8 or M > 16 rule, non-contiguous
# operands accepted), int32 result that silently wraps on overflow.  With int8 operands each
# product is at most 128**2, so K is split into chunks of 2**16 to stay far below 2**31.
# On other devices (CUDA needs M > 16 and K, N multiples of 8) the operands are zero-padded,
# which adds nothing to the product.  ``F.unfold`` has no int8 kernel on CPU, so conv im2col
# uses ``Tensor.unfold`` views instead.

_SHIFT = 128
_K_CHUNK = 1 << 16
_CUDA_MULT = 8
_CUDA_MIN_M = 17


@dataclass(frozen=True)
class PreparedWeight:
    """Weight codes precomputed for ``_int_mm``; a layer can keep the tensors as buffers.

    ``wt``: int8 [K, O], (qw - 128) reshaped to [O, K] and transposed (the ``mat2`` layout).
    ``w_sum``: int64 [O], sum over K of ``wt``.  ``w_off``: int64 [O], 128 - zw.
    ``kernel_size``: (kh, kw) for conv weights, None for linear weights.
    """

    wt: Tensor
    w_sum: Tensor
    w_off: Tensor
    kernel_size: tuple[int, int] | None = None

    def buffers(self) -> dict[str, Tensor]:
        """Tensors to register as buffers; rebuild with ``PreparedWeight(**buffers, kernel_size=...)``."""
        return {"wt": self.wt, "w_sum": self.w_sum, "w_off": self.w_off}


def _check_codes(q: Tensor, name: str) -> None:
    if not isinstance(q, Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of codes")
    if q.dtype != torch.uint8 and q.numel() and (int(q.min()) < 0 or int(q.max()) > 255):
        raise ValueError(f"{name} codes must lie in [0, 255]")


def _shift(q: Tensor, name: str) -> Tensor:
    """Codes in [0, 255] -> int8 codes minus 128."""
    _check_codes(q, name)
    return torch.bitwise_xor(q.to(torch.uint8), _SHIFT).view(torch.int8)


def _zero_point(z: int | Tensor, name: str) -> int:
    if isinstance(z, Tensor):
        if z.numel() != 1 or z.is_floating_point():
            raise ValueError(f"{name} must be a single integer")
        z = int(z.item())
    if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z <= 255:
        raise ValueError(f"{name} must be an integer in [0, 255], got {z!r}")
    return z


def _padded_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``_int_mm`` with zero padding to M >= 17 and K, N multiples of 8 (CUDA constraints)."""
    m, k = a.shape
    n = b.shape[1]
    mp, kp = max(m, _CUDA_MIN_M), -(-k // _CUDA_MULT) * _CUDA_MULT
    np_ = -(-n // _CUDA_MULT) * _CUDA_MULT
    a = F.pad(a, (0, kp - k, 0, mp - m)) if (mp, kp) != (m, k) else a
    b = F.pad(b, (0, np_ - n, 0, kp - k)) if (kp, np_) != (k, n) else b
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def _mm_exact(a: Tensor, b: Tensor) -> Tensor:
    """Exact int64 product of int8 matrices a [M, K] and b [K, N].

    Where ``_int_mm`` adds products in saturating 16-bit pairs (x86 without VNNI, `kernel_probe`)
    b is split as 2·hi + lo (|hi| ≤ 64, |lo| ≤ 1: pair-safe with a shifted to [0, 255]); where it is
    not exact at all, float64 (exact for these magnitudes) does the product. So does a single output
    column (N = 1): with oneDNN capped at AVX512_CORE ``_int_mm``'s N = 1 path was wrong even for
    |b| <= 4 while every N >= 2 was pair16-exact (torch 2.14, Sapphire Rapids); a matrix-vector
    product gains nothing from the kernel anyway."""
    from lowbitdm_cli.export.kernel_probe import probe_int_mm

    if b.shape[1] == 1 and a.device.type == "cpu":
        return (a.double() @ b.double()).round().to(torch.int64)
    kind = probe_int_mm(a.device.type)
    if kind == "pair16" and b.numel() and int(b.to(torch.int16).abs().max()) > 64:
        hi = torch.round(b.to(torch.float32) / 2).to(torch.int8)
        lo = (b.to(torch.int16) - 2 * hi.to(torch.int16)).to(torch.int8)
        return 2 * _mm_exact(a, hi) + _mm_exact(a, lo)
    if kind not in ("int32", "pair16"):
        return (a.double() @ b.double()).round().to(torch.int64)
    mm = torch._int_mm if a.device.type == "cpu" else _padded_int_mm
    k = a.shape[1]
    if k <= _K_CHUNK:
        return mm(a, b).to(torch.int64)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for k0 in range(0, k, _K_CHUNK):
        out += mm(a[:, k0 : k0 + _K_CHUNK], b[k0 : k0 + _K_CHUNK]).to(torch.int64)
    return out


def _acc(sx: Tensor, x_off: int, wt: Tensor, w_sum: Tensor, w_off: Tensor | int) -> Tensor:
    """sum_k (sx + x_off)(wt + w_off) as int64 [M, O] for shifted int8 sx [M, K], wt [K, O]."""
    x_sum = sx.sum(1, dtype=torch.int64)
    k = sx.shape[1]
    return _mm_exact(sx, wt) + x_sum[:, None] * w_off + x_off * (w_sum + k * w_off)


def prepare_weight(qw: Tensor, zw: int | Tensor) -> PreparedWeight:
    """Precompute the shifted, transposed int8 weight and its sums for [O, K] or [O, C, kh, kw] codes."""
    if not isinstance(qw, Tensor) or qw.dim() not in (2, 4):
        raise ValueError("qw must be a 2-D [O, K] or 4-D [O, C, kh, kw] code tensor")
    out_ch = qw.shape[0]
    zw_t = torch.as_tensor(zw, device=qw.device)
    if zw_t.is_floating_point() or zw_t.numel() not in (1, out_ch):
        raise ValueError(f"zw must be an integer scalar or have {out_ch} entries")
    zw_t = zw_t.reshape(-1).to(torch.int64).expand(out_ch)
    if zw_t.numel() and (int(zw_t.min()) < 0 or int(zw_t.max()) > 255):
        raise ValueError("zw must lie in [0, 255]")
    sw = _shift(qw, "qw").reshape(out_ch, -1)
    kernel = (qw.shape[2], qw.shape[3]) if qw.dim() == 4 else None
    return PreparedWeight(
        wt=sw.t().contiguous(),
        w_sum=sw.sum(1, dtype=torch.int64),
        w_off=(_SHIFT - zw_t).contiguous(),
        kernel_size=kernel,
    )


def _as_prepared(qw: Tensor | PreparedWeight, zw: int | Tensor | None) -> PreparedWeight:
    if isinstance(qw, PreparedWeight):
        return qw
    if zw is None:
        raise ValueError("zw is required when qw is not a PreparedWeight")
    return prepare_weight(qw, zw)


def _scale_bias(acc: Tensor, scale: Tensor | float, bias: Tensor | None, dim: int) -> Tensor:
    """float32 ``scale[o] * acc + bias[o]`` with the output channel on axis ``dim``."""
    out_ch = acc.shape[dim]
    view = [1] * acc.dim()
    view[dim] = -1
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=acc.device)
    if scale_t.numel() not in (1, out_ch):
        raise ValueError(f"scale must be a scalar or have {out_ch} entries")
    out = acc.to(torch.float32) * (scale_t.reshape(view) if scale_t.numel() > 1 else scale_t.reshape(()))
    if bias is not None:
        if bias.numel() != out_ch:
            raise ValueError(f"bias must have {out_ch} entries")
        out = out + bias.to(torch.float32).reshape(view)
    return out


def int_linear_acc(
    qx: Tensor, zx: int | Tensor, qw: Tensor | PreparedWeight, zw: int | Tensor | None = None
) -> Tensor:
    """Exact int64 sum_k (qx[..., k] - zx)(qw[o, k] - zw[o]) with shape [..., O]."""
    w = _as_prepared(qw, zw)
    if w.kernel_size is not None or not isinstance(qx, Tensor) or qx.dim() < 1:
        raise ValueError("int_linear needs a linear weight and qx of shape [..., K]")
    k = w.wt.shape[0]
    if qx.shape[-1] != k:
        raise ValueError(f"qx has K={qx.shape[-1]}, weight expects K={k}")
    sx = _shift(qx, "qx").reshape(-1, k)
    acc = _acc(sx, _SHIFT - _zero_point(zx, "zx"), w.wt, w.w_sum, w.w_off)
    return acc.reshape(*qx.shape[:-1], w.wt.shape[1])


def int_linear(
    qx: Tensor,
    zx: int | Tensor,
    qw: Tensor | PreparedWeight,
    zw: int | Tensor | None,
    scale: Tensor | float,
    bias: Tensor | None = None,
) -> Tensor:
    """float32 ``scale[o] * sum_k (qx - zx)(qw[o] - zw[o]) + bias[o]``, shape [..., O]."""
    return _scale_bias(int_linear_acc(qx, zx, qw, zw), scale, bias, -1)


def _pair(v: int | tuple[int, int] | list[int], name: str, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < minimum for p in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return pair  # type: ignore[return-value]


def _im2col(sx: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int], pad_value: int) -> tuple[Tensor, int, int]:
    """int8 [N, C, H, W] -> columns [N*Ho*Wo, C*kh*kw] (C-major, like a flattened weight)."""
    n, c = sx.shape[:2]
    sx = F.pad(sx, (padding[1], padding[1], padding[0], padding[0]), value=pad_value)
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    if sx.shape[2] < span[0] or sx.shape[3] < span[1]:
        raise ValueError("padded input is smaller than the (dilated) kernel")
    cols = sx.unfold(2, span[0], stride[0]).unfold(3, span[1], stride[1])
    cols = cols[..., :: dilation[0], :: dilation[1]]  # [N, C, Ho, Wo, kh, kw]
    ho, wo = cols.shape[2], cols.shape[3]
    return cols.permute(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, -1), ho, wo


def int_conv2d_acc(
    qx: Tensor,
    zx: int | Tensor,
    qw: Tensor | PreparedWeight,
    zw: int | Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """Exact int64 conv2d of (qx - zx) [N, C, H, W] with (qw - zw) [O, C/groups, kh, kw] -> [N, O, Ho, Wo].

    Zero padding pads with the code ``zx`` (real 0); ``groups > 1`` loops over the groups.
    """
    w = _as_prepared(qw, zw)
    if w.kernel_size is None or not isinstance(qx, Tensor) or qx.dim() != 4:
        raise ValueError("int_conv2d needs a conv weight and qx of shape [N, C, H, W]")
    out_ch = w.wt.shape[1]
    bad_groups = isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
    if bad_groups or qx.shape[1] % groups or out_ch % groups:
        raise ValueError(f"groups={groups!r} must be a positive divisor of C={qx.shape[1]} and O={out_ch}")
    kh, kw = w.kernel_size
    kg = (qx.shape[1] // groups) * kh * kw
    if w.wt.shape[0] != kg:
        raise ValueError(f"weight expects K={w.wt.shape[0]} per group, input gives K={kg}")
    zx_i = _zero_point(zx, "zx")
    cols, ho, wo = _im2col(_shift(qx, "qx"), (kh, kw), _pair(stride, "stride", 1),
                           _pair(padding, "padding", 0), _pair(dilation, "dilation", 1), zx_i - _SHIFT)
    og = out_ch // groups
    parts = [
        _acc(cols[:, g * kg : (g + 1) * kg], _SHIFT - zx_i, w.wt[:, g * og : (g + 1) * og],
             w.w_sum[g * og : (g + 1) * og], w.w_off[g * og : (g + 1) * og])
        for g in range(groups)
    ]
    acc = parts[0] if groups == 1 else torch.cat(parts, 1)
    return acc.reshape(qx.shape[0], ho, wo, out_ch).permute(0, 3, 1, 2)


def int_conv2d(
    qx: Tensor,
    zx: int | Tensor,
    qw: Tensor | PreparedWeight,
    zw: int | Tensor | None,
    scale: Tensor | float,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> Tensor:
    """float32 ``scale[o] * conv(qx - zx, qw - zw)[o] + bias[o]``, shape [N, O, Ho, Wo]."""
    acc = int_conv2d_acc(qx, zx, qw, zw, stride, padding, dilation, groups)
    return _scale_bias(acc, scale, bias, 1).contiguous()


def int_matmul(qa: Tensor, za: int | Tensor, qb: Tensor, zb: int | Tensor) -> Tensor:
    """Exact int64 sum_k (qa[..., m, k] - za)(qb[..., k, n] - zb); leading dims broadcast."""
    if not isinstance(qa, Tensor) or not isinstance(qb, Tensor) or qa.dim() < 2 or qb.dim() < 2:
        raise ValueError("qa and qb must be code tensors with at least 2 dims")
    if qa.shape[-1] != qb.shape[-2]:
        raise ValueError(f"inner dims differ: {qa.shape[-1]} vs {qb.shape[-2]}")
    try:
        batch = torch.broadcast_shapes(qa.shape[:-2], qb.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(f"batch dims do not broadcast: {exc}") from None
    a_off, b_off = _SHIFT - _zero_point(za, "za"), _SHIFT - _zero_point(zb, "zb")
    sa = _shift(qa, "qa").expand(*batch, *qa.shape[-2:]).reshape(-1, *qa.shape[-2:])
    sb = _shift(qb, "qb").expand(*batch, *qb.shape[-2:]).reshape(-1, *qb.shape[-2:])
    b_sum = sb.sum(1, dtype=torch.int64)  # [B, N]
    out = torch.empty(sa.shape[0], qa.shape[-2], qb.shape[-1], dtype=torch.int64, device=qa.device)
    for i in range(sa.shape[0]):
        out[i] = _acc(sa[i], a_off, sb[i], b_sum[i], b_off)
    return out.reshape(*batch, qa.shape[-2], qb.shape[-1])
