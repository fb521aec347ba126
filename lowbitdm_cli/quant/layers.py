"""Quantized layer wrappers: `QuantConv2d` and `QuantLinear`.

Each wraps the float layer's own parameters and applies an input (activation)
quantizer and a weight quantizer. In inference (no autograd) a layer whose weight and
input are both quantized evaluates ``Δx·Δw·Σ(qx − zx)(qw − zw) + b`` integer-exactly
(`quant.integer`), the arithmetic of the integer runtime, instead of a float product of
the dequantized operands; training keeps the float STE path. An optional LoRA pair (A, B)
is merged *before* weight quantization, Ŵ = Q(W₀ + B·A) (EfficientDM's QALoRA), so it
folds for free.

A linear layer may also transform its input (`quant.transforms`, set by calibration): divide
it by the smoothing factors s (buffer ``smooth``), rotate it (``rotate_block``), and add a
float32 low-rank branch on the raw input (buffers ``low_rank_down`` / ``low_rank_up``). Its
``weight`` then holds the transformed residual W·s·H − L1·L2, so LoRA, AdaRound, QAT and the
packing all work on what is quantized. With smoothing alone and a static input quantizer the
integer path divides by Δ·s in the quantization pass itself (no extra pass over the input);
otherwise, and always in the float STE path, x/s is computed first.
The wrapper never decides bits or granularity: a `LayerSpec` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.export import passes
from lowbitdm_cli.quant.integer import (
    BF16_EXACT,
    accumulate,
    bf16_math,
    bf16_math_enabled,
    bf16_products,
    chunk_weight,
    conv_chunk_products,
    conv_products,
    exact_route,
    layout_of,
    linear_chunk_products,
    operand_layout,
    rescale_to,
    sign_sums,
    split_weight,
    sum_chunks,
)
from lowbitdm_cli.quant.policy import LayerSpec
from lowbitdm_cli.quant.quantizer import UniformQuantizer
from lowbitdm_cli.quant.transforms import low_rank_branch, transform_input

__all__ = ["QuantConv2d", "QuantLayerMixin", "QuantLinear", "quant_layers"]


class QuantLayerMixin:
    """Owns `w_quant`, `a_quant`, optional LoRA factors, and the observer hook."""

    spec: LayerSpec
    weight: nn.Parameter

    def _setup(self, spec: LayerSpec, timesteps: list[int] | None) -> None:
        self.spec = spec
        w = self.weight
        self.w_quant = (UniformQuantizer(spec.w_bits, "symmetric" if spec.w_symmetric else "asymmetric",
                                         channel_axis=0 if spec.w_per_channel else None,
                                         num_channels=w.shape[0], ndim=w.ndim if spec.w_per_channel else 1)
                        if spec.w_bits else None)
        self.a_quant = (UniformQuantizer(spec.a_bits, "symmetric" if spec.a_symmetric or spec.a_dynamic
                                         else "asymmetric",
                                         timesteps=timesteps if spec.a_temporal and not spec.a_dynamic else None,
                                         lsq_grad_scale=spec.lsq_grad_scale, dynamic=spec.a_dynamic)
                        if spec.a_bits else None)
        # shortcut splitting: channels [a_split:] (the concatenated skip) get their own quantizer
        self.a_quant_skip = (UniformQuantizer(spec.a_bits, "symmetric" if spec.a_symmetric else "asymmetric",
                                              timesteps=timesteps if spec.a_temporal else None,
                                              lsq_grad_scale=spec.lsq_grad_scale)
                             if spec.a_bits and spec.a_split else None)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.observer = None  # callable(layer, x) used during calibration
        self._setup_transforms(spec)

    # --- input transforms (smoothing, rotation, low-rank branch) -----------------------------------
    def _setup_transforms(self, spec: LayerSpec) -> None:
        """Buffers of the input transforms the spec names, at identity (calibration sets them)."""
        w = self.weight
        if spec.transformed and w.ndim != 2:
            raise ValueError("input transforms (smooth, rotate, low_rank) apply to linear layers only")
        self.rotate_block: int | None = spec.rotate
        self.register_buffer("smooth", torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if spec.smooth
                             else None)
        r = spec.low_rank
        self.register_buffer("low_rank_down", None if r is None else torch.zeros(r, w.shape[1]).to(w))
        self.register_buffer("low_rank_up", None if r is None else torch.zeros(w.shape[0], r).to(w))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the quantized product: x/s, then rotated (identity without transforms)."""
        return transform_input(x, self.smooth, self.rotate_block)

    def add_low_rank(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y plus the float32 low-rank branch on the raw input x (y itself without a branch)."""
        if self.low_rank_down is None:
            return y
        return y + low_rank_branch(x, self.low_rank_down, self.low_rank_up)

    def _input_integers(self, x: torch.Tensor, layout: torch.memory_format | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """`a_quant.integer_values` of the transformed input (float32 or bf16 `x`: the codes of its float32
        values), in memory `layout` (4-D; None: that of `x`); smoothing alone (static quantizer) divides by
        Δ·s in the quantization pass. A plain input (no transform) of one static step on the CPU takes one
        pass (`export.passes.operand`: the same values, written in `layout`), in bf16 where `dtype` asks
        and the values are exact there (|u − z| ≤ 256); otherwise float32."""
        if self.smooth is None and self.rotate_block is None and x.device.type == "cpu" and passes.enabled():
            plain = self.a_quant.plain_step()
            if plain is not None:
                delta, z, q_min, q_max = plain
                bounds = (max(z - q_min, 0.0), max(q_max - z, 0.0))
                q = passes.operand(x, float(delta), z, q_min, q_max, 0.0, z, layout,
                                   dtype if max(bounds) <= BF16_EXACT else torch.float32)
                if q is not None:
                    return q, delta.reshape(1), bounds
        x = x.float()
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        if self.smooth is not None and self.rotate_block is None and not self.a_quant.dynamic:
            return self.a_quant.integer_values(x, divisor=self.smooth)
        return self.a_quant.integer_values(self.transform_input(x))

    # --- LoRA (QALoRA) --------------------------------------------------------------------
    def add_lora(self, rank: int, generator: torch.Generator | None = None) -> None:
        """A: kaiming-uniform [r, in·k·k]; B: zeros [out, r]; so W₀ + B·A = W₀ at start."""
        fan_in = self.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5), torch's default for Linear/Conv
        a = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(self.weight))
        self.lora_B = nn.Parameter(torch.zeros(self.weight.shape[0], rank).to(self.weight))

    def merged_weight(self) -> torch.Tensor:
        """W₀ + B·A in the weight's own shape (B·A as a direct matrix product)."""
        if self.lora_A is None:
            return self.weight
        return self.weight + (self.lora_B @ self.lora_A).reshape(self.weight.shape)

    def qweight(self) -> torch.Tensor:
        """The fake-quantized (merged) weight. Without autograd (sampling) it is cached until
        any tensor it depends on changes (tracked by their in-place version counters)."""
        if torch.is_grad_enabled() or not isinstance(self.w_quant, (UniformQuantizer, type(None))):
            return self._compute_qweight()  # a swapped-in quantizer (AdaRound) has state the key misses
        return self._cached("_qweight_cache", self._compute_qweight)

    def _cached(self, slot: str, compute: Callable[[], Any]) -> Any:
        """`compute()` of the weight, kept in `slot` until a tensor it depends on changes."""
        tensors = [t for t in (self.weight, self.lora_A, self.lora_B) if t is not None]
        if self.w_quant is not None:
            tensors += [self.w_quant.delta, self.w_quant.zero_point, self.w_quant.bits]
        key = (self.w_quant.enabled if self.w_quant is not None else None, self.weight.device,
               self.weight.dtype, *((id(t), t._version, t.data_ptr()) for t in tensors))
        cache = self.__dict__.get(slot)
        if cache is None or cache[0] != key:
            cache = (key, compute())
            self.__dict__[slot] = cache
        return cache[1]

    def _compute_qweight(self) -> torch.Tensor:
        w = self.merged_weight()
        return self.w_quant(w) if self.w_quant is not None else w

    # --- integer-exact inference ------------------------------------------------------------
    def integer_exact(self) -> bool:
        """Whether `forward` takes the integer-exact path (`quant.integer`): inference (no
        autograd) with the weight and the whole input quantized by plain uniform quantizers
        and no observer attached. Training and calibration use the float STE path."""
        return (not torch.is_grad_enabled() and self.observer is None and self.a_quant_skip is None
                and type(self.w_quant) is UniformQuantizer and self.w_quant.enabled
                and self.a_quant is not None and self.a_quant.enabled)

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
        """(qw − zw as float in the weight's shape, Δw [O], max_o Σ_k |qw − zw|, a dict filled on demand
        with the weight's `split_weight` pieces by split point s, its `sign_sums` by ("sums", g), chunk
        weights by ("chunks", g) and `exact_route` by ("route", input range)), cached with the weight."""
        def compute() -> tuple[torch.Tensor, torch.Tensor, float, dict]:
            w_int, delta, _ = self.w_quant.integer_values(self.merged_weight().detach())
            out_ch = w_int.shape[0]
            return (w_int.contiguous(), delta.detach().reshape(-1).expand(out_ch).contiguous(),
                    float(w_int.abs().reshape(out_ch, -1).sum(1).max()) if w_int.numel() else 0.0, {})
        return self._cached("_integer_weight_cache", compute)

    def _integer_forward(self, x: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         channel_dim: int, layout: torch.memory_format = torch.contiguous_format,
                         operand_layout: torch.memory_format | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Δx·Δw[o]·Σ_k (qx − zx)(qw − zw) + b`` with the sum exact and the rescale of `rescale_to`, in
        `dtype` (float32, or bf16: the accumulator rounded to bf16 first) and memory `layout`; `op` gets the
        integer input in `operand_layout` (None: that of `x`). In bf16, where `bf16_products` holds, a
        product whose float32 sums are exact runs on bf16 operands (codes and weights within ±256: exact in
        bf16): float32 sums rounded once to bf16, which is the accumulator the bf16 rescale takes anyway.
        The float32 products (chunks, the weight split, and every product of a float32 model) run under
        `quant.integer.bf16_math` where `bf16_math_enabled` (AMX-BF16): bf16 multiplies of the same exact
        operands with float32 sums, so the same bits."""
        # CPU only: oneDNN's bf16 convs are direct (no Winograd) with float32 sums; other devices' libraries
        # choose their algorithms, so they keep the float32 product (same bits by the rule)
        bf16 = dtype == torch.bfloat16 and x.device.type == "cpu" and bf16_products()
        x_int, x_scale, (x_neg, x_pos) = self._input_integers(x, operand_layout,
                                                              torch.bfloat16 if bf16 else torch.float32)
        w_int, w_scale, _, pieces = self.integer_weight()

        def split(s: int) -> tuple[torch.Tensor, torch.Tensor]:
            if s not in pieces:
                pieces[s] = tuple(p.contiguous() for p in split_weight(w_int, s))
            return pieces[s]

        def sums(g: int) -> tuple[torch.Tensor, torch.Tensor]:
            if ("sums", g) not in pieces:
                pieces["sums", g] = sign_sums(w_int, g)
            return pieces["sums", g]

        # one product where float32 holds every partial sum; else one grouped product over input-channel
        # chunks where the layer has one (the FLOPs of one product where the weight split costs two);
        # else the split, or float64 (`quant.integer.exact_route`, per input range: fixed per slot)
        if ("route", x_neg, x_pos) not in pieces:
            k = w_int[0].numel() if w_int.numel() else 0
            pieces["route", x_neg, x_pos] = exact_route(x_neg, x_pos, w_int.shape[1], k, sums, self.chunkable())
        chunks, plan = pieces["route", x_neg, x_pos]
        if "bf16_exact" not in pieces:  # every weight value exact in bf16
            pieces["bf16_exact"] = bool(w_int.numel()) and float(w_int.abs().max()) <= BF16_EXACT
        operands_bf16_exact = pieces["bf16_exact"] and max(x_neg, x_pos) <= BF16_EXACT
        acc = None
        if bf16 and chunks is None and plan == 0 and operands_bf16_exact:
            if "bf16" not in pieces:  # the weight in bf16
                pieces["bf16"] = w_int.to(torch.bfloat16)
            acc = op(x_int.to(torch.bfloat16), pieces["bf16"])
        if acc is None:  # float32 products; on AMX-BF16 as bf16 multiplies where the operands are exact there
            fast = plan is not None and x.device.type == "cpu" and operands_bf16_exact and bf16_math_enabled()
            with bf16_math(fast):
                if chunks is not None:
                    acc = sum_chunks(self._chunk_products(x_int.float(), w_int, chunks, pieces))
                else:
                    acc = accumulate(op, x_int.float(), w_int, plan, split)
        # out in `layout` (whatever layout `op` computed in): the first pass of the rescale writes it,
        # so the layout change costs no extra pass
        return rescale_to(acc, x_scale.detach(), w_scale, self.bias, channel_dim, self.rescale_kernel, dtype, layout)

    def rescales_in_bf16(self) -> bool:
        """Whether a bf16 input is rescaled into bf16 (the accumulator rounded to bf16 first, `rescale_to`), as
        `IntConv2d` / `IntLinear` do: every integer-exact layer but a transformed or per-token one, which
        computes in float32 with one rounding out (its float32 branch comes after the rescale), as
        `IntTransformLinear` does."""
        return self.integer_exact() and not (self.spec.transformed or self.spec.a_dynamic)

    def chunkable(self) -> bool:
        """Whether `_chunk_products` can run this layer's exact product over input-channel chunks."""
        return False

    def _chunk_products(self, x_int: torch.Tensor, w_int: torch.Tensor, g: int, pieces: dict) -> list[torch.Tensor]:
        """The `g` chunks' exact partial products (each float32-exact by `chunk_plan`), for `sum_chunks`."""
        raise NotImplementedError

    def qinput(self, x: torch.Tensor) -> torch.Tensor:
        """The (transformed) input, observed during calibration, fake-quantized."""
        x = self.transform_input(x)
        if self.observer is not None:
            self.observer(self, x)
        if self.a_quant is None:
            return x
        if self.a_quant_skip is not None:
            k = self.spec.a_split
            return torch.cat([self.a_quant(x[:, :k]), self.a_quant_skip(x[:, k:])], dim=1)
        return self.a_quant(x)

    def act_quantizers(self) -> list[UniformQuantizer]:
        """The input quantizers: `a_quant`, plus `a_quant_skip` for a split layer."""
        return [q for q in (self.a_quant, self.a_quant_skip) if q is not None]


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """Conv2d with fake-quantized weight and input."""

    rescale_kernel = "conv"  # whose float order `rescale` follows (`quant.integer.rescale_order`)
    preferred_layout = torch.contiguous_format  # the output layout for an input that is both (`use_layout` sets it)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: LayerSpec, timesteps: list[int] | None = None) -> QuantConv2d:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        internal = set(nn.Module().__dict__)
        layer.__dict__.update({k: v for k, v in conv.__dict__.items() if k not in internal})
        layer._parameters = conv._parameters
        layer._buffers = conv._buffers
        layer._setup(spec, timesteps)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.rescales_in_bf16():
            return self._exact_conv(x, torch.bfloat16)
        if x.dtype != self.weight.dtype:  # bf16 compute (`models.precision`): float32 inside, one rounding out
            return self.forward(x.to(self.weight.dtype)).to(x.dtype)
        if self.integer_exact():
            return self._exact_conv(x, torch.float32)
        return self._conv_forward(self.qinput(x), self.qweight(), self.bias)

    def _exact_conv(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # the operand in one layout per layer (a split weight runs the conv twice on the same input):
        # channels-last, or the input's for a 1x1 conv (`quant.integer.operand_layout`); the output
        # keeps the input's layout (`quant.integer.layout_of`), as the integer runtime's
        layout = layout_of(x, self.preferred_layout)
        return self._integer_forward(x, self._bias_free_conv, 1, layout,
                                     operand_layout(self.weight, self.stride, self.padding, self.dilation, layout),
                                     dtype)

    def _bias_free_conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The bias-free conv (`quant.integer.conv_products`); `forward` hands it channels-last input, on which
        oneDNN's float conv runs without reordering input and output per call, or for a 1x1 conv input in
        the layer input's layout (one matmul on NCHW memory: no layout change). `_integer_forward` rescales its (exact)
        output into the layout of the layer's input (NCHW, or channels-last in a channels-last model,
        `models.precision.use_layout`), as the integer runtime does, so the float ops after this layer
        (norms, adds) see the same memory layout and round alike in both runtimes (mixed layouts cost
        a copy at every concat, upsample and norm)."""
        if self.padding_mode == "zeros":
            return conv_products(x, w, self.stride, self.padding, self.dilation, self.groups)
        return self._conv_forward(x, w, None)

    def chunkable(self) -> bool:
        return self.groups == 1 and self.padding_mode == "zeros"

    def _chunk_products(self, x_int: torch.Tensor, w_int: torch.Tensor, g: int, pieces: dict) -> list[torch.Tensor]:
        """One conv with ``groups=g``: group j multiplies input-channel chunk j with every output row
        (`quant.integer.chunk_weight`); its [N, g·O, ...] output viewed as the g chunks' products."""
        if ("chunks", g) not in pieces:
            pieces["chunks", g] = chunk_weight(w_int, g).contiguous()
        return conv_chunk_products(x_int, pieces["chunks", g], g, self.stride, self.padding, self.dilation)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """Linear with fake-quantized weight and input."""

    rescale_kernel = "linear"

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: LayerSpec, timesteps: list[int] | None = None) -> QuantLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer._parameters = linear._parameters
        layer._buffers = linear._buffers
        layer._setup(spec, timesteps)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.rescales_in_bf16():
            return self._integer_forward(x, F.linear, -1, dtype=torch.bfloat16)
        if x.dtype != self.weight.dtype:  # bf16 compute (`models.precision`): float32 inside, one rounding out
            return self.forward(x.to(self.weight.dtype)).to(x.dtype)
        if self.integer_exact():
            y = self._integer_forward(x, F.linear, -1)
        else:
            y = F.linear(self.qinput(x), self.qweight(), self.bias)
        return self.add_low_rank(y, x)

    def chunkable(self) -> bool:
        return True

    def _chunk_products(self, x_int: torch.Tensor, w_int: torch.Tensor, g: int, pieces: dict) -> list[torch.Tensor]:
        """g linears on slices of the features (strided views: no copy of the input)."""
        if ("chunks", g) not in pieces:
            pieces["chunks", g] = tuple(p.contiguous() for p in w_int.chunk(g, dim=1))
        return linear_chunk_products(x_int, pieces["chunks", g])


def quant_layers(module: nn.Module) -> dict[str, QuantLayerMixin]:
    """All quantized layers of `module` by qualified name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantLayerMixin)}
