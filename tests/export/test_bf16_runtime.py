"""bf16 compute (`models.precision`): the fake and the integer runtime stay equal bit for bit.

Everything around the quantized layers runs in bf16; each plain quantized layer rounds its exact
accumulator to bf16, rescales it in float32 and rounds once more to bf16 (`quant.integer.rescale_to`):
the integer runtime from its int32 accumulator, the fake runtime from a bf16 product of the exact codes
where the CPU runs bf16 natively (`quant.integer.bf16_products`), else from its float32 product; a
transformed or per-token layer computes in float32 and rounds once. Checked natively and under
``ONEDNN_MAX_CPU_ISA=AVX2`` (16-bit pair-sum kernels: the probes pick split lowerings; float32 products).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_chain import merge_tiny, sample_tiny
from torch import nn

from lowbitdm_cli.export.checkpoint import load_merged
from lowbitdm_cli.export.int_runtime import IntLayer
from lowbitdm_cli.models.precision import resolve_dtype, use_dtype
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.models.wrapper import set_timestep
from lowbitdm_cli.quant.layers import quant_layers

TX_SCOPE = '["attention", "feed_forward"]'
CONFIGS = {"w8a8": ("w8a8", []), "w4a4": ("w4a4", []),
           "w4a4-temporal-fallback": ("w4a4", ["quant.a_temporal=true", "quant.attn_matmul=true",
                                               'quant.overrides=[{pattern="conv_out", a_bits="fp"}]']),
           # the transformer options (per-token, smoothing, rotation, float low-rank branch) on the attention and MLP
           "w4a4-transforms": ("w4a4", [f"quant.{o}={TX_SCOPE}" for o in ("a_per_token", "smooth", "rotate", "low_rank")]
                               + ["quant.low_rank_dim=4"])}


@pytest.fixture(scope="module", params=list(CONFIGS))
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bits, extra = CONFIGS[request.param]
    return merge_tiny(bits, extra, tmp_path_factory.mktemp(request.param)).path


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10


def test_int_equals_fake_in_bf16(merged: Path) -> None:
    """eps of the two runtimes in bf16: the same bits, and not the float32 model's (bf16 really ran)."""
    mi, mf = (use_dtype(load_merged(merged, r), torch.bfloat16) for r in ("int", "fake"))
    m32 = load_merged(merged, "fake")
    assert mi.denoiser.dtype == mf.denoiser.dtype == torch.bfloat16
    x, cond = _batch(6, seed=1)
    with torch.no_grad():
        for t in (999, 500, 0):
            eps = mi.eps(x, t, cond, 2.0)
            assert eps.dtype == torch.float32
            assert torch.equal(eps, mf.eps(x, t, cond, 2.0))
            assert not torch.equal(eps, m32.eps(x, t, cond, 2.0))


def test_every_layer_agrees_in_bf16(merged: Path) -> None:
    """Each int layer against its fake counterpart on the bf16 inputs the int model produces."""
    mi, mf = (use_dtype(load_merged(merged, r), torch.bfloat16) for r in ("int", "fake"))
    fake_layers = quant_layers(mf.denoiser)
    differing, seen = [], []

    def check(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.append((args[0].dtype, out.dtype))
            if not torch.equal(out, fake_layers[name](args[0])):
                differing.append(name)
        return hook

    for name, module in mi.denoiser.named_modules():
        if isinstance(module, IntLayer):
            module.register_forward_hook(check(name))
    x, cond = _batch(4, seed=0)
    with torch.no_grad():
        for t in (999, 333):
            set_timestep(mf.denoiser, t)
            mi.eps(x, t, cond, 2.0)
    assert seen and not differing, differing
    assert {o for _, o in seen} == {torch.bfloat16}  # the time embedding's input included


def test_fake_bf16_products_give_the_float32_products_bits(merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake runtime in bf16 with its exact products on bf16 operands (``LOWBITDM_BF16_PRODUCTS=1``) and on
    float32 ones (``0``): the same bits, since both round the exact sums to bf16 before the rescale; and the bf16
    products really ran (on bf16 operands) where they apply: every plain layer of these 4- and 8-bit models."""
    from lowbitdm_cli.quant.layers import QuantConv2d

    mf = use_dtype(load_merged(merged, "fake"), torch.bfloat16)
    operands = []
    real = QuantConv2d._bias_free_conv
    monkeypatch.setattr(QuantConv2d, "_bias_free_conv", lambda self, x, w: operands.append(x.dtype) or real(self, x, w))
    x, cond = _batch(4, seed=4)
    eps = {}
    with torch.no_grad():
        for flag in ("1", "0"):
            monkeypatch.setenv("LOWBITDM_BF16_PRODUCTS", flag)
            operands.clear()
            eps[flag] = [mf.eps(x, t, cond, 2.0) for t in (999, 0)]
            assert set(operands) == {torch.bfloat16 if flag == "1" else torch.float32}, operands
    assert all(torch.equal(a, b) for a, b in zip(eps["1"], eps["0"], strict=True))
    monkeypatch.setenv("LOWBITDM_BF16_PRODUCTS", "sometimes")
    with pytest.raises(ValueError, match="LOWBITDM_BF16_PRODUCTS"), torch.no_grad():
        mf.eps(x, 0, cond, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_bf16_math_gives_the_float32_products_bits(merged: Path, monkeypatch: pytest.MonkeyPatch,
                                                        dtype: torch.dtype) -> None:
    """The fake runtime's float32 products with oneDNN allowed to multiply in bf16 (``LOWBITDM_BF16_MATH=1``,
    `quant.integer.bf16_math`: what auto does on AMX-BF16, where the products run as bf16 tiles) and without
    (``0``): the same bits as each other and as the integer runtime, every code and weight being exact in bf16;
    the mode is on during every float32 product of these 4- and 8-bit models and only there. (On a CPU without
    AMX-BF16 oneDNN keeps its float32 kernels in this mode: there this checks the plumbing; on AMX the bits.)"""
    from lowbitdm_cli.quant.layers import QuantConv2d

    monkeypatch.setenv("LOWBITDM_BF16_PRODUCTS", "0")  # every product in float32, bf16 models' too
    mf, mi = (use_dtype(load_merged(merged, r), dtype) for r in ("fake", "int"))
    modes = []
    real = QuantConv2d._bias_free_conv

    def conv(self, x, w):
        modes.append(torch.backends.mkldnn.conv.fp32_precision)
        return real(self, x, w)

    monkeypatch.setattr(QuantConv2d, "_bias_free_conv", conv)
    x, cond = _batch(4, seed=5)
    before = torch.backends.mkldnn.conv.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision
    eps = {}
    with torch.no_grad():
        for flag in ("1", "0"):
            monkeypatch.setenv("LOWBITDM_BF16_MATH", flag)
            modes.clear()
            eps[flag] = [mf.eps(x, t, cond, 2.0) for t in (999, 0)]
            assert modes and set(modes) == {"bf16" if flag == "1" else before[0]}, modes
            assert (torch.backends.mkldnn.conv.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == before
        reference = [mi.eps(x, t, cond, 2.0) for t in (999, 0)]
    assert all(torch.equal(a, b) and torch.equal(a, r) for a, b, r in zip(eps["1"], eps["0"], reference, strict=True))
    monkeypatch.setenv("LOWBITDM_BF16_MATH", "sometimes")
    with pytest.raises(ValueError, match="LOWBITDM_BF16_MATH"), torch.no_grad():
        mf.eps(x, 0, cond, 2.0)


def test_bf16_math_restores_the_flags_on_error() -> None:
    from lowbitdm_cli.quant.integer import bf16_math

    mkldnn = torch.backends.mkldnn
    before = mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError, match="inside"), bf16_math():
        assert (mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision) == ("bf16", "bf16")
        raise RuntimeError("inside")
    assert (mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision) == before
    with bf16_math(False):
        assert (mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision) == before


def test_fp_model_in_bf16_keeps_quantizer_free_layers_in_bf16() -> None:
    model = use_dtype(load_model("tiny-random"), torch.bfloat16)
    dtypes = {p.dtype for p in model.denoiser.parameters()}
    assert dtypes == {torch.bfloat16}
    x, cond = _batch(2, seed=3)
    with torch.no_grad():
        eps = model.eps(x, 500, cond, 2.0)
        ref = load_model("tiny-random").eps(x, 500, cond, 2.0)
    assert eps.dtype == torch.float32 and not torch.equal(eps, ref)


def test_int_equals_fake_in_bf16_under_avx2(merged: Path) -> None:
    """The same with oneDNN capped at AVX2 (pair-sum kernels, split weights), in a fresh process."""
    script = (
        "import json, sys, torch\n"
        "from lowbitdm_cli.export.checkpoint import load_merged\n"
        "from lowbitdm_cli.export.int_runtime import lowering_counts\n"
        "from lowbitdm_cli.models.precision import use_dtype\n"
        "mi, mf = (use_dtype(load_merged(sys.argv[1], r), torch.bfloat16) for r in ('int', 'fake'))\n"
        "g = torch.Generator().manual_seed(2)\n"
        "x, cond = torch.randn(4, 1, 16, 16, generator=g), torch.arange(4) % 10\n"
        "with torch.no_grad():\n"
        "    same = [torch.equal(mi.eps(x, t, cond, 2.0), mf.eps(x, t, cond, 2.0)) for t in (999, 0)]\n"
        "print(json.dumps({'same': same, 'lowerings': lowering_counts(mi.denoiser),\n"
        "                  'probe': mi.meta['runtime']['kernel_probes']}))\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script, str(merged)], env=env, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["same"] == [True, True], result
    assert result["probe"]["onednn_conv"] in ("pair16", "unavailable")


def test_auto_dtype_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBITDM_DTYPE", "bf16")
    assert resolve_dtype("auto") == "bf16" and resolve_dtype("fp32") == "fp32"
    monkeypatch.setenv("LOWBITDM_DTYPE", "fp16")
    with pytest.raises(ValueError, match="LOWBITDM_DTYPE"):
        resolve_dtype("auto")
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_dtype("fp64")


def test_fused_loops_keep_int_equal_to_fake(merged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fused quantize / rescale loops (`fused_ops`, LOWBITDM_FUSED=1) the integer runtime
    still gives the fake runtime's bits, in float32 and bf16 (skipped where they do not compile)."""
    from lowbitdm_cli.export import fused_ops

    if "fallback" in merged.parent.name:
        pytest.skip("w8a8 (shifted layers) and w4a4 (direct ones) cover the fused loops; compiling is slow")
    monkeypatch.setenv("LOWBITDM_FUSED", "1")
    if not fused_ops.available():
        try:
            torch.compile(lambda t: t + 1)(torch.ones(2))
        except Exception:  # noqa: BLE001 - whatever stops Inductor here
            pytest.skip("torch.compile (inductor, C++) is not usable here")
        if os.environ.get("ATEN_CPU_CAPABILITY"):  # Inductor's loops under a capped ATen gave garbage (2026-12-07)
            pytest.skip("under ATEN_CPU_CAPABILITY Inductor's loops differ from the eager ops: the runtime keeps those")
        pytest.fail("the fused loops compile here but differ from the eager ops (`fused_ops._self_check`)")
    calls, original = [], fused_ops.quantize
    monkeypatch.setattr(fused_ops, "quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, cond = _batch(4, seed=5)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            mi, mf = (use_dtype(load_merged(merged, r), dtype) for r in ("int", "fake"))
            for t in (999, 0):
                assert torch.equal(mi.eps(x, t, cond, 2.0), mf.eps(x, t, cond, 2.0))
    assert calls  # the fused path really ran


def test_sample_cli_dtype(merged: Path, tmp_path: Path, runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sample --dtype bf16` samples in bf16 and says so; auto resolves (here pinned to fp32 by the
    test environment) and the manifest records the resolved dtype; the two never share an artifact."""
    if not merged.parent.name.startswith("w4a4-temporal"):
        pytest.skip("one configuration is enough for the CLI wiring")
    manifests = {dtype: sample_tiny(runner, merged, tmp_path / str(dtype), *(["--dtype", dtype] if dtype else []))
                 for dtype in ("bf16", None)}
    assert manifests["bf16"].info["dtype"] == "bf16" and manifests[None].info["dtype"] == "fp32"
    assert manifests["bf16"].recipe["sample"]["dtype"] == "bf16" and "dtype" not in manifests[None].recipe["sample"]
    assert manifests["bf16"].inputs_digest != manifests[None].inputs_digest
