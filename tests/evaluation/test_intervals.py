"""Metric intervals against independent hand computations, and the evaluate stage recording them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy import stats
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import MANIFEST, Artifact, ModelRef, StageRun
from lowbitdm_cli.cli import app
from lowbitdm_cli.evaluation.intervals import (
    bootstrap_indices,
    bootstrap_interval,
    _inner_seed,
    frechet_interval,
    frechet_replicates,
    inception_score_replicates,
    kid_replicates,
    mean_interval,
    recentred_interval,
    wilson_interval,
)
from lowbitdm_cli.evaluation.metrics import inception_score, softmax_probs
from lowbitdm_cli.npz import write_npz


def _gauss(n: int, d: int, seed: int, shift: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1000 + d).normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def _ref(d: int) -> tuple[np.ndarray, np.ndarray]:
    x = _gauss(20 * d + 200, d, seed=99, shift=0.0)
    return x.mean(0), np.cov(x, rowvar=False)


# --- the building blocks ------------------------------------------------------------------------

def test_bootstrap_indices_are_seeded_and_independent_of_count() -> None:
    a = list(bootstrap_indices(50, 5, seed=3))
    b = list(bootstrap_indices(50, 8, seed=3))
    c = list(bootstrap_indices(50, 5, seed=4))
    assert all((x == y).all() for x, y in zip(a, b))  # replicate b depends on (seed, b) only
    assert not all((x == y).all() for x, y in zip(a, c))
    assert all(len(x) == 50 and x.min() >= 0 and x.max() < 50 for x in a)


def test_recentred_interval_by_hand() -> None:
    reps = np.array([10.0, 12.0, 14.0, 16.0, 18.0])  # mean 14: deviations −4 … 4
    lo, hi = recentred_interval(5.0, reps, level=0.5)
    # numpy's linear quantiles of [−4, −2, 0, 2, 4] at 25 % and 75 % are −2 and 2
    assert (lo, hi) == pytest.approx((3.0, 7.0))


@pytest.mark.parametrize("n, d", [(120, 8), (20, 40)], ids=["n>d (covariance)", "n<d (Gram)"])
def test_frechet_replicates_match_naive_pytorch_fid(n: int, d: int) -> None:
    feats = _gauss(n, d, seed=n)
    mu_r, sigma_r = _ref(d)
    ours = frechet_replicates(feats, mu_r, sigma_r, resamples=6, seed=11)
    naive = []
    for idx in bootstrap_indices(n, 6, seed=11):
        x = feats[idx]
        naive.append(calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r, sigma_r))
    assert ours == pytest.approx(np.array(naive), rel=1e-6, abs=1e-6)


def test_fid_interval_contains_value_is_deterministic_and_shrinks_like_one_over_sqrt_n() -> None:
    d = 6
    mu_r, sigma_r = _ref(d)

    def interval(n: int, seed: int) -> tuple[float, float, float]:
        feats = _gauss(n, d, seed=n, shift=1.0)  # a clear mean shift: the 1/sqrt(n) (linear) term dominates
        value = calculate_frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_r, sigma_r)
        reps = frechet_replicates(feats, mu_r, sigma_r, resamples=400, seed=seed)
        return value, *recentred_interval(value, reps)

    v, lo, hi = interval(400, seed=0)
    assert lo < v < hi
    assert interval(400, seed=0) == (v, lo, hi)
    assert interval(400, seed=1) != (v, lo, hi)
    widths = {n: interval(n, 0)[2] - interval(n, 0)[1] for n in (200, 800, 3200)}
    # seeded float64 simulations (numpy's PCG64 draws are the same on every CPU): the widths shrink as
    # 1/sqrt(n) up to the bootstrap's own Monte Carlo error (400 resamples: a few %), far inside ±20 %
    assert widths[200] / widths[800] == pytest.approx(2.0, rel=0.2)  # sqrt(800 / 200) = 2
    assert widths[800] / widths[3200] == pytest.approx(2.0, rel=0.2)


def test_fid_interval_covers_the_expected_value_at_n() -> None:
    """The coverage claim on synthetic data: intervals from independent n-sample sets cover the mean
    FID over many such sets (E[FID_n], estimated) about 95 % of the time; the pooled FID (large n,
    smaller bias) is a different quantity and lies below most intervals."""
    d, n, sets = 8, 150, 60
    mu_r, sigma_r = _ref(d)
    values, intervals = [], []
    for s in range(sets):
        feats = _gauss(n, d, seed=10_000 + s)
        v = calculate_frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_r, sigma_r)
        values.append(v)
        intervals.append(recentred_interval(v, frechet_replicates(feats, mu_r, sigma_r, 300, seed=s)))
    expected = float(np.mean(values))
    covered = np.mean([lo <= expected <= hi for lo, hi in intervals])
    # 60 seeded sets (the same draws on every CPU): 0.85 is > 3 binomial s.d. below a 95 % interval's
    # coverage, and float64 rounding cannot move an endpoint across `expected` short of a ~1e-13 tie
    assert 0.85 <= covered <= 1.0, covered
    big = _gauss(20_000, d, seed=5)
    pooled = calculate_frechet_distance(big.mean(0), np.cov(big, rowvar=False), mu_r, sigma_r)
    assert pooled < expected  # FID's n-bias: the intervals do not target the large-n value


def _naive_fid(x: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray) -> float:
    return calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r, sigma_r)


def test_double_bootstrap_matches_naive_two_level_loop() -> None:
    d, n = 5, 40
    feats = _gauss(n, d, seed=3)
    mu_r, sigma_r = _ref(d)
    value = _naive_fid(feats, mu_r, sigma_r)
    got = frechet_interval(value, feats, mu_r, sigma_r, resamples=30, seed=4, inner=5)
    outer = np.array([_naive_fid(feats[i], mu_r, sigma_r) for i in bootstrap_indices(n, 30, seed=4)])
    inner_sd = []
    for b, idx in enumerate(bootstrap_indices(n, 5, seed=4)):
        x = feats[idx]
        inner_sd.append(np.std([_naive_fid(x[j], mu_r, sigma_r) for j in bootstrap_indices(n, 5, _inner_seed(4, b))],
                               ddof=1))
    correction = min(1.0, np.std(outer, ddof=1) / np.mean(inner_sd))
    dev = np.quantile(outer - outer.mean(), [0.025, 0.975])
    assert got["correction"] == pytest.approx(correction, rel=1e-6)
    assert (got["low"], got["high"]) == pytest.approx((value + correction * dev[0], value + correction * dev[1]),
                                                      rel=1e-6)
    assert got["method"] == "double-bootstrap" and got["resamples"] == 30 and got["seed"] == 4


def test_double_bootstrap_changes_nothing_where_the_statistic_is_nearly_linear() -> None:
    # a large mean shift in 3-d at 2000 samples: FID is dominated by its linear term, the
    # bootstrap is not inflated, and the correction stays close to 1
    feats = _gauss(2000, 3, seed=1, shift=3.0)
    mu_r, sigma_r = _ref(3)
    got = frechet_interval(_naive_fid(feats, mu_r, sigma_r), feats, mu_r, sigma_r, resamples=200, seed=0)
    assert 0.85 <= got["correction"] <= 1.0


def test_double_bootstrap_covers_in_the_high_dimensional_regime() -> None:
    """d = 24 at n = 80 (d/n = 0.3, as FID-digits at 250 samples is 64/250): the plain bootstrap
    over-covers with a too-wide interval; the double bootstrap is narrower and still covers E[FID_n]."""
    d, n, sets = 24, 80, 40
    mu_r, sigma_r = _ref(d)
    values, plain, double = [], [], []
    for s in range(sets):
        feats = _gauss(n, d, seed=20_000 + s)
        v = _naive_fid(feats, mu_r, sigma_r)
        values.append(v)
        plain.append(recentred_interval(v, frechet_replicates(feats, mu_r, sigma_r, 200, seed=s)))
        got = frechet_interval(v, feats, mu_r, sigma_r, 200, seed=s)
        double.append((got["low"], got["high"]))
    expected = float(np.mean(values))
    width = {k: np.mean([hi - lo for lo, hi in ivs]) for k, ivs in (("plain", plain), ("double", double))}
    assert width["double"] < width["plain"]
    covered = np.mean([lo <= expected <= hi for lo, hi in double])
    assert covered >= 0.85, covered  # as above: seeded sets, a binomial margin, not a measured figure


def test_kid_replicates_match_naive_unbiased_mmd() -> None:
    x, ref = _gauss(40, 5, seed=1), _gauss(60, 5, seed=2, shift=0.0)

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / a.shape[1] + 1) ** 3

    reps, scale = kid_replicates(x, ref, resamples=5, seed=7)
    assert scale == 1.0
    naive = []
    for idx in bootstrap_indices(len(x), 5, seed=7):
        xi = x[idx]
        kxx = k(xi, xi)
        m = len(xi)
        naive.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) - 2 * k(xi, ref).mean())
    # the constant reference term is left out, so the two differ by a constant
    diff = reps - np.array(naive)
    assert diff == pytest.approx(np.zeros_like(diff), abs=1e-9)


def test_kid_replicates_scale_beyond_the_cap() -> None:
    x, ref = _gauss(400, 4, seed=1), _gauss(100, 4, seed=2)
    reps, scale = kid_replicates(x, ref, resamples=3, seed=0, cap=100)
    assert len(reps) == 3 and scale == pytest.approx(0.5)


def test_inception_score_replicates_match_naive() -> None:
    probs = softmax_probs(np.random.default_rng(0).normal(size=(90, 7)) * 2)
    ours = inception_score_replicates(probs, split_size=40, resamples=4, seed=2)
    naive = [inception_score(probs[idx], 40)[0] for idx in bootstrap_indices(90, 4, seed=2)]
    assert ours == pytest.approx(naive)
    lo, hi = bootstrap_interval(inception_score(probs, 40)[0],
                                lambda idx: inception_score(probs[idx], 40)[0], 90, 4, seed=2)
    assert (lo, hi) == recentred_interval(inception_score(probs, 40)[0], ours)


@pytest.mark.parametrize("k, n", [(0, 20), (7, 20), (247, 250), (250, 250)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_mean_interval_by_hand() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0])
    half = 1.959963984540054 * np.std(v, ddof=1) / 2
    assert mean_interval(v) == pytest.approx((2.5 - half, 2.5 + half))


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)
    with pytest.raises(ValueError, match="2 finite"):
        recentred_interval(1.0, np.array([1.0]))


# --- the evaluate stage -------------------------------------------------------------------------

def _digits_sample_artifact(path: Path, count: int = 120) -> Artifact:
    """A sample artifact holding real held-out digits (no sampling needed)."""
    from lowbitdm_cli.models.digits import load_digits_split

    split = load_digits_split()
    x = ((split.held_out_images[:count] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    run = StageRun.start(path, "sample", ModelRef(name="digits", source="embedded", digest="0" * 64),
                         {"sample": {"seed": 0}})
    write_npz(run.path("samples.npz"), {"arr_0": x.permute(0, 2, 3, 1).numpy(),
                                        "labels": split.held_out_labels[:count].numpy().astype(np.int64)})
    return run.commit(["samples.npz"])


def test_evaluate_records_intervals(tmp_path: Path) -> None:
    from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator
    from lowbitdm_cli.stages.evaluate import evaluate

    samples = _digits_sample_artifact(tmp_path / "sample")
    art = evaluate(samples, ["fid_digits", "class_accuracy"], tmp_path / "evaluate", bootstrap=200, bootstrap_seed=3)
    m = art.manifest
    assert set(m.intervals) == {"fid_digits", "class_accuracy"}
    fid, acc = m.intervals["fid_digits"], m.intervals["class_accuracy"]
    assert fid.low < m.metrics["fid_digits"] < fid.high
    assert (fid.method, fid.resamples, fid.seed) == ("double-bootstrap", 200, 3) and 0 < fid.correction <= 1
    assert acc.method == "wilson" and acc.low <= m.metrics["class_accuracy"] <= acc.high
    right = round(m.metrics["class_accuracy"] * 120)
    assert (acc.low, acc.high) == pytest.approx(wilson_interval(right, 120))
    # the FID interval's outer level is a hand-written bootstrap over the evaluator's own features
    ev = DigitsEvaluator()
    data = np.load(samples.file("samples.npz"))
    feats, _ = ev.features_and_logits(torch.from_numpy(data["arr_0"]))
    naive = [calculate_frechet_distance(feats[i].mean(0), np.cov(feats[i], rowvar=False), ev.ref_mu, ev.ref_sigma)
             for i in bootstrap_indices(120, 200, seed=3)]
    lo, hi = recentred_interval(0.0, np.array(naive))
    v = m.metrics["fid_digits"]
    assert (fid.low, fid.high) == pytest.approx((v + fid.correction * lo, v + fid.correction * hi), rel=1e-6)
    # the written manifest carries them; without bootstrap, FID-digits says why it has none
    assert "intervals" in json.loads((art.path / MANIFEST).read_text())
    off = evaluate(samples, ["fid_digits", "class_accuracy"], tmp_path / "evaluate-off", bootstrap=0)
    assert set(off.manifest.intervals) == {"class_accuracy"}
    assert "fid_digits" in off.manifest.info["no_interval"]


def test_manifest_without_intervals_keeps_its_bytes_and_opens(tmp_path: Path) -> None:
    samples = _digits_sample_artifact(tmp_path / "sample", count=20)
    text = (samples.path / MANIFEST).read_text()
    assert "intervals" not in text  # stages without intervals write the manifest as before
    assert Artifact.open(samples.path).manifest.intervals == {}


def test_cli_evaluate_shows_intervals(tmp_path: Path) -> None:
    samples = _digits_sample_artifact(tmp_path / "sample", count=60)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(samples.path), "--bootstrap", "50", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert re.search(r"\d \[\d[\d.]*, \d[\d.]*\]", result.stdout)  # value [low, high]
    result = runner.invoke(app, ["--json", "show", str(tmp_path / "e")])
    data = json.loads(result.stdout)
    assert data["intervals"]["fid_digits"]["resamples"] == 50
    assert math.isfinite(data["intervals"]["fid_digits"]["low"])
    result = runner.invoke(app, ["evaluate", str(samples.path), "--bootstrap", "1", "--out", str(tmp_path / "e1")])
    assert result.exit_code != 0 and "at least 2" in result.output
