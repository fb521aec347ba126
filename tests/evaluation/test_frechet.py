"""FID-digits uses the same Fréchet formula as FID: check it against pytorch-fid."""

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from lowbitdm_cli.evaluation.frechet import feature_statistics, frechet_distance


@pytest.mark.parametrize("dim", [2, 8, 64], ids=lambda d: f"d{d}")
def test_matches_pytorch_fid(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(500, dim))
    b = rng.normal(loc=0.3, scale=1.5, size=(400, dim)) @ rng.normal(size=(dim, dim)) * 0.5
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1, np.atleast_2d(s1), mu2, np.atleast_2d(s2))
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_known_answer_diagonal_gaussians():
    # N(μ1, diag(a)) vs N(μ2, diag(b)): d² = |μ1 − μ2|² + Σ (√a − √b)²
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    a, b = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    expected = 9 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, s = feature_statistics(rng.normal(size=(200, 16)))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6


def test_singular_covariance_is_handled():
    feats = np.zeros((50, 4))
    feats[:, 0] = np.linspace(0, 1, 50)
    mu, s = feature_statistics(feats)
    d = frechet_distance(mu, s, mu + 1, s)
    assert d == pytest.approx(4.0, abs=1e-3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
