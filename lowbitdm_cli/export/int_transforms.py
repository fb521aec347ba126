"""Integer linear layers with the transformer methods: per-token dynamic input scales, smoothing,
Hadamard rotation and the SVDQuant low-rank branch (`quant.transforms`).

`IntTransformLinear` is an `IntLinear` whose input quantization and output differ from the plain
one exactly as the fake-quantized `QuantLinear` does in inference, with the same float operations:

- per token: Δ[t] = `token_scale` of each row, codes ``round(x/Δ[t])`` symmetric (offset by
  2^(b−1) for the uint8 kernels), the product run with unit kernel scales (oneDNN's rescale takes
  one activation scale), then ``((acc·Δ[t])·Δw[o]) + b[o]`` by `quant.integer.rescale`;
- smoothing alone with a static quantizer: codes ``round(x / (Δ·s))`` in the quantization pass;
  otherwise x/s (and the rotation) first, in float, then the usual quantization;
- the low-rank branch ``x·downᵀ·upᵀ`` in float32 on the raw input, added to the layer's output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbitdm_cli.export.int_runtime import IntLinear
from lowbitdm_cli.quant.config import LayerEntry
from lowbitdm_cli.quant.quantizer import token_scale
from lowbitdm_cli.quant.transforms import low_rank_branch, transform_input

__all__ = ["IntTransformLinear", "int_transform_linear"]


class IntTransformLinear(IntLinear):
    """`IntLinear` with per-token dynamic input scales (`dynamic`) and/or input transforms.

    Extra args: `smooth` [K] float divisor s, `rotate` Hadamard block size, `low_rank_down` [r, K] and
    `low_rank_up` [O, r] float32 branch factors (on the raw input). With `dynamic`, `input_scale`,
    `input_zero_point`, `a_symmetric` and `timesteps` are ignored (symmetric, one scale per token)."""

    dynamic: bool = False

    def __init__(self, weight_codes: Tensor, weight_zero_point: Tensor, weight_scale: Tensor, bias: Tensor | None,
                 input_scale: Tensor | None, input_zero_point: Tensor | None, a_bits: int, a_symmetric: bool = False,
                 timesteps: list[int] | None = None, *, dynamic: bool = False, smooth: Tensor | None = None,
                 rotate: int | None = None, low_rank_down: Tensor | None = None,
                 low_rank_up: Tensor | None = None) -> None:
        self.dynamic = dynamic  # read by set_lowering, which IntLayer.__init__ calls
        if dynamic:
            input_scale, input_zero_point, a_symmetric, timesteps = torch.ones(1), torch.zeros(1), True, None
        super().__init__(weight_codes, weight_zero_point, weight_scale, bias, input_scale, input_zero_point, a_bits,
                         a_symmetric, timesteps)
        if (low_rank_down is None) != (low_rank_up is None):
            raise ValueError("a low-rank branch needs both factors")
        self.register_buffer("smooth", None if smooth is None else smooth.reshape(-1).float().contiguous())
        self.rotate_block = rotate
        self.register_buffer("low_rank_down", None if low_rank_down is None else low_rank_down.float().contiguous())
        self.register_buffer("low_rank_up", None if low_rank_up is None else low_rank_up.float().contiguous())
        fused = smooth is not None and rotate is None and not dynamic
        # Δ[slot]·s: the divisor of the fake quantizer's `integer_values(x, divisor=s)`, same float product
        self.register_buffer("input_divisor", self.input_scale[:, None] * self.smooth[None, :] if fused else None)

    def set_lowering(self, kernel: str, split: int | None = None) -> None:
        super().set_lowering(kernel, split)
        if self.dynamic:  # oneDNN's fused rescale takes one activation scale: rescale per token here
            self.fused_rescale = False

    def quantize_input(self, x: Tensor, layout: torch.memory_format | None = None) -> tuple[Tensor, int, Tensor]:
        """(uint8 codes, kernel zero point, Δx: [1], or [..., 1] per token) of the transformed input (a linear's:
        `layout`, for 4-D codes, changes nothing)."""
        if self.dynamic:
            x = transform_input(x, self.smooth, self.rotate_block)
            delta = token_scale(x, self.a_bits)
            q = torch.div(x, delta).round_().clamp_(self.q_min, self.q_max).add_(self._offset)
            return q.to(torch.uint8), self._zx[0], delta
        if self.input_divisor is not None:
            i = self._slot()
            q = torch.div(x, self.input_divisor[i]).round_().add_(self._z_add[i]).clamp_(self.q_min, self.q_max)
            if self._offset:
                q.add_(self._offset)
            return q.to(torch.uint8), self._zx[i], self.input_scale[i : i + 1]
        return super().quantize_input(transform_input(x, self.smooth, self.rotate_block), layout)

    def float_operand(self, x: Tensor, layout: torch.memory_format | None = None) -> tuple[Tensor, int, Tensor]:
        return self.operand_from_codes(x, layout)  # from this layer's own codes (per token, transforms)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:  # bf16 compute (`models.precision`): float32 inside, one rounding out, as
            return self.forward(x.float()).to(x.dtype)  # the fake QuantLinear (transforms and branch in float32)
        y = super().forward(x)
        return y if self.low_rank_down is None else y + low_rank_branch(x, self.low_rank_down, self.low_rank_up)

    def extra_repr(self) -> str:
        extra = [k for k, on in (("per-token", self.dynamic), ("smooth", self.smooth is not None),
                                 (f"rotate={self.rotate_block}", self.rotate_block is not None),
                                 (f"low_rank={None if self.low_rank_down is None else self.low_rank_down.shape[0]}",
                                  self.low_rank_down is not None)) if on]
        return f"{super().extra_repr()}, {', '.join(extra)}"


def int_transform_linear(name: str, entry: LayerEntry, codes: tuple[Tensor, Tensor, Tensor], t: dict[str, Tensor],
                         timesteps: list[int]) -> IntTransformLinear:
    """The `IntTransformLinear` of a merged linear layer with per-token inputs or input transforms."""
    act, tr = entry.input_activations, entry.transforms
    u, zero, scale = codes
    static = {} if act.dynamic else {"input_scale": t[f"{name}.input_scale"],
                                     "input_zero_point": t[f"{name}.input_zero_point"],
                                     "a_symmetric": bool(act.symmetric),
                                     "timesteps": timesteps if act.per_timestep else None}
    transforms = {} if tr is None else {
        "smooth": t.get(f"{name}.input_smooth") if tr.smooth else None, "rotate": tr.rotate,
        "low_rank_down": t.get(f"{name}.low_rank_down"), "low_rank_up": t.get(f"{name}.low_rank_up")}
    return IntTransformLinear(u, zero, scale, t.get(f"{name}.bias"), **{"input_scale": None, "input_zero_point": None,
                              **static}, a_bits=int(act.num_bits), dynamic=bool(act.dynamic), **transforms)
