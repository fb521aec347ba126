"""Prototype for `benchmarks/pt2e.py`: lowbitdm's own W8A8 quantizer driving PT2E on one conv layer.

PT2E's x86 path (X86InductorQuantizer → Inductor → `onednn::qconv2d_pointwise`) takes int8 weights
with a zero weight zero point, and lowbitdm's default weights are per-channel *asymmetric*
(min-max): no 8-bit layer of the ptq W8A8 checkpoint has ``w − zw`` within int8 (the integer
runtime calls them "shifted" and adds a correction term). So the prototype uses lowbitdm's
symmetric-weight variant (`quant.w_symmetric=true`, same recipe otherwise), whose 8-bit codes are
``w − zw ∈ [−128, 127]`` with Δw per output channel and whose activations are per-tensor affine
uint8 (Δx, zx), exactly PT2E's scheme. For one such conv:

  1. a float Conv2d with weight Δw[o]·(w − zw) and the layer's bias is exported and prepared with
     the X86InductorQuantizer default config;
  2. its two observers are replaced by fixed ones: the input's by `FixedQParamsObserver(Δx, zx)`,
     the weight's by a per-channel observer that returns (Δw, 0); nothing is calibrated;
  3. `convert_pt2e`, then torch.compile with freezing.

Measured on the layer's real input (digits forward at t = 500, batch 64): whether the int8 weight
PT2E packs is lowbitdm's (exact), whether its input codes are lowbitdm's, how far its output is
from lowbitdm's fake / integer layer (bit-identical share; max difference in units of the output
step Δx·Δw[o]), and the layer's time against lowbitdm's integer layer and the float conv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import merged_runtime as mr
import torch
import torch.nn.functional as F
from torch import nn

from lowbitdm_cli.export.checkpoint import load_merged
from lowbitdm_cli.export.int_runtime import IntConv2d
from lowbitdm_cli.export.kernel_probe import kernel_report

LABEL = "W8A8-wsym"


def _pick(denoiser: nn.Module) -> tuple[str, IntConv2d]:
    """The direct (w − zw fits int8) 3x3 conv with the most input channels, first of equals."""
    convs = [(n, m) for n, m in denoiser.named_modules()
             if isinstance(m, IntConv2d) and m.direct and m.kernel_size == (3, 3) and not m.temporal]
    if not convs:
        raise RuntimeError("no direct 3x3 integer conv in the symmetric-weight checkpoint")
    return max(convs, key=lambda nm: nm[1].in_channels)


def _int8_weight(layer: IntConv2d) -> torch.Tensor:
    """The layer's w − zw as int8 [O, C, kh, kw] (the runtime keeps it as [K, O] with K in (kh, kw, C))."""
    kh, kw = layer.kernel_size
    return layer.int8_weight().reshape(layer.out_ch, kh, kw, layer.in_channels).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _layer_input(model, name: str, batch: int) -> torch.Tensor:
    seen = []
    handle = model.denoiser.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    try:
        mr._call(model, batch)()
    finally:
        handle.remove()
    return seen[0]


def _fixed_weight_observer(scale: torch.Tensor):
    """A per-channel symmetric int8 observer whose qparams are (scale, 0), whatever it sees."""
    from torchao.quantization.pt2e import PerChannelMinMaxObserver

    class FixedPerChannel(PerChannelMinMaxObserver):
        def __init__(self) -> None:
            super().__init__(ch_axis=0, dtype=torch.int8, qscheme=torch.per_channel_symmetric,
                             quant_min=-128, quant_max=127)
            self.register_buffer("fixed_scale", scale.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fixed_scale, torch.zeros(self.fixed_scale.shape, dtype=torch.int64)

    return FixedPerChannel()


@torch.no_grad()
def _pt2e_layer(layer: IntConv2d, x: torch.Tensor, compile_fn: Callable[[nn.Module], nn.Module]
                ) -> tuple[nn.Module, nn.Module]:
    """(convert_pt2e graph, its torch.compile'd copy) of the layer with lowbitdm's qparams injected."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import FixedQParamsObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    conv = nn.Conv2d(layer.in_channels, layer.out_ch, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, bias=layer.bias is not None).eval()
    conv.weight.copy_(_int8_weight(layer).float() * layer.weight_scale.reshape(-1, 1, 1, 1))
    if layer.bias is not None:
        conv.bias.copy_(layer.bias)
    exported = torch.export.export(conv, (x,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    replaced = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or "activation_post_process" not in str(node.target):
            continue
        source = node.args[0]
        if source.op == "placeholder":
            obs = FixedQParamsObserver(scale=float(layer.input_scale[0]), zero_point=int(layer._zx[0]),
                                       dtype=torch.uint8, quant_min=0, quant_max=255)
            replaced["input"] = node.target
        elif source.op == "get_attr" and source.target.endswith("weight"):
            obs = _fixed_weight_observer(layer.weight_scale)
            replaced["weight"] = node.target
        else:
            continue
        setattr(prepared, node.target, obs)
    if set(replaced) != {"input", "weight"}:
        raise RuntimeError(f"expected an input and a weight observer, replaced {replaced}")
    converted = convert_pt2e(prepared)
    return converted, compile_fn(converted)


def _packed_weight(converted: nn.Module) -> torch.Tensor | None:
    """The int8 weight constant `convert_pt2e` folded into the graph."""
    for _, t in list(converted.named_buffers()) + list(converted.named_parameters()):
        if t.dtype == torch.int8 and t.dim() == 4:
            return t
    for node in converted.graph.nodes:
        if node.op == "get_attr":
            t = getattr(converted, node.target)
            if torch.is_tensor(t) and t.dtype == torch.int8 and t.dim() == 4:
                return t
    return None


def _exact_acc(layer: IntConv2d, u: torch.Tensor) -> torch.Tensor:
    """Σ (u − zx)(w − zw) per output, exact (float64 products of integers), as float32."""
    w = _int8_weight(layer).double()
    return F.conv2d(u.double() - layer._zx[0], w, None, layer.stride, layer.padding, layer.dilation).float()


@torch.no_grad()
def compare(layer: IntConv2d, fake_layer: nn.Module, x: torch.Tensor,
            compile_fn: Callable[[nn.Module], nn.Module]) -> tuple[dict, nn.Module]:
    """Everything checked about one injected layer on input `x`, and the compiled PT2E layer. Besides
    the fake / integer layer (((acc·Δx)·Δw[o]) + b), the PT2E output is compared with
    acc·(Δx·Δw[o]) + b on the exact accumulator: the rescale order of oneDNN's kernel on AMX."""
    converted, compiled = _pt2e_layer(layer, x, compile_fn)
    y_int, y_fake, y_ref, y_pt2e = layer(x), fake_layer(x), converted(x), compiled(x)
    dx, dw = layer.input_scale[0], layer.weight_scale.reshape(1, -1, 1, 1)
    bias = 0.0 if layer.bias is None else layer.bias.reshape(1, -1, 1, 1)
    u = layer.quantize_input(x)[0].clone()
    y_combined = _exact_acc(layer, u) * (dx * dw) + bias
    u_pt2e = torch.ops.quantized_decomposed.quantize_per_tensor(x, float(dx), int(layer._zx[0]), 0, 255, torch.uint8)
    w8 = _packed_weight(converted)
    step = dx * dw  # the output's integer step per channel

    def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
        return {"identical": float((a == b).float().mean()), "max_abs": float((a - b).abs().max()),
                "max_in_output_steps": float(((a - b).abs() / step).max())}

    # every input code 255 (as `kernel_probe` tests): where u8·s8 pairs add in saturating 16-bit lanes
    # (AVX2, AVX-512 without VNNI), any adjacent weight pair summing past ±128 clips
    x_max = torch.full_like(x, float((255 - layer._zx[0]) * dx))
    u_max = layer.quantize_input(x_max)[0].clone()
    saturating = {"codes_all_255": bool((u_max == 255).all()),
                  "int_vs_fake": diff(layer(x_max), fake_layer(x_max)),
                  "pt2e_compiled_vs_combined_scale_rescale": diff(compiled(x_max),
                                                                  _exact_acc(layer, u_max) * (dx * dw) + bias)}
    return {"int8_weight_equal": bool(w8 is not None and torch.equal(w8, _int8_weight(layer))),
            "saturating_input": saturating,
            "input_codes_equal_eager_quantize_per_tensor": bool(torch.equal(u, u_pt2e)),
            "int_vs_fake": diff(y_int, y_fake), "pt2e_reference_vs_fake": diff(y_ref, y_fake),
            "pt2e_compiled_vs_fake": diff(y_pt2e, y_fake), "pt2e_compiled_vs_reference": diff(y_pt2e, y_ref),
            "pt2e_compiled_vs_combined_scale_rescale": diff(y_pt2e, y_combined)}, compiled


def _setup(args: argparse.Namespace, folder: Path, small: str) -> tuple[str, IntConv2d, nn.Module, torch.Tensor]:
    if not (folder / LABEL / "merge").is_dir():
        mr._merged_small(small, LABEL, folder, args.quick, bits="w8a8", extra=("quant.w_symmetric=true",))
    merged = folder / LABEL / "merge"
    integer, fake = load_merged(merged, "int"), load_merged(merged, "fake")
    name, layer = _pick(integer.denoiser)
    return name, layer, fake.denoiser.get_submodule(name), _layer_input(fake, name, args.batch)


@torch.no_grad()
def run(args: argparse.Namespace, folder: Path, small: str, compile_fn: Callable[[nn.Module], nn.Module]) -> dict:
    """Build (or reuse) the symmetric-weight W8A8 checkpoint, inject one layer, compare and time it;
    then the same comparison (no timing) in a child process capped at AVX2 (saturating int8 pairs)."""
    name, layer, fake_layer, x = _setup(args, folder, small)
    checks, compiled = compare(layer, fake_layer, x, compile_fn)
    checks.update(kernel_report())
    weight = layer.weight_scale.reshape(-1, 1, 1, 1) * _int8_weight(layer).float()
    cells = {"float conv (fp32)": lambda: F.conv2d(x, weight, layer.bias, layer.stride, layer.padding,
                                                   layer.dilation),
             "lowbitdm int layer": lambda: layer(x), "pt2e layer (lowbitdm qparams)": lambda: compiled(x)}
    rounds = [{k: v * 1e3 for k, v in mr._time_cells(cells, args.repeats * 3, args.warmup).items()}
              for _ in range(args.rounds)]
    ms = {k: statistics.median(r[k] for r in rounds) for k in cells}
    out = folder / "pt2e_layer_avx2.json"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    cmd = [sys.executable, __file__, "--merged-dir", str(folder), "--out", str(out), "--batch", str(args.batch),
           "--model", small] + (["--quick"] if args.quick else [])
    subprocess.run(cmd, env=env, check=True)
    return {"checkpoint": f"ptq W8A8 with quant.w_symmetric=true ({small})", "layer": name,
            "shape": {"in": list(x.shape), "out_channels": layer.out_ch, "kernel": list(layer.kernel_size)},
            "native": checks, "avx2": json.loads(out.read_text()), "layer_ms_median_of_rounds": ms,
            "rounds": rounds, "int_vs_pt2e_speed": ms["lowbitdm int layer"] / ms["pt2e layer (lowbitdm qparams)"]}


def _print_checks(title: str, c: dict) -> None:
    print(f"  {title}: int8 weight packed by PT2E == lowbitdm's w - zw: {c['int8_weight_equal']};  input codes "
          f"(eager quantize_per_tensor) == lowbitdm's: {c['input_codes_equal_eager_quantize_per_tensor']}")
    for key in ("int_vs_fake", "pt2e_reference_vs_fake", "pt2e_compiled_vs_fake", "pt2e_compiled_vs_reference",
                "pt2e_compiled_vs_combined_scale_rescale"):
        d = c[key]
        print(f"    {key:<40} identical {100 * d['identical']:6.2f} %   max |diff| {d['max_abs']:.3g} "
              f"({d['max_in_output_steps']:.3g} output steps)")
    for key, d in c["saturating_input"].items():
        if isinstance(d, dict):
            print(f"    all codes 255: {key:<25} identical {100 * d['identical']:6.2f} %   max |diff| "
                  f"{d['max_abs']:.3g} ({d['max_in_output_steps']:.3g} output steps)")


def print_summary(p: dict) -> None:
    print(f"\nprototype: lowbitdm's own W8A8 qparams in PT2E, one layer ({p['layer']}, input {p['shape']['in']}, "
          f"{p['checkpoint']})")
    _print_checks(f"native ({p['native']['kernel_probes']['onednn_conv']} oneDNN conv)", p["native"])
    _print_checks(f"ONEDNN_MAX_CPU_ISA=AVX2 ({p['avx2']['kernel_probes']['onednn_conv']} oneDNN conv)", p["avx2"])
    print("  layer time (median of rounds): " + "   ".join(f"{k} {v:.2f} ms" for k, v in
                                                         p["layer_ms_median_of_rounds"].items())
          + f"   int / pt2e {p['int_vs_pt2e_speed']:.2f}x")


def main() -> None:
    """Child of `run`: the comparison alone, in this process's CPU class, written as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from pt2e import _compiled

    name, layer, fake_layer, x = _setup(args, args.merged_dir, args.model)
    checks, _ = compare(layer, fake_layer, x, _compiled)
    args.out.write_text(json.dumps({**checks, "layer": name, **kernel_report()}) + "\n")


if __name__ == "__main__":
    main()
