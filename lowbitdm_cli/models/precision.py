"""The float dtype a denoiser computes in: fp32, or bf16 on CPUs with native bf16 arithmetic.

`set_compute_dtype` converts everything *around* the quantized layers (norms, activations,
attention, embeddings, residual adds, up/down sampling) to the chosen dtype. The quantized
layers keep their float32 tensors (weights, scales, zero points, biases), so the integer codes do
not change. In bf16 each plain one rounds its exact integer accumulator to bf16, rescales that in
float32 and rounds once more to bf16 (`quant.integer.rescale_to`): the error of a bf16 FP conv, and
what lets the fake runtime run its exact products as bf16 products; a transformed or per-token linear
computes in float32 and rounds once at the end. The fake and the integer runtime do the same, so the
two stay equal bit for bit per dtype.

``auto`` resolves to bf16 where the CPU executes bf16 natively (AMX-BF16 or AVX512-BF16, and
neither PyTorch's nor oneDNN's ISA capped below it: ``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``), else fp32; ``$LOWBITDM_DTYPE`` (fp32 or bf16) replaces that guess.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch
from torch import nn

from lowbitdm_cli.export.kernel_probe import cpu_flags

__all__ = ["DTYPES", "LAYOUTS", "DtypeName", "LayoutName", "auto_dtype", "bf16_native", "resolve_dtype",
           "set_compute_dtype", "use_dtype", "use_layout"]

DtypeName = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
LayoutName = Literal["nchw", "channels_last"]
LAYOUTS: dict[str, torch.memory_format] = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def bf16_native() -> bool:
    """Whether this process's CPU kernels run bf16 natively (AMX-BF16 / AVX512-BF16, not capped)."""
    flags = cpu_flags()
    if not any(f in flags for f in _BF16_FLAGS):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not cap or cap == "ALL" or "BF16" in cap or "AMX" in cap


def auto_dtype() -> DtypeName:
    """``$LOWBITDM_DTYPE`` if set, else bf16 where `bf16_native`, else fp32."""
    env = os.environ.get("LOWBITDM_DTYPE", "").strip().lower()
    if env:
        if env not in DTYPES:
            raise ValueError(f"LOWBITDM_DTYPE must be one of {sorted(DTYPES)}, got {env!r}")
        return env  # type: ignore[return-value]
    return "bf16" if bf16_native() else "fp32"


def resolve_dtype(name: str) -> DtypeName:
    """fp32 / bf16 as given; ``auto`` by `auto_dtype`."""
    if name == "auto":
        return auto_dtype()
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, fp32 or bf16, got {name!r}")
    return name  # type: ignore[return-value]


def _keeps_float32(module: nn.Module) -> bool:
    """Quantized layers and quantizers: their float tensors define the integer codes."""
    from lowbitdm_cli.export.compiled_runtime import RefLayer
    from lowbitdm_cli.export.int_runtime import IntLayer
    from lowbitdm_cli.quant.layers import QuantLayerMixin
    from lowbitdm_cli.quant.quantizer import UniformQuantizer

    return isinstance(module, (QuantLayerMixin, IntLayer, RefLayer, UniformQuantizer))


@torch.no_grad()
def set_compute_dtype(denoiser: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Convert `denoiser`'s float parameters and buffers to `dtype`, except those of quantized layers
    and quantizers (whole subtrees kept float32). diffusers' ``denoiser.dtype`` (which casts the time
    and class embeddings) then names `dtype` whether or not the first parameter is a quantized
    layer's: the quantized layers are listed in ``_keep_in_fp32_modules``, which it skips."""
    kept = [name for name, m in denoiser.named_modules() if name and _keeps_float32(m)]
    inside = tuple(f"{name}." for name in kept)
    for name, module in denoiser.named_modules():
        if _keeps_float32(module) or (name and name.startswith(inside)):
            continue
        for key, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for key, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(dtype)
    # get_parameter_dtype skips parameters whose name contains one of these (full prefixes, dot-terminated)
    if dtype == torch.float32:
        denoiser.__dict__.pop("_keep_in_fp32_modules", None)
    else:
        denoiser._keep_in_fp32_modules = list(inside)
    return denoiser


def use_dtype(model, dtype: torch.dtype):  # noqa: ANN001, ANN201 - a DiffusionModel, returned
    """`model` computing in `dtype` from now on (its denoiser converted in place by `set_compute_dtype`).
    A compiled runtime's model keeps the dtype it was compiled in (`export.compiled_runtime`)."""
    from lowbitdm_cli.export.compiled_runtime import CompiledDenoiser

    if isinstance(model.denoiser, CompiledDenoiser):
        if dtype != model.dtype:
            raise ValueError(f"this model was compiled in {model.dtype}: set the dtype (use_dtype) before "
                             f"compile_runtime / load_quantized(runtime='compiled')")
        return model
    set_compute_dtype(model.denoiser, dtype)
    model.dtype = dtype
    return model


@torch.no_grad()
def use_layout(model, layout: str):  # noqa: ANN001, ANN201 - a DiffusionModel, returned
    """`model`'s 4-D activations in memory `layout` ("nchw" or "channels_last") from now on: its input
    goes to the denoiser in that layout and its float Conv2d weights are stored so, so that every conv
    (oneDNN's float, bf16 and int8 kernels alike compute in channels-last) runs without reordering its
    input and output per call; norms, activations, adds and concats keep the layout. Quantized convs
    return their input's layout in both runtimes (`quant.integer.layout_of`), so fake and integer
    stay equal bit for bit per layout (a one-channel input, both layouts at once, gives the layout
    asked for here); an FP model's output may differ in the last bits between layouts (its float
    kernels sum in another order). ε comes back NCHW either way."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    from lowbitdm_cli.export.int_runtime import IntConv2d
    from lowbitdm_cli.quant.layers import QuantConv2d

    fmt = LAYOUTS[layout]
    for module in model.denoiser.modules():
        if isinstance(module, (QuantConv2d, IntConv2d)):  # its output layout where the input's is ambiguous
            module.preferred_layout = fmt
        elif isinstance(module, nn.Conv2d) and not _keeps_float32(module) and module.weight.dim() == 4:
            module.weight.data = module.weight.data.contiguous(memory_format=fmt)
    model.memory_format = fmt
    return model
