"""Samplers: DPM-Solver++(2M) against hand-written references, DDIM equivalence, determinism per index."""

from __future__ import annotations

import math

import pytest
import torch

from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.models.wrapper import NoiseSchedule
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import (
    SamplerSettings,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    dpmpp2m_sample,
    dpmpp2m_step,
    run_sampler,
    to_uint8,
)
from lowbitdm_cli.stages.common import sampler_settings

SCHEDULE = NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})
U32, U64 = 2.0**-24, 2.0**-53  # float32 and float64 unit roundoff


def _abl(t: int) -> tuple[float, float, float]:
    a = float(SCHEDULE.alphas_cumprod[t])
    return math.sqrt(a), math.sqrt(1 - a), 0.5 * math.log(a / (1 - a))


def test_second_order_step_matches_the_papers_update():
    # diffusers' / the paper's form (Lu et al. 2022, Alg. 2, "midpoint"): with m0 = x0(s), m1 = x0(s_prev),
    # h = λ_t − λ_s, r0 = (λ_s − λ_{s_prev}) / h, D1 = (m0 − m1) / r0:
    # x_t = σ_t/σ_s · x − α_t (e^{−h} − 1) m0 − ½ α_t (e^{−h} − 1) D1
    g = torch.Generator().manual_seed(0)
    x, m0, m1 = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    s_prev, s, t = 600, 550, 500
    a_t, sig_t, lam_t = _abl(t)
    _, sig_s, lam_s = _abl(s)
    lam_p = _abl(s_prev)[2]
    h = lam_t - lam_s
    r0 = (lam_s - lam_p) / h
    d1 = (m0 - m1) / r0
    ref = sig_t / sig_s * x - a_t * (math.exp(-h) - 1) * m0 - 0.5 * a_t * (math.exp(-h) - 1) * d1
    got = dpmpp2m_step(SCHEDULE, x, m0, s, t, m1, s_prev)
    # float64 on both sides, < 16 roundings each (expm1 vs exp − 1 included) on terms no larger than
    # c·(|x| + |m0| + |m1|), c the largest coefficient: ≤ 32·u64·c·(…) apart
    c = max(sig_t / sig_s, a_t * abs(math.expm1(-h)) * (1 + 1 / r0), 1 / sig_s)
    assert ((got - ref).abs() <= 32 * U64 * c * (x.abs() + m0.abs() + m1.abs())).all()
    # without a previous prediction it is the first-order step, which is DDIM's η = 0 step
    eps = (x - _abl(s)[0] * m0) / sig_s
    first = dpmpp2m_step(SCHEDULE, x, m0, s, t)
    ddim = ddim_step(SCHEDULE, x, eps, s, t, 0.0, None)
    assert ((first - ddim).abs() <= 32 * U64 * c * (x.abs() + m0.abs() + eps.abs())).all()
    # the step to x0 returns the data prediction
    assert torch.equal(dpmpp2m_step(SCHEDULE, x, m0, 0, -1, m1, 50), m0)


class _Gaussian:
    """A model whose ε is exact for data ~ N(0, c²): ε(x_t) = σ_t x_t / (α_t² c² + σ_t²).

    Its probability-flow ODE keeps x_t / sqrt(α_t² c² + σ_t²) constant, so every x_t is known."""

    device = "cpu"
    sample_shape = (1, 8, 8)
    schedule = SCHEDULE
    c = 0.5

    def var(self, t: int) -> float:
        a = float(SCHEDULE.alphas_cumprod[t])
        return a * self.c**2 + (1 - a)

    def eps(self, x, t, cond=None, guidance=1.0):  # noqa: ANN001, ANN201
        return math.sqrt(1 - float(SCHEDULE.alphas_cumprod[t])) * x / self.var(t)


def _error_at_t0(sampler, steps: int) -> float:  # noqa: ANN001
    model = _Gaussian()
    seen = {}
    settings = SamplerSettings(steps=steps, sampler="ddim")
    sampler(model, None, [0, 1], 3, settings, hook=lambda step, t, x: seen.__setitem__(t, x.clone()))
    ts = ddim_timesteps(1000, steps)
    exact = seen[ts[0]] * math.sqrt(model.var(0) / model.var(ts[0]))
    return float((seen[0] - exact).abs().max() / exact.abs().max())


def test_dpmpp2m_is_second_order_on_an_exact_ode():
    e10, e20, e40 = (_error_at_t0(dpmpp2m_sample, n) for n in (10, 20, 40))
    d10, d20, d40 = (_error_at_t0(ddim_sample, n) for n in (10, 20, 40))
    # discretisation errors (relative: e 0.18, 0.040, 2.5e-5; d 0.25, 0.13, 0.068) against float32 rounding
    # of < 40 steps x 8 roundings ≈ 2e-5: the ratios below hold with wide margins on any CPU
    assert e20 < d20 / 3 and e40 < d40 / 3  # far more accurate than DDIM at the same steps
    assert e10 / e20 > 3.0  # halving the steps cuts the error ~4x (second order); DDIM's only ~2x
    assert 1.5 < d10 / d20 < 3.0 and 1.5 < d20 / d40 < 3.0


def test_two_steps_are_ddim():
    # both steps of a 2-step run are first order (the first step, and the last, to x0), i.e. DDIM η = 0;
    # so are the last two steps of any run
    model = load_model("tiny-random")
    settings = SamplerSettings(steps=2, guidance=2.0, clip_x0=True, sampler="dpmpp2m")
    labels = torch.tensor([1, 2, 3])
    xs_a, xs_b = {}, {}
    a = dpmpp2m_sample(model, labels, [0, 1, 2], 5, settings, hook=lambda _i, t, x: xs_a.__setitem__(t, x.clone()))
    b = ddim_sample(model, labels, [0, 1, 2], 5, SamplerSettings(steps=2, guidance=2.0, clip_x0=True),
                    hook=lambda _i, t, x: xs_b.__setitem__(t, x.clone()))
    assert sorted(xs_a) == sorted(xs_b) == [0, 500] and torch.equal(xs_a[500], xs_b[500])  # same noise
    # step 500 → 0: the same x0 (same expression), then σ_t/σ_s·x − α_t·expm1(−h)·x0 against
    # √ᾱ_0·x0 + √(1−ᾱ_0)·ε(x, x0): equal in exact arithmetic, each side ≤ 8 float32 roundings on terms
    # ≤ 1.05·(|x| + |x0|) (every coefficient, ε's 1/√(1−ᾱ_500) included, is ≤ 1.05 at 500 → 0)
    a500, a0 = float(model.schedule.alphas_cumprod[500]), float(model.schedule.alphas_cumprod[0])
    coefs = [((1 - a0) / (1 - a500)) ** 0.5, a0**0.5 - (a500 * (1 - a0) / (1 - a500)) ** 0.5, a0**0.5,
             (1 - a500) ** -0.5, (a500 / (1 - a500)) ** 0.5]  # σ_t/σ_s, α_t·(1 − e^{−h}), DDIM's
    assert max(abs(c) for c in coefs) <= 1.05
    eps = model.eps(xs_a[500], 500, labels, 2.0)
    x0 = ((xs_a[500] - (1 - a500) ** 0.5 * eps) / a500**0.5).clamp(-1, 1)
    assert ((xs_a[0] - xs_b[0]).abs() <= 16 * 1.05 * U32 * (xs_a[500].abs() + x0.abs())).all()
    # the last step returns the data prediction, as DDIM's step to ᾱ = 1 does: bit for bit from the same x
    eps0 = model.eps(xs_a[0], 0, labels, 2.0)
    assert torch.equal(a, ddim_step(model.schedule, xs_a[0], eps0, 0, -1, 0.0, None, clip_x0=True))
    assert torch.equal(b, ddim_step(model.schedule, xs_b[0], model.eps(xs_b[0], 0, labels, 2.0), 0, -1, 0.0, None,
                                    clip_x0=True))
    # with more steps the middle ones are second order: their correction moves pixels by ~0.4 here, so
    # 1e-3 separates it from float32 rounding (~1e-6) on any CPU
    more = SamplerSettings(steps=5, guidance=2.0, clip_x0=True, sampler="dpmpp2m")
    assert not torch.allclose(run_sampler(model, labels, [0, 1, 2], 5, more),
                              ddim_sample(model, labels, [0, 1, 2], 5, SamplerSettings(steps=5, guidance=2.0,
                                                                                       clip_x0=True)), atol=1e-3)


def test_dpmpp2m_image_depends_only_on_seed_and_index():
    model = load_model("tiny-random")
    settings = SamplerSettings(steps=4, guidance=2.0, clip_x0=True, sampler="dpmpp2m")
    batch = run_sampler(model, torch.tensor([3, 4, 5, 6]), [3, 4, 5, 6], 1, settings)
    single = run_sampler(model, torch.tensor([5]), [5], 1, settings)
    assert (to_uint8(batch[2:3]).astype(int) - to_uint8(single).astype(int)).__abs__().max() <= 1
    assert torch.equal(batch, run_sampler(model, torch.tensor([3, 4, 5, 6]), [3, 4, 5, 6], 1, settings))


def test_sampler_settings_are_checked():
    with pytest.raises(ValueError, match="deterministic"):
        SamplerSettings(eta=1.0, sampler="dpmpp2m")
    with pytest.raises(ValueError, match="sampler must be"):
        SamplerSettings(sampler="euler")
    recipe = load_recipe("ptq", sets=["sample.sampler=dpmpp2m", "sample.eta=1.0", "sample.steps=10"])
    with pytest.raises(RecipeError, match="eta"):
        sampler_settings(recipe.sample)
    with pytest.raises(Exception, match="sampler"):
        load_recipe("ptq", sets=["sample.sampler=euler"])


def test_unset_sampler_leaves_the_sample_section_digest_alone():
    recipe = load_recipe("ptq")
    assert "sampler" not in recipe.sample.model_dump()
    assert recipe.resolved({"steps": 50, "eta": 0.0, "guidance": 1.0, "clip_x0": False}).sample.sampler is None
    assert sampler_settings(recipe.resolved({"steps": 50, "eta": 0.0, "guidance": 1.0,
                                             "clip_x0": False}).sample).sampler == "ddim"
    chosen = load_recipe("ptq", sets=["sample.sampler=ddim"]).sample.model_dump()
    assert chosen["sampler"] == "ddim"
