"""The merged checkpoint through PyTorch's own x86 int8 lowering: ``--runtime compiled``.

The integer runtime (`int_runtime`) swaps each quantized layer for a oneDNN int8 call and leaves
every float op around it (GroupNorm, SiLU, attention, residual adds, the quantize and rescale passes)
to eager PyTorch, one pass per op; that is what keeps it equal to the fake-quantized model bit for
bit, and what makes it slower than the float model in bf16 on a CPU with AMX
(`benchmarks/merged_runtime.py`). Here the same integer layers are written as the reference pattern PyTorch's
x86 int8 lowering recognises (``dequantize_per_tensor`` → conv/linear ← ``dequantize_per_channel``,
the pattern PT2E's `X86InductorQuantizer` produces; `torchao.quantization.pt2e.inductor_passes.x86`
registers the rewrite) and the whole denoiser is compiled by Inductor with freezing: each layer becomes
one prepacked oneDNN int8 call, and the float ops between them fused C++ loops.

What it keeps from the checkpoint, unchanged: the integer weights w − zw (int8, per output channel
Δw), every activation step Δx and zero point, per timestep slot; codes are the fake quantizer's
``clamp(round(x/Δx) + z) (+ 2^(b−1) when symmetric)``.

- A layer with one kernel call is *folded*: it makes the calls the x86 passes make of the pattern
  itself (the int8 weight through ``qconv_prepack`` / ``qlinear_prepack``, which freezing runs once and
  folds into a constant, then ``qconv_pointwise`` / ``qlinear_pointwise``), with the timestep slot's
  Δx and zero point as tensors the kernel reads at run time. So the kernel rescales by Δx and Δw,
  adds the bias and returns the model's dtype (bf16 straight out of oneDNN under `--dtype bf16`) in
  every slot: no float32 accumulator is written and read back, and one prepacked weight serves every
  slot. (The passes lower the int8 pattern only with a constant activation step and zero point: with
  the pattern, a layer with timestep slots had to leave Δx and the bias to a pass after the kernel,
  and one whose 8-bit zero points differ per slot could not fold at all.) Shifted 8-bit weights
  (w − zw outside int8: every asymmetric W8 layer) fold too: the kernel multiplies w − 128, and
  (128 − zw)·Δw·Δx·Σ_window(u − zx) is added to each output channel. Where oneDNN runs on AMX the
  window sums come out of the kernel (an all-ones weight row); elsewhere they are summed beside it (a
  channel sum Inductor fuses into the loop that writes the codes, then a window sum): AVX-512's kernels
  block output channels by 64, so one more row costs a whole block (`int_runtime.window_sums_beside`).
- Timestep slots do not cost a graph each: the slot is chosen from the timestep inside the compiled
  graph, as `TimestepSlots` does. Unfolded layers (pair-safe splits on CPUs whose kernels saturate,
  and ``fold=False``) are the pattern at unit scales with one kernel zero point (the layer's, when
  every slot has the same; else the codes are re-centred, u − zx + Z, when every slot's u − zx fits 7
  bits; else zero point 0 and ``zx·conv(1, w)`` subtracted), rescaled after the kernel.

Run eagerly and unfolded (`reference_layers(fold=False)`), the pattern is the fake model op for op
(the rescale in the order of `quant.integer.rescale`, equal bit for bit: tested); folded, the kernel
rescales in its own float order, eagerly as compiled. What compiling gives up is that equality: Inductor fuses and reorders the
float ops (GroupNorm's reductions among them), so a value before a quantizer can differ in its last
bit and move a code by one step, which a sampler carries through its steps; the integer sums stay
exact where the kernels are exact (`IntLayer.exact_lowerings`: on CPUs whose int8 kernels saturate
pairs of products (AVX2, AVX-512 without VNNI) a layer whose weights could saturate takes the float
route, a float32 product of u − zx and w − zw that is exact (one product, or two input-channel
chunks, `quant.integer.chunk_plan`) and costs less there than the two pair-safe int8 halves the
integer runtime's split makes; a layer needing more chunks takes `export.s16`'s int16 kernel, one exact
call with int32 sums, where it runs, else keeps the split: `product_route`).
`benchmarks/compiled_runtime.py` measures the speed per CPU class and how far the samples move
(FID-digits, accuracy, pixels equal to the fake runtime's).

Needs torchao (``pip install 'lowbitdm[compiled]'``: its x86 lowering passes) and a C++ compiler for
Inductor. The first call per input shape and dtype compiles the whole denoiser, which costs many
forwards' worth of time: it pays off on long sampling runs. The transformer options of an
`IntTransformLinear` (per-token activation steps, smoothing, rotation, the low-rank branch) run as
`RefTransformLayer`: smoothing and per-token steps become float ops that Inductor fuses into the
quantize loop, the rotation two small products per block. What it cannot express (temporal
attention-matmul quantizers) is reported by `unsupported` and refused with one line naming it.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbitdm_cli.errors import RuntimeUnavailableError
from lowbitdm_cli.export import s16
from lowbitdm_cli.export.int_runtime import IntConv2d, IntLayer, IntLinear, window_sums, window_sums_beside
from lowbitdm_cli.export.int_transforms import IntTransformLinear
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.integer import (
    chunk_plan,
    chunk_weight,
    conv_chunk_products,
    layout_of,
    linear_chunk_products,
    rescale,
    rescale_order,
    sign_sums,
    split_weight,
    sum_chunks,
)
from lowbitdm_cli.quant.quantizer import TimestepSlots, token_scale
from lowbitdm_cli.quant.transforms import low_rank_branch, transform_input

__all__ = ["CompiledDenoiser", "RefLayer", "RefTransformLayer", "available", "check_compilable", "compile_runtime",
           "reference_layers", "unsupported"]


@functools.cache
def available() -> str | None:
    """None when the compiled runtime can run here, else why not (one line)."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers the passes)
    except ImportError:
        return "the compiled runtime needs torchao (pip install 'lowbitdm[compiled]')"
    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return "this PyTorch has no oneDNN int8 kernels (x86 CPU builds have them)"
    return None


class _Step(threading.local):
    """The timestep of the denoiser call in progress, as a tensor: the compiled graph takes it as an
    input (a module buffer would be frozen into a constant)."""

    t: Tensor | None = None


_STEP = _Step()
_RECOMPILE_LIMIT = 64


def _constant(t: Tensor) -> nn.Parameter:
    """A parameter that Inductor's freezing folds into the graph (buffers stay graph inputs: the
    weight prepack then has nothing constant to pack)."""
    return nn.Parameter(t, requires_grad=False)


class RefLayer(TimestepSlots, nn.Module):
    """One `IntConv2d` / `IntLinear` as one oneDNN int8 call inside a compiled graph: folded (one kernel
    call), the prepacked kernel itself with the slot's Δx and zero point, which rescales, adds the bias
    and returns the model's dtype (a shifted layer's window sums are added after it); else quantize →
    dequantize → float op ← dequantized int8 weight, the pattern Inductor's x86 passes lower to a call
    that returns float32 sums at unit scales, with the slot's Δx, any zero-point correction and the
    bias after it. The slot
    is picked inside the graph (`_slot`); `set_timestep` only records timesteps no slot was calibrated
    for, as the layer it replaces does (the sample manifest lists them)."""

    def __init__(self, layer: IntLayer, fold: bool = True, sums_in_kernel: bool | None = None,
                 product: str = "auto") -> None:
        super().__init__()
        self.conv = isinstance(layer, IntConv2d)
        self.kind = "conv" if self.conv else "linear"
        self.order = rescale_order(self.kind)
        out_ch, k = layer.out_ch, layer.k
        if self.conv:
            kh, kw = layer.kernel_size
            self.geometry = (layer.stride, layer.padding, layer.dilation)
            # what a LoRA branch around the layer reads (`adapters.branch.LoRABranch`)
            self.kernel_size, self.stride, self.padding, self.dilation = (layer.kernel_size, *self.geometry)
            as_weight = lambda w: w.reshape(w.shape[0], kh, kw, -1).permute(0, 3, 1, 2).contiguous()
        else:
            as_weight = lambda w: w.reshape(w.shape[0], k).contiguous()
        # activation codes per slot: u = clamp(round(x/Δx) + z_add, q_min, q_max) + offset, kernel zero point zx
        self.register_buffer("input_scale", layer.input_scale.float().clone())
        self.register_buffer("z_add", torch.tensor(layer._z_add, dtype=torch.float32))
        self.register_buffer("zx", torch.tensor(layer._zx, dtype=torch.long))  # the kernel's zero point, per slot
        self.register_buffer("timesteps", layer.timesteps.clone())
        self._index, self.unmatched_timesteps = None, set(layer.unmatched_timesteps)
        self.q_min, self.q_max, self.offset = layer.q_min, layer.q_max, layer._offset
        self.fixed_zx = int(layer._zx[0]) if len(set(layer._zx)) == 1 else None

        # the weight matrix the integer runtime multiplies (its K order), and the pair-safe split it uses
        wmat = layer.wmat.t().to(torch.int16)  # [O(+1), K]: a shifted layer's last row is all ones
        lowerings = layer.exact_lowerings()
        split = next((s for kernel, s in lowerings if kernel == "onednn"), None)
        if not any(kernel == "onednn" for kernel, _ in lowerings):
            raise ValueError("oneDNN's int8 kernels cannot compute this layer exactly here")
        # Where oneDNN would need the weight split (two pair-safe int8 calls: CPUs whose kernels add u8·s8
        # pairs in 16 bits), the product runs elsewhere (`product_route`): a float32 product of u − zx and
        # w − zw (one product or two input-channel chunks), else the int16 kernel (`export.s16`)
        self.route, self.float_chunks = product_route(layer, product, split is not None)
        if self.route != "int8":
            split = None
        # Folded: one kernel call that takes the slot's Δx and zero point at run time, rescales by Δw, adds
        # the bias and returns the model's dtype, so no float32 accumulator leaves it; a shifted layer's
        # all-ones row comes out as Δx·Σ(u − zx), see `_folded`
        self.folded = fold and split is None and self.route == "int8"
        # the kernel's Δx and zero point: constants with one activation step, else picked per slot
        self.static = (float(layer.input_scale[0]), int(layer._zx[0])) if layer.input_scale.numel() == 1 else None
        self.packed_zero = max(layer._zx)  # the prepacked format: for a kernel with a zero point where any slot has one
        # Unfolded, the kernel takes one zero point. Where the slots' differ, the codes are re-centred when
        # every slot's u − zx fits 7 bits: u' = u − zx + Z with one kernel zero point Z, the same exact sum
        # Σ(u' − Z)w, and never a saturating pair (2·127·128 < 2¹⁵). Else (8-bit codes) zx·Σw over the
        # window is subtracted after the kernel.
        lo = int(self.q_min + self.offset) - max(layer._zx)
        hi = int(self.q_max + self.offset) - min(layer._zx)
        centre = max(0, -lo)
        self.recentred = not self.folded and self.route == "int8" and self.fixed_zx is None and hi + centre <= 127
        self.kernel_zero = centre if self.recentred else (self.fixed_zx or 0)
        shift = [self.offset - zx + centre for zx in layer._zx] if self.recentred else [self.offset] * len(layer._zx)
        self.register_buffer("code_shift", torch.tensor(shift, dtype=torch.float32))  # per slot, added to codes
        # A folded shifted layer needs Σ_window(u − zx), times (128 − zw)·Δw·Δx per channel: "beside" the
        # kernel, a channel sum fused into the quantize loop and a window sum, else the all-ones row in it
        self.sums_beside = self.folded and window_sums_beside(layer, sums_in_kernel)
        if self.sums_beside:
            wmat = wmat[:out_ch]
        elif self.folded and not layer.direct:  # rows to a multiple of 16 (zero rows): aligned outputs
            wmat = torch.cat([wmat, wmat.new_zeros(-wmat.shape[0] % 16, wmat.shape[1])])
        parts = [wmat] if split is None else list(split_weight(wmat.float(), split))
        self.split = split
        self.part_scale = [1.0] if split is None else [float(1 << split), 1.0]
        for i, part in enumerate(parts):
            self.register_parameter(f"w{i}", _constant(as_weight(part.to(torch.int8))))
        self.parts = len(parts)
        if self.float_chunks is not None:  # float32 w − zw, as the grouped conv's weight or per feature chunk
            w_float, g = layer.op_weight(), self.float_chunks
            self.w_float = _constant(chunk_weight(w_float, g).contiguous() if self.conv else
                                     torch.stack(w_float.chunk(g, 1)))  # [g, O, K/g]
        if self.route == "s16":  # w − zw in the int16 kernel's packed layout
            self.w_s16 = _constant(layer.s16_weight())
        rows = wmat.shape[0]
        if not self.folded:  # unit: the rescale after the kernel is the layer's own
            self.w_unit = _constant(torch.ones(rows))
        self.w_zero = _constant(torch.zeros(rows, dtype=torch.long))
        self.out_ch, self.direct = out_ch, layer.direct
        self.register_buffer("w_off", layer.w_off.float())  # shifted: 128 − zw per channel
        # constants: a folded layer's kernel call takes them (its padded rows: Δw 1, bias 0), a rescale
        # after the kernel reads them
        self.weight_scale = _constant(layer.weight_scale.float().clone())
        self.bias = None if layer.bias is None else _constant(layer.bias.float().clone())
        if self.folded:
            _register_prepack_fakes()
            pad = rows - out_ch
            self.kernel_scale = _constant(torch.cat([self.weight_scale.detach(), torch.ones(pad)]))
            self.kernel_bias = None if self.bias is None else _constant(torch.cat([self.bias.detach(), torch.zeros(pad)]))
        if self.folded and not self.direct:  # (128 − zw)·Δw per output channel multiplies the all-ones row's output
            self.sum_scale = _constant((self.weight_scale.detach() * self.w_off).reshape(self._view))

    @property
    def _view(self) -> list[int]:
        """Per-output-channel values shaped to broadcast over an output."""
        return [-1, 1, 1] if self.conv else [-1]

    @property
    def lowering(self) -> str:
        """What the sample manifest records (`int_runtime.lowering_counts`)."""
        if self.route == "s16":
            return "inductor-s16"
        if self.float_chunks is not None:
            return "inductor-float" + (f"-chunks{self.float_chunks}" if self.float_chunks > 1 else "")
        return "inductor-onednn" + (f"-split{self.split}" if self.split is not None else "")

    def _slot(self) -> Tensor:
        """[1] index of the timestep slot (`TimestepSlots`: the nearest calibrated timestep), a tensor op
        on the call's timestep, so one graph serves every slot."""
        if self.timesteps.numel() == 0:
            return self.timesteps.new_zeros(1)
        if _STEP.t is None:
            raise RuntimeError("temporal layer called outside CompiledDenoiser")
        return (self.timesteps - _STEP.t).abs().argmin().reshape(1)

    def _op(self, xd: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """The float conv / linear on dequantized codes and weights."""
        return F.conv2d(xd, w, bias, *self.geometry) if self.conv else F.linear(xd, w, bias)

    def _product(self, u: Tensor, zx: int) -> Tensor:
        """Σ (u − zx)·w per output (rows of a shifted layer's weights include the window sums), float32."""
        qd = torch.ops.quantized_decomposed
        xd = qd.dequantize_per_tensor.default(u, 1.0, zx, 0, 255, torch.uint8)
        out = None
        for i in range(self.parts):
            w = qd.dequantize_per_channel.default(getattr(self, f"w{i}"), self.w_unit, self.w_zero, 0, -128, 127,
                                                  torch.int8)
            y = self._op(xd, w, None)
            out = y * self.part_scale[i] if out is None else out + y * self.part_scale[i]
        return out

    def _folded(self, u: Tensor, i: Tensor, dtype: torch.dtype) -> Tensor:
        """(u − zx)·Δx ⋅ (w − zw)·Δw + b in one oneDNN int8 call, written as the calls Inductor's x86 passes
        make of the dequantize pattern (weights prepacked, then ``qconv_pointwise`` / ``qlinear_pointwise``)
        but with the slot's Δx and zero point as tensors: the kernel takes them at run time, so one
        prepacked weight serves every timestep slot. Under freezing the prepack folds into a constant;
        the output is `dtype` (bf16 straight out of the kernel)."""
        onednn, static, zp = torch.ops.onednn, self.static is not None, self.packed_zero
        if static:
            x_scale, x_zp = self.static
        else:
            x_scale, x_zp = self.input_scale.index_select(0, i).reshape(()), self.zx.index_select(0, i).reshape(())
        scalars = (1.0, 0, dtype)  # output scale and zero point (none), output dtype
        if self.conv:
            stride, padding, dilation = ([int(v) for v in g] for g in self.geometry)
            packed = onednn.qconv_prepack(self.w0, self.kernel_scale, 1.0, zp, stride, padding, dilation, 1, None)
            call = onednn.qconv_pointwise.default if static else onednn.qconv_pointwise.tensor
            y = call(u, x_scale, x_zp, packed, self.kernel_scale, self.w_zero, self.kernel_bias, stride, padding,
                     dilation, 1, *scalars, "none", [], "")
        else:
            packed = onednn.qlinear_prepack(self.w0, None)
            call = onednn.qlinear_pointwise.default if static else onednn.qlinear_pointwise.tensor
            y = call(u, x_scale, x_zp, packed, self.kernel_scale, self.w_zero, self.kernel_bias, *scalars, "none", [], "")
        if self.direct:
            return y
        if self.sums_beside:
            window = (self.kernel_size, self.stride, self.padding) if self.conv else None
            return (y.float() + window_sums(u, x_zp, window) * x_scale * self.sum_scale).to(dtype)
        return self._add_window_sums(y, self.sum_scale).to(dtype)  # both rows rescaled by the kernel

    def forward(self, x: Tensor) -> Tensor:
        i = self._slot()
        delta, z = self.input_scale.index_select(0, i), self.z_add.index_select(0, i)
        y = self._quantized(x.float(), i, delta, delta, z, x.dtype)
        return y if self.conv else y.reshape(*x.shape[:-1], self.out_ch)

    def _quantized(self, x: Tensor, i: Tensor, divisor: Tensor, delta: Tensor, z: Tensor | float,
                   dtype: torch.dtype) -> Tensor:
        """The layer's output on float32 `x`: codes ``clamp(round(x / divisor) + z) (+ shift)``, each
        worth `delta` (one step, or one per row of a linear's output), through the kernel."""
        shift = self.code_shift.index_select(0, i) if self.recentred else self.offset
        u = (torch.clamp(torch.round(x / divisor) + z, self.q_min, self.q_max) + shift).to(torch.uint8)
        if not self.conv:  # the codes as one contiguous matrix: the kernels take a 2-D input
            u = u.reshape(-1, u.shape[-1])
        return self._folded(u, i, dtype) if self.folded else self._rescaled(u, i, delta).to(dtype)

    def _float_product(self, u: Tensor, i: Tensor) -> Tensor:
        """Σ(u − zx)(w − zw) as float32 products of the integer values, exact: one product, or the input
        channels' chunks (one grouped conv, or linears on feature slices) added with one rounding."""
        x = u.float() - self.zx.index_select(0, i).float()
        if self.conv:
            return sum_chunks(conv_chunk_products(x, self.w_float, self.float_chunks, *self.geometry))
        return sum_chunks(linear_chunk_products(x, self.w_float))

    def _rescaled(self, u: Tensor, i: Tensor, delta: Tensor) -> Tensor:
        """The exact sum Σ(u − zx)(w − zw) from the kernel, then the slot's rescale in float32."""
        if self.route == "s16":
            zx = self.zx.index_select(0, i)
            if self.conv:  # the kernel writes channels-last: the input's layout, as the fake layer returns
                acc = s16.conv(u, zx, self.w_s16, self.kernel_size, *self.geometry, self.out_ch)
                acc = acc.to(torch.float32, memory_format=layout_of(u))
            else:
                acc = s16.linear(u, zx, self.w_s16, self.out_ch).float()
            return rescale(acc, delta, self.weight_scale, self.bias, 1 if self.conv else -1, self.kind,
                           order=self.order)
        if self.float_chunks is not None:
            return rescale(self._float_product(u, i), delta, self.weight_scale, self.bias, 1 if self.conv else -1,
                           self.kind, order=self.order)
        acc = self._product(u, self.kernel_zero)
        if self.fixed_zx is None and not self.recentred:
            # Σ(u − zx)w = Σu·w − zx·Σw over the window (zero padding: code 0 here)
            ones = torch.ones((1, *u.shape[1:]), device=u.device)  # a constant: freezing folds the window sums
            w_sum = sum(getattr(self, f"w{p}").float() * s for p, s in enumerate(self.part_scale))
            window = self._op(ones, w_sum, None)
            acc = acc - self.zx.index_select(0, i) * window
        if not self.direct:
            acc = self._add_window_sums(acc, self.w_off.reshape(self._view))
        # the fake runtime's rescale, in its float order (the one this CPU's oneDNN kernel uses)
        return rescale(acc, delta, self.weight_scale, self.bias, 1 if self.conv else -1, self.kind, order=self.order)

    def _add_window_sums(self, y: Tensor, coefficient: Tensor) -> Tensor:
        """A shifted layer's outputs: Σ(u − zx)(w − zw) = Σ(u − zx)(w − 128) + (128 − zw)·Σ(u − zx), the
        kernel's first `out_ch` rows plus `coefficient` times its all-ones row (row `out_ch`), in float32."""
        dim = 1 if self.conv else -1
        return y.narrow(dim, 0, self.out_ch).float() + y.narrow(dim, self.out_ch, 1).float() * coefficient


class RefTransformLayer(RefLayer):
    """One `IntTransformLinear` in a compiled graph: the input transforms (x / s, the Hadamard rotation),
    and with per-token inputs each token's step Δ[t], as float ops (the rotation as two small products,
    the rest fused by Inductor into the quantize loop); the int8 product as in `RefLayer` (folded where
    there is one step per slot; with per-token steps at unit scales, since oneDNN's kernel takes one
    activation step, then ``((acc·Δ[t])·Δw) + b``); the float32 low-rank branch on the raw input added
    after. All in float32 and rounded once to the model's dtype, as `IntTransformLinear` does."""

    def __init__(self, layer: IntTransformLinear, fold: bool = True, sums_in_kernel: bool | None = None,
                 product: str = "auto") -> None:
        super().__init__(layer, fold=fold and not layer.dynamic, sums_in_kernel=sums_in_kernel, product=product)
        self.dynamic, self.a_bits, self.rotate_block = layer.dynamic, layer.a_bits, layer.rotate_block
        for name in ("smooth", "input_divisor", "low_rank_down", "low_rank_up"):
            value = getattr(layer, name)
            setattr(self, name, None if value is None else _constant(value.clone()))
        # fold=True: the rotation as two small products, H_b = H_a ⊗ H_c (Sylvester matrices factor), with
        # entries ±1 and one multiplication by b^(−1/2) after, as the butterfly. Inductor inlines the
        # butterfly's log2(b) stages into the quantize loop and recomputes them per value (on a 512-wide
        # input most of the loop's time: benchmarks/compiled_runtime.py --profile --models digits-dit).
        # fold=False keeps the butterfly: the fake runtime's float ops.
        self.h_outer = self.h_inner = None
        if fold and self.rotate_block is not None and self.rotate_block > 2:
            a = 1 << ((self.rotate_block.bit_length() - 1) // 2)
            self.h_outer, self.h_inner = _constant(_sylvester(a)), _constant(_sylvester(self.rotate_block // a))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        i = self._slot()
        if self.dynamic:  # symmetric per-token codes round(x / Δ[t]): zero point 0, offset to uint8
            xt = self._transform(xf)
            delta = token_scale(xt, self.a_bits)
            y = self._quantized(xt, i, delta, delta.reshape(-1, 1), 0.0, torch.float32)
        else:
            delta, z = self.input_scale.index_select(0, i), self.z_add.index_select(0, i)
            if self.input_divisor is not None:  # smoothing alone: codes round(x / (Δ·s)), as the fake quantizer
                y = self._quantized(xf, i, self.input_divisor.index_select(0, i), delta, z, torch.float32)
            else:
                y = self._quantized(self._transform(xf), i, delta, delta, z, torch.float32)
        y = y.reshape(*x.shape[:-1], self.out_ch)
        if self.low_rank_down is not None:
            y = y + low_rank_branch(xf, self.low_rank_down, self.low_rank_up)
        return y.to(x.dtype)

    def _transform(self, x: Tensor) -> Tensor:
        """x / s, then the block Hadamard rotation (`quant.transforms.transform_input`): folded, two small
        products per block; unfolded, the butterfly without in-place writes (the same float ops)."""
        if self.h_outer is None:
            return transform_input(x, self.smooth, self.rotate_block, functional=True)
        x = transform_input(x, self.smooth, None)
        a, c = self.h_outer.shape[0], self.h_inner.shape[0]
        y = torch.matmul(self.h_outer, (x.reshape(-1, c) @ self.h_inner).reshape(-1, a, c))  # H_aᵀ·X·H_c per block
        return (y * (1.0 / math.sqrt(self.rotate_block))).reshape(x.shape)


def _sylvester(n: int) -> Tensor:
    """The n×n Sylvester Hadamard matrix (entries ±1, n a power of two), float32: H_2n = H_2 ⊗ H_n."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h


@functools.cache
def _register_prepack_fakes() -> None:
    """Shapes for oneDNN's weight prepack ops under tracing (they have no fake kernel): the prepack stays a
    node of the traced graph, which freezing runs once on the real weights and folds into a constant."""
    fakes = {"onednn::qconv_prepack": lambda weight, *args, **kwargs: torch.empty_like(weight),
             "onednn::qlinear_prepack": lambda weight, *args, **kwargs: weight.new_empty(weight.shape[1], weight.shape[0])}
    for op, fake in fakes.items():
        try:
            torch.library.register_fake(op)(fake)
        except RuntimeError:  # a PyTorch that has one already
            pass


def unsupported(denoiser: nn.Module) -> list[str]:
    """Names of the modules the compiled runtime cannot express (empty: it runs the whole denoiser)."""
    out = []
    for name, m in denoiser.named_modules():
        if isinstance(m, IntLayer):
            if type(m) not in (IntConv2d, IntLinear, IntTransformLinear):
                out.append(f"{name} ({type(m).__name__}: a layer the compiled runtime does not know)")
            elif not any(kernel == "onednn" for kernel, _ in m.exact_lowerings()):
                out.append(f"{name} (no exact oneDNN int8 lowering on this CPU)")
        elif isinstance(m, TimestepSlots) and m.temporal and not isinstance(m, RefLayer):
            out.append(f"{name} ({type(m).__name__}: a temporal quantizer outside the integer layers)")
    return out


def check_compilable(denoiser: nn.Module) -> None:
    """`RuntimeUnavailableError` (one line) unless the compiled runtime can run `denoiser` here."""
    why = available()
    if why:
        raise RuntimeUnavailableError(why)
    bad = unsupported(denoiser)
    if bad:
        raise RuntimeUnavailableError("the compiled runtime cannot run " + ", ".join(bad[:3])
                                      + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") + ": use --runtime int")


PRODUCTS = ("auto", "int8", "s16", "float")


def product_route(layer: IntLayer, product: str, needs_split: bool) -> tuple[str, int | None]:
    """Where a layer's Σ(u − zx)(w − zw) runs, and the float route's input-channel chunks: "int8" (oneDNN,
    folded, or its pair-safe weight split where `needs_split`), "float" (a float32 product of the integer
    values, exact in one product or two chunks) or "s16" (`export.s16`'s int16 kernel: one exact call,
    int32 sums). `product`: "auto" keeps oneDNN where one call is exact, else takes the float route, else
    the int16 kernel, else the split (on an AVX2-only AMD EPYC, Zen 3, `benchmarks/compiled_runtime.py
    --products`: the float route ran both UNets' W8A8 layers faster than the split and than the int16
    kernel, whose vpmaddwd issues at half the float32 FMA's rate there; the int16 kernel beat the split on
    the 26 M UNet, not on digits); "int8", "float" and "s16" take that route wherever it is exact (tests
    and benchmarks: any CPU)."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
    if product == "int8" or (product == "auto" and not needs_split):
        return "int8", None
    weight = layer.op_weight()  # [O, C(, kh, kw)]: chunks of the input channels
    chunks = chunk_plan(*layer.code_range(), weight.shape[1], lambda g: sign_sums(weight, g), 2)
    if product in ("auto", "float") and chunks is not None:
        return "float", chunks
    if product in ("auto", "s16") and layer.s16_exact():
        return "s16", None
    return "int8", None


def reference_layers(denoiser: nn.Module, fold: bool = True, product: str = "auto") -> nn.Module:
    """`denoiser` with every integer layer replaced by its `RefLayer` (in place; returned); `fold=False`
    keeps every rescale in the fake runtime's float order (the op-for-op form); `product` as
    `product_route`'s ("int8": the int8 weight split where oneDNN needs it)."""
    for module in list(denoiser.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, IntLayer):
                ref = RefTransformLayer if isinstance(child, IntTransformLinear) else RefLayer
                setattr(module, name, ref(child, fold=fold, product=product))
    return denoiser


class CompiledDenoiser(nn.Module):
    """The denoiser with its integer layers as `RefLayer`s, compiled by Inductor with freezing; called
    like the original (``denoiser(x, timestep=t, **kwargs).sample``)."""

    def __init__(self, denoiser: nn.Module, fold: bool = True, product: str = "auto") -> None:
        super().__init__()
        check_compilable(denoiser)
        self.inner = reference_layers(denoiser, fold=fold, product=product).eval()
        self._compiled = torch.compile(self.inner, dynamic=False)  # static shapes: one graph per input shape

    def forward(self, x: Tensor, timestep: Tensor, **kwargs) -> _Output:
        _STEP.t = timestep.reshape(-1)[:1].to(torch.long)
        try:
            from torch._dynamo import config as dynamo_config
            from torch._inductor import config as inductor_config

            with torch.no_grad(), inductor_config.patch(freezing=True), dynamo_config.patch(
                    recompile_limit=max(_RECOMPILE_LIMIT, dynamo_config.recompile_limit),
                    fail_on_recompile_limit_hit=True), warnings.catch_warnings():
                # freezing: the weights fold into prepacked constants. Every compiled model of a diffusers
                # class shares its forward's code object and so dynamo's recompile limit (8 graphs, other
                # models and input shapes included), past which it would run the rest eagerly and
                # silently several times slower: room for 64, then an error. Compiling diffusers' code
                # makes dynamo and inductor warn about their own internals, which say nothing to a user.
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._(dynamo|inductor)")
                return _Output(self._compiled(x, timestep=timestep, **kwargs).sample)
        finally:
            _STEP.t = None


class _Output:
    def __init__(self, sample: Tensor) -> None:
        self.sample = sample


def compile_runtime(model: DiffusionModel, fold: bool = True, product: str = "auto") -> DiffusionModel:
    """`model` (loaded with the integer runtime) with its denoiser compiled (`CompiledDenoiser`); the
    first call per input shape compiles. `fold=False` keeps every rescale outside the kernels (what
    `benchmarks/compiled_runtime.py --profile` compares against); `product` picks where the layers that
    oneDNN cannot run in one exact call go (`product_route`: the benchmark's ``--products``)."""
    if not isinstance(model.denoiser, CompiledDenoiser):
        model.denoiser = CompiledDenoiser(model.denoiser, fold=fold, product=product)
    return model
