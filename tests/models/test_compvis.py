"""CompVis LDM loader: tiny CompVis-layout models (from `compvis_reference`) must convert exactly.

Each test builds a tiny, randomly initialised model in the ORIGINAL CompVis layout, saves it the
way CompVis does (``{"state_dict": ...}`` with ``model.diffusion_model.`` / ``first_stage_model.``
/ ``cond_stage_model.`` prefixes, plus a YAML mirroring the released configs), converts it with
`load_compvis` and compares the diffusers modules' outputs with the reference forward.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import compvis_reference as ref
import pytest
import torch
import yaml

from lowbitdm_cli.errors import ModelNotFoundError
from lowbitdm_cli.models.compvis import compvis_files, load_compvis, read_checkpoint
from lowbitdm_cli.models.wrapper import NoiseSchedule

# Outputs are compared in float64 (both models converted after loading the float32 checkpoint): the two
# implementations order their sums differently (convolution vs linear attention projections, SDPA vs
# einsum attention), and a CPU only changes that order. Each output is the end of < 60 layers (norms
# counted), each summing < 2**14 terms (a GroupNorm's statistics over a 128x128 map; convolutions sum
# < 600), so float64 rounding (u64 = 2**-53) moves it by < 60·2**14·u64 ≈ 1.1e-10 of the magnitudes it
# passes through; TOL leaves a ×90 margin for the tiny networks' gain (measured: ~5e-15). Conversion
# errors are of order 1e-3 and more (test_legacy_head_order_is_not_interchangeable).
TOL = 1e-8  # max |diff| relative to the output's max |value|

VQ_FIRST_STAGE = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {"embed_dim": 3, "n_embed": 16,
               "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3,
                            "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                            "dropout": 0.0},
               "lossconfig": {"target": "torch.nn.Identity"}},
}
KL_FIRST_STAGE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {"embed_dim": 4, "monitor": "val/rec_loss",
               "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
                            "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                            "dropout": 0.0},
               "lossconfig": {"target": "torch.nn.Identity"}},
}


def kl_first_stage(resolution: int = 32) -> dict:
    fs = copy.deepcopy(KL_FIRST_STAGE)
    fs["params"]["ddconfig"]["resolution"] = resolution
    return fs


def cin_config() -> dict:
    """cin256-v2.yaml, tiny: crossattn + ClassEmbedder(1001 → context_dim), SpatialTransformer UNet, VQ-f4."""
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "image", "cond_stage_key": "class_label", "image_size": 8,
        "channels": 3, "cond_stage_trainable": True, "conditioning_key": "crossattn", "monitor": "val/loss",
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 16}},
        "first_stage_config": copy.deepcopy(VQ_FIRST_STAGE),
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 1001, "embed_dim": 16, "key": "class_label"}},
    }}}


def bedroom_config(new_order: bool = False) -> dict:
    """lsun_bedrooms-ldm-vq-4.yaml, tiny: unconditional AttentionBlock UNet (num_head_channels), VQ-f4."""
    unet = {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [2, 1], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16}
    if new_order:
        unet["use_new_attention_order"] = True
    return {"model": {"base_learning_rate": 2e-6, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "image", "image_size": 8, "channels": 3,
        "monitor": "val/loss_simple_ema",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": copy.deepcopy(VQ_FIRST_STAGE),
        "cond_stage_config": "__is_unconditional__",
    }}}


def church_config() -> dict:
    """lsun_churches-ldm-kl-8.yaml, tiny: scale_by_std, use_scale_shift_norm, resblock_updown, KL-f8.

    Like the real one (8 heads over 192, 384, 768 channels) `num_heads` fixes the head count, so
    the head dim differs per level (16, 32) — the case plain UNet2DModel cannot express.
    Latents are 16x16: at 4x4, resblock_updown reaches 1x1 maps where GroupNorm(32) over 32
    channels normalises single values and amplifies float rounding ~300x, which is no test of the
    mapping.
    """
    return {"model": {"base_learning_rate": 5e-5, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0155, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "loss_type": "l1", "first_stage_key": "image", "cond_stage_key": "image",
        "image_size": 16, "channels": 4, "cond_stage_trainable": False, "concat_mode": False,
        "scale_by_std": True, "monitor": "val/loss_simple_ema",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2, 2], "num_heads": 2,
            "use_scale_shift_norm": True, "resblock_updown": True}},
        "first_stage_config": kl_first_stage(resolution=128),
        "cond_stage_config": "__is_unconditional__",
    }}}


def sd_config() -> dict:
    """v1-inference.yaml, tiny: text cross-attention (context_dim 24), num_heads, KL-f8, scale_factor 0.18215."""
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 4, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [2, 1], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16,
            "use_spatial_transformer": True, "transformer_depth": 2, "context_dim": 24, "use_checkpoint": True,
            "legacy": False}},
        "first_stage_config": copy.deepcopy(KL_FIRST_STAGE),
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    }}}


def build(config: dict, seed: int = 0) -> ref.LatentDiffusion:
    """The reference LatentDiffusion (CompVis layout) for `config`, every parameter randomised."""
    mp = config["model"]["params"]
    fs = mp["first_stage_config"]
    fs_cls = ref.VQModelInterface if fs["target"].endswith("VQModelInterface") else ref.AutoencoderKL
    cs = mp["cond_stage_config"]
    cond = ref.ClassEmbedder(**cs["params"]) if isinstance(cs, dict) and cs["target"].endswith("ClassEmbedder") else None
    ldm = ref.LatentDiffusion(mp, fs_cls(**fs["params"]), cond)
    return ref.randomize_(ldm, seed).eval()


def save(tmp: Path, config: dict, state: dict[str, torch.Tensor], name: str = "model.ckpt",
         extra: dict | None = None) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = tmp / name, tmp / "config.yaml"
    torch.save({"state_dict": state, "global_step": 1, **(extra or {})}, ckpt)
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    return ckpt, cfg


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _latents(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _f64(m, ldm: torch.nn.Module) -> None:  # m: a CompVisModel
    """Converted model and reference in float64 (see TOL)."""
    for module in (m.unet, m.autoencoder, m.class_embedder, ldm):
        if module is not None:
            module.double()


# ----------------------------------------------------------------------------- (a) cin256: class cross-attention


def test_cin256_class_conditional_unet_and_embedder_match_reference(tmp_path: Path) -> None:
    config = cin_config()
    ldm = build(config)
    ckpt, cfg = save(tmp_path, config, ldm.state_dict())
    m = load_compvis(ckpt, cfg)
    _f64(m, ldm)

    assert type(m.unet).__name__ == "UNet2DConditionModel" and type(m.autoencoder).__name__ == "VQModel"
    assert (m.conditioning, m.num_classes, m.null_class, m.context_dim) == ("class", 1000, 1000, 16)
    assert m.cond_stage_target == "ldm.modules.encoders.modules.ClassEmbedder"
    assert m.latent_shape == (3, 8, 8) and m.image_size == 32 and m.scale_factor == 1.0
    assert m.schedule["beta_schedule"] == "scaled_linear"
    assert m.ignored_keys == {"schedule_buffers": 4}

    x = _latents((3, 3, 8, 8))
    t = torch.tensor([0, 421, 999])
    y = torch.tensor([3, 999, 1000])  # a class, the last class, the null class
    with torch.no_grad():
        want = ldm.model.diffusion_model(x, t, context=ldm.cond_stage_model(y))
        ctx = m.context(y)
        got = m.unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(ctx, ldm.cond_stage_model(y))
    d = rel_diff(got, want)
    print(f"cin256 UNet max rel diff {d:.2e}")
    assert d <= TOL


def test_schedule_is_compvis_linear(tmp_path: Path) -> None:
    """CompVis `linear` (linear in sqrt beta) equals diffusers `scaled_linear` as the wrapper reads it."""
    config = cin_config()
    ldm = build(config)
    m = load_compvis(*save(tmp_path, config, ldm.state_dict()))
    ours = NoiseSchedule.from_config(m.schedule).alphas_cumprod
    theirs = torch.cumprod(1 - ref.make_beta_schedule("linear", 1000, 0.0015, 0.0195), 0)
    assert torch.equal(ours, theirs.float())  # the same float64 ops (linspace of sqrt, square, cumprod), rounded once
    # a checkpoint whose stored schedule disagrees with its YAML is refused
    config["model"]["params"]["linear_end"] = 0.012
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    with pytest.raises(ModelNotFoundError, match="alphas_cumprod does not match"):
        load_compvis(tmp_path / "model.ckpt", cfg)


# ----------------------------------------------------------------------------- (b) bedroom: AttentionBlock UNet


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy-heads", "new-order-heads"])
def test_bedroom_unconditional_attentionblock_unet_matches_reference(tmp_path: Path, new_order: bool) -> None:
    config = bedroom_config(new_order)
    ldm = build(config, seed=2)
    m = load_compvis(*save(tmp_path, config, ldm.state_dict()))
    _f64(m, ldm)
    assert type(m.unet).__name__ == "UNet2DModel"
    assert (m.conditioning, m.num_classes, m.null_class, m.class_embedder) == ("none", None, None, None)
    # 2 heads at 32 channels, 4 at 64: the qkv split order matters
    heads = sorted({a.heads for a in m.unet.modules() if type(a).__name__ == "Attention"})
    assert heads == [2, 4]

    x = _latents((2, 3, 8, 8))
    t = torch.tensor([7, 640])
    with torch.no_grad():
        want = ldm.model.diffusion_model(x, t)
        got = m.unet(x, t).sample
    d = rel_diff(got, want)
    print(f"bedroom UNet ({'new' if new_order else 'legacy'} order) max rel diff {d:.2e}")
    assert d <= TOL


def test_legacy_head_order_is_not_interchangeable(tmp_path: Path) -> None:
    """The check has teeth: reading a legacy-order checkpoint as new-order gives a different function."""
    config = bedroom_config(new_order=False)
    ldm = build(config, seed=2)
    save(tmp_path, config, ldm.state_dict())
    wrong = bedroom_config(new_order=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(wrong))
    m = load_compvis(tmp_path / "model.ckpt", tmp_path / "config.yaml")
    _f64(m, ldm)
    x, t = _latents((1, 3, 8, 8)), torch.tensor([100])
    with torch.no_grad():
        assert rel_diff(m.unet(x, t).sample, ldm.model.diffusion_model(x, t)) > 1e-3


# ----------------------------------------------------------------------------- (c) VQ-f4 autoencoder


def test_vq_f4_decode_and_encode_match_reference(tmp_path: Path) -> None:
    config = bedroom_config()
    ldm = build(config, seed=3)
    m = load_compvis(*save(tmp_path, config, ldm.state_dict()))
    _f64(m, ldm)
    vq = ldm.first_stage_model
    h = _latents((2, 3, 8, 8), seed=4)
    img = _latents((2, 3, 32, 32), seed=5)
    with torch.no_grad():
        # the quantizer picks the same codebook entries
        ours = m.autoencoder.quantize(h)[2][2].reshape(-1)
        assert torch.equal(ours, vq.quantize.indices(h))
        d_dec = rel_diff(m.decode(h), vq.decode(h))  # scale_factor 1: decode quantizes, as CompVis does
        d_raw = rel_diff(m.autoencoder.decode(h, force_not_quantize=True).sample, vq.decode(h, force_not_quantize=True))
        d_enc = max(rel_diff(m.autoencoder.encode(img).latents, vq.encode(img)), rel_diff(m.encode(img), vq.encode(img)))
    print(f"VQ-f4 decode {d_dec:.2e}, decode w/o quantization {d_raw:.2e}, encode {d_enc:.2e}")
    assert max(d_dec, d_raw, d_enc) <= TOL
    assert m.latent_shape == (3, 8, 8) and m.image_size == 32


# ----------------------------------------------------------------------------- (d) KL-f8 + church-style UNet


def test_church_kl_f8_autoencoder_and_scale_shift_updown_unet_match_reference(tmp_path: Path) -> None:
    config = church_config()
    ldm = build(config, seed=6)
    state = ldm.state_dict()
    state["scale_factor"] = torch.tensor(0.2277)  # scale_by_std models store the measured factor
    m = load_compvis(*save(tmp_path, config, state))
    _f64(m, ldm)
    assert type(m.autoencoder).__name__ == "AutoencoderKL" and m.scale_factor == pytest.approx(0.2277)
    assert m.latent_shape == (4, 16, 16) and m.image_size == 128
    kl = ldm.first_stage_model
    z = _latents((2, 4, 16, 16), seed=7)
    img = _latents((2, 3, 128, 128), seed=8)
    x, t = _latents((2, 4, 16, 16), seed=9), torch.tensor([1, 998])
    with torch.no_grad():
        d_dec = rel_diff(m.decode(z * m.scale_factor), kl.decode(z))
        dist = m.autoencoder.encode(img).latent_dist
        mean, logvar = kl.encode(img)
        d_enc = max(rel_diff(dist.mean, mean), rel_diff(dist.logvar, logvar),
                    rel_diff(m.encode(img, sample=False), m.scale_factor * mean))  # denoiser-space latents
        d_unet = rel_diff(m.unet(x, t).sample, ldm.model.diffusion_model(x, t))
    print(f"KL-f8 decode {d_dec:.2e}, encode {d_enc:.2e}; church UNet (scale-shift, resblock up/down) {d_unet:.2e}")
    assert max(d_dec, d_enc, d_unet) <= TOL


def test_stable_diffusion_v1_layout_text_crossattn(tmp_path: Path) -> None:
    """SD v1 layout: text cross-attention UNet (depth 2, per-level heads) + KL; CLIP keys reported, not loaded."""
    config = sd_config()
    ldm = build(config, seed=10)
    state = ldm.state_dict()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(7)[None]
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(24)
    m = load_compvis(*save(tmp_path, config, state))
    _f64(m, ldm)
    assert (m.conditioning, m.class_embedder, m.context_dim) == ("text", None, 24)
    assert m.cond_stage_target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert m.ignored_keys["cond_stage_model"] == 2 and m.scale_factor == pytest.approx(0.18215)
    ctx = _latents((2, 7, 24), seed=11)
    x, t = _latents((2, 4, 4, 4), seed=12), torch.tensor([5, 500])
    with torch.no_grad():
        d = rel_diff(m.unet(x, t, encoder_hidden_states=ctx).sample, ldm.model.diffusion_model(x, t, context=ctx))
    print(f"SD-v1-style UNet max rel diff {d:.2e}")
    assert d <= TOL


# ----------------------------------------------------------------------------- formats and EMA


def test_safetensors_and_ema(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    config = bedroom_config()
    ldm, ema = build(config, seed=2), build(config, seed=13)
    state = dict(ldm.state_dict())
    for k, v in ema.model.named_parameters():  # LitEma: model_ema.<name without dots>
        state["model_ema." + k.replace(".", "")] = v.detach().clone()
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    ckpt, cfg = save(tmp_path, config, state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    x, t = _latents((1, 3, 8, 8)), torch.tensor([250])
    with torch.no_grad():
        plain = load_compvis(tmp_path / "model.safetensors", cfg)
        _f64(plain, ldm)
        assert rel_diff(plain.unet(x, t).sample, ldm.model.diffusion_model(x, t)) <= TOL
        assert plain.ignored_keys["model_ema"] == len(state) - len(ldm.state_dict())
        with_ema = load_compvis(ckpt, cfg, ema=True)
        _f64(with_ema, ema)
        assert rel_diff(with_ema.unet(x, t).sample, ema.model.diffusion_model(x, t)) <= TOL
        assert with_ema.ignored_keys["model_ema"] == 2


def test_compvis_files(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    assert compvis_files(tmp_path) == (tmp_path / "model.ckpt", tmp_path / "config.yaml")
    assert compvis_files(tmp_path / "model.ckpt") == (tmp_path / "model.ckpt", tmp_path / "config.yaml")
    other = tmp_path / "c.yaml"
    other.write_text("model: {}\n")
    assert compvis_files(tmp_path / "model.ckpt", other) == (tmp_path / "model.ckpt", other)
    with pytest.raises(ModelNotFoundError, match="no such CompVis checkpoint"):
        compvis_files(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model.ckpt or model.safetensors"):
        compvis_files(tmp_path / "empty")
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ModelNotFoundError, match="config YAML not found"):
        compvis_files(tmp_path)


# ----------------------------------------------------------------------------- refusals


def _side_effect(path: str) -> None:  # would run only if the checkpoint were unpickled freely
    Path(path).write_text("executed")


class Unsafe:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_side_effect, (str(self.path),))


def test_pickle_requiring_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    config = bedroom_config()
    marker = tmp_path / "marker"
    ckpt, cfg = save(tmp_path, config, build(config).state_dict(), extra={"callbacks": Unsafe(marker)})
    with pytest.raises(ModelNotFoundError, match=r"refused: this checkpoint needs test_compvis\._side_effect unpickled") as err:
        load_compvis(ckpt, cfg)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: !!python/object/apply:os.makedirs ['{marker}']\n")  # yaml.unsafe_load would run it
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="unreadable YAML config"):
        load_compvis(tmp_path / "model.ckpt", cfg)
    assert not marker.exists()


def test_missing_key_is_named(tmp_path: Path) -> None:
    config = cin_config()
    state = build(config).state_dict()
    del state["model.diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(ModelNotFoundError, match=r"missing for diffusers up_blocks\.0\.attentions\.1\."
                                                 r"transformer_blocks\.0\.attn2\.to_k\.weight"):
        load_compvis(*save(tmp_path, config, state))


@pytest.mark.parametrize("key, what", [
    ("model.diffusion_model.input_blocks.9.0.op.weight", "cannot place: model.diffusion_model.input_blocks.9"),
    ("first_stage_model.decoder.up.0.attn.0.q.weight", "cannot place: first_stage_model.decoder.up.0.attn"),
    ("cond_stage_model.extra.weight", "cannot place: cond_stage_model.extra.weight"),
    ("some_buffer", "not LatentDiffusion buffers: some_buffer"),
])
def test_unexpected_key_is_named(tmp_path: Path, key: str, what: str) -> None:
    config = cin_config()
    state = build(config).state_dict()
    state[key] = torch.zeros(1)
    with pytest.raises(ModelNotFoundError, match=what.replace(".", r"\.")):
        load_compvis(*save(tmp_path, config, state))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    config = cin_config()
    state = build(config).state_dict()
    config["model"]["params"]["cond_stage_config"]["params"]["n_classes"] = 1000
    with pytest.raises(ModelNotFoundError, match=r"class embedder: weight: checkpoint shape \(1001, 16\) != \(1000, 16\)"):
        load_compvis(*save(tmp_path, config, state))


@pytest.mark.parametrize("edit, what", [
    (lambda p: p.update(parameterization="v"), "parameterization='v'"),
    (lambda p: p.update(beta_schedule="cosine"), "beta_schedule='cosine'"),
    (lambda p: p.update(conditioning_key="concat"), "conditioning_key='concat'"),
    (lambda p: p.update(cond_stage_forward="encode"), "cond_stage_forward='encode'"),
    (lambda p: p["unet_config"]["params"].update(use_linear_in_transformer=True), "use_linear_in_transformer"),
    (lambda p: p["unet_config"]["params"].update(num_classes=10), "num_classes=10"),
    (lambda p: p["unet_config"]["params"].update(some_new_flag=1), "some_new_flag: not supported"),
    (lambda p: p["unet_config"]["params"].update(num_heads=3), "num_heads=3 does not divide"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(attn_resolutions=[16]), "attn_resolutions"),
    (lambda p: p["first_stage_config"].update(target="ldm.models.autoencoder.IdentityFirstStage"),
     "IdentityFirstStage"),
])
def test_unsupported_config_is_refused(tmp_path: Path, edit: Any, what: str) -> None:
    config = cin_config()
    ckpt, _ = save(tmp_path, config, build(config).state_dict())
    edit(config["model"]["params"])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    with pytest.raises(ModelNotFoundError, match=what.replace("[", r"\[").replace("(", r"\(")):
        load_compvis(ckpt, cfg)


def test_church_per_level_heads_survive_from_config(tmp_path: Path) -> None:
    """CompVisUNet2DModel keeps its per-level head counts in its config: a rebuild computes the same."""
    from lowbitdm_cli.models.compvis import CompVisUNet2DModel

    config = church_config()
    ldm = build(config, seed=6)
    state = ldm.state_dict()
    state["scale_factor"] = torch.tensor(0.2277)
    m = load_compvis(*save(tmp_path, config, state))
    _f64(m, ldm)
    assert type(m.unet) is CompVisUNet2DModel and m.unet.config.attention_heads == [2, 2, 2]
    assert m.unet_config["_class_name"] == "CompVisUNet2DModel"
    assert sorted({(a.heads, a.to_q.out_features) for a in m.unet.modules() if type(a).__name__ == "Attention"}) \
        == [(2, 32), (2, 64)]
    again = CompVisUNet2DModel.from_config(m.unet.config).double()
    again.load_state_dict(m.unet.state_dict())
    x, t = _latents((1, 4, 16, 16), seed=9), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(again.eval()(x, t).sample, m.unet(x, t).sample)
        assert rel_diff(again(x, t).sample, ldm.model.diffusion_model(x, t)) <= TOL


def test_read_checkpoint_plain_state_dict(tmp_path: Path) -> None:
    torch.save({"model.diffusion_model.a": torch.ones(2)}, tmp_path / "flat.ckpt")
    assert list(read_checkpoint(tmp_path / "flat.ckpt")) == ["model.diffusion_model.a"]
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="refused: not a tensors-only torch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")


@pytest.mark.parametrize("make", [cin_config, sd_config, church_config], ids=["cin256", "sd-v1", "church"])
def test_mapping_agrees_with_diffusers_single_file_converters_where_they_apply(make: Any) -> None:
    """A second opinion: diffusers' own LDM converters give the same tensors under the same names for
    cross-attention UNets and for the VQ/KL autoencoders (they skip the VQ codebook, and do not
    handle AttentionBlock UNets, whose qkv split is checked against the reference above)."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from lowbitdm_cli.models import compvis as cv

    config = make()
    mp = config["model"]["params"]
    sd = build(config).state_dict()
    _, vae_cfg = cv._vae_config(mp["first_stage_config"])
    ours_vae = cv._map_vae({k[len(cv.VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(cv.VAE_PREFIX)},
                           len(vae_cfg["block_out_channels"])).out
    theirs_vae = single_file.convert_ldm_vae_checkpoint(dict(sd), vae_cfg)
    ours_vae.pop("quantize.embedding.weight", None)
    assert ours_vae.keys() == theirs_vae.keys() and all(torch.equal(ours_vae[k], theirs_vae[k]) for k in ours_vae)
    lay = cv._unet_layout(mp["unet_config"]["params"])
    if not lay.spatial:
        return
    _, unet_cfg = cv._diffusers_unet_config(lay)
    ours = cv._map_unet({k[len(cv.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(cv.UNET_PREFIX)}, lay).out
    theirs = single_file.convert_ldm_unet_checkpoint(dict(sd), unet_cfg)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ----------------------------------------------------------------------------- the released configs, full size

_VQ_F4 = {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
    "embed_dim": 3, "n_embed": 8192, "ddconfig": {
        "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}
_KL_F8 = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
    "embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}
PAPER_UNETS = {  # unet_config.params of cin256-v2, lsun_bedrooms-ldm-vq-4, lsun_churches-ldm-kl-8, v1-inference
    "cin256-v2": ({"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
                   "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
                   "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512},
                  _VQ_F4, "UNet2DConditionModel", None),
    "lsun-bedroom": ({"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
                      "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
                      "num_head_channels": 32}, _VQ_F4, "UNet2DModel", None),
    "lsun-church": ({"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
                     "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
                     "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True},
                    _KL_F8, "CompVisUNet2DModel", None),
    "sd-v1": ({"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
               "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
               "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
               "legacy": False}, _KL_F8, "UNet2DConditionModel", (859_520_964, 83_653_863)),
}


@pytest.mark.parametrize("name", list(PAPER_UNETS))
def test_released_configs_map_key_for_key_at_full_size(name: str) -> None:
    """The paper models' real configs, on the meta device (no memory, no weights): every tensor of the
    full-size CompVis layout lands on a diffusers tensor of the same shape, none left over. For SD v1
    the parameter counts are the known ones (UNet 859,520,964; VAE 83,653,863)."""
    import diffusers

    from lowbitdm_cli.models import compvis as cv

    unet_params, first_stage, want_cls, counts = PAPER_UNETS[name]
    lay = cv._unet_layout(unet_params)
    cls_name, unet_cfg = cv._diffusers_unet_config(lay)
    vae_cls, vae_cfg = cv._vae_config(first_stage)
    assert cls_name == want_cls
    with torch.device("meta"):
        ours = ref.UNetModel(**unet_params)
        theirs = (cv.CompVisUNet2DModel if cls_name == "CompVisUNet2DModel" else getattr(diffusers, cls_name))(**unet_cfg)
        fs_ref = (ref.VQModelInterface if vae_cls == "VQModel" else ref.AutoencoderKL)(**first_stage["params"])
        fs = getattr(diffusers, vae_cls)(**vae_cfg)
    cv._load_strict(theirs, cv._map_unet(ours.state_dict(), lay), cv.UNET_PREFIX, name)
    cv._load_strict(fs, cv._map_vae(fs_ref.state_dict(), len(vae_cfg["block_out_channels"])), cv.VAE_PREFIX, name)
    n_unet = sum(p.numel() for p in theirs.parameters())
    assert n_unet == sum(p.numel() for p in ours.parameters())
    if counts:
        assert (n_unet, sum(p.numel() for p in fs.parameters())) == counts
    if name == "lsun-church":  # 8 heads everywhere: head dims 24, 48, 48, 96 and 96 in the middle
        heads = {(a.heads, a.to_q.out_features) for a in theirs.modules() if type(a).__name__ == "Attention"}
        assert heads == {(8, 192), (8, 384), (8, 768)}


def test_malformed_config_is_one_clear_error(tmp_path: Path) -> None:
    config = cin_config()
    ckpt, cfg = save(tmp_path, config, build(config).state_dict())
    del config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch"]
    cfg.write_text(yaml.safe_dump(config))
    with pytest.raises(ModelNotFoundError, match=r"malformed CompVis config \(KeyError: 'ch'\)"):
        load_compvis(ckpt, cfg)


def test_null_class_default_and_override(tmp_path: Path) -> None:
    """1001 classes → ImageNet + null 1000 (cin256-v2); otherwise no null class unless one is named."""
    config = cin_config()
    config["model"]["params"]["cond_stage_config"]["params"]["n_classes"] = 11
    ckpt, cfg = save(tmp_path, config, build(config).state_dict())
    plain = load_compvis(ckpt, cfg)
    assert (plain.num_classes, plain.null_class) == (11, None)
    named = load_compvis(ckpt, cfg, null_class=10)
    assert (named.num_classes, named.null_class) == (10, 10)
    with pytest.raises(ModelNotFoundError, match="null_class=11 is not a label"):
        load_compvis(ckpt, cfg, null_class=11)
