"""The compiled runtime (`export.compiled_runtime`, `sample --runtime compiled`): each integer layer as
one oneDNN int8 call (folded: the prepacked kernel called directly with the slot's Δx and zero point;
unfolded: the reference pattern PyTorch's x86 int8 lowering turns into one), inside a denoiser that
Inductor compiles.

It does not promise the fake runtime's bits (Inductor reorders the float ops), so the layer tests
bound it against an independent reference: the exact integer sum in float64, rescaled in float64.
Both the integer layer and its compiled form compute the same exact integer sum (the inputs lie a
quarter step or more from every rounding boundary, so any correctly rounded quantization gives the
same codes) and then at most three float32 roundings (×Δx, ×Δw, +b; the kernel's own rescale where
the scales are folded into it) of magnitude at most |acc·Δx·Δw| + |b| each, so each lies within
4·2⁻²⁴·(|acc·Δx·Δw| + |b|) of the float64 value. A bf16 output adds its own rounding (2⁻⁸ relative):
within (2⁻⁷ + 2⁻¹⁵)·(|acc·Δx·Δw| + |b|), which leaves room for a kernel that adds the bias in bf16.
A folded layer runs the same kernel eagerly, so the same bounds hold there. A folded shifted layer
adds to each kernel output Δx·Σ(u − zx) times (128 − zw)·Δw: in the kernel, its all-ones row's output
(a kernel output too) times the constant, two float32 roundings of that product and one of the sum
more; beside it, the sum exact in float32 (integers below 2²⁴) times Δx and the constant, three
roundings of the correction and one of the sum. Either way in float32 within 6·2⁻²⁴ and in bf16 (the
row's output rounded to bf16 as well, then the sum) within (2⁻⁷ + 2⁻⁸ + 2⁻¹⁴) of
|Δx·Δw·Σ(u − zx)(w − 128)| + |b| + |Δx·Δw·(128 − zw)·Σ(u − zx)|.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_chain import merge_tiny, sample_tiny

from lowbitdm_cli.errors import RuntimeUnavailableError
from lowbitdm_cli.export import compiled_runtime, s16
from lowbitdm_cli.export.compiled_runtime import (
    RefLayer,
    RefTransformLayer,
    check_compilable,
    reference_layers,
    unsupported,
)
from lowbitdm_cli.export.int_runtime import IntConv2d, IntLayer, IntLinear
from lowbitdm_cli.export.int_transforms import IntTransformLinear
from lowbitdm_cli.quant.quantizer import token_scale
from lowbitdm_cli.quant.transforms import hadamard_transform

needs_compiled = pytest.mark.skipif(compiled_runtime.available() is not None,
                                    reason=str(compiled_runtime.available()))
U = 2.0**-24


def _layer(kind: str, shifted: bool, zero_points: list[int], seed: int = 0, a_bits: int = 8,
           kernel: int = 3, stride: int = 1, padding: int = 1, in_ch: int | None = None) -> IntLayer:
    g = torch.Generator().manual_seed(seed)
    shape = (24, in_ch or 16, kernel, kernel) if kind == "conv" else (24, in_ch or 40)
    if shifted:  # codes over the whole byte, zero points anywhere: w − zw leaves int8
        codes, zw = torch.randint(0, 256, shape, generator=g), torch.randint(0, 256, (24,), generator=g)
    else:
        codes, zw = torch.randint(90, 166, shape, generator=g), torch.full((24,), 128)
    slots = len(zero_points)
    args = (codes, zw, torch.rand(24, generator=g) * 0.01 + 1e-3, torch.randn(24, generator=g),
            torch.tensor([0.05, 0.03, 0.08][:slots]), torch.tensor(zero_points), a_bits)
    timesteps = [999, 500, 0][:slots] if slots > 1 else None
    if kind == "conv":
        return IntConv2d(*args, timesteps=timesteps, stride=stride, padding=padding)
    return IntLinear(*args, timesteps=timesteps)


def _input(layer: IntLayer, slot: int, seed: int) -> torch.Tensor:
    """Float inputs a quarter step or more from every rounding boundary of `slot`'s quantizer (some
    beyond the clamp range)."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, layer.in_channels, 8, 8) if isinstance(layer, IntConv2d) else (3, 5, layer.k)
    codes = torch.randint(int(layer.q_min) - 20, int(layer.q_max) + 21, shape, generator=g).float()
    jitter = (torch.rand(shape, generator=g) - 0.5) * 0.5
    return (codes - layer._z_add[slot] + jitter) * float(layer.input_scale[slot])


def _bf16_input(layer: IntLayer, slot: int, seed: int) -> torch.Tensor:
    """`_input` rounded to bf16, with the values that rounding brought near a rounding boundary (within a
    twentieth of a step) set to zero, a code no rounding moves."""
    x = _input(layer, slot, seed).bfloat16()
    r = x.double() / float(layer.input_scale[slot])
    return torch.where((r - r.floor() - 0.5).abs() < 0.05, torch.zeros_like(x), x)


def _terms(layer: IntLayer, x: torch.Tensor, slot: int, shifted_part: str = "") -> torch.Tensor:
    """Σ(u − zx)·(w − zw) per output, the exact integer sum in float64 (zero padding = code zx); a shifted
    layer's `shifted_part` "kernel" is Σ(u − zx)·(w − 128) alone, "window" (128 − zw)·Σ(u − zx) alone."""
    delta = float(layer.input_scale[slot])
    u = torch.clamp(torch.round(x.double() / delta) + layer._z_add[slot], layer.q_min, layer.q_max) + layer._offset
    v = u - layer._zx[slot]
    w = layer.wmat[:, : layer.out_ch].t().double()  # w − zw (direct) or w − 128 (shifted), K in the layer's order
    off = 0.0 if layer.direct else layer.w_off.double()[:, None]  # shifted: w − zw = (w − 128) + (128 − zw)
    if shifted_part == "window":
        w = torch.ones_like(w) * off
    elif shifted_part != "kernel":
        w = w + off
    if isinstance(layer, IntConv2d):
        kh, kw = layer.kernel_size
        return F.conv2d(v, w.reshape(layer.out_ch, kh, kw, -1).permute(0, 3, 1, 2), None, layer.stride, layer.padding)
    return v @ w.t()


def _rescale64(layer: IntLayer, acc: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(acc·Δx·Δw, b) in float64, shaped to broadcast over `acc`'s outputs."""
    shape = (-1, 1, 1) if isinstance(layer, IntConv2d) else (-1,)
    return acc * float(layer.input_scale[slot]) * layer.weight_scale.double().reshape(shape), \
        layer.bias.double().reshape(shape)


def _exact(layer: IntLayer, x: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 output, its bound's scale |acc·Δx·Δw| + |b|) from the exact integer sum."""
    main, b = _rescale64(layer, _terms(layer, x, slot), slot)
    return main + b, main.abs() + b.abs()


def _folded_shifted_scale(layer: IntLayer, x: torch.Tensor, slot: int) -> torch.Tensor:
    """|Δx·Δw·Σ(u − zx)(w − 128)| + |b| + |Δx·Δw·(128 − zw)·Σ(u − zx)|: the scale of the kernel's output
    and of the window sums' correction that a folded shifted layer adds to it."""
    kernel, b = _rescale64(layer, _terms(layer, x, slot, shifted_part="kernel"), slot)
    window, _ = _rescale64(layer, _terms(layer, x, slot, shifted_part="window"), slot)
    return kernel.abs() + b.abs() + window.abs()


def _folds(ref: RefLayer) -> bool:
    """Whether a `RefLayer` (fold=True) should fold: one kernel call (on a saturating CPU, 8-bit shifted
    weights need two), whatever its slots' steps and zero points (the kernel takes them at run time), unless
    its inputs have per-token steps (the kernel takes one)."""
    return ref.split is None and ref.route == "int8" and not getattr(ref, "dynamic", False)


def _kernel_calls(ref: RefLayer) -> int:
    """oneDNN int8 calls a `RefLayer` makes: one per weight part, none on the float or int16 route."""
    return 0 if ref.route != "int8" else ref.parts


def _int8_calls(code: str) -> int:
    """oneDNN int8 kernel calls in Inductor's generated wrapper code; a weight prepack left in it (run per
    call instead of folded into a constant by freezing) fails."""
    calls = [line for line in code.splitlines() if "torch.ops.onednn." in line and not line.strip().startswith("#")]
    assert not [line for line in calls if "prepack" in line], "a weight prepack runs per call"
    return sum(line.count("torch.ops.onednn.q") for line in calls)


def _assert_within(y: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, unit: float = 4 * U) -> None:
    excess = (y.double() - exact).abs() - unit * scale
    assert float(excess.max()) <= 0, f"beyond the derived bound by {float(excess.max())}"


# (kind, shifted weights, zero point per timestep slot, activation bits): 8-bit codes whose zero points
# differ per slot are corrected after the kernel, 4-bit ones re-centred
CASES = [("conv", False, [3], 8), ("conv", True, [3], 8), ("conv", False, [3, 7, 0], 8), ("conv", True, [200, 7], 8),
         ("linear", False, [3], 8), ("linear", True, [5, 9], 8), ("conv", False, [3, 15, 0], 4),
         ("linear", True, [1, 9], 4), ("linear", True, [5], 8)]


@pytest.mark.parametrize("kind,shifted,zero_points,a_bits", CASES)
def test_reference_layer_matches_the_exact_sum(kind: str, shifted: bool, zero_points: list[int], a_bits: int) -> None:
    """Eager `RefLayer` (unfolded and, where it folds, folded) and the integer layer it replaces, in
    every timestep slot, against float64."""
    layer = _layer(kind, shifted, zero_points, a_bits=a_bits)
    ref = RefLayer(layer, fold=False).eval()
    # a shifted layer's window sums in the kernel (an all-ones row) and beside it, whatever this CPU's choice
    folds = [RefLayer(layer, sums_in_kernel=k).eval() for k in ((True, False) if shifted else (None,))]
    assert not ref.folded and not ref.sums_beside
    for folded in folds:
        assert folded.folded == _folds(folded) and not folded.recentred
        assert folded.sums_beside == (folded.folded and shifted and folds.index(folded) == 1)
    assert ref.recentred == (len(set(zero_points)) > 1 and a_bits == 4)
    for slot, t in enumerate(layer.timesteps.tolist() or [None]):
        x = _input(layer, slot, seed=slot)
        layer.set_timestep(t)
        compiled_runtime._STEP.t = None if t is None else torch.tensor([t])
        with torch.no_grad():
            exact, scale = _exact(layer, x, slot)
            _assert_within(layer(x), exact, scale)
            _assert_within(ref(x), exact, scale)
            for folded in folds:
                if not folded.folded:
                    assert torch.equal(folded(x), ref(x))
                elif layer.direct:  # the kernel itself, eagerly: the same bounds as compiled in float32
                    _assert_within(folded(x), exact, scale)
                else:
                    _assert_within(folded(x), exact, _folded_shifted_scale(layer, x, slot), unit=6 * U)
    compiled_runtime._STEP.t = None


@pytest.mark.parametrize("product", ["float", "s16"])
@pytest.mark.parametrize("kind,shifted,zero_points,a_bits", CASES)
def test_rerouted_product_is_the_integer_layer_bit_for_bit(kind: str, shifted: bool, zero_points: list[int],
                                                           a_bits: int, product: str) -> None:
    """The routes CPUs whose int8 kernels add pairs in 16 bits take where oneDNN would need the weight split
    in two calls: float32 products of u − zx and w − zw, exact, or the int16 kernel's int32 sums; then the
    fake runtime's rescale. Eagerly each is the integer layer bit for bit in every slot; no zero-point
    correction, no window sums, no re-centring."""
    if product == "s16" and not s16.available():
        pytest.skip(s16.load())
    layer = _layer(kind, shifted, zero_points, a_bits=a_bits)
    ref = RefLayer(layer, product=product).eval()
    assert ref.route == product and ref.lowering == f"inductor-{product}"
    assert ref.float_chunks == (1 if product == "float" else None)
    assert not ref.folded and not ref.recentred and not ref.sums_beside and ref.split is None
    for slot, t in enumerate(layer.timesteps.tolist() or [None]):
        x = _input(layer, slot, seed=slot)
        layer.set_timestep(t)
        compiled_runtime._STEP.t = None if t is None else torch.tensor([t])
        with torch.no_grad():
            assert torch.equal(ref(x), layer(x)), slot
    compiled_runtime._STEP.t = None
    assert RefLayer(layer, product="int8").route == "int8"


@pytest.mark.parametrize("kind,in_ch,product", [("conv", 96, "float"), ("linear", 864, "float"),
                                                ("conv", 96, "s16"), ("linear", 864, "s16")])
def test_rerouted_product_wide_sums_compiled(kind: str, in_ch: int, product: str) -> None:
    """8-bit codes over 864 inputs: 255·Σ|w − zw| passes 2^24, so the float route runs two input-channel
    chunks (one grouped conv, or two linears on feature slices) added with one rounding, and the int16
    kernel one call (int32 sums): still the integer layer's bits eagerly; compiled with freezing, no int8
    call (the int16 kernel called from the graph), the sums exact, Inductor's rescale within the bound."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    if product == "s16" and not s16.available():
        pytest.skip(s16.load())
    layer = _layer(kind, True, [3, 200], in_ch=in_ch)
    ref = RefLayer(layer, product=product).eval()
    assert ref.lowering == ("inductor-float-chunks2" if product == "float" else "inductor-s16")
    torch._dynamo.reset()
    compiled = torch.compile(ref, fullgraph=True)
    for slot, t in enumerate(layer.timesteps.tolist()):
        x = _input(layer, slot, seed=slot)
        layer.set_timestep(t)
        compiled_runtime._STEP.t = torch.tensor([t])
        with torch.no_grad():
            assert torch.equal(ref(x), layer(x)), slot
            with inductor_config.patch(freezing=True), torch._dynamo.config.patch(error_on_recompile=slot > 0):
                y, code = run_and_get_code(compiled, x)
            assert _int8_calls("\n".join(code)) == 0
            assert ("lowbitdm.conv_s16" in "\n".join(code)) == (product == "s16")
            exact, scale = _exact(layer, x, slot)
            _assert_within(y, exact, scale)
    compiled_runtime._STEP.t = None


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (1, 1, 0), (1, 2, 0), (3, 1, 0), (4, 2, 2)])
def test_window_sums_beside_the_kernel_follow_the_conv_geometry(kernel: int, stride: int, padding: int) -> None:
    """A folded shifted conv whose window sums are taken beside the kernel (a channel sum, then a window
    sum with the conv's stride and zero padding) stays within the bound of the exact sum for strided, 1x1,
    unpadded and even-sized windows (4-bit codes: one kernel call on every CPU, so it folds)."""
    layer = _layer("conv", True, [1, 9], kernel=kernel, stride=stride, padding=padding, a_bits=4)
    ref = RefLayer(layer, sums_in_kernel=False).eval()
    assert ref.folded and ref.sums_beside
    for slot, t in enumerate(layer.timesteps.tolist()):
        x = _input(layer, slot, seed=slot)
        compiled_runtime._STEP.t = torch.tensor([t])
        with torch.no_grad():
            exact, _ = _exact(layer, x, slot)
            _assert_within(ref(x), exact, _folded_shifted_scale(layer, x, slot), unit=6 * U)
    compiled_runtime._STEP.t = None


@pytest.mark.parametrize("flags,cap,amx", [(["avx512_vnni", "amx_int8"], "", True),
                                            (["avx512_vnni", "amx_int8"], "AVX512_CORE_VNNI", False),
                                            (["avx512_vnni", "amx_int8"], "AVX512_CORE_AMX", True),
                                            (["avx512_vnni", "avx512_bf16"], "", False), (None, "", False)])
def test_window_sums_stay_in_the_kernel_where_onednn_runs_on_amx(flags: list[str] | None, cap: str, amx: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The default place of a shifted layer's window sums follows the CPU's AMX-INT8 flag and oneDNN's cap."""
    from lowbitdm_cli.export import kernel_probe

    monkeypatch.setattr(kernel_probe, "_cpuinfo", lambda: ("a CPU", flags))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert kernel_probe.amx_int8() == amx
    layer = _layer("conv", True, [200, 7])
    assert RefLayer(layer).sums_beside == (not amx and RefLayer(layer).folded)


@needs_compiled
# (case, dtype, a shifted layer's window sums in the kernel: True, beside it: False, direct: None)
@pytest.mark.parametrize("kind,shifted,zero_points,a_bits,dtype,in_kernel", [
    (*CASES[3], "fp32", False), (*CASES[5], "fp32", False), (*CASES[0], "fp32", None), (*CASES[4], "fp32", None),
    (*CASES[6], "fp32", None), (*CASES[0], "bf16", None), (*CASES[4], "bf16", None), (*CASES[2], "bf16", None),
    (*CASES[7], "bf16", False), (*CASES[1], "fp32", False), (*CASES[8], "fp32", False), (*CASES[1], "bf16", False),
    (*CASES[8], "bf16", False), (*CASES[3], "fp32", True), (*CASES[1], "bf16", True), (*CASES[8], "bf16", True)])
def test_compiled_layer_lowers_to_onednn_and_keeps_the_sum(kind: str, shifted: bool, zero_points: list[int],
                                                           a_bits: int, dtype: str, in_kernel: bool | None) -> None:
    """Compiled with freezing, the layer becomes prepacked oneDNN int8 calls (one per weight part, in
    Inductor's generated code, the prepack folded away), the timestep slot is an input of one graph (no
    recompile per slot), and the output stays within the bound in every slot: folded layers rescaled by
    the kernel itself with the slot's Δx and zero point (a shifted layer's window sums, from the kernel
    or beside it, added after it), unfolded ones after it, in float32 and with bf16 in and out."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    layer = _layer(kind, shifted, zero_points, seed=1, a_bits=a_bits)
    ref = RefLayer(layer, sums_in_kernel=in_kernel).eval()
    assert ref.folded == _folds(ref) and ref.sums_beside == (ref.folded and in_kernel is False)
    torch._dynamo.reset()
    compiled = torch.compile(ref, fullgraph=True)  # the slot lookup included: no graph break
    # the config's own patch: monkeypatch's undo deletes a config attribute under some pytest versions
    with torch.no_grad(), inductor_config.patch(freezing=True):
        for slot, t in enumerate(layer.timesteps.tolist() or [None]):
            x = _input(layer, slot, seed=10) if dtype == "fp32" else _bf16_input(layer, slot, seed=10)
            compiled_runtime._STEP.t = None if t is None else torch.tensor([t])
            with torch._dynamo.config.patch(error_on_recompile=slot > 0):  # one shape: the slot alone changes
                if slot == 0:
                    y, code = run_and_get_code(compiled, x)
                    assert _int8_calls("\n".join(code)) == _kernel_calls(ref)
                else:
                    y = compiled(x)
            assert y.dtype == x.dtype
            exact, scale = _exact(layer, x.float(), slot)
            if ref.folded and not layer.direct:  # two more roundings of the correction, one more of the sum
                scale = _folded_shifted_scale(layer, x.float(), slot)
                unit = 6 * U if dtype == "fp32" else 2.0**-7 + 2.0**-8 + 2.0**-14
            else:
                unit = 4 * U if dtype == "fp32" else 2.0**-7 + 2.0**-15
            _assert_within(y, exact, scale, unit=unit)
    compiled_runtime._STEP.t = None


# (per-token inputs, smoothing, rotation, low-rank branch): efficientdm-tx's attention and MLP linears,
# and the static-step forms (temporal slots) of the other transformer options
TRANSFORMS = {"efficientdm-tx": (True, True, True, True), "smooth-alone": (False, True, False, False),
              "smooth-rotate-branch": (False, True, True, True), "rotate": (False, False, True, False)}


def _transform_layer(dynamic: bool, smooth: bool, rotate: bool, low_rank: bool, seed: int = 0) -> IntTransformLinear:
    """A W4A4 `IntTransformLinear` (24 outputs, K = 32); static inputs have three timestep slots."""
    g = torch.Generator().manual_seed(seed)
    out, k = 24, 32
    codes, zw = torch.randint(0, 16, (out, k), generator=g), torch.randint(4, 12, (out,), generator=g)
    static = {} if dynamic else {"input_scale": torch.tensor([0.05, 0.03, 0.08]),
                                 "input_zero_point": torch.tensor([3.0, 8.0, 5.0]), "timesteps": [999, 500, 0]}
    return IntTransformLinear(
        codes, zw, torch.rand(out, generator=g) * 0.01 + 1e-3, torch.randn(out, generator=g),
        **{"input_scale": None, "input_zero_point": None, **static}, a_bits=4, dynamic=dynamic,
        smooth=torch.rand(k, generator=g) + 0.5 if smooth else None, rotate=16 if rotate else None,
        low_rank_down=torch.randn(4, k, generator=g) * 0.1 if low_rank else None,
        low_rank_up=torch.randn(out, 4, generator=g) * 0.1 if low_rank else None)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("config", list(TRANSFORMS))
def test_transform_layer_unfolded_is_the_integer_layer(config: str, dtype: str) -> None:
    """Eager and unfolded, `RefTransformLayer` computes what `IntTransformLinear` does with the same float
    ops (the transforms, each token's step, the codes, the exact sum, the rescale in the kernel's float
    order, the float32 branch): the same bits in every timestep slot, float32 and bf16 in and out; the
    butterfly stages written without in-place writes (for Inductor) are the same ops too."""
    layer = _transform_layer(*TRANSFORMS[config]).eval()
    ref = RefTransformLayer(layer, fold=False).eval()
    assert not ref.folded
    g = torch.Generator().manual_seed(1)
    for t in layer.timesteps.tolist() or [None]:
        x = torch.randn(3, 5, layer.k, generator=g) * 0.3
        x = x if dtype == "fp32" else x.bfloat16()
        layer.set_timestep(t)
        compiled_runtime._STEP.t = None if t is None else torch.tensor([t])
        with torch.no_grad():
            y = ref(x)
            assert y.dtype == x.dtype and torch.equal(y, layer(x)), t
    compiled_runtime._STEP.t = None


@pytest.mark.parametrize("config", ["smooth-alone", "rotate"])
def test_transform_layer_folds_static_steps(config: str) -> None:
    """With one activation step per slot the kernel takes the slot's Δx (folded); per-token steps never fold
    (oneDNN's kernel takes one step). On inputs far from every rounding boundary (the folded rotation's
    products round differently from the butterfly, by far less than a quarter step) folded and unfolded
    compute the same codes and exact sum, each then within 4u·M of the float64 rescale (M = |acc·Δx·Δw|
    + |b|, three float32 roundings), so within 8u·M of each other; with y the unfolded output,
    M ≤ (|y − b| + |b|)(1 + 5u), whence 9u·(|y − b| + |b|)."""
    layer = _transform_layer(*TRANSFORMS[config]).eval()
    folded, unfolded = RefTransformLayer(layer).eval(), RefTransformLayer(layer, fold=False).eval()
    assert folded.folded and not RefTransformLayer(_transform_layer(*TRANSFORMS["efficientdm-tx"])).folded
    assert (folded.h_outer is not None) == (layer.rotate_block is not None) and unfolded.h_outer is None
    for slot, t in enumerate(layer.timesteps.tolist()):
        x = _transformed_input(layer, slot, seed=slot)
        compiled_runtime._STEP.t = torch.tensor([t])
        with torch.no_grad():
            y, b = unfolded(x).double(), layer.bias.double()
            _assert_within(folded(x), y, (y - b).abs() + b.abs(), unit=9 * U)
    compiled_runtime._STEP.t = None


def _transformed_input(layer: IntTransformLinear, slot: int, seed: int) -> torch.Tensor:
    """[3, 5, K] inputs whose transformed values lie a quarter step or more from every rounding boundary
    (some beyond the clamp range): codes plus jitter times the step, rotated back (H is its own inverse)
    and multiplied by s. Per token, one value is 7 steps exactly (the token's maximum, so its step is the
    chosen one) and the others within 6.25 steps."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5, layer.k)
    jitter = (torch.rand(shape, generator=g) - 0.5) * 0.5
    if layer.dynamic:
        step = torch.rand(3, 5, 1, generator=g) * 0.1 + 0.02
        codes = torch.randint(-6, 7, shape, generator=g).float()
        v = (codes + jitter) * step
        v[..., 0] = 7 * step[..., 0] * torch.sign(torch.randn(3, 5, generator=g))
    else:
        codes = torch.randint(int(layer.q_min) - 3, int(layer.q_max) + 4, shape, generator=g).float()
        v = (codes - layer._z_add[slot] + jitter) * float(layer.input_scale[slot])
    x = v.double() if layer.rotate_block is None else hadamard_transform(v.double(), layer.rotate_block)
    return (x if layer.smooth is None else x * layer.smooth.double()).float()


@needs_compiled
@pytest.mark.parametrize("config", list(TRANSFORMS))
def test_compiled_transform_layer(config: str) -> None:
    """Compiled with freezing (one graph, the slot an input): one prepacked oneDNN int8 call; on inputs
    whose transformed values lie far from every rounding boundary (so any correctly rounded float order
    gives the same codes) the output differs from the eager unfolded layer's by the rescale alone,
    within 9u·(|y − b| + |b|) (`test_transform_layer_folds_static_steps`), plus the low-rank branch's two
    float32 products in any summation order, within γ₃₆·|x|·|down|ᵀ·|up|ᵀ each
    (γₙ = nu/(1 − nu) < 1.01nu), plus one float32 rounding of the sum. With per-token steps and a
    rotation, the token's step moves with its largest rotated value: the butterfly (log2 b levels of
    sums) and the two products (a + c terms, H_b = H_a ⊗ H_c) are each within γ·Σ_block|x/s|/√b of the
    exact value (γ of log2 b and a + c), and the scaling by b^(−1/2) rounds once in each, so
    Δ' = Δ(1 + δ) with
    δ ≤ (γ_(a+c) + γ_log2(b))·S/(7Δ√b) + 4u (S the token's largest Σ_block|x/s|, its largest rotated
    value 7Δ) and the output moves by δ·|acc·Δ·Δw| ≤ 1.01δ·|y − b|."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    layer = _transform_layer(*TRANSFORMS[config]).eval()
    ref, eager = RefTransformLayer(layer).eval(), RefTransformLayer(layer, fold=False).eval()
    assert ref.folded == (not layer.dynamic)
    torch._dynamo.reset()
    compiled = torch.compile(ref, fullgraph=True)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        for slot, t in enumerate(layer.timesteps.tolist() or [None]):
            x = _transformed_input(layer, slot, seed=slot)
            compiled_runtime._STEP.t = None if t is None else torch.tensor([t])
            with torch._dynamo.config.patch(error_on_recompile=slot > 0):
                if slot == 0:
                    y, code = run_and_get_code(compiled, x)
                    assert _int8_calls("\n".join(code)) == 1
                else:
                    y = compiled(x)
            e, b = eager(x).double(), layer.bias.double()
            scale = 9 * ((e - b).abs() + b.abs()) + e.abs()
            if layer.dynamic and layer.rotate_block is not None:
                blk, a = layer.rotate_block, ref.h_outer.shape[0]
                xs = x.double() / layer.smooth.double() if layer.smooth is not None else x.double()
                s_max = xs.abs().reshape(*x.shape[:-1], -1, blk).sum(-1).amax(-1, keepdim=True)
                step = token_scale(eager._transform(x), layer.a_bits).double()
                levels = a + blk // a + blk.bit_length() - 1
                delta = 1.01 * levels * s_max / (7 * step * blk**0.5) + 4  # in units of u
                scale = scale + 1.01 * delta * (e - b).abs()
            if layer.low_rank_down is not None:
                down, up = layer.low_rank_down.double().abs(), layer.low_rank_up.double().abs()
                scale = scale + 2 * 1.01 * 36 * (x.double().abs() @ down.t() @ up.t())
            _assert_within(y, e, scale, unit=U)
    compiled_runtime._STEP.t = None


def test_unsupported_layers_are_named() -> None:
    from lowbitdm_cli.quant.quantizer import UniformQuantizer

    class Unknown(IntLinear):
        pass

    codes = torch.randint(0, 256, (4, 8))
    args = (codes, torch.full((4,), 128), torch.ones(4), None, torch.ones(1), torch.zeros(1), 8)
    model = torch.nn.Module()
    model.ok = IntLinear(*args)
    model.per_token = IntTransformLinear(*args, dynamic=True)  # runs compiled (`RefTransformLayer`)
    model.unknown = Unknown(*args)
    model.attn_q = UniformQuantizer(8, "asymmetric", timesteps=[999, 0])
    assert [n.split(" ")[0] for n in unsupported(model)] == ["unknown", "attn_q"]
    if compiled_runtime.available() is None:
        with pytest.raises(RuntimeUnavailableError, match="unknown .*attn_q .*use --runtime int"):
            check_compilable(model)


def test_missing_torchao_is_one_line(merged: Path, runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchao: one line naming the extra (brackets intact: the CLI escapes rich markup)."""
    from lowbitdm_cli.cli import app

    why = "the compiled runtime needs torchao (pip install 'lowbitdm[compiled]')"
    monkeypatch.setattr(compiled_runtime, "available", lambda: why)
    with pytest.raises(RuntimeUnavailableError, match="needs torchao"):
        check_compilable(torch.nn.Linear(2, 2))
    result = runner.invoke(app, ["sample", str(merged), "--runtime", "compiled", "--out", str(merged.parent / "y")])
    assert result.exit_code == 2 and why in " ".join(result.output.split()), result.output


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merge_tiny("w4a4", ["quant.a_temporal=true"], tmp_path_factory.mktemp("compiled")).path


def test_reference_pattern_is_the_fake_model_op_for_op(merged: Path) -> None:
    """Run eagerly (no Inductor), the denoiser with every integer layer as its `RefLayer` equals the
    fake-quantized model bit for bit, at every timestep slot: the pattern handed to Inductor is the
    fake model's arithmetic, so whatever the compiled runtime changes, Inductor's rewriting changes."""
    from lowbitdm_cli.export.checkpoint import load_merged

    fake, ref = load_merged(merged, "fake"), load_merged(merged, "int")
    reference_layers(ref.denoiser, fold=False)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(4, *fake.sample_shape, generator=g), torch.arange(4) % fake.num_classes
    timesteps = sorted({int(t) for m in fake.denoiser.modules() if hasattr(m, "timesteps") for t in m.timesteps})
    assert len(timesteps) > 1  # a temporal checkpoint
    with torch.no_grad():
        for t in timesteps[:: max(1, len(timesteps) // 3)]:
            compiled_runtime._STEP.t = torch.tensor([t])
            assert torch.equal(ref.forward(x, t, cond), fake.forward(x, t, cond)), t
    compiled_runtime._STEP.t = None


@needs_compiled
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sample_cli_compiled(merged: Path, tmp_path: Path, runner, dtype: str) -> None:
    """`sample --runtime compiled` on a merged checkpoint with temporal activation steps: every integer
    layer runs as a compiled oneDNN call, the manifest says so, and the artifact is another one than
    the integer runtime's."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    counters.clear()
    with inductor_config.patch(fx_graph_cache=False):  # a real compile, whose code is captured
        compiled, code = run_and_get_code(sample_tiny, runner, merged, tmp_path / "compiled", "--runtime", "compiled",
                                          "--dtype", dtype)
    integer = sample_tiny(runner, merged, tmp_path / "int", "--dtype", dtype)
    assert compiled.info["runtime"] == "compiled" and integer.info["runtime"] == "int"
    assert compiled.info["dtype"] == integer.info["dtype"] == dtype
    lowered = compiled.info["int_runtime"]["lowerings"]
    assert set(lowered) <= {"inductor-onednn", *(f"inductor-onednn-split{s}" for s in range(1, 8)), "inductor-float",
                            "inductor-float-chunks2", "inductor-s16"}
    assert sum(lowered.values()) == sum(integer.info["int_runtime"]["lowerings"].values()) > 0
    # each one a prepacked oneDNN call in the compiled graph (none left to eager by a graph break)
    # (on CPUs whose int8 kernels add pairs in 16 bits, layers that would need the weight split take the
    # int16 kernel, one call each, or the float route: no int8 call)
    int8 = sum(n for name, n in lowered.items() if name.startswith("inductor-onednn"))
    assert not counters["graph_break"] and _int8_calls("\n".join(code)) >= int8
    assert "\n".join(code).count("torch.ops.lowbitdm.conv_s16") >= lowered.get("inductor-s16", 0)
    assert compiled.inputs_digest != integer.inputs_digest
    # timesteps without a calibrated slot (2 sampling steps, 4 calibrated) are reported alike
    assert compiled.info["unmatched_timesteps"] == integer.info["unmatched_timesteps"]


def test_compiled_runtime_needs_a_merged_checkpoint(merged: Path, runner) -> None:
    from lowbitdm_cli.cli import app

    finetuned = merged.parent / "finetune"
    result = runner.invoke(app, ["sample", str(finetuned), "--runtime", "compiled", "--out", str(merged.parent / "x")])
    assert result.exit_code == 2 and "merged checkpoints" in result.output


def test_compiled_runtime_is_cpu_only(merged: Path, tmp_path: Path) -> None:
    """Its lowering is oneDNN's x86 int8 kernels: another device is one line, before anything runs."""
    from lowbitdm_cli.recipes import load_recipe
    from lowbitdm_cli.stages.common import Source, open_source
    from lowbitdm_cli.stages.sample import sample

    source = open_source(str(merged), runtime="int")
    compiled = Source(source.model, source.ref, source.artifact, source.label, runtime="compiled")
    with pytest.raises(RuntimeUnavailableError, match="--device cpu"):
        sample(compiled, load_recipe("ptq", model="tiny-random", bits="w4a4"), tmp_path / "s", device="cuda")
    assert not (tmp_path / "s").exists()


def test_lora_branch_around_a_reference_layer() -> None:
    """A LoRA branch (`adapters.branch.LoRABranch`, which reads the conv's geometry) wraps a `RefLayer`
    as it wraps the integer layer it replaces: eagerly the two give the same bits."""
    from lowbitdm_cli.adapters.branch import LoRABranch
    from lowbitdm_cli.adapters.lora_file import LoraPair

    layer = _layer("conv", False, [3], 8)
    g = torch.Generator().manual_seed(3)
    pair = LoraPair(torch.randn(4, 16, 3, 3, generator=g) * 0.1, torch.randn(24, 4, 1, 1, generator=g) * 0.1, None)
    wrapped = {}
    for name, base in (("int", layer), ("ref", RefLayer(layer, fold=False))):
        wrapped[name] = LoRABranch(base)
        wrapped[name].add(pair, 1.0)
    x = _input(layer, 0, seed=4)
    with torch.no_grad():
        assert torch.equal(wrapped["ref"](x), wrapped["int"](x))


TX = '["attention", "feed_forward"]'
# (bits, settings): ptq W8A8 with temporal steps (8-bit zero points per slot, the case the pattern could not
# fold); efficientdm-tx's transformer options (per-token inputs, smoothing, rotation, a low-rank branch)
DIT_CHECKPOINTS = {"w8a8-temporal": ("w8a8", ["quant.a_temporal=true"]),
                   "efficientdm-tx": ("w4a4", ["quant.a_temporal=true", f"quant.a_per_token={TX}", f"quant.smooth={TX}",
                                               f"quant.rotate={TX}", f"quant.low_rank={TX}", "quant.low_rank_dim=4"])}


@needs_compiled
@pytest.mark.parametrize("config", list(DIT_CHECKPOINTS))
def test_transformer_checkpoint_compiles_with_every_layer_folded(config: str,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """A diffusion transformer (the embedded digits DiT, `DIT_CHECKPOINTS`) runs compiled: every integer
    layer with one kernel call and one activation step per slot folds (all of them where the kernels sum in
    int32), per-token layers run as `RefTransformLayer`s, each kernel call one oneDNN call in one graph (no
    graph break, no prepack per call), for two timesteps without a recompile, with outputs of the model's
    shape and no NaN."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from lowbitdm_cli.export.checkpoint import load_merged
    from lowbitdm_cli.export.compiled_runtime import compile_runtime

    bits, sets = DIT_CHECKPOINTS[config]
    merged = merge_tiny(bits, sets, tmp_path_factory.mktemp("dit"), model="digits-dit").path
    integer = load_merged(merged, "int")
    transformed = sum(isinstance(m, IntTransformLinear) for m in integer.denoiser.modules())
    model = compile_runtime(integer)
    layers = [m for m in model.denoiser.inner.modules() if isinstance(m, RefLayer)]
    assert layers and all(m.folded == _folds(m) for m in layers)
    assert sum(isinstance(m, RefTransformLayer) for m in layers) == transformed
    if config == "w8a8-temporal":
        assert any(len(set(m.zx.tolist())) > 1 for m in layers)  # zero points that differ per slot
    else:
        assert transformed and any(m.dynamic for m in layers if isinstance(m, RefTransformLayer))
    x, cond = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0)), torch.arange(2)
    counters.clear()
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        y, code = run_and_get_code(model.forward, x, 900, cond)
        with torch._dynamo.config.patch(error_on_recompile=True):  # another slot, the same graph
            y2 = model.forward(x, 100, cond)
    assert not counters["graph_break"] and _int8_calls("\n".join(code)) == sum(_kernel_calls(m) for m in layers)
    assert y.shape == y2.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(y2).all()
