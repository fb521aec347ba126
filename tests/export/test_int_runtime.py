"""The integer runtime of merged checkpoints against the fake-quantized (dequantized float) path.

Layer level: `IntLinear`/`IntConv2d` agree with the fake-quantized layer to float rounding and
their integer sums equal `int_ops`' exact ones. Model level: every layer agrees on the real
forward pass; end to end, the two runtimes agree to float rounding until an activation lands
within float rounding of a rounding tie and its code flips (a float32 vs float64 evaluation of
the fake model itself diverges the same way), which the tests check explicitly.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbitdm_cli import load_quantized
from lowbitdm_cli.artifacts import Artifact, sha256_file
from lowbitdm_cli.errors import IntegrityError
from lowbitdm_cli.export.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_merged
from lowbitdm_cli.export.int_ops import int_conv2d_acc, int_linear_acc
from lowbitdm_cli.export.int_runtime import IntConv2d, IntLayer, IntLinear, onednn_available
from lowbitdm_cli.models.wrapper import set_timestep
from lowbitdm_cli.quant.attention import QuantAttnProcessor
from lowbitdm_cli.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear, quant_layers
from lowbitdm_cli.quant.policy import LayerSpec
from lowbitdm_cli.quant.quantizer import UniformQuantizer
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import SamplerSettings, ddim_sample, to_uint8

TOL = 1e-4  # max abs difference as a fraction of the output range
TINY = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4"]
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


KERNELS = ["int_mm", *(["onednn"] if onednn_available() else [])]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("a_symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("a_bits", [8, 4], ids=lambda b: f"a{b}")
@pytest.mark.parametrize("w_bits", [8, 4, 2], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("kind", ["linear", *CONVS])
def test_layer_matches_fake_quant(kind: str, w_bits: int, a_bits: int, a_symmetric: bool, kernel: str) -> None:
    conv = CONVS.get(kind)
    layer, fake, codes, zw = _random_layer("conv" if conv else "linear", w_bits, a_bits, a_symmetric,
                                           seed=w_bits * 10 + a_bits, conv=conv)
    layer.use_onednn = kernel == "onednn"
    assert layer.kernel == kernel
    assert layer.direct == (w_bits < 8)  # 8-bit weights with an off-centre zero point: shifted kernel
    x = _input("conv" if conv else "linear", layer, seed=w_bits + a_bits)
    with torch.no_grad():
        out, ref = layer(x), fake(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert _rel(out, ref) <= TOL
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
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    bits, extra = CONFIGS[request.param]
    recipe = load_recipe("ptq", model="tiny-random", bits=bits, sets=TINY + extra)
    root = tmp_path_factory.mktemp(request.param)
    calibrated = calibrate(recipe, root / "calibrate")
    return merge(finetune(calibrated, recipe, root / "finetune"), root / "merge")


def _pair(merged: Artifact):
    return load_merged(merged.path, "int"), load_merged(merged.path, "fake")


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10


def test_every_layer_agrees_on_the_int_forward_pass(merged: Artifact) -> None:
    """Each int layer against its fake counterpart on the very inputs the int model produces."""
    mi, mf = _pair(merged)
    fake_layers = quant_layers(mf.denoiser)
    worst: dict[str, float] = {}

    def check(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            worst[name] = max(worst.get(name, 0.0), _rel(out, fake_layers[name](args[0])))
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
    assert set(worst) == set(int_layers)
    bad = {n: v for n, v in worst.items() if v > TOL}
    assert not bad, bad


def _record_codes(model) -> list[torch.Tensor]:
    """Activation codes (q, signed when symmetric) of every quantized input, in call order."""
    calls: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(module, IntLayer):
            u, _, _ = module.quantize_input(x)
            calls.append((u.to(torch.int16) - int(module._offset), x.detach().clone(), module))
        elif getattr(module, "a_quant", None) is not None:
            calls.append((module.a_quant.quantize_codes(x).to(torch.int16), x.detach().clone(), module.a_quant))

    def matmul_hook(heads: int):  # attention matmul inputs (float in both runtimes): [B*heads, ...]
        def record(module: UniformQuantizer, args: tuple) -> None:
            x = args[0].reshape(args[0].shape[0] // heads, heads, *args[0].shape[1:])  # per sample
            calls.append((module.quantize_codes(x).to(torch.int16), x.detach().clone(), module))
        return record

    for m in model.denoiser.modules():
        if isinstance(m, IntLayer | QuantLayerMixin):
            m.register_forward_pre_hook(hook)
        if isinstance(getattr(m, "processor", None), QuantAttnProcessor):
            for q in m.processor.act_quantizers():
                q.register_forward_pre_hook(matmul_hook(m.heads))
    return calls


def _first_flip_is_a_rounding_tie(int_calls: list, fake_calls: list, sample: int) -> bool:
    """Walk one sample's quantized inputs in call order. Until codes differ, the inputs agree to
    float rounding; the first differing codes are one step apart and sit on a rounding tie.
    Returns whether any code of the sample differs."""
    assert len(int_calls) == len(fake_calls)
    for (ci, xi, _), (cf, xf, fquant) in zip(int_calls, fake_calls, strict=True):
        xi, xf, ci, cf = xi[sample], xf[sample], ci[sample], cf[sample]
        assert _rel(xi, xf) <= TOL
        if torch.equal(ci, cf):
            continue
        flipped = ci != cf
        assert int((ci - cf).abs().max()) == 1
        delta, _ = fquant.current_params()
        vf, vi = (xf / delta)[flipped], (xi / delta)[flipped]
        # the half-integer between the codes lies between the two (float-rounding-close) inputs
        assert bool(((vf - vf.floor() - 0.5).abs() <= (vi - vf).abs() + 1e-5).all())
        return True
    return False


def test_eps_agree_until_a_rounding_tie(merged: Artifact) -> None:
    mi, mf = _pair(merged)
    int_calls, fake_calls = _record_codes(mi), _record_codes(mf)
    x, cond = _batch(6, seed=1)
    clean = 0
    with torch.no_grad():
        for t in (999, 500, 120, 0):
            int_calls.clear()
            fake_calls.clear()
            ei, ef = mi.eps(x, t, cond), mf.eps(x, t, cond)
            for i in range(x.shape[0]):
                if not _first_flip_is_a_rounding_tie(int_calls, fake_calls, i):
                    assert _rel(ei[i], ef[i]) <= TOL
                    clean += 1
    assert clean >= 8, clean  # many (sample, t) pairs never meet a tie: those agree to float rounding


def test_ddim_samples_agree(merged: Artifact) -> None:
    """Same seed, 4 DDIM steps, CFG 2. Samples whose trajectories never meet a rounding tie agree to
    one grey level everywhere. Over all samples, the share of pixels within one grey level is
    ≥ 99 % or no more than 5 points below that of the same fake model run in float64 instead
    of float32 (on tiny-random a single flipped code cascades, so both are ~92-98 %)."""
    mi, mf = _pair(merged)
    settings = SamplerSettings(steps=4, eta=0.0, guidance=2.0, clip_x0=True)
    idx, cond = list(range(24)), torch.arange(24) % 10
    int_calls, fake_calls = _record_codes(mi), _record_codes(mf)
    ui = to_uint8(ddim_sample(mi, cond, idx, 0, settings)).astype(int)
    uf = to_uint8(ddim_sample(mf, cond, idx, 0, settings)).astype(int)
    diverged = torch.zeros(2 * len(idx), dtype=torch.bool)  # CFG runs both branches in one batch
    for (ci, _, _), (cf, _, _) in zip(int_calls, fake_calls, strict=True):
        diverged |= (ci != cf).reshape(ci.shape[0], -1).any(1)
    diverged = (diverged[: len(idx)] | diverged[len(idx):]).numpy()
    close = np.abs(ui - uf) <= 1
    assert close[~diverged].all()
    m64 = load_merged(merged.path, "fake")
    m64.denoiser.double()
    eps64 = m64.eps
    m64.eps = lambda x, t, c, g=1.0: eps64(x.double(), t, c, g).float()  # type: ignore[method-assign]
    u64 = to_uint8(ddim_sample(m64, cond, idx, 0, settings)).astype(int)
    float_noise = (np.abs(u64 - uf) <= 1).mean()
    assert close.mean() >= min(0.99, float_noise - 0.05), (close.mean(), float_noise)


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
        digests[runtime] = manifest.inputs_digest
    assert digests["int"] != digests["fake"]  # the two runtimes never share an artifact
    result = runner.invoke(app, ["sample", str(merged.path), "--runtime", "exact"])
    assert result.exit_code == 2 and "exact" in result.output
