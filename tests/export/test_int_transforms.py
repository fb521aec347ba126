"""The transformer methods through the whole chain: calibrate → finetune → merge → integer runtime.

For each option alone and combined, on a tiny pixel-space DiT and on the tiny UNet's linear path
(attention, time embedding), the merged checkpoint records the options (format version 3), its fake
runtime reproduces the calibrated/finetuned artifact bit for bit (the merge round trip), and its
integer runtime equals the fake one bit for bit: layer by layer on the real forward pass, on every
exact lowering of each transformed layer, on the denoiser output, natively and with oneDNN capped
at AVX2 (what an AVX2-only CPU runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.export.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_merged
from lowbitdm_cli.export.int_runtime import IntLayer
from lowbitdm_cli.export.int_transforms import IntTransformLinear
from lowbitdm_cli.models.wrapper import set_timestep
from lowbitdm_cli.quant.layers import quant_layers
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.stages.common import load_quantized_from

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_builders import build_pixel_dit
from test_int_runtime import KERNELS, _force

TINY = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4", "finetune.epochs=1",
        "finetune.batch_size=2", "finetune.lora_rank=2"]
ALL = '["attention", "feed_forward", "adaln"]'
# name: (model, bits, finetune method, settings)
CONFIGS = {
    "dit-per-token": ("dit", "w4a4", None, [f"quant.a_per_token={ALL}"]),
    "dit-smooth-temporal": ("dit", "w4a4", None, [f"quant.smooth={ALL}", "quant.a_temporal=true"]),
    "dit-rotate": ("dit", "w4a4", None, ['quant.rotate=["attention_out", "ff_out", "adaln"]']),
    "dit-low-rank": ("dit", "w4a4", None, [f"quant.low_rank={ALL}", "quant.low_rank_dim=4"]),
    "dit-combined-qalora": ("dit", "w4a4", "qalora", [
        f"quant.a_per_token={ALL}", f"quant.smooth={ALL}", 'quant.rotate=["attention_out", "ff_out"]',
        f"quant.low_rank={ALL}", "quant.low_rank_dim=4", "quant.a_temporal=true"]),
    "dit-combined-w8a8": ("dit", "w8a8", None, [
        'quant.a_per_token=["attention_qkv", "ff_in"]', f"quant.smooth={ALL}", 'quant.rotate=["ff_out"]',
        'quant.low_rank=["feed_forward", "adaln"]', "quant.low_rank_dim=4"]),
    "unet-per-token": ("unet", "w4a4", None, ['quant.a_per_token=["attention", "time_emb_proj"]']),
    "unet-smooth-temporal": ("unet", "w4a4", None, ['quant.smooth=["attention"]', "quant.a_temporal=true"]),
    "unet-rotate": ("unet", "w4a4", None, ['quant.rotate=["attention", "time_emb_proj"]']),
    "unet-low-rank": ("unet", "w4a4", None, ['quant.low_rank=["attention"]', "quant.low_rank_dim=4"]),
    "unet-combined": ("unet", "w4a4", None, [
        'quant.a_per_token=["attention_qkv", "time_emb_proj"]', 'quant.smooth=["attention"]',
        'quant.rotate=["attention_out"]', 'quant.low_rank=["attention", "time_emb_proj"]', "quant.low_rank_dim=4",
        "quant.a_temporal=true"]),
}


def _chain(name: str, root: Path) -> tuple[Artifact, Artifact]:
    """(the finetune artifact, its merge) of config `name`."""
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    kind, bits, method, sets = CONFIGS[name]
    model = str(build_pixel_dit(root / "dit")) if kind == "dit" else "tiny-random"
    recipe = load_recipe("ptq", model=model, bits=bits, sets=TINY + sets, finetune_method=method)
    tuned = finetune(calibrate(recipe, root / "calibrate"), recipe, root / "finetune")
    return tuned, merge(tuned, root / "merge")


@pytest.fixture(scope="module", params=list(CONFIGS))
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Artifact, Artifact]:
    tuned, merged = _chain(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, tuned, merged


def _batch(model, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.sample_shape, generator=g), torch.arange(n) % model.num_classes


def test_checkpoint_records_the_options(chain) -> None:
    name, tuned, merged = chain
    cfg = json.loads((merged.path / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 3
    specs = Artifact.open(tuned.path).find("calibrate").manifest.info["layers"]
    from safetensors.torch import load_file

    t = load_file(str(merged.path / WEIGHTS_NAME))
    transformed = 0
    for layer, spec in specs.items():
        if spec["kind"] == "matmul":
            continue
        entry = cfg["layers"][layer]
        act = entry["input_activations"]
        assert (act is not None and act["dynamic"] and act["strategy"] == "token") == spec["a_dynamic"]
        assert (f"{layer}.input_scale" not in t) == spec["a_dynamic"]
        tr = entry.get("transforms")
        want = {k: spec[k] for k in ("smooth", "rotate", "low_rank")}
        assert tr == (want if any(want.values()) else None)
        if tr:
            transformed += 1
            assert (f"{layer}.input_smooth" in t) == tr["smooth"]
            assert (f"{layer}.low_rank_up" in t) == (tr["low_rank"] is not None)
    assert transformed or "per-token" in name
    assert transformed + sum(s.get("a_dynamic", False) for s in specs.values()) > 0


def test_calibration_sets_consistent_factors_and_skips_per_token_ranges(chain) -> None:
    """From the calibrated layer's stored tensors, W = (R·H)/s + up·down (down on the raw input) gives
    the FP weight back to the rounding of the float32 factors: per row o,
    ‖ΔW_o‖₂ ≤ 4u·(‖R_o‖₂·max 1/s + ‖up_o‖₂·‖down‖_F + ‖W_o‖₂) (R, up and down each rounded once, the
    orthogonal H keeps norms). Per-token input quantizers keep their initial (unused) step: the range
    pass never observed them."""
    from lowbitdm_cli.quant.transforms import hadamard_transform
    from lowbitdm_cli.stages.common import load_fp_model

    _name, tuned, _merged = chain
    calib = Artifact.open(tuned.path).find("calibrate")
    state = calib.tensors("quant_state.safetensors")
    fp = load_fp_model(calib.manifest.model.name, calib.manifest.recipe)
    fp_weights = {n: m.weight.detach().double() for n, m in fp.denoiser.named_modules() if isinstance(m, nn.Linear)}
    u = 2.0**-24
    for layer, spec in calib.manifest.info["layers"].items():
        if spec["a_dynamic"]:
            assert float(state[f"{layer}.a_quant.delta"]) == 1.0
        elif spec["a_bits"] and spec["kind"] != "matmul":
            assert float(state[f"{layer}.a_quant.delta"].reshape(-1)[0]) != 1.0
        if not (spec["smooth"] or spec["rotate"] or spec["low_rank"]):
            continue
        w_fp = fp_weights[layer]
        r = state[f"{layer}.weight"].double()
        s = state[f"{layer}.smooth"].double() if spec["smooth"] else torch.ones(r.shape[1], dtype=torch.float64)
        rec = r if not spec["rotate"] else hadamard_transform(r, spec["rotate"])
        rec = rec / s
        bound = r.norm(dim=1) * float((1 / s).max()) + w_fp.norm(dim=1)
        if spec["low_rank"]:
            up, down = state[f"{layer}.low_rank_up"].double(), state[f"{layer}.low_rank_down"].double()
            rec = rec + up @ down
            bound = bound + up.norm(dim=1) * down.norm()
        assert ((rec - w_fp).norm(dim=1) <= 4 * u * bound).all(), layer


def test_merge_round_trip_reproduces_the_artifact(chain) -> None:
    """The merged checkpoint on the fake runtime gives the finetune artifact's denoiser output, bit for bit."""
    _name, tuned, merged = chain
    art, mf = load_quantized_from(tuned), load_merged(merged.path, "fake")
    x, cond = _batch(mf, 4, seed=2)
    with torch.no_grad():
        for t in (999, 333):
            set_timestep(art.denoiser, t)
            set_timestep(mf.denoiser, t)
            assert torch.equal(art.eps(x, t, cond, 2.0), mf.eps(x, t, cond, 2.0))


def test_every_layer_and_the_output_agree(chain) -> None:
    _name, _tuned, merged = chain
    mi, mf = load_merged(merged.path, "int"), load_merged(merged.path, "fake")
    assert mi.meta["runtime"]["fallback_layers"] == 0 or all(
        "float" in r or "not quantized" in r for r in mi.meta["runtime"]["fallback_reasons"].values())
    fake_layers = quant_layers(mf.denoiser)
    differing: dict[str, float] = {}

    def check(layer: str):
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not torch.equal(out, fake_layers[layer](args[0])):
                differing[layer] = float((out - fake_layers[layer](args[0])).abs().max())
        return hook

    int_layers = {n: m for n, m in mi.denoiser.named_modules() if isinstance(m, IntLayer)}
    assert any(isinstance(m, IntTransformLinear) for m in int_layers.values())
    for n, m in int_layers.items():
        m.register_forward_hook(check(n))
    x, cond = _batch(mi, 4, seed=0)
    with torch.no_grad():
        for t in (999, 500, 0):
            set_timestep(mf.denoiser, t)
            set_timestep(mi.denoiser, t)
            assert torch.equal(mi.eps(x, t, cond, 2.0), mf.eps(x, t, cond, 2.0))
    assert not differing, differing


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_lowering_of_a_transformed_layer_is_exact(chain, kernel: str) -> None:
    """Each transformed int layer, forced onto each exact lowering, on inputs with outlier channels."""
    _name, _tuned, merged = chain
    mi, mf = load_merged(merged.path, "int"), load_merged(merged.path, "fake")
    fake_layers = quant_layers(mf.denoiser)
    g = torch.Generator().manual_seed(5)
    layers = {n: m for n, m in mi.denoiser.named_modules() if isinstance(m, IntTransformLinear)}
    for n, layer in list(layers.items())[:6]:
        _force(layer, kernel)
        x = torch.randn(3, 7, layer.k, generator=g) * (1 + 20 * (torch.rand(layer.k, generator=g) > 0.9))
        layer.set_timestep(500)
        set_timestep(mf.denoiser, 500)
        with torch.no_grad():
            assert torch.equal(layer(x), fake_layers[n](x)), n


_AVX2_SCRIPT = """
import json, sys, torch
from pathlib import Path
sys.path[:0] = [{tests!r} + "/export", {tests!r} + "/models"]
from test_int_transforms import _batch, _chain
from lowbitdm_cli.export.checkpoint import load_merged
from lowbitdm_cli.export.kernel_probe import kernel_report
from lowbitdm_cli.models.wrapper import set_timestep
_, merged = _chain("dit-combined-w8a8", Path({root!r}))
mi, mf = load_merged(merged.path, "int"), load_merged(merged.path, "fake")
x, cond = _batch(mi, 4, seed=1)
with torch.no_grad():
    same = all(torch.equal(mi.eps(x, t, cond, 2.0), mf.eps(x, t, cond, 2.0)) for t in (999, 0))
print(json.dumps({{"isa": kernel_report()["cpu"]["onednn_max_cpu_isa"], "same": same,
                  "lowerings": sorted(mi.meta["runtime"]["lowerings"])}}))
"""


def test_int_equals_fake_with_onednn_capped_at_avx2(tmp_path: Path) -> None:
    script = _AVX2_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), root=str(tmp_path))
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["isa"] == "AVX2" and report["same"], report
