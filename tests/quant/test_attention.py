"""Attention matmul quantization: the processor against diffusers' own attention, hand-computed
fake quantization of QKᵀ and softmax·V inputs, the policy, and the chain on tiny-random."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from lowbitdm_cli.export.checkpoint import CONFIG_NAME, load_merged
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.quant.attention import QuantAttnProcessor, attn_processors
from lowbitdm_cli.quant.model import quantize_denoiser
from lowbitdm_cli.quant.policy import LayerOverride, LayerSpec, QuantPolicy, build_layer_specs
from lowbitdm_cli.quant.quantizer import fake_quantize
from lowbitdm_cli.recipes import load_recipe

TINY = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4", "quant.attn_matmul=true"]


def _attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()


def _spec(a_bits: int = 4, p_bits: int = 8) -> LayerSpec:
    return LayerSpec(role="attention_matmul", kind="matmul", a_bits=a_bits, p_bits=p_bits)


def test_disabled_processor_equals_diffusers_attention() -> None:
    # diffusers scales the scores inside baddbmm, we after bmm: not the same float32 ops, so both run in
    # float64. Each output is < 100 float64 roundings deep (16-wide projections, a 16-token softmax, the
    # output projection, the residual), so any summation order lands within 100·u64·(sum of |terms|);
    # 1e-12 · max|ref| leaves a ×90 margin over that for terms up to max|ref|, and a wrong scale or
    # missing residual is off by O(1).
    attn = _attention().double()
    attn.upcast_softmax = False  # it casts the scores to float32: a no-op in a float32 model, a rounding here
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    attn.set_processor(AttnProcessor())
    ref = attn(x)
    proc = QuantAttnProcessor(_spec())
    for q in proc.act_quantizers():
        q.enabled = False
    attn.set_processor(proc)
    assert (attn(x) - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert "processor.q_quant.delta" in attn.state_dict()  # registered as a submodule


def test_matmul_inputs_are_fake_quantized_by_hand() -> None:
    """Recompute the attention with explicitly quantized Q, K, P, V (step/zero chosen by hand)."""
    attn = _attention(1)
    proc = QuantAttnProcessor(_spec(a_bits=4, p_bits=3))
    params = {"q": (0.3, 7.0), "k": (0.25, 8.0), "v": (0.2, 6.0), "p": (1 / 7, 0.0)}
    with torch.no_grad():
        for which, (delta, zero) in params.items():
            proc.quantizer(which).delta.fill_(delta)
            proc.quantizer(which).zero_point.fill_(zero)
    attn.set_processor(proc)
    x = torch.randn(2, 16, 3, 3)
    out = attn(x)

    def fq(t: torch.Tensor, which: str, bits: int) -> torch.Tensor:
        delta, zero = params[which]
        if which == "p":  # unsigned: codes 0..2^b-1, zero point 0
            return torch.clamp(torch.round(t / delta), 0, 2**bits - 1) * delta
        return (torch.clamp(torch.round(t / delta) + zero, 0, 2**bits - 1) - zero) * delta

    with torch.no_grad():
        h = attn.group_norm(x.view(2, 16, 9)).transpose(1, 2)
        q = attn.head_to_batch_dim(attn.to_q(h))
        k = attn.head_to_batch_dim(attn.to_k(h))
        v = attn.head_to_batch_dim(attn.to_v(h))
        p = (fq(q, "q", 4) @ fq(k, "k", 4).transpose(1, 2) * attn.scale).softmax(-1)
        o = attn.batch_to_head_dim(fq(p, "p", 3) @ fq(v, "v", 4))
        ref = attn.to_out[0](o).transpose(1, 2).reshape(2, 16, 3, 3) + x
    assert torch.equal(out, ref)  # the processor's own ops in its order (bmm, then the scale): bit for bit
    # the softmax output has 2^3 levels from 0: 8 distinct values at most
    captured = {}
    proc.observer = lambda which, t: captured.__setitem__(which, t)
    attn(x)
    p_q = proc.p_quant(captured["p"])
    assert p_q.min() >= 0 and torch.unique(torch.round(p_q / (1 / 7))).numel() <= 8
    assert torch.equal(p_q, fake_quantize(captured["p"], torch.tensor(1 / 7), torch.tensor(0.0),
                                          torch.tensor(3.0), "unsigned"))


def test_policy_adds_matmul_specs_by_role_and_pattern() -> None:
    den = load_model("tiny-random").denoiser
    names = [n for n, m in den.named_modules() if isinstance(m, Attention)]
    assert names
    off = build_layer_specs(den, QuantPolicy(w_bits=4, a_bits=4))
    assert not any(s.kind == "matmul" for s in off.values())
    on = build_layer_specs(den, QuantPolicy(w_bits=4, a_bits=4, attn_matmul=True, attn_softmax_bits=6))
    matmuls = {n: s for n, s in on.items() if s.kind == "matmul"}
    assert sorted(matmuls) == sorted(names)
    assert all(s.role == "attention_matmul" and s.a_bits == 4 and s.p_bits == 6 and s.w_bits is None
               for s in matmuls.values())
    kept = build_layer_specs(den, QuantPolicy(w_bits=4, a_bits=4, attn_matmul=True, keep_8bit=["attention_matmul"]))
    assert all(kept[n].a_bits == 8 for n in names)
    first = names[0]
    ov = build_layer_specs(den, QuantPolicy(w_bits=4, a_bits=4, attn_matmul=True,
                                            overrides=[LayerOverride(pattern=first, a_bits="fp")]))
    assert first not in ov and all(n in ov for n in names[1:])
    quantize_denoiser(den, on)
    assert sorted(attn_processors(den)) == sorted(names)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory):
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    root = tmp_path_factory.mktemp("attn")
    recipe = load_recipe("ptq", model="tiny-random", bits="w4a4", finetune_method="qalora",
                         sets=[*TINY, "quant.a_temporal=true", "finetune.epochs=1", "finetune.batch_size=2",
                               "finetune.lora_rank=2", "finetune.act_lr=1e-2"])
    cal = calibrate(recipe, root / "calibrate")
    ft = finetune(cal, recipe, root / "finetune")
    return cal, ft, merge(ft, root / "merge")


def test_calibrate_initialises_and_finetune_trains_matmul_quantizers(chain) -> None:
    cal, ft, _ = chain
    layers = cal.manifest.info["layers"]
    matmul_names = [n for n, entry in layers.items() if entry["role"] == "attention_matmul"]
    assert matmul_names
    cal_state, ft_state = cal.tensors("quant_state.safetensors"), ft.tensors("quant_state.safetensors")
    for name in matmul_names:
        for which in "qkpv":
            key = f"{name}.processor.{which}_quant.delta"
            assert key in cal_state and bool(cal_state[f"{name}.processor.{which}_quant.initialized"])
            assert cal_state[key].shape[0] == 4  # temporal: one step per calibration timestep
            assert not torch.equal(cal_state[key], ft_state[key]), f"{key} was not trained"
        p_zero = cal_state[f"{name}.processor.p_quant.zero_point"]
        assert torch.all(p_zero == 0)


def test_merged_checkpoint_rebuilds_the_matmul_quantizers(chain) -> None:
    from lowbitdm_cli.stages.common import load_quantized_from

    _, ft, merged = chain
    config = json.loads((merged.path / CONFIG_NAME).read_text())
    assert config["attention_matmuls"]
    entry = next(iter(config["attention_matmuls"].values()))
    assert entry["inputs"]["p"]["type"] == "uint" and entry["inputs"]["q"]["num_bits"] == 4
    reference = load_quantized_from(ft)  # the fake-quantized model the merge came from
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([1, 2])
    with torch.no_grad():
        ref = reference.forward(x, 999, cond)
        for runtime in ("fake", "int"):
            model = load_merged(merged.path, runtime)
            assert sorted(attn_processors(model.denoiser)) == sorted(attn_processors(reference.denoiser))
            procs = attn_processors(model.denoiser)
            for name, proc in attn_processors(reference.denoiser).items():
                for a, b in zip(procs[name].act_quantizers(), proc.act_quantizers(), strict=True):
                    torch.testing.assert_close(a.delta, b.delta)
            out = model.forward(x, 999, cond)
            # fake: the merged codes dequantize to the finetuned weights; int: int == fake bit for bit
            assert torch.equal(out, ref), (runtime, float((out - ref).abs().max()))
    runtime_info = load_merged(merged.path, "int").meta["runtime"]
    assert runtime_info["float_attention_matmuls"] == 2 * len(config["attention_matmuls"])


def test_reconstruction_trains_matmul_steps(chain, tmp_path) -> None:
    """Q-Diffusion's block reconstruction learns the attention matmul steps with the block's own (LSQ)."""
    from lowbitdm_cli.stages.calibrate import calibrate

    recipe = load_recipe("qdiffusion", model="tiny-random", bits="w4a4",
                         sets=[*TINY, "quant.a_temporal=true", "calibrate.num_timesteps=4", "calibrate.recon_iters=3",
                               "calibrate.recon_samples=8", "calibrate.recon_batch_size=4",
                               "calibrate.recon_act_lr=1e-2", "quant.weight_init=minmax", "quant.act_init=minmax"])
    ptq = chain[0].tensors("quant_state.safetensors")
    recon = calibrate(recipe, tmp_path / "cal").tensors("quant_state.safetensors")
    keys = [k for k in ptq if ".processor." in k and k.endswith(".delta")]
    assert keys and all(not torch.equal(ptq[k], recon[k]) for k in keys)
