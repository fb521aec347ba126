"""Every diffusers family through the CLI: calibrate (ptq) → finetune (qalora) → merge → sample.

Tiny random models in each on-disk format (`family_builders`) stand in for the paper
checkpoints: DDPM (pixel, cosine schedule), LDM (VQ latents), class-conditional LDM
(class-embedding cross-attention context, the CompVis cin256 layout), Stable Diffusion
(CLIP text encoder, prompts from a file) and DiT (transformer, learned sigma).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from family_builders import build_class_ldm, build_clip, build_ddpm, build_dit, build_ldm, build_pixel_dit, build_sd
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.export.checkpoint import CONFIG_NAME, load_merged
from lowbitdm_cli.export.int_runtime import IntLayer, IntLinear
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.models.wrapper import NoiseSchedule, set_timestep
from lowbitdm_cli.npz import read_npz
from lowbitdm_cli.quant.layers import quant_layers
from lowbitdm_cli.quant.policy import QuantPolicy, build_layer_specs

BUILDERS: dict[str, Callable[[Path], Path]] = {"ddpm": build_ddpm, "ldm": build_ldm, "ldm-class": build_class_ldm,
                                               "sd": build_sd, "dit": build_dit}
SETS = ["calibrate.num_samples=2", "calibrate.batch_size=2", "sample.num_samples=4", "sample.batch_size=2",
        "sample.steps=3", "finetune.epochs=1", "finetune.batch_size=2", "finetune.steps=2"]
PROMPTS = ["a cat", "a red dog", "two birds"]
# roles each family's layer policy must find (beyond plain conv/linear)
ROLES = {
    "ddpm": {"conv_in", "conv_out", "time_embedding", "time_emb_proj", "attention", "downsample", "upsample"},
    "ldm": {"conv_in", "conv_out", "time_embedding", "attention"},
    "ldm-class": {"conv_in", "conv_out", "time_embedding", "attention", "cross_attention", "feed_forward"},
    "sd": {"conv_in", "conv_out", "time_embedding", "attention", "cross_attention", "feed_forward"},
    "dit": {"conv_in", "conv_out", "time_embedding", "adaln", "attention", "feed_forward"},
}
LATENT = {"ddpm": (3, 8, 8), "ldm": (3, 4, 4), "ldm-class": (3, 4, 4), "sd": (4, 4, 4), "dit": (4, 4, 4)}


def _sets(extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


def _ok(result, what: str) -> None:  # noqa: ANN001
    assert result.exit_code == 0, f"{what} failed ({result.exit_code}):\n{result.output}\n{result.exception!r}"


def _one_line_error(result, *needles: str) -> str:  # noqa: ANN001
    assert result.exit_code == 2, f"exit code {result.exit_code}, {result.exception!r}:\n{result.output}"
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    text = " ".join(result.output.split())  # rich may wrap the one long line
    for needle in needles:
        assert needle in text, text
    return lines[0]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return {"root": root, **{kind: build(root / kind) for kind, build in BUILDERS.items()}}


@pytest.fixture(scope="session")
def chains(family_dirs: dict[str, Path]) -> dict[str, Path]:
    """The four stages of every family, run once per session through the CLI."""
    runner = CliRunner()
    runs = {}
    for kind in BUILDERS:
        run = family_dirs["root"] / f"run-{kind}"
        prompts = ["--prompts", str(family_dirs["root"] / "prompts.txt")] if kind == "sd" else []
        steps = [["calibrate", "--model", str(family_dirs[kind]), "--bits", "w4a8", "--recipe", "ptq", *_sets(),
                  *prompts, "--out", str(run / "calibrate")],
                 ["finetune", str(run / "calibrate"), "--method", "qalora"],
                 ["merge", str(run / "finetune")],
                 ["sample", str(run / "merge")]]
        for args in steps:
            _ok(runner.invoke(app, args), f"{kind} {args[0]}")
        runs[kind] = run
    return runs


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_chain(kind: str, chains: dict[str, Path], family_dirs: dict[str, Path]) -> None:
    run = chains[kind]
    cal = Artifact.open(run / "calibrate").manifest
    assert cal.model.name == str(family_dirs[kind].resolve()) and cal.model.source == str(family_dirs[kind].resolve())
    roles = {s["role"] for s in cal.info["layers"].values()}
    assert ROLES[kind] <= roles, ROLES[kind] - roles
    xs = Artifact.open(run / "calibrate").tensors("calib_data.safetensors")["xs"]
    assert tuple(xs.shape[1:]) == (2, *LATENT[kind])  # calibration stays in latent space
    if kind == "sd":
        assert cal.info["num_prompts"] == len(PROMPTS) and len(cal.info["prompts_sha256"]) == 64
    assert Artifact.open(run / "finetune").manifest.info["method"] == "qalora"

    cfg = json.loads((run / "merge" / CONFIG_NAME).read_text())
    assert cfg["model"]["architecture"] == type(load_model(str(family_dirs[kind]), PROMPTS).denoiser).__name__
    assert bool(cfg["model"].get("parts")) == (kind != "ddpm")  # FP parts load from the source, by digest

    sampled = Artifact.open(run / "sample").manifest
    assert sampled.info["runtime"] == "int"
    data = read_npz(run / "sample" / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 8, 8, 3)  # decoded to 8x8 RGB
    if kind in ("ddpm", "ldm"):
        assert "labels" not in data
    else:
        n = len(PROMPTS) if kind == "sd" else 4
        assert data["labels"].tolist() == [i % n for i in range(4)]  # class labels / prompt indices


@pytest.mark.parametrize("kind", ["ldm-class", "sd", "dit"])
def test_sampling_is_deterministic(kind: str, chains: dict[str, Path], tmp_path: Path) -> None:
    """The same command twice gives the same images; so does the fake-quantized runtime (integer-exact)."""
    runner = CliRunner()
    _ok(runner.invoke(app, ["sample", str(chains[kind] / "merge"), "--out", str(tmp_path / "again")]), "sample")
    first = read_npz(chains[kind] / "sample" / "samples.npz")["arr_0"]
    assert np.array_equal(first, read_npz(tmp_path / "again" / "samples.npz")["arr_0"])
    _ok(runner.invoke(app, ["sample", str(chains[kind] / "merge"), "--runtime", "fake", "--out", str(tmp_path / "f")]),
        "sample --runtime fake")
    assert np.array_equal(first, read_npz(tmp_path / "f" / "samples.npz")["arr_0"])


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_int_runtime_agrees_with_fake_per_layer(kind: str, chains: dict[str, Path]) -> None:
    """Every integer layer, fed the input it sees in a CFG forward, gives its fake-quantized twin's
    bits, and so does the whole ε; transformer and cross-attention Linears see 3-D [B, L, D] inputs."""
    merged = chains[kind] / "merge"
    prompts = PROMPTS if kind == "sd" else None
    mi, mf = load_merged(merged, "int", prompts), load_merged(merged, "fake", prompts)
    fake = quant_layers(mf.denoiser)
    unequal, three_d, names = [], 0, []

    def hook(name: str):  # noqa: ANN202
        def check(_m, inputs: tuple, out: torch.Tensor) -> None:
            nonlocal three_d
            if not torch.equal(out, fake[name](inputs[0])):
                unequal.append(name)
            three_d += int(inputs[0].dim() == 3)
        return check

    handles = []
    for name, m in mi.denoiser.named_modules():
        if isinstance(m, IntLayer):
            handles.append(m.register_forward_hook(hook(name)))
            names.append(name)
    assert len(names) >= 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *mi.sample_shape, generator=gen)
    cond = torch.tensor([0, 1]) if mi.conditional else None
    with torch.no_grad():
        set_timestep(mf.denoiser, 500)
        eps_int = mi.eps(x, 500, cond, 2.0)
        for h in handles:
            h.remove()
        eps_fake = mf.eps(x, 500, cond, 2.0)
    assert not unequal, unequal
    assert mi.meta["runtime"]["fallback_layers"] == 0 and mi.meta["runtime"]["int_layers"] == len(names)
    assert torch.equal(eps_int, eps_fake)
    if kind in ("ldm-class", "sd", "dit"):
        assert three_d > 0
    if kind in ("ldm-class", "sd"):
        assert any(n.endswith("attn2.to_k") and isinstance(dict(mi.denoiser.named_modules())[n], IntLinear)
                   for n in names)  # cross-attention keys run on integer kernels


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layer_policy_keeps_first_last_and_time_layers_at_8bit(kind: str, family_dirs: dict[str, Path]) -> None:
    model = load_model(str(family_dirs[kind]), PROMPTS)
    policy = QuantPolicy(w_bits=4, a_bits=4, keep_8bit=["time_embedding", "conv_in", "conv_out", "adaln"],
                         skip=["cross_attention"])
    specs = build_layer_specs(model.denoiser, policy)
    for name, s in specs.items():
        assert s.role != "cross_attention"
        if s.role in policy.keep_8bit:
            assert (s.w_bits, s.a_bits) == (8, 8), name
    if kind in ("sd", "ldm-class"):  # cross-attention matmuls follow the cross_attention role too
        matmul = build_layer_specs(model.denoiser, policy.model_copy(update={"attn_matmul": True, "skip": [],
                                                                          "keep_8bit": ["cross_attention"]}))
        attn2 = [s for n, s in matmul.items() if n.endswith("attn2") and s.kind == "matmul"]
        attn1 = [s for n, s in matmul.items() if n.endswith("attn1") and s.kind == "matmul"]
        assert attn2 and all(s.a_bits == 8 for s in attn2) and attn1 and all(s.a_bits == 4 for s in attn1)
        skipped = build_layer_specs(model.denoiser, policy.model_copy(update={"attn_matmul": True}))
        assert not any(n.endswith("attn2") for n in skipped)
    if kind == "dit":
        assert specs["pos_embed.proj"].role == "conv_in" and specs["proj_out_2"].role == "conv_out"
        assert specs["transformer_blocks.0.norm1.linear"].role == "adaln"
        assert specs["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"].role == "time_embedding"


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedules_match_diffusers(schedule: str) -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    ours = NoiseSchedule.from_config(dict(ref.config))
    # diffusers computes in float32: its betas (linspace, squared for scaled_linear; float64 rounded for the
    # cosine) are within 32 u32 of exact, so each factor 1 − β_s is within 32·u32·β_s/(1 − β_s) + u32 and the
    # cumulative product at t within the sum of those plus t roundings. Ours is float64 rounded once (u32).
    u32 = 2.0**-24
    beta = ref.betas.double()
    rel = torch.cumsum(32 * u32 * beta / (1 - beta) + 2 * u32, 0) + u32 + 2000 * 2.0**-53
    diff = (ours.alphas_cumprod.double() - ref.alphas_cumprod.double()).abs()
    assert (diff <= 1.01 * rel * ref.alphas_cumprod.double()).all()


# --- user mistakes: one line, exit code 2 -------------------------------------------------------

def test_offline_hub_names_what_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LOWBITDM_MODELS_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(app, ["calibrate", "--model", "dit-xl-2-256", "--bits", "w4a4", *_sets(),
                                      "--out", str(tmp_path / "c")])
    _one_line_error(result, "'dit-xl-2-256'", "facebook/DiT-XL-2-256", str(tmp_path / "models" / "dit-xl-2-256"),
                    "--model PATH")
    assert not (tmp_path / "c").exists()


def test_registered_name_loads_from_models_dir(family_dirs: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(family_dirs["dit"], tmp_path / "dit-xl-2-256")
    monkeypatch.setenv("LOWBITDM_MODELS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["--json", "calibrate", "--model", "dit-xl-2-256", "--bits", "w8a8", *_sets(),
                                      "--set", "sample.steps=2", "--out", str(tmp_path / "c")])
    _ok(result, "calibrate dit-xl-2-256")
    manifest = Artifact.open(tmp_path / "c").manifest
    assert manifest.model.name == "dit-xl-2-256" and manifest.model.source == str(tmp_path / "dit-xl-2-256")
    assert manifest.recipe["sample"]["guidance"] == 1.5  # the registry's paper setting
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(app, ["--json", "models"]).stdout)}
    assert rows["dit-xl-2-256"]["available"] is True and rows["dit-xl-2-256"]["family"] == "dit"
    assert rows["dit-xl-2-256"]["local_dir"] == str(tmp_path / "dit-xl-2-256")
    assert rows["sd-v1-4"]["hub_id"] == "CompVis/stable-diffusion-v1-4" and rows["digits"]["local_dir"] is None
    assert (rows["sd-v1-4"]["conditioning"], rows["sd-v1-4"]["resolution"]) == ("text", 512)
    shutil.copytree(family_dirs["ddpm"], tmp_path / "ldm-4")  # an unconditional model where a class one belongs
    _one_line_error(CliRunner().invoke(app, ["calibrate", "--model", "ldm-4", *_sets(), "--out", str(tmp_path / "x")]),
                    "conditioning 'none'", "'ldm-4' is 'class'")


@pytest.mark.parametrize("case", ["v-prediction", "no-prompts", "pipeline", "not-a-pipeline", "prompt-file"])
def test_bad_models(case: str, family_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    extra: list[str] = []
    if case == "v-prediction":
        shutil.copytree(family_dirs["ddpm"], folder)
        cfg_file = folder / "scheduler" / "scheduler_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "v_prediction"}))
        needles = ["v_prediction", "epsilon"]
    elif case == "no-prompts":
        folder = family_dirs["sd"]
        needles = ["text-to-image", "--prompts"]
    elif case == "pipeline":
        shutil.copytree(family_dirs["ddpm"], folder)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        needles = ["'FluxPipeline' is not supported", "DiTPipeline"]
    elif case == "not-a-pipeline":
        folder.mkdir()
        needles = ["no model_index.json"]
    else:
        folder = family_dirs["sd"]
        extra = ["--prompts", str(tmp_path / "missing.txt")]
        needles = ["missing.txt", "does not exist"]
    result = CliRunner().invoke(app, ["calibrate", "--model", str(folder), *extra, *_sets(),
                                      "--out", str(tmp_path / "c")])
    _one_line_error(result, *needles)
    assert not (tmp_path / "c").exists()


def test_changed_fp_parts_are_refused(chains: dict[str, Path], family_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A merged checkpoint loads its FP autoencoder from the source, and only the one it was merged with."""
    from safetensors.torch import load_file, save_file

    from lowbitdm_cli.errors import ArtifactError

    cfg = json.loads((chains["ldm"] / "merge" / CONFIG_NAME).read_text())
    source = Path(cfg["model"]["parts"]["source"])
    weights = source / "vqvae" / "diffusion_pytorch_model.safetensors"
    backup = tmp_path / "vq.safetensors"
    shutil.copy(weights, backup)
    try:
        state = load_file(str(weights))
        key = next(iter(state))
        state[key] = state[key] + 1.0
        save_file(state, str(weights))
        with pytest.raises(ArtifactError, match="differ from those it was merged with"):
            load_merged(chains["ldm"] / "merge", "fake")
    finally:
        shutil.copy(backup, weights)
    assert load_merged(chains["ldm"] / "merge", "fake").autoencoder is not None


def test_clip_score(chains: dict[str, Path], tmp_path: Path) -> None:
    """clip_score (the default metric of text-to-image samples) needs local CLIP weights; with them it
    scores every image against the prompt its label indexes."""
    from lowbitdm_cli.evaluation.clip_score import open_clip

    runner = CliRunner()
    samples = chains["sd"] / "sample"
    _one_line_error(runner.invoke(app, ["evaluate", str(samples), "--out", str(tmp_path / "e0")]),
                    "clip_score needs local CLIP weights", "--clip-weights")
    clip_dir = build_clip(tmp_path / "clip")
    result = runner.invoke(app, ["--json", "evaluate", str(samples), "--clip-weights", str(clip_dir),
                                 "--out", str(tmp_path / "e")])
    _ok(result, "evaluate clip_score")
    score = json.loads(result.stdout)["metrics"]["clip_score"]
    data = read_npz(samples / "samples.npz")
    scorer = open_clip(clip_dir)
    cos = scorer.cosines(iter([(data["arr_0"], [PROMPTS[i] for i in data["labels"]])]))
    # the same cosines (one batch, the same scorer); each mean of n float32 scores ≤ 100 is within
    # (n + 1)·u32·100 of exact (the ×100, the n − 1 additions, the division), so the two within twice that
    assert len(cos) <= 50 and 0.0 <= score <= 100.0
    assert score == pytest.approx(float(100 * np.maximum(cos, 0).mean()), abs=2 * (len(cos) + 1) * 2.0**-24 * 100)
    shuffled = scorer.cosines(iter([(data["arr_0"], [PROMPTS[(i + 1) % 3] for i in data["labels"]])]))
    assert not np.allclose(cos, shuffled)  # each image is scored against its own prompt
    _one_line_error(runner.invoke(app, ["evaluate", str(chains["dit"] / "sample"), "--metric", "clip_score",
                                        "--clip-weights", str(clip_dir), "--out", str(tmp_path / "e2")]),
                    "sampled without prompts")


@pytest.mark.parametrize("kind, recipe", [("dit", "mpqdm"), ("sd", "quest"), ("ldm-class", "qdiffusion"),
                                          ("dit", "efficientdm-tx")],
                         ids=["dit-mpqdm", "sd-quest", "ldm-class-qdiffusion", "dit-efficientdm-tx"])
def test_methods_run_on_families(kind: str, recipe: str, family_dirs: dict[str, Path], tmp_path: Path) -> None:
    """OMQ + TRD (the TRD feature: DiT's last transformer block), QuEST's selective layers
    (cross-attention and time-embedding projections), BRECQ reconstruction over transformer blocks."""
    runner = CliRunner()
    prompts = ["--prompts", str(family_dirs["root"] / "prompts.txt")] if kind == "sd" else []
    recon = ["calibrate.recon_iters=2", "calibrate.recon_samples=4", "calibrate.recon_batch_size=2"]
    _ok(runner.invoke(app, ["calibrate", "--model", str(family_dirs[kind]), "--bits", "w4a4", "--recipe", recipe,
                            *_sets(recon), *prompts, "--out", str(tmp_path / "c")]), f"{kind} {recipe} calibrate")
    _ok(runner.invoke(app, ["finetune", str(tmp_path / "c")]), f"{kind} {recipe} finetune")
    info = Artifact.open(tmp_path / "finetune").manifest.info
    if recipe != "qdiffusion":  # Q-Diffusion is PTQ only: its finetune stage is the pass-through
        assert info["epochs"] == 1 and info["trainable_parameters"] > 0
    if recipe == "quest":
        assert info["local_layers"] > 0
    if recipe == "qdiffusion":
        assert Artifact.open(tmp_path / "c").manifest.info["reconstruction"]
    if recipe == "efficientdm-tx":  # the transformer recipe on a latent DiT it has never seen, unchanged
        _ok(runner.invoke(app, ["merge", str(tmp_path / "finetune"), "--out", str(tmp_path / "m")]), "merge")
        layers = json.loads((tmp_path / "m" / "quantization_config.json").read_text())["layers"]
        qkv = [v for k, v in layers.items() if k.endswith("attn1.to_q")]
        assert qkv and all(v["transforms"]["smooth"] and v["transforms"]["low_rank"] == 8
                           and v["weight_shape"][1] % v["transforms"]["rotate"] == 0
                           and v["input_activations"]["strategy"] == "token" for v in qkv)
        assert all(v["weights"]["num_bits"] == 8 for k, v in layers.items() if k.endswith("norm1.linear"))  # adaLN
        fake, integer = (load_merged(tmp_path / "m", r) for r in ("fake", "int"))
        x, cond = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3])
        with torch.no_grad():
            assert torch.equal(fake.eps(x, 500, cond, 1.5), integer.eps(x, 500, cond, 1.5))


def test_compvis_conversions_plug_in(family_dirs: dict[str, Path]) -> None:
    """What the CompVis converter returns (UNet2DConditionModel + class embedder + VQModel + scheduler
    config) becomes the same model as the class-LDM folder holding those modules."""
    from types import SimpleNamespace

    from lowbitdm_cli.errors import RecipeError
    from lowbitdm_cli.models.families import from_compvis

    folder = family_dirs["ldm-class"]
    ref = load_model(str(folder))
    cv = SimpleNamespace(unet=ref.denoiser, autoencoder=ref.autoencoder, class_embedder=ref.conditioner.embedding,
                         scale_factor=1.0, conditioning="class", num_classes=4, null_class=4, latent_shape=(3, 4, 4),
                         schedule=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    model = from_compvis(cv, "cin-tiny", "/somewhere/model.ckpt")
    x, cond = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(model.eps(x, 500, cond, 3.0), ref.eps(x, 500, cond, 3.0))
        assert torch.equal(model.decode(x), ref.decode(x))
    assert (model.sample_shape, model.null_class, model.meta["family"]) == ((3, 4, 4), 4, "ldm-class")
    no_null = from_compvis(SimpleNamespace(**{**vars(cv), "null_class": None}), "cin-tiny", "/somewhere/model.ckpt")
    with pytest.raises(RecipeError, match="sample.guidance=1"):
        no_null.eps(x, 500, cond, 3.0)


def test_hub_repository_from_the_cache(family_dirs: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model owner/repo` loads the hub snapshot (here a cache laid out as huggingface_hub does,
    offline); without one, the error says what to download and where."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-dit" / "snapshots" / ("0" * 40)
    shutil.copytree(family_dirs["dit"], snapshot)
    (cache / "models--someone--tiny-dit" / "refs").mkdir()
    (cache / "models--someone--tiny-dit" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("LOWBITDM_MODELS_DIR", str(tmp_path / "models"))
    runner = CliRunner()
    _ok(runner.invoke(app, ["calibrate", "--model", "someone/tiny-dit", "--bits", "w8a8", *_sets(),
                            "--out", str(tmp_path / "c")]), "calibrate someone/tiny-dit")
    ref = Artifact.open(tmp_path / "c").manifest.model
    assert (ref.name, ref.source) == ("someone/tiny-dit", "hub:someone/tiny-dit")
    _ok(runner.invoke(app, ["finetune", str(tmp_path / "c"), "--out", str(tmp_path / "f")]), "finetune")
    _one_line_error(runner.invoke(app, ["calibrate", "--model", "someone/missing", *_sets(),
                                        "--out", str(tmp_path / "c2")]),
                    "hf download someone/missing", str(tmp_path / "models" / "someone--missing"))


def test_prompts_from_a_file(family_dirs: dict[str, Path], chains: dict[str, Path], tmp_path: Path) -> None:
    """--prompts for FP and quantized sampling (other prompts than calibration's too); a stage's inputs
    digest covers the prompts' text, and clip_score refuses a prompt file changed since sampling."""
    runner = CliRunner()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    _ok(runner.invoke(app, ["sample", str(family_dirs["sd"]), "--prompts", str(prompts), *_sets(),
                            "--set", "sample.num_samples=3", "--out", str(tmp_path / "fp")]), "FP sample")
    data = read_npz(tmp_path / "fp" / "samples.npz")
    assert data["arr_0"].shape == (3, 8, 8, 3) and data["labels"].tolist() == [0, 1, 0]
    assert Artifact.open(tmp_path / "fp").manifest.recipe["model"]["prompts"] == str(prompts)
    # the merged model (calibrated on PROMPTS) samples with two other prompts
    _ok(runner.invoke(app, ["sample", str(chains["sd"] / "merge"), "--prompts", str(prompts), "--set",
                            "sample.num_samples=3", "--out", str(tmp_path / "q")]), "quantized sample, new prompts")
    assert read_npz(tmp_path / "q" / "samples.npz")["labels"].tolist() == [0, 1, 0]
    calibrate = ["calibrate", "--model", str(family_dirs["sd"]), "--prompts", str(prompts), *_sets(),
                 "--out", str(tmp_path / "c")]
    _ok(runner.invoke(app, calibrate), "calibrate")
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    _ok(runner.invoke(app, calibrate), "calibrate again")  # same inputs: nothing to do
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before
    clip_dir = build_clip(tmp_path / "clip")
    prompts.write_text("a cat\na horse\n")
    _one_line_error(runner.invoke(app, calibrate), "made from other inputs")  # same path, other text
    four = tmp_path / "four.txt"
    four.write_text("a red bird\na blue bird\na cat\nsun\n")  # distil on other (and more) prompts than calibration's
    _ok(runner.invoke(app, ["finetune", str(chains["sd"] / "calibrate"), "--method", "qalora", "--prompts", str(four),
                            "--set", "finetune.batch_size=5", "--out", str(tmp_path / "f")]), "finetune --prompts")
    assert Artifact.open(tmp_path / "f").manifest.recipe["model"]["prompts"] == str(four)
    _one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "fp"), "--clip-weights", str(clip_dir),
                                        "--out", str(tmp_path / "e")]), "changed since sampling")
    assert not (tmp_path / "e.partial").exists()


def test_dit_in_the_hubs_transformer2d_layout(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    """facebook/DiT-XL-2-256 stores its transformer as Transformer2DModel (ada_norm_zero): same model."""
    hub = build_dit(tmp_path / "dit", hub_layout=True)
    assert json.loads((hub / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    a, b = load_model(str(hub)), load_model(str(family_dirs["dit"]))
    x, cond = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(a.eps(x, 500, cond, 1.5), b.eps(x, 500, cond, 1.5))
    assert a.num_classes == 4 and a.null_class == 4


def test_bin_weights_load_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder with .bin weights (older hub repositories) is read by torch.load(weights_only=True) only."""
    from diffusers import DDPMPipeline

    src = build_ddpm(tmp_path / "src")
    DDPMPipeline.from_pretrained(str(src)).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    calls = []
    real_load = torch.load

    def checked_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    model = load_model(str(tmp_path / "bin"))
    assert calls and all(w is True for w in calls)
    assert torch.equal(next(iter(model.denoiser.state_dict().values())),
                       next(iter(load_model(str(src)).denoiser.state_dict().values())))


def test_merged_checkpoints_from_before_denoiser_config_still_load(calibrated: Artifact, tmp_path: Path) -> None:
    """Checkpoints merged before this change record only `unet_config` (UNet2DModel): they load as before."""
    from lowbitdm_cli.stages.merge import merge

    merged = merge(calibrated, tmp_path / "merge")
    old = Path(shutil.copytree(merged.path, tmp_path / "old"))
    cfg = json.loads((old / CONFIG_NAME).read_text())
    assert cfg["model"]["denoiser_config"] and cfg["model"]["unet_config"]
    del cfg["model"]["denoiser_config"]
    (old / CONFIG_NAME).write_text(json.dumps(cfg))
    new, legacy = load_merged(merged.path, "int"), load_merged(old, "int")
    x, cond = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(new.eps(x, 500, cond, 2.0), legacy.eps(x, 500, cond, 2.0))


def _write_marker(path: str) -> None:  # would run only if the weights were unpickled freely
    Path(path).write_text("executed")


class _Unsafe:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (_write_marker, (str(self.path),))


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_pickled_bin_weights_are_refused_in_one_line(component: str, tmp_path: Path, runner: CliRunner) -> None:
    """.bin weights that need more than tensors unpickled: one line naming the file and the global, nothing runs."""
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file as safetensors_load

    marker = tmp_path / "marker"
    if component == "unet":
        folder = tmp_path / "bin"
        DDPMPipeline.from_pretrained(str(build_ddpm(tmp_path / "src"))).save_pretrained(folder,
                                                                                       safe_serialization=False)
        weights = folder / "unet" / "diffusion_pytorch_model.bin"
        args = []
    else:
        folder = build_sd(tmp_path / "sd")
        enc = folder / "text_encoder"
        state = safetensors_load(str(enc / "model.safetensors"))
        (enc / "model.safetensors").unlink()
        weights = enc / "pytorch_model.bin"
        torch.save(state, weights)
        (tmp_path / "p.txt").write_text("a cat\n")
        args = ["--prompts", str(tmp_path / "p.txt")]
    state = torch.load(weights, weights_only=True)
    state["callbacks"] = _Unsafe(marker)
    torch.save(state, weights)
    result = runner.invoke(app, ["calibrate", "--model", str(folder), "--bits", "w8a8", *args,
                                 "--out", str(tmp_path / "c")])
    line = _one_line_error(result, str(weights), "refused", "_write_marker unpickled")
    assert "Traceback" not in line
    assert not marker.exists()


def test_merged_denoiser_drops_into_a_diffusers_pipeline(chains: dict[str, Path], family_dirs: dict[str, Path]) -> None:
    """docs/integer-runtime.md's example: a merged checkpoint's denoiser samples with diffusers' own pipeline and scheduler."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from lowbitdm_cli import load_quantized

    model = load_quantized(chains["ddpm"] / "merge")  # integer kernels
    assert model.meta["runtime"]["int_layers"] > 0
    scheduler = DDIMScheduler.from_pretrained(str(family_dirs["ddpm"]), subfolder="scheduler")
    pipe = DDIMPipeline(unet=model.denoiser, scheduler=scheduler)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the pipeline's call computes what lowbitdm's sampler does
        assert torch.equal(model.denoiser(x, torch.tensor([500, 500])).sample, model.eps(x, 500))


def test_pixel_space_dit_without_vae_runs_the_chain(tmp_path: Path, runner: CliRunner) -> None:
    """A DiTPipeline folder with no vae/ (pixel-space DiT): the autoencoder is optional where the denoiser's
    channels are an image's; calibrate, finetune, merge and sample run on pixels."""
    folder = build_pixel_dit(tmp_path / "dit-pixel")
    assert not (folder / "vae").exists()
    model = load_model(str(folder))
    assert model.autoencoder is None and model.sample_shape == (3, 8, 8) and model.num_classes == 4
    run = tmp_path / "run"
    for args in (["calibrate", "--model", str(folder), "--bits", "w4a8", "--recipe", "ptq", *_sets(),
                  "--out", str(run / "calibrate")],
                 ["finetune", str(run / "calibrate"), "--method", "qalora"],
                 ["merge", str(run / "finetune")],
                 ["sample", str(run / "merge")]):
        _ok(runner.invoke(app, args), args[0])
    merged = load_merged(run / "merge", "int")
    assert merged.autoencoder is None and merged.meta["runtime"]["int_layers"] > 0
    images = read_npz(run / "sample" / "samples.npz")["arr_0"]
    assert images.shape == (4, 8, 8, 3)


def test_latent_dit_without_vae_is_refused(tmp_path: Path, runner: CliRunner) -> None:
    folder = build_dit(tmp_path / "dit")
    shutil.rmtree(folder / "vae")
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    _one_line_error(runner.invoke(app, ["calibrate", "--model", str(folder), "--out", str(tmp_path / "c")]),
                    "has no vae/", "4 input channels", "needs its autoencoder")
    shutil.rmtree(folder)
    folder = build_dit(tmp_path / "dit")
    shutil.rmtree(folder / "vae")  # named in model_index.json, but missing: incomplete, as before
    _one_line_error(runner.invoke(app, ["calibrate", "--model", str(folder), "--out", str(tmp_path / "c")]),
                    "vae/config.json is missing")
