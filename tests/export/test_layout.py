"""Channels-last models (`models.precision.use_layout`, `sample --layout`): every quantized conv
returns its input's memory layout in both runtimes, so the fake and the integer runtime stay equal
bit for bit per layout and dtype; oneDNN's bf16 output is used only where it is PyTorch's rounding."""

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
from lowbitdm_cli.export.int_runtime import IntConv2d
from lowbitdm_cli.models.precision import use_dtype, use_layout
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.models.wrapper import set_timestep
from lowbitdm_cli.quant.integer import layout_of
from lowbitdm_cli.quant.layers import QuantConv2d, quant_layers

CL = torch.channels_last


@pytest.fixture(scope="module", params=["w8a8", "w4a4"])
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merge_tiny(request.param, [], tmp_path_factory.mktemp(request.param)).path


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10


def _loaded(path: Path, runtime: str, dtype: torch.dtype, layout: str):  # noqa: ANN202
    return use_layout(use_dtype(load_merged(path, runtime), dtype), layout)


def test_layout_of() -> None:
    x = torch.randn(2, 3, 4, 5)
    assert layout_of(x) == torch.contiguous_format
    assert layout_of(x.contiguous(memory_format=CL)) == CL
    both = torch.randn(2, 1, 4, 5)  # one channel: contiguous and channels-last at once
    assert layout_of(both) == torch.contiguous_format and layout_of(both, CL) == CL
    assert layout_of(torch.randn(4, 5)) == torch.contiguous_format


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_equals_fake_channels_last(merged: Path, dtype: torch.dtype) -> None:
    """eps of the two channels-last runtimes: the same bits; every quantized conv of the integer model
    really ran on channels-last input and returned channels-last output."""
    mi, mf = (_loaded(merged, r, dtype, "channels_last") for r in ("int", "fake"))
    layouts = []
    for module in mi.denoiser.modules():
        if isinstance(module, IntConv2d):
            module.register_forward_hook(lambda _m, args, out: layouts.append(out.is_contiguous(memory_format=CL)))
    x, cond = _batch(6, seed=1)
    with torch.no_grad():
        for t in (999, 500, 0):
            eps = mi.eps(x, t, cond, 2.0)
            assert eps.is_contiguous() and eps.dtype == torch.float32  # ε comes back NCHW
            assert torch.equal(eps, mf.eps(x, t, cond, 2.0))
    assert layouts and all(layouts)  # conv_in's too, whose one-channel input is both layouts at once


def test_each_conv_keeps_its_input_layout_and_values(merged: Path) -> None:
    """Per layer and runtime: NCHW in → NCHW out, channels-last in → channels-last out, with the same
    values either way (an exact accumulator and an elementwise rescale do not depend on the layout)."""
    mi, mf = (load_merged(merged, r) for r in ("int", "fake"))
    set_timestep(mi.denoiser, 500)
    set_timestep(mf.denoiser, 500)
    convs = [m for m in [*mi.denoiser.modules(), *mf.denoiser.modules()] if isinstance(m, (IntConv2d, QuantConv2d))]
    assert len(convs) >= 4
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for conv in convs:
            x = torch.randn(3, conv.in_channels, 8, 8, generator=g)
            nchw, cl = conv(x), conv(x.contiguous(memory_format=CL))
            assert torch.equal(nchw, cl) and nchw.is_contiguous()
            if conv.in_channels > 1:
                assert cl.is_contiguous(memory_format=CL) and (conv.out_channels == 1 or not cl.is_contiguous())
            else:  # a one-channel input is both layouts at once: the layer's preferred one (default NCHW)
                assert cl.is_contiguous()
                conv.preferred_layout = CL
                out = conv(x)
                assert out.is_contiguous(memory_format=CL) and torch.equal(out, nchw)
                assert conv.out_channels == 1 or not out.is_contiguous()


def test_int_equals_fake_channels_last_under_avx2(merged: Path) -> None:
    """The same with oneDNN capped at AVX2 (pair-sum kernels, split weights), fresh process."""
    script = (
        "import json, sys, torch\n"
        "from lowbitdm_cli.export.checkpoint import load_merged\n"
        "from lowbitdm_cli.models.precision import use_dtype, use_layout\n"
        "g = torch.Generator().manual_seed(2)\n"
        "x, cond = torch.randn(4, 1, 16, 16, generator=g), torch.arange(4) % 10\n"
        "same = []\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    mi, mf = (use_layout(use_dtype(load_merged(sys.argv[1], r), dtype), 'channels_last')\n"
        "              for r in ('int', 'fake'))\n"
        "    with torch.no_grad():\n"
        "        same += [torch.equal(mi.eps(x, t, cond, 2.0), mf.eps(x, t, cond, 2.0)) for t in (999, 0)]\n"
        "print(json.dumps({'same': same}))\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script, str(merged)], env=env, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"same": [True] * 4}, result


def test_use_layout_converts_the_float_convs_only() -> None:
    model = use_layout(load_model("tiny-random"), "channels_last")
    assert model.memory_format == CL
    convs = [m for m in model.denoiser.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=CL) for m in convs)
    x, cond = _batch(2, seed=3)
    with torch.no_grad():
        eps = model.eps(x, 500, cond, 2.0)
    assert eps.shape == x.shape and eps.is_contiguous()
    with pytest.raises(ValueError, match="layout must be one of"):
        use_layout(model, "nhwc")


def test_quantized_convs_keep_their_weights(merged: Path) -> None:
    """`use_layout` leaves quantized layers' tensors alone (their codes and scales define the model)."""
    fake = _loaded(merged, "fake", torch.float32, "channels_last")
    weights = [m.weight for m in quant_layers(fake.denoiser).values() if isinstance(m, QuantConv2d)]
    assert weights and all(w.is_contiguous() for w in weights)


def test_sample_cli_layout(merged: Path, tmp_path: Path, runner) -> None:
    """`sample --layout channels_last` records the layout in the manifest and the recipe; nchw (the
    default) stays out of the recipe dump, so digests of earlier artifacts hold; the two never share
    an artifact."""
    if "w4a4" not in merged.parent.name:
        pytest.skip("one configuration is enough for the CLI wiring")
    manifests = {layout: sample_tiny(runner, merged, tmp_path / str(layout), *(["--layout", layout] if layout else []))
                 for layout in ("channels_last", None)}
    assert manifests["channels_last"].info["layout"] == "channels_last" and manifests[None].info["layout"] == "nchw"
    assert manifests["channels_last"].recipe["sample"]["layout"] == "channels_last"
    assert "layout" not in manifests[None].recipe["sample"]
    assert manifests["channels_last"].inputs_digest != manifests[None].inputs_digest
