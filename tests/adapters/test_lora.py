"""LoRA adapters on float, fake-quantized and integer models (`adapters`), `sample --lora`, `merge --lora`.

References: the branch against the adapter folded into the float weights (the other computation of
``W + s·B·A``); int == fake bit for bit with adapters (the branch is the same float ops on both);
the same factors in three file layouts give the same model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbitdm_cli import load_quantized
from lowbitdm_cli.adapters.branch import LoRABranch, attach_loras, fold_loras
from lowbitdm_cli.adapters.lora_file import Adapter
from lowbitdm_cli.artifacts import Artifact, sha256_file
from lowbitdm_cli.cli import app
from lowbitdm_cli.errors import AdapterError
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import SamplerSettings, ddim_sample, to_uint8

sys.path.insert(0, str(Path(__file__).parent))
from lora_builders import TARGETS, random_factors, write_adapter  # noqa: E402

TINY = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4", "sample.num_samples=8",
        "sample.batch_size=4"]


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.arange(n) % 10


def _assert_layers_match(branched: torch.nn.Module, folded: torch.nn.Module, names: list[str]) -> None:
    """Each branched layer against its folded twin, in float64 on the same input. Folding rounds to float32:
    B·A (rank-r sums), the multiplier, and each add to W (≤ 3·u32·|m·B||A| + u32·|W_f| per add); the
    branch's up is m·B rounded once (u32·|m·B|). So |y_b − y_f| ≤ u32·(n·|x|·|W_f| + 5·Σ|x|·|up_i||down_i|)
    elementwise (n branches, |x|· a product or convolution with the absolute weights); float64 sums add
    ~1e-14 of the same magnitudes (the 1e-12 term)."""
    u32 = 2.0**-24
    bm, fm = dict(branched.named_modules()), dict(folded.named_modules())
    g = torch.Generator().manual_seed(7)
    for name in names:
        lb, lf = bm[name], fm[name]
        conv = lb.conv
        x = torch.randn((2, lf.in_channels, 8, 8) if conv else (4, lf.in_features), generator=g, dtype=torch.float64)

        def apply(inp: torch.Tensor, w: torch.Tensor, lf: torch.nn.Module = lf, conv: bool = conv) -> torch.Tensor:
            return F.conv2d(inp, w, None, lf.stride, lf.padding, lf.dilation, lf.groups) if conv else F.linear(inp, w)

        lowrank = sum((getattr(lb, f"up_{i}").abs().reshape(lf.weight.shape[0], -1)
                       @ getattr(lb, f"down_{i}").abs().reshape(getattr(lb, f"down_{i}").shape[0], -1)
                       ).reshape(lf.weight.shape) for i in range(lb.num_branches))
        base, low = apply(x.abs(), lf.weight.abs()), apply(x.abs(), lowrank)
        bound = 1.01 * u32 * (lb.num_branches * base + 5 * low) + 1e-12 * (base + low)
        with torch.no_grad():
            assert ((lb(x) - lf(x)).abs() <= bound).all(), name


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    factors = random_factors(load_model("tiny-random").denoiser, rank=2, seed=0)
    return write_adapter(tmp_path_factory.mktemp("lora") / "peft" / "adapter_model.safetensors", factors, "peft",
                         alpha=4.0)


@pytest.fixture(scope="module", params=["w8a8", "w4a4"])
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    recipe = load_recipe("ptq", model="tiny-random", bits=request.param, sets=TINY)
    root = tmp_path_factory.mktemp(request.param)
    return merge(finetune(calibrate(recipe, root / "calibrate"), recipe, root / "finetune"), root / "merge")


# --- the branch on the float model ----------------------------------------------------------------------
def test_branch_equals_the_folded_weights(adapter: Path) -> None:
    """y = layer(x) + s·(alpha/r)·B(A(x)) on every target (linears, 3x3 convs with stride 1 and 2, 1x1 conv):
    the FP model with branches agrees with the FP model whose weights got s·(alpha/r)·B·A added."""
    branched, folded, plain = (load_model("tiny-random") for _ in range(3))
    records = attach_loras(branched.denoiser, [Adapter(adapter, 0.5)])
    fold_loras(folded.denoiser, [(adapter, 0.5)])
    assert records[0]["layers"] == len(TARGETS) and records[0]["rank"] == 2
    assert all(isinstance(dict(branched.denoiser.named_modules())[n], LoRABranch) for n in TARGETS)
    x, cond = _batch(4, seed=1)
    with torch.no_grad():
        for t in (900, 300, 10):
            yb, yf, yp = (m.eps(x, t, cond, 2.0) for m in (branched, folded, plain))
            # the whole model in float32: branch and fold differ by rounding only, the adapter by its effect
            assert (yb - yp).abs().max() > 100 * (yb - yf).abs().max()
    _assert_layers_match(branched.denoiser.double(), folded.denoiser.double(), list(TARGETS))


def test_alpha_scales_like_peft(tmp_path: Path) -> None:
    """alpha/r times the user's scale: alpha 4 at rank 2 with scale 1 is the adapter without alpha at scale 2."""
    factors = random_factors(load_model("tiny-random").denoiser, rank=2, seed=3)
    with_alpha = write_adapter(tmp_path / "a" / "adapter_model.safetensors", factors, "peft", alpha=4.0)
    without = write_adapter(tmp_path / "b" / "lora.safetensors", factors, "peft")
    a, b = load_model("tiny-random"), load_model("tiny-random")
    attach_loras(a.denoiser, [with_alpha])
    attach_loras(b.denoiser, [(without, 2.0)])
    x, cond = _batch(2, seed=2)
    with torch.no_grad():
        assert torch.equal(a.eps(x, 500, cond), b.eps(x, 500, cond))


@pytest.mark.parametrize("layout", ["kohya", "processor"])
def test_file_layouts_give_the_same_model(tmp_path: Path, layout: str) -> None:
    """The same factors saved as PEFT keys, kohya's lora_unet_* names (with .alpha) and diffusers'
    attention-processor keys attach to the same layers with the same scale."""
    den = load_model("tiny-random").denoiser
    targets = ("down_blocks.1.attentions.0.to_q", "mid_block.attentions.0.to_out.0") if layout == "processor" \
        else TARGETS
    factors = random_factors(den, rank=2, seed=4, targets=targets)
    peft = write_adapter(tmp_path / "p" / "adapter_model.safetensors", factors, "peft", alpha=2.0)
    other = write_adapter(tmp_path / f"{layout}.safetensors", factors, layout, alpha=2.0 if layout == "kohya" else None)
    a, b = load_model("tiny-random"), load_model("tiny-random")
    attach_loras(a.denoiser, [peft])
    attach_loras(b.denoiser, [other])
    x, cond = _batch(2, seed=5)
    with torch.no_grad():
        assert torch.equal(a.eps(x, 200, cond), b.eps(x, 200, cond))


def test_two_adapters_on_one_layer_add_up(adapter: Path, tmp_path: Path) -> None:
    second = write_adapter(tmp_path / "second.safetensors",
                           random_factors(load_model("tiny-random").denoiser, rank=3, seed=9), "peft")
    both, folded = load_model("tiny-random"), load_model("tiny-random")
    attach_loras(both.denoiser, [adapter, (second, -0.7)])
    fold_loras(folded.denoiser, [adapter, (second, -0.7)])
    layer = dict(both.denoiser.named_modules())[TARGETS[0]]
    assert layer.num_branches == 2
    _assert_layers_match(both.denoiser.double(), folded.denoiser.double(), list(TARGETS))


# --- mismatched adapters --------------------------------------------------------------------------------
def test_keys_that_match_no_layer_are_named(adapter: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter))
    tensors["unet.down_blocks.7.attentions.0.to_q.lora_A.weight"] = torch.zeros(2, 32)
    tensors["unet.down_blocks.7.attentions.0.to_q.lora_B.weight"] = torch.zeros(32, 2)
    tensors["text_encoder.layers.0.q_proj.lora_A.weight"] = torch.zeros(2, 8)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(tensors, str(bad))
    model = load_model("tiny-random")
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    with pytest.raises(AdapterError, match="down_blocks.7.attentions.0.to_q") as e:
        attach_loras(model.denoiser, [adapter, bad])
    assert "text_encoder.layers.0.q_proj" in str(e.value) and "\n" not in str(e.value)
    # nothing attached, not even the first (good) adapter: never a partial load
    assert not any(isinstance(m, LoRABranch) for m in model.denoiser.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.denoiser.state_dict().items())


def test_shapes_that_do_not_fit_are_named(tmp_path: Path) -> None:
    factors = {"down_blocks.1.attentions.0.to_q": (torch.zeros(2, 31), torch.zeros(32, 2))}
    bad = write_adapter(tmp_path / "shape.safetensors", factors, "peft")
    with pytest.raises(AdapterError, match=r"to_q \(A \[2, 31\].*linear 32->32"):
        attach_loras(load_model("tiny-random").denoiser, [bad])


def test_cli_mismatch_is_one_line(merged: Artifact, tmp_path: Path, runner) -> None:  # noqa: ANN001
    factors = {"no_such_block.proj": (torch.zeros(2, 4), torch.zeros(4, 2))}
    bad = write_adapter(tmp_path / "other-model.safetensors", factors, "peft")
    result = runner.invoke(app, ["sample", str(merged.path), "--lora", str(bad), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "no_such_block.proj" in result.output and "match no linear or conv layer" in result.output
    assert not (tmp_path / "s").exists()


# --- quantized models: int == fake with adapters ---------------------------------------------------
def test_int_equals_fake_with_adapters(merged: Artifact, adapter: Path) -> None:
    """The merged checkpoint with the adapter as a branch: integer runtime, fake runtime and the
    fake-quantized finetune artifact give the same eps and the same DDIM images, bit for bit; the
    adapter changes them; the packed weights are untouched."""
    mi = load_quantized(merged.path, "int", loras=[(adapter, 0.8)])
    mf = load_quantized(merged.path, "fake", loras=[(adapter, 0.8)])
    ma = load_quantized(merged.find("finetune"), loras=[(adapter, 0.8)])
    plain = load_quantized(merged.path, "int")
    assert mi.meta["runtime"]["int_layers"] > 0
    for name in TARGETS:
        assert isinstance(dict(mi.denoiser.named_modules())[name], LoRABranch)
    x, cond = _batch(4, seed=7)
    with torch.no_grad():
        for t in (999, 500, 0):
            ei = mi.eps(x, t, cond, 2.0)
            assert torch.equal(ei, mf.eps(x, t, cond, 2.0)) and torch.equal(ei, ma.eps(x, t, cond, 2.0))
            assert not torch.equal(ei, plain.eps(x, t, cond, 2.0))
    settings = SamplerSettings(steps=4, eta=0.0, guidance=2.0, clip_x0=True)
    idx, labels = list(range(10)), torch.arange(10)
    ui, uf = (to_uint8(ddim_sample(m, labels, idx, 0, settings)) for m in (mi, mf))
    assert np.array_equal(ui, uf)
    assert mi.meta["loras"][0]["sha256"] == sha256_file(adapter) and mi.meta["loras"][0]["scale"] == 0.8


def test_sample_cli_records_the_adapters(merged: Artifact, adapter: Path, tmp_path: Path,
                                        runner) -> None:  # noqa: ANN001
    args = ["sample", str(merged.path), "--lora", str(adapter), "--set", "sample.num_samples=4",
            "--set", "sample.batch_size=4", "--set", "sample.steps=2"]
    result = runner.invoke(app, args + ["--lora-scale", "0.5", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    m = Artifact.open(tmp_path / "s").manifest
    assert m.info["loras"][0]["sha256"] == sha256_file(adapter) and m.info["loras"][0]["scale"] == 0.5
    assert m.info["loras"][0]["layers"] == len(TARGETS)
    # another scale is another input: the same folder is stale, the default folder is another one
    stale = runner.invoke(app, args + ["--lora-scale", "1.0", "--out", str(tmp_path / "s")])
    assert stale.exit_code == 2, stale.output
    default = runner.invoke(app, args + ["--lora-scale", "1.0"])
    assert default.exit_code == 0, default.output
    made = [p.name for p in merged.path.parent.iterdir() if p.name.startswith("sample-lora-")]
    assert len(made) == 1
    mismatch = runner.invoke(app, ["sample", str(merged.path), "--lora", str(adapter), "--lora-scale", "1",
                                   "--lora-scale", "2"])
    assert mismatch.exit_code == 2 and "one --lora-scale per --lora" in mismatch.output


# --- merge --lora: the adapter folded before quantization ------------------------------------------------
def test_merge_folds_the_adapter_before_quantization(merged: Artifact, adapter: Path, tmp_path: Path,
                                                     runner) -> None:  # noqa: ANN001
    """Each target's packed weight is Q(W + s·(alpha/r)·B·A) with the calibrated weight quantizer;
    other layers are packed as without the adapter; the manifest records the adapter."""
    finetuned = merged.find("finetune")
    result = runner.invoke(app, ["merge", str(finetuned.path), "--lora", str(adapter), "--lora-scale", "0.5"])
    assert result.exit_code == 0, result.output
    folder = next(p for p in finetuned.path.parent.iterdir() if p.name.startswith("merge-lora-"))
    art = Artifact.open(folder)
    assert art.manifest.info["loras"][0]["sha256"] == sha256_file(adapter)
    assert art.manifest.info["loras"][0]["applied"] == "folded"
    with_lora, without = load_quantized(folder, "fake"), load_quantized(merged.path, "fake")
    reference = load_quantized(finetuned)  # fake-quantized: its w_quant is what merge packs with
    ref_layers = dict(reference.denoiser.named_modules())
    folded_layers, plain_layers = dict(with_lora.denoiser.named_modules()), dict(without.denoiser.named_modules())
    factors = {n: (a, b) for n, (a, b) in random_factors(load_model("tiny-random").denoiser, rank=2, seed=0).items()}
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = ref_layers[name]
            delta = (b.reshape(b.shape[0], -1) @ a.reshape(2, -1)).reshape(layer.weight.shape)
            w = layer.weight + 0.5 * (4.0 / 2) * delta
            expected = layer.w_quant(w)
            assert torch.equal(folded_layers[name].qweight(), expected), name
            assert not torch.equal(expected, plain_layers[name].qweight())
        untouched = "down_blocks.1.attentions.0.to_k"
        assert torch.equal(folded_layers[untouched].qweight(), plain_layers[untouched].qweight())


def test_fp_sample_with_an_adapter(adapter: Path, tmp_path: Path, runner) -> None:  # noqa: ANN001
    """The FP model takes adapters too (like-for-like comparisons): its samples change and record it."""
    args = ["sample", "tiny-random", "--set", "sample.num_samples=4", "--set", "sample.batch_size=4",
            "--set", "sample.steps=2"]
    plain = runner.invoke(app, args + ["--out", str(tmp_path / "plain")])
    lora = runner.invoke(app, args + ["--lora", str(adapter), "--out", str(tmp_path / "lora")])
    assert plain.exit_code == 0 and lora.exit_code == 0, plain.output + lora.output
    m = Artifact.open(tmp_path / "lora").manifest
    assert m.info["loras"][0]["sha256"] == sha256_file(adapter) and m.info["loras"][0]["applied"] == "branch"
    assert m.model.digest == Artifact.open(tmp_path / "plain").manifest.model.digest  # the FP weights' digest
    from lowbitdm_cli.npz import read_npz

    a, b = (read_npz(tmp_path / n / "samples.npz")["arr_0"] for n in ("plain", "lora"))
    assert not np.array_equal(a, b)
