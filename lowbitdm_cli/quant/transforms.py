"""Input transforms of a linear layer: the tensor math of the transformer methods (no layers).

For y = X·Wᵀ each transform changes what is quantized, not the float product:

- smoothing (SmoothQuant, arXiv 2211.10438): per input channel j,
  s_j = max|X_j|^α / max|W_:,j|^(1−α), and X' = X/s, W' = W·s (`smoothing_factors`);
- rotation (QuaRot-style): X' = X·H, W' = W·H with H the normalised Walsh–Hadamard matrix,
  block-diagonal in blocks of the largest power of two dividing K (`hadamard_transform`);
  H is symmetric and orthogonal, so X'·W'ᵀ = X·H·Hᵀ·Wᵀ = X·Wᵀ;
- the low-rank branch (SVDQuant, arXiv 2411.05007): W' = L1·L2 + R with L1·L2 the top-r SVD of
  W' kept in float32 and only R quantized (`low_rank_split`); the branch runs on the raw input
  with the smoothing and rotation folded into its down-projection (`fold_into_down`).

`hadamard_transform` is a butterfly of float32 additions and one multiplication per element
(no matrix product whose summation order could depend on the BLAS kernel), and the branch
`low_rank_branch` is two float32 products of the same operands in both runtimes, so the fake-
quantized model and the integer runtime compute them with the same bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fold_into_down", "hadamard_block", "hadamard_transform", "low_rank_branch", "low_rank_split",
           "smoothing_factors", "transform_input"]

SMOOTH_RANGE = (1e-5, 1e5)
"""s is clamped to this range: a dead channel (max|X_j| = 0) or an all-zero weight column must not
give 0 or ∞."""


def hadamard_block(k: int) -> int:
    """The largest power of two dividing `k` (the Hadamard block size for a width-k input)."""
    return k & -k if k > 0 else 0


def hadamard_transform(x: Tensor, block: int, functional: bool = False) -> Tensor:
    """x·H along the last dim, H = block-diagonal normalised Walsh–Hadamard (Sylvester order) with
    blocks of `block` (a power of two dividing x.shape[-1]). log2(block) butterfly stages of float
    additions, then one multiplication by block^(−1/2) (exact for an even power of two). Each stage
    writes its sums and differences straight into the halves of the next buffer (two buffers, used in
    turn): the same float operations in the same order as stacking them, half the memory traffic.
    `functional` (and under autograd) stacks them instead: what a compiler can fuse into one loop."""
    k = x.shape[-1]
    if block < 1 or block & (block - 1) or k % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing {k}")
    lead = x.shape[:-1]
    y = x.reshape(-1, k // block, block)
    rows, blocks = y.shape[:2]
    # out= has no autograd (nor a compiler's fusion): stack the same ops instead
    stacked = functional or (torch.is_grad_enabled() and x.requires_grad)
    spare: Tensor | None = None  # the buffer the previous stage read, free for the next one to write
    h = 1
    while h < block:
        pairs = y.reshape(rows, blocks, block // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        if stacked:
            y = torch.stack((a + b, a - b), 3).reshape(rows, blocks, block)
        else:
            out = spare if spare is not None else torch.empty(y.shape, dtype=y.dtype, device=y.device)
            dest = out.view(rows, blocks, block // (2 * h), 2, h)
            torch.add(a, b, out=dest[..., 0, :])
            torch.sub(a, b, out=dest[..., 1, :])
            spare = y if h > 1 else None  # never write into the caller's x
            y = out
        h *= 2
    scale = 1.0 / math.sqrt(block)
    return (y * scale if stacked or block == 1 else y.mul_(scale)).reshape(*lead, k)


def smoothing_factors(act_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max_o|W_oj|^(1−α) per input channel j, in float64, clamped to
    `SMOOTH_RANGE`; channels where either maximum is 0 get s_j = 1. `weight`: [O, K]."""
    a = act_absmax.detach().double().reshape(-1)
    w = weight.detach().double().abs().amax(0)
    if a.numel() != w.numel():
        raise ValueError(f"{a.numel()} activation maxima for a weight with {w.numel()} input channels")
    alive = (a > 0) & (w > 0)
    s = torch.where(alive, a.clamp_min(1e-30).pow(alpha) / w.clamp_min(1e-30).pow(1 - alpha), torch.ones_like(a))
    return s.clamp(*SMOOTH_RANGE).float()


def low_rank_split(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(up [O, r], down [r, K], residual [O, K]) with up·down the top-`rank` SVD of `weight` (float64
    SVD, the singular values split √S to each side) and residual = weight − up·down computed in
    float64 from the float32 factors, then rounded once: up·down + residual = weight to float32
    precision."""
    w = weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).float()
    down = (root[:, None] * vh[:rank]).float()
    residual = (w - up.double() @ down.double()).float()
    return up, down, residual


def transform_input(x: Tensor, smooth: Tensor | None, rotate: int | None, functional: bool = False) -> Tensor:
    """The input the quantized product sees: (x / s) then the Hadamard rotation (each optional;
    `functional`: see `hadamard_transform`)."""
    if smooth is not None:
        x = x / smooth
    if rotate is not None:
        x = hadamard_transform(x, rotate, functional)
    return x


def fold_into_down(down: Tensor, smooth: Tensor | None, rotate: int | None) -> Tensor:
    """The branch's down-projection on the raw input: transform_input(x)·downᵀ = x·Dᵀ with
    D = (down·H) / s (H symmetric), computed in float64 and rounded once."""
    d = down.double()
    if rotate is not None:
        d = hadamard_transform(d, rotate)
    if smooth is not None:
        d = d / smooth.double()
    return d.float()


def low_rank_branch(x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """The float32 branch x·downᵀ·upᵀ (the same two products in the fake and the integer runtime)."""
    return F.linear(F.linear(x, down), up)
