"""The integer runtime of merged checkpoints against the fake-quantized model.

Layer level: `IntLinear`/`IntConv2d` give bit for bit the output of the fake-quantized layer
in inference (its integer-exact path, `quant.integer`) on every kernel, agree with the float
STE path to float rounding, and their integer sums equal `int_ops`' exact ones. Model level:
every layer and the whole denoiser agree bit for bit on the real forward pass, and DDIM
samples from the merged checkpoint equal the fake-quantized artifact's pixel for pixel.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_chain import merge_tiny
from torch import nn

from lowbitdm_cli import load_quantized
from lowbitdm_cli.artifacts import Artifact, sha256_file
from lowbitdm_cli.errors import IntegrityError
from lowbitdm_cli.export import int_runtime, s16
from lowbitdm_cli.export.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_merged
from lowbitdm_cli.export.int_ops import int_conv2d_acc, int_linear_acc
from lowbitdm_cli.export.int_runtime import IntConv2d, IntLayer, IntLinear, onednn_available, window_sums_beside
from lowbitdm_cli.export.kernel_probe import probe_int_mm, probe_onednn_conv, probe_onednn_linear
from lowbitdm_cli.models.wrapper import set_timestep
from lowbitdm_cli.quant.integer import rescale, rescale_order
from lowbitdm_cli.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear, quant_layers
from lowbitdm_cli.quant.policy import LayerSpec
from lowbitdm_cli.sampling import SamplerSettings, ddim_sample, to_uint8
from lowbitdm_cli.stages.common import load_quantized_from

TOL = 1e-4  # max abs difference as a fraction of the output range
FALLBACK_SETS = ["quant.a_temporal=true",
                 'quant.overrides=[{pattern="conv_out", a_bits="fp"}, {pattern="*.time_emb_proj", w_bits="fp"}]']
CONFIGS = {"w8a8": ("w8a8", []), "w4a4": ("w4a4", []), "w4a4-temporal": ("w4a4", FALLBACK_SETS),
           "w8a8-attention-matmuls": ("w8a8", ["quant.attn_matmul=true"])}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / (ref.max() - ref.min()).clamp_min(1e-12))


# --- single layers from random codes ------------------------------------------------------------
def _random_layer(kind: str, w_bits: int, a_bits: int, a_symmetric: bool, seed: int, conv: dict | None = None,
                  timesteps: list[int] | None = None) -> tuple[IntLayer, QuantLayerMixin, torch.Tensor, torch.Tensor]:
    """An int layer and the fake-quantized layer `load_merged` would build from the same random codes."""
    g = torch.Generator().manual_seed(seed)
    out_ch, in_ch = 12, 10
    shape = (out_ch, in_ch, *conv["kernel"]) if kind == "conv" else (out_ch, in_ch)
    codes = torch.randint(0, 1 << w_bits, shape, generator=g).to(torch.uint8)
    zw = torch.randint(1, (1 << w_bits) - 1, (out_ch,), generator=g, dtype=torch.int32)  # nonzero
    zw[0] = 3 if w_bits == 8 else zw[0]  # an off-centre 8-bit zero point needs the shifted kernel
    sw = torch.rand(out_ch, generator=g) * 0.02 + 0.005
    slots = len(timesteps) if timesteps else 1
    sx = torch.rand(slots, generator=g) * 0.1 + 0.02
    zx = torch.randint(1, (1 << a_bits) - 1, (slots,), generator=g, dtype=torch.int32)
    zx = zx * 0 if a_symmetric else zx  # symmetric quantizers keep z = 0 (the kernels use 2^(b-1))
    bias = torch.randn(out_ch, generator=g)
    weight = ((codes.float() - zw.float().view(-1, *[1] * (len(shape) - 1))) * sw.view(-1, *[1] * (len(shape) - 1)))
    kw = {"bias": bias, "input_scale": sx, "input_zero_point": zx, "a_bits": a_bits, "a_symmetric": a_symmetric,
          "timesteps": timesteps}
    if kind == "conv":
        layer = IntConv2d(codes, zw, sw, stride=conv["stride"], padding=conv["padding"], **kw)
        float_layer = nn.Conv2d(in_ch, out_ch, conv["kernel"], stride=conv["stride"], padding=conv["padding"])
        wrapper = QuantConv2d
    else:
        layer = IntLinear(codes, zw, sw, **kw)
        float_layer, wrapper = nn.Linear(in_ch, out_ch), QuantLinear
    with torch.no_grad():
        float_layer.weight.copy_(weight)
        float_layer.bias.copy_(bias)
    spec = LayerSpec(role="merged", kind=kind, w_bits=None, a_bits=a_bits, a_symmetric=a_symmetric,
                     a_temporal=bool(timesteps))
    fake = wrapper.from_float(float_layer, spec, timesteps)
    with torch.no_grad():
        fake.a_quant.delta.copy_(sx.reshape(fake.a_quant.delta.shape))
        fake.a_quant.zero_point.copy_(zx.float().reshape(fake.a_quant.zero_point.shape))
    return layer, fake.eval(), codes, zw


def _input(kind: str, layer: IntLayer, seed: int) -> torch.Tensor:
    """Inputs that span the code range, with some clamping on both sides."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 10, 11, 9) if kind == "conv" else (4, 5, 10)
    return torch.randn(shape, generator=g) * float(layer.input_scale.max()) * 2 ** (layer.a_bits - 1)


CONVS = {"3x3s2p1": {"kernel": (3, 3), "stride": 2, "padding": 1}, "1x1": {"kernel": (1, 1), "stride": 1, "padding": 0}}


# every lowering must give the fake layer's bits on every CPU: the split ones (weights in two
# pair-safe halves, what AVX2-class CPUs need) are forced here too, whatever this CPU's kernels do
KERNELS = ["int_mm", "int_mm-split1", "int_mm-split4", "float", *(["s16"] if s16.available() else []),
           *(["onednn", "onednn-unit-scales", "onednn-split2", "onednn-split5", "onednn-sums-in-kernel",
              "onednn-sums-beside"] if onednn_available() else [])]
# a KERNELS entry's options: the kernel's own rescale off; a shifted layer's window sums from the kernel's
# all-ones row or beside it (`window_sums_beside`), whichever this CPU's default
_OPTIONS = ("-unit-scales", "-sums-in-kernel", "-sums-beside")


def _kernel_name(kernel: str) -> str:
    """The kernel of a KERNELS entry (``onednn``, ``int_mm``, ``float``)."""
    for option in _OPTIONS:
        kernel = kernel.removesuffix(option)
    return kernel.partition("-split")[0]


def _force(layer: IntLayer, kernel: str) -> None:
    """Put `layer` on the lowering named by a KERNELS entry (skip what cannot be exact here)."""
    name, _, split = kernel.partition("-split")
    name = _kernel_name(name)
    layer.set_lowering(name, int(split) if split else None)
    if kernel.endswith("-unit-scales"):
        layer.fused_rescale = False
    if kernel.endswith(("-sums-in-kernel", "-sums-beside")):
        layer._sums_beside = kernel.endswith("-beside") and window_sums_beside(layer, in_kernel=False)
        assert layer.sums_beside == (kernel.endswith("-beside") and not layer.direct)
    probe = {"onednn": probe_onednn_conv if isinstance(layer, IntConv2d) else probe_onednn_linear,
             "int_mm": probe_int_mm}.get(name)
    if probe is not None and probe() == "pair16" and not split and layer.u_max * 2 * int(
            layer.int8_weight().to(torch.int16).abs().max()) > 32767:
        pytest.skip(f"{name} adds pairs in 16 bits on this CPU: this layer needs the split lowering")


def _exact_fake(fake: QuantLayerMixin, w_bits: int, codes: torch.Tensor, zw: torch.Tensor,
                layer_scale: torch.Tensor) -> QuantLayerMixin:
    """The fake layer with the weight quantizer `load_merged` gives it (asymmetric over the codes)."""
    spec = fake.spec.model_copy(update={"w_bits": w_bits})
    layer = type(fake).from_float(fake, spec, fake.a_quant.timesteps.tolist() or None)
    view = (-1, *[1] * (codes.dim() - 1))
    sw = layer_scale.reshape(view)
    with torch.no_grad():
        layer.a_quant.load_state_dict(fake.a_quant.state_dict())
        layer.w_quant.zero_point.copy_(zw.float().reshape(view))
        layer.w_quant.delta.copy_(sw.reshape(view))
    return layer.eval()


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN int8 kernels in this PyTorch")
@pytest.mark.parametrize("kind", ["linear", "1x1"])
def test_kernel_rescale_is_checked_per_shape(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct layer lets oneDNN rescale only once the kernel's float32 output has matched the
    unit-scale route bit for bit on that input shape. oneDNN picks its implementation per shape (on
    AMX this 10 → 12 channel layer rescales in the other order than the probe's wider one), so the
    process's order is set to each of the two in turn (the global probe bypassed): for exactly one
    of them the kernel keeps rescaling, for the other the first call finds the difference and the
    layer rescales itself. Every output equals the fake layer's either way."""
    from lowbitdm_cli.export import int_runtime
    from lowbitdm_cli.quant.integer import RESCALE_ORDERS

    conv = CONVS.get(kind)
    monkeypatch.setattr(int_runtime, "onednn_rescale_matches", lambda *_: True)
    kept = []
    for order in RESCALE_ORDERS:
        monkeypatch.setenv("LOWBITDM_RESCALE_ORDER", order)
        layer, fake, codes, zw = _random_layer("conv" if conv else "linear", 4, 8, False, seed=5, conv=conv)
        _force(layer, "onednn")
        assert layer.fused_rescale
        exact = _exact_fake(fake, 4, codes, zw, layer.weight_scale)
        shape = (64, 10) if kind == "linear" else (4, 10, 8, 8)
        for seed in range(3):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0
            with torch.no_grad():
                assert torch.equal(layer(x), exact(x))
        assert layer.lowering == ("onednn-fused" if layer.fused_rescale else "onednn")
        kept.append(layer.fused_rescale)
    assert sum(kept) == 1, kept  # the kernel rescales in one of the two orders on every class measured


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("a_symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("a_bits", [8, 4], ids=lambda b: f"a{b}")
@pytest.mark.parametrize("w_bits", [8, 4, 2], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("kind", ["linear", *CONVS])
def test_layer_matches_fake_quant(kind: str, w_bits: int, a_bits: int, a_symmetric: bool, kernel: str) -> None:
    conv = CONVS.get(kind)
    layer, fake, codes, zw = _random_layer("conv" if conv else "linear", w_bits, a_bits, a_symmetric,
                                           seed=w_bits * 10 + a_bits, conv=conv)
    _force(layer, kernel)
    assert layer.kernel == _kernel_name(kernel)
    assert layer.direct == (w_bits < 8)  # 8-bit weights with an off-centre zero point: shifted kernel
    x = _input("conv" if conv else "linear", layer, seed=w_bits + a_bits)
    with torch.no_grad():
        out, ref = layer(x), fake(x)  # `fake` has no weight quantizer: a float product of dequantized operands
        exact = _exact_fake(fake, w_bits, codes, zw, layer.weight_scale)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # contiguous (NCHW) on every lowering, as the fake layer's: the float ops after it (GroupNorm)
    # round by memory layout, so both runtimes must hand them the same one
    assert out.is_contiguous() and exact.is_contiguous()
    assert _rel(out, ref) <= TOL
    assert torch.equal(out, exact)  # the fake layer's integer-exact inference gives the same bits
    # the integer sums are exactly int_ops' (independently tested) ones
    u, zx, _ = layer.quantize_input(x)
    assert torch.equal(u.float() - (zx if a_symmetric else 0), fake.a_quant.quantize_codes(x))
    if conv:
        cols, ho, wo = layer.im2col(u, zx)
        acc = layer.accumulate(cols, zx).long().reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)
        expected = int_conv2d_acc(u, zx, codes, zw, stride=conv["stride"], padding=conv["padding"])
    else:
        acc = layer.accumulate(u.reshape(-1, u.shape[-1]), zx).long()
        expected = int_linear_acc(u.reshape(-1, u.shape[-1]), zx, codes, zw)
    assert torch.equal(acc, expected)


@pytest.mark.parametrize("kind", ["linear", *CONVS])
def test_float_path_chunks_wide_sums(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Codes 255 against w − zw = 255 (a shifted layer) over K = 288 inputs: the float path's sums reach
    288·255² > 2^24, so it runs the product over two input-channel chunks (`quant.integer.exact_route`)
    and adds them with one rounding: the int64 sum of `int_ops` rounded once, then the rescale."""
    conv = CONVS.get(kind)
    k = 288
    in_ch = k // (conv["kernel"][0] * conv["kernel"][1]) if conv else k
    shape = (8, in_ch, *conv["kernel"]) if conv else (8, in_ch)
    codes, zw = torch.full(shape, 255, dtype=torch.uint8), torch.zeros(8, dtype=torch.int32)
    scale, bias = torch.linspace(0.01, 0.02, 8), torch.linspace(-1, 1, 8)
    common = {"bias": bias, "input_scale": torch.tensor([0.5]), "input_zero_point": torch.tensor([0]), "a_bits": 8}
    if conv:
        layer: IntLayer = IntConv2d(codes, zw, scale, stride=conv["stride"], padding=conv["padding"], **common)
        x = torch.full((2, in_ch, 7, 7), 1000.0)  # every code 255
    else:
        layer = IntLinear(codes, zw, scale, **common)
        x = torch.full((5, k), 1000.0)
    calls: list[int] = []
    sum_chunks = int_runtime.sum_chunks
    monkeypatch.setattr(int_runtime, "sum_chunks", lambda parts: calls.append(len(parts)) or sum_chunks(parts))
    layer.set_lowering("float")
    with torch.no_grad():
        out = layer(x)
    assert calls == [2]
    u, zx, delta = layer.quantize_input(x)
    if conv:
        acc = int_conv2d_acc(u, zx, codes, zw, stride=conv["stride"], padding=conv["padding"])
    else:
        acc = int_linear_acc(u, zx, codes, zw)
    assert int(acc.max()) == k * 255 * 255 > 2**24
    expected = rescale(acc.to(torch.float64).float(), delta, layer.weight_scale, layer.bias, 1 if conv else -1,
                       layer.rescale_kernel)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("w_code", "zw"), [(255, 128), (0, 128), (255, 3), (0, 252)],
                         ids=["direct-127", "direct-minus128", "shifted-127", "shifted-minus128"])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
def test_saturating_codes_are_exact(kind: str, w_code: int, zw: int) -> None:
    """All activation codes 255 against weights at the ends of the int8 range, K ≥ 64: where a CPU
    adds u8·s8 pairs in saturating 16-bit lanes (AVX2, AVX-512 without VNNI) a plain oneDNN or
    _int_mm call clips each pair at 32767; the chosen lowering must still give the exact result."""
    out_ch = 8
    shape = (out_ch, 64) if kind == "linear" else (out_ch, 16, 3, 3) if kind == "conv3x3" else (out_ch, 64, 1, 1)
    codes = torch.full(shape, w_code, dtype=torch.uint8)
    zero = torch.full((out_ch,), zw, dtype=torch.int32)
    scale, bias = torch.linspace(0.01, 0.02, out_ch), torch.linspace(-1, 1, out_ch)
    common = {"bias": bias, "input_scale": torch.tensor([0.5]), "input_zero_point": torch.tensor([0]), "a_bits": 8}
    if kind == "linear":
        layer: IntLayer = IntLinear(codes, zero, scale, **common)
        x = torch.full((5, 64), 1000.0)
    else:
        layer = IntConv2d(codes, zero, scale, padding=1 if kind == "conv3x3" else 0, **common)
        x = torch.full((2, shape[1], 5, 5), 1000.0)
    w = codes.double() - zw
    u = torch.full_like(x, 255.0, dtype=torch.float64)  # every input clamps to the top code
    acc = F.linear(u, w) if kind == "linear" else F.conv2d(u, w, None, 1, layer.padding)
    expected = rescale(acc.float(), torch.tensor([0.5]), scale, bias, -1 if kind == "linear" else 1, layer.rescale_kernel)
    assert int(layer.int8_weight().to(torch.int16).abs().min()) >= 127  # the kernels see |w| ≥ 127: pairs beyond 16 bits
    assert layer.direct == (zw == 128)
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(out, expected), (layer.lowering, float((out - expected).abs().max()))


def test_autotune_keeps_the_bits_and_picks_an_exact_lowering() -> None:
    """A layer whose first choice is a split (or the float path) times every exact lowering on its
    first input and keeps the fastest: the output is the same bits whichever wins."""
    layer, fake, codes, zw = _random_layer("conv", 8, 8, False, seed=3, conv=CONVS["3x3s2p1"])
    x = _input("conv", layer, seed=4)
    with torch.no_grad():
        expected = _exact_fake(fake, 8, codes, zw, layer.weight_scale)(x)
        layer._tune = [("float", None), ("int_mm", 1), *([("onednn", 2)] if onednn_available() else []),
                       *([("s16", None)] if s16.available() else [])]
        out = layer(x)
    assert layer._tune is None and layer.lowering.split("-")[0] in ("float", "int_mm", "onednn", "s16")
    assert torch.equal(out, expected) and torch.equal(layer(x), expected)


@pytest.mark.parametrize("onednn", ["int32", "pair16", "unavailable"])
def test_int_mm_is_a_candidate_only_where_onednn_has_none(monkeypatch, onednn: str) -> None:
    """torch._int_mm's CPU kernel is a fallback: a candidate only where no oneDNN lowering is exact
    (no oneDNN at all, or pairs that overflow and no split that keeps float32 outputs exact); the
    integer-exact float path is always the last."""
    layer, *_ = _random_layer("conv", 8, 8, False, seed=3, conv=CONVS["3x3s2p1"])
    monkeypatch.setattr(layer, "_probe_onednn", lambda: onednn)
    monkeypatch.setattr(int_runtime, "probe_int_mm", lambda device: "int32")
    kernels = [kernel for kernel, _ in layer.exact_lowerings()]
    assert kernels[-1] == "float"
    if onednn == "unavailable":
        assert kernels[0] == "int_mm"
    else:
        assert kernels[0] == "onednn" and "int_mm" not in kernels


def test_autotune_is_bounded_and_kept_per_shape(monkeypatch) -> None:
    """The timed forwards see at most TUNE_ROWS batch rows; every candidate's first call (which builds its
    weights and plans) is untimed; then rounds time every candidate still in, in a rotated order, and drop
    one TUNE_DROP× slower than the best; the fastest wins, each lowering built once; and a second layer of
    the same shapes and candidates takes that choice without timing anything. The bits stay the fake
    layer's."""
    monkeypatch.setattr(int_runtime, "_TUNED", {})
    monkeypatch.setattr(int_runtime, "TUNE_ROWS", 2)
    # a clock that runs on the lowering: float the fastest but 10 on its first call (what building costs),
    # which a timed first call would have held against it (10 > 3 × 3)
    cost = {"float": 1.0, "int_mm-split1": 3.0, "int_mm": 5.0}
    clock, calls, builds = [0.0], [], []
    monkeypatch.setattr(int_runtime.time, "perf_counter", lambda: clock[0])
    layers = []
    for _ in range(2):
        layer, fake, codes, zw = _random_layer("conv", 8, 8, False, seed=3, conv=CONVS["3x3s2p1"])
        forward, set_lowering = layer.forward, layer.set_lowering

        def counted(x: torch.Tensor, layer=layer, forward=forward) -> torch.Tensor:
            lowering = layer.lowering
            clock[0] += 10.0 if lowering not in [c for c, _ in calls] else cost[lowering]
            calls.append((lowering, x.shape[0]))
            return forward(x)

        def counted_set(*args, set_lowering=set_lowering) -> None:
            builds.append(args)
            set_lowering(*args)

        layer.forward, layer.set_lowering = counted, counted_set
        layers.append(layer)
    x = _input("conv", layers[0], seed=4)
    with torch.no_grad():
        expected = _exact_fake(fake, 8, codes, zw, layers[0].weight_scale)(x)
        candidates = [("int_mm", 1), ("float", None), ("int_mm", None)]
        layers[0]._tune = list(candidates)
        layers[0].autotune(x)  # what the first forward does
        out = layers[0](x)
        assert [c for c, _ in calls] == [
            "int_mm-split1", "float", "int_mm",  # untimed first calls
            "int_mm-split1", "float", "int_mm",  # round 1: int_mm 5 > 3 × 1: dropped
            "float", "int_mm-split1",  # round 2, rotated
            "int_mm-split1", "float",  # round 3
            "float"]  # then the real input, on the choice
        assert {rows for _, rows in calls[:-1]} == {2} and calls[-1] == ("float", 3)
        assert builds == candidates  # each built once; the choice restored, not rebuilt
        assert layers[0].lowering == "float" and torch.equal(out, expected)
        calls.clear()
        layers[1]._tune = list(candidates)
        layers[1].autotune(x)
        assert calls == [] and layers[1].lowering == "float" and layers[1]._tune is None
        assert torch.equal(layers[1](x), expected)
        # a kernel faster than the float path by less than TUNE_MARGIN does not replace it; by more, it does
        for fast, chosen in ((0.95, "float"), (0.8, "int_mm-split1")):
            cost["int_mm-split1"] = fast
            monkeypatch.setattr(int_runtime, "_TUNED", {})
            layers[1]._tune = list(candidates)
            layers[1].autotune(x)
            assert layers[1].lowering == chosen
        # a first batch of one row is tuned on that row; a batch RETUNE_GROWTH× larger (up to TUNE_ROWS) tunes again
        monkeypatch.setattr(int_runtime, "TUNE_ROWS", 8)
        monkeypatch.setattr(int_runtime, "_TUNED", {})
        big, big_expected = torch.cat([x] * 4), torch.cat([expected] * 4)  # 12 rows
        layers[1]._tune = list(candidates)
        calls.clear()
        assert torch.equal(layers[1](x[:1]), expected[:1])
        assert {rows for _, rows in calls} == {1} and len(calls) > 1  # tuned on the one row, then run
        calls.clear()
        assert torch.equal(layers[1](big[:3]), big_expected[:3]) and calls == [(layers[1].lowering, 3)]  # 3 < 4 x 1
        calls.clear()
        assert torch.equal(layers[1](big), big_expected)  # the call (12 rows), inside it the tuning (on 8 rows)
        assert len(calls) > 2 and calls[0][1] == 12 and {rows for _, rows in calls[1:]} == {8}
        calls.clear()
        assert torch.equal(layers[1](big), big_expected) and len(calls) == 1  # 8 < 4 x 8: kept
        layers[1].set_lowering("float")  # an explicit lowering is kept: no tuning again
        calls.clear()
        layers[1]._tuned_rows = 1
        assert torch.equal(layers[1](big), big_expected) and calls == [("float", 12)]


def test_kernel_probe_sees_the_avx2_class(tmp_path: Path) -> None:
    """With oneDNN capped at AVX2 (what an AVX2-only CPU runs), the probe finds 16-bit pair sums
    (or no oneDNN at all, off x86), and the layers it lowers are split where they must be."""
    script = (
        "import json, torch\n"
        "from lowbitdm_cli.export.kernel_probe import kernel_report\n"
        "from lowbitdm_cli.export.int_runtime import IntLinear\n"
        "layer = IntLinear(torch.full((4, 64), 255, dtype=torch.uint8), torch.full((4,), 128), torch.ones(4), None,\n"
        "                  torch.tensor([1.0]), torch.tensor([0]), 8)\n"
        "print(json.dumps({**kernel_report(), 'lowering': layer.lowering}))\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for path, kind in report["kernel_probes"].items():
        # oneDNN's kernels, capped, never mistaken for int32; torch._int_mm does not follow the cap, and on an
        # AVX2-only CPU (AMD EPYC, Zen 3) it sums exactly: measured int32 there
        assert kind in ("pair16", "unavailable") or (path == "int_mm" and kind == "int32"), (path, kind)
    if report["kernel_probes"]["onednn_linear"] == "pair16":
        assert "-split" in report["lowering"]
    assert report["cpu"]["onednn_max_cpu_isa"] == "AVX2"


def test_temporal_slots_follow_the_timestep_value() -> None:
    steps = [750, 500, 250, 0]
    layer, fake, _, _ = _random_layer("linear", 4, 8, False, seed=5, timesteps=steps)
    x = _input("linear", layer, seed=6)
    with pytest.raises(RuntimeError, match="set_timestep"):
        layer(x)
    outs = []
    for t in (500, 0, 740):  # 740 is not a slot: the nearest (750) is used and recorded
        layer.set_timestep(t)
        fake.a_quant.set_timestep(t)
        with torch.no_grad():
            out = layer(x)
            assert _rel(out, fake(x)) <= TOL
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])  # different slots, different parameters
    assert layer.unmatched_timesteps == {740} == fake.a_quant.unmatched_timesteps


def test_zero_point_outside_the_code_range_is_refused() -> None:
    args = (torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2), torch.ones(2), None, torch.ones(1))
    with pytest.raises(ValueError, match="outside"):
        IntLinear(*args, torch.tensor([300]), a_bits=8)
    with pytest.raises(ValueError, match="zero points"):
        IntLinear(torch.zeros(2, 3, dtype=torch.uint8), torch.tensor([0, 256]), torch.ones(2), None,
                  torch.ones(1), torch.tensor([3]), a_bits=8)


# --- merged artifacts of tiny-random -------------------------------------------------------------
@pytest.fixture(scope="module", params=list(CONFIGS))
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    bits, extra = CONFIGS[request.param]
    return merge_tiny(bits, extra, tmp_path_factory.mktemp(request.param))


def _pair(merged: Artifact):
    return load_merged(merged.path, "int"), load_merged(merged.path, "fake")


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10


def test_every_layer_agrees_on_the_int_forward_pass(merged: Artifact) -> None:
    """Each int layer against its fake counterpart on the very inputs the int model produces:
    the same bits."""
    mi, mf = _pair(merged)
    fake_layers = quant_layers(mf.denoiser)
    differing: dict[str, float] = {}

    def check(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            ref = fake_layers[name](args[0])
            if not torch.equal(out, ref):
                differing[name] = _rel(out, ref)
        return hook

    int_layers = {n: m for n, m in mi.denoiser.named_modules() if isinstance(m, IntLayer)}
    assert int_layers
    for name, module in int_layers.items():
        module.register_forward_hook(check(name))
    x, cond = _batch(4, seed=0)
    with torch.no_grad():
        for t in (999, 666, 333, 0):
            set_timestep(mf.denoiser, t)
            mi.eps(x, t, cond, guidance=2.0)
    assert not differing, differing


def test_eps_are_identical(merged: Artifact) -> None:
    mi, mf = _pair(merged)
    x, cond = _batch(6, seed=1)
    with torch.no_grad():
        for t in (999, 500, 120, 0):
            assert torch.equal(mi.eps(x, t, cond, 2.0), mf.eps(x, t, cond, 2.0))


def test_ddim_samples_agree(merged: Artifact) -> None:
    """Same seed, 4 DDIM steps, CFG 2: the merged checkpoint on the integer runtime, on the fake
    runtime and the fake-quantized artifact it came from give the same images (the issue asks
    for ≥ 99 % of pixels within one grey level; the arithmetic is the same, so all are equal)."""
    mi, mf = _pair(merged)
    art = load_quantized_from(merged)
    settings = SamplerSettings(steps=4, eta=0.0, guidance=2.0, clip_x0=True)
    idx, cond = list(range(24)), torch.arange(24) % 10
    ui, uf, ua = (to_uint8(ddim_sample(m, cond, idx, 0, settings)).astype(int) for m in (mi, mf, art))
    assert (np.abs(ui - ua) <= 1).mean() >= 0.99
    assert np.array_equal(ui, ua) and np.array_equal(uf, ua)


# --- the report, the loader, integrity --------------------------------------------------------
def test_runtime_report_counts_fallbacks(merged: Artifact) -> None:
    cfg = json.loads((merged.path / CONFIG_NAME).read_text())
    report = load_merged(merged.path, "int").meta["runtime"]
    assert report["int_layers"] + report["fallback_layers"] == len(cfg["layers"])
    assert report["fallback_layers"] == len(report["fallback"])
    expected = {n for n, e in cfg["layers"].items() if e["weights"] is None or e["input_activations"] is None}
    assert set(report["fallback"]) == expected
    if merged.path.parent.name.startswith("w4a4-temporal"):
        assert report["fallback_layers"] == 9  # conv_out (input fp) + 8 time_emb_proj (weights fp)
        assert report["fallback_reasons"]["conv_out"] == "input not quantized"
        assert cfg["timesteps"]
    else:
        assert report["fallback_layers"] == 0
    assert "runtime" not in load_merged(merged.path, "fake").meta
    with pytest.raises(ValueError, match="runtime"):
        load_merged(merged.path, "exact")  # type: ignore[arg-type]


def test_load_quantized_validates_and_never_unpickles(merged: Artifact, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, edit_manifest) -> None:
    def no_pickle(*_a: object, **_k: object) -> None:
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    model = load_quantized(merged.path)
    assert model.meta["runtime"]["int_layers"] > 0
    monkeypatch.undo()

    import shutil

    tampered = Path(shutil.copytree(merged.path, tmp_path / "tampered"))
    data = bytearray((tampered / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (tampered / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=WEIGHTS_NAME):
        load_quantized(tampered)

    # a packed weight one byte short, written consistently into the manifest: the config check catches it
    short = Path(shutil.copytree(merged.path, tmp_path / "short"))
    tensors = load_file(str(short / WEIGHTS_NAME))
    key = next(k for k in tensors if k.endswith(".weight_packed"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(short / WEIGHTS_NAME))

    def rehash(m: dict) -> None:
        m["files"][WEIGHTS_NAME] = {"sha256": sha256_file(short / WEIGHTS_NAME),
                                    "size": (short / WEIGHTS_NAME).stat().st_size}

    edit_manifest(short, rehash, redigest=True)
    with pytest.raises(IntegrityError, match="weight_packed"):
        load_quantized(short)
    with pytest.raises(IntegrityError, match="weight_packed"):
        load_merged(short, "fake")


def test_sample_cli_records_the_runtime(merged: Artifact, tmp_path: Path, runner) -> None:
    from lowbitdm_cli.cli import app

    if not merged.path.parent.name.startswith("w4a4-temporal"):
        return  # one configuration is enough for the CLI wiring
    sets = [a for s in ("sample.num_samples=2", "sample.batch_size=2", "sample.steps=2", "sample.grid_samples=0")
            for a in ("--set", s)]
    digests = {}
    for runtime in ("int", "fake"):
        args = ["sample", str(merged.path), *sets, "--out", str(tmp_path / runtime)]
        result = runner.invoke(app, args + (["--runtime", runtime] if runtime == "fake" else []))
        assert result.exit_code == 0, result.output
        manifest = Artifact.open(tmp_path / runtime).manifest
        assert manifest.info["runtime"] == runtime
        # both runtimes rescale in the process's order, so it is in the record of either
        assert manifest.info["rescale_order"] == {k: rescale_order(k) for k in ("conv", "linear")}
        if runtime == "int":  # which CPU, what its kernels compute, which lowering each layer ran
            record = manifest.info["int_runtime"]
            assert set(record["kernel_probes"]) == {"onednn_linear", "onednn_conv", "int_mm"}
            assert record["cpu"]["torch_isa"] and sum(record["lowerings"].values()) > 0
            assert record["rescale_order"] == {k: rescale_order(k) for k in ("conv", "linear")}
        else:
            assert "int_runtime" not in manifest.info
        digests[runtime] = manifest.inputs_digest
    assert digests["int"] != digests["fake"]  # the two runtimes never share an artifact
    result = runner.invoke(app, ["sample", str(merged.path), "--runtime", "exact"])
    assert result.exit_code == 2 and "exact" in result.output
