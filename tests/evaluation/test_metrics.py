"""FID / sFID, IS, precision/recall and KID formulas against independent references and known answers.

Tolerances: everything here is float64 against an independent float64 implementation (pytorch-fid's
sqrtm, scipy's entropy, clean-fid's KID) or a closed form. The algorithms differ, so they agree to the
problem's conditioning, not to the last bit; each bound (rel ≥ 1e-12, where the sums have ≤ 1008 terms,
so ≤ 1008·u64 ≈ 1.1e-13 of rounding; rel 1e-9 to 1e-6 where sqrtm or eigendecompositions are involved)
is ≥ 10x what a CPU's summation order can change (≤ K·u64 relative for K-term sums), so no bound
depends on the CPU that runs it."""

from __future__ import annotations

import numpy as np
import pytest
from cleanfid.fid import kernel_distance
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy import linalg
from scipy.spatial.distance import cdist
from scipy.stats import entropy

from lowbitdm_cli.evaluation.metrics import (
    frechet_distance_features,
    frechet_distance_psd,
    inception_score,
    kernel_inception_distance,
    manifold_radii,
    precision_recall,
    softmax_probs,
    trace_sqrt_product,
)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


def _scipy_fid(x1: np.ndarray, x2: np.ndarray) -> float:
    """Textbook FID with scipy's matrix square root (real part), written out independently."""
    (m1, s1), (m2, s2) = _stats(x1), _stats(x2)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def _feature_sets(n1: int, n2: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(n1, dim)) @ mix
    b = (rng.normal(loc=0.2, scale=1.3, size=(n2, dim)) @ mix) + 0.1
    return a, b


# --- Fréchet distance ----------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [3, 64, 256], ids=lambda d: f"d{d}")
def test_frechet_psd_matches_pytorch_fid(dim: int) -> None:
    a, b = _feature_sets(4 * dim + 50, 3 * dim + 40, dim, seed=dim)
    (m1, s1), (m2, s2) = _stats(a), _stats(b)
    assert frechet_distance_psd(m1, s1, m2, s2) == pytest.approx(calculate_frechet_distance(m1, s1, m2, s2), rel=1e-7)


def test_trace_sqrt_product_matches_sqrtm() -> None:
    a, b = _feature_sets(300, 200, 32, seed=1)
    s1, s2 = _stats(a)[1], _stats(b)[1]
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(linalg.sqrtm(s1 @ s2).real), rel=1e-9)
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s2, s1), rel=1e-9)  # symmetric


def test_frechet_known_answer_diagonal() -> None:
    # N(μ1, diag(a)) vs N(μ2, diag(b)): d² = |μ1 − μ2|² + Σ (√a − √b)²
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, -1.0, 2.0])
    a, b = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 4.0])
    expected = 9 + 4 + 0 + (1 - 3) ** 2 + (2 - 1) ** 2 + (0 - 2) ** 2
    assert frechet_distance_psd(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


@pytest.mark.parametrize("n1, n2, dim", [(12, 9, 40), (30, 30, 30), (500, 400, 8)],
                         ids=["fewer-than-dims", "square", "many-samples"])
def test_frechet_features_matches_references(n1: int, n2: int, dim: int) -> None:
    # the first two take the low-rank (nuclear norm) path, the last the statistics path
    a, b = _feature_sets(n1, n2, dim, seed=n1 + n2)
    ours = frechet_distance_features(a, b)
    assert ours == pytest.approx(_scipy_fid(a, b), rel=1e-6)
    assert ours == pytest.approx(frechet_distance_psd(*_stats(a), *_stats(b)), rel=1e-6)


def test_frechet_features_identical_sets_is_zero() -> None:
    a, _ = _feature_sets(20, 2, 50, seed=3)
    assert abs(frechet_distance_features(a, a)) < 1e-8
    assert frechet_distance_features(a, a + 1.0) == pytest.approx(50.0)  # a shift only moves the mean


def test_frechet_shape_errors() -> None:
    with pytest.raises(ValueError):
        frechet_distance_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        frechet_distance_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        frechet_distance_psd(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- Inception Score --------------------------------------------------------------------------------

def test_inception_score_known_answers() -> None:
    c = 8
    same = np.full((40, c), 1.0 / c)
    assert inception_score(same)[0] == pytest.approx(1.0)  # no information: IS = 1
    one_hot = np.eye(c)[np.arange(40) % c]
    assert inception_score(one_hot)[0] == pytest.approx(c)  # confident and balanced: IS = number of classes
    assert inception_score(one_hot, split_size=8) == pytest.approx((c, 0.0))


def test_inception_score_matches_scipy_entropy() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.3), size=23)
    splits = [probs[i:i + 7] for i in range(0, 23, 7)]  # ADM: consecutive blocks, the last shorter
    ref = [np.exp(np.mean([entropy(p, part.mean(0)) for p in part])) for part in splits]
    mean, std = inception_score(probs, split_size=7)
    assert mean == pytest.approx(np.mean(ref), rel=1e-12)
    assert std == pytest.approx(np.std(ref), rel=1e-9)


def test_inception_score_from_logits() -> None:
    logits = np.random.default_rng(1).normal(size=(12, 1008)) * 5
    probs = softmax_probs(logits)
    assert np.allclose(probs.sum(1), 1.0)
    expected = np.exp(np.mean([entropy(p, probs.mean(0)) for p in probs]))
    assert inception_score(probs)[0] == pytest.approx(expected, rel=1e-12)


# --- precision / recall -------------------------------------------------------------------------

def test_precision_recall_hand_made() -> None:
    ref = np.arange(5, dtype=float)[:, None]  # 0..4 on a line: every 1-NN radius is 1
    samples = np.array([[0.5], [10.0]])  # the first on the reference manifold, the second far away
    assert manifold_radii(ref, k=1) == pytest.approx(np.ones(5))
    # both samples' 1-NN radius is 9.5² (each other): every reference point is within it of 0.5
    assert precision_recall(ref, samples, k=1) == (0.5, 1.0)
    # k = 3: the reference radii are 2² (ends 3²) and 0.5, 10 still split the same way
    assert manifold_radii(ref, k=3) == pytest.approx([9.0, 4.0, 4.0, 4.0, 9.0])
    far = np.array([[20.0], [21.0], [22.0], [23.0]])  # sample radii 3², 2², 2², 3²; no reference point reached
    assert precision_recall(ref, far, k=3) == (0.0, 0.0)


def _brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    d_rr, d_ss, d_rs = cdist(ref, ref, "sqeuclidean"), cdist(smp, smp, "sqeuclidean"), cdist(ref, smp, "sqeuclidean")
    r_ref, r_smp = np.sort(d_rr, axis=1)[:, k], np.sort(d_ss, axis=1)[:, k]
    precision = np.mean([(d_rs[:, j] <= r_ref).any() for j in range(len(smp))])
    recall = np.mean([(d_rs[i, :] <= r_smp).any() for i in range(len(ref))])
    return float(precision), float(recall)


@pytest.mark.parametrize("batch_size", [10_000, 7], ids=["one-batch", "batched"])
def test_precision_recall_matches_brute_force(batch_size: int) -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(60, 16))
    smp = rng.normal(loc=0.4, scale=1.4, size=(45, 16))
    ours = precision_recall(ref, smp, k=3, batch_size=batch_size)
    assert ours == pytest.approx(_brute_force_pr(ref, smp, 3), abs=1e-12)
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0  # a case that tells the two apart
    assert precision_recall(ref, ref, k=3) == (1.0, 1.0)


def test_precision_recall_needs_more_than_k_points() -> None:
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# --- KID ----------------------------------------------------------------------------------------------

def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1) ** 3

    m = len(x)
    kxx, kyy = k(x, x), k(y, y)
    off = lambda g: (g.sum() - np.trace(g)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * k(x, y).mean())


def test_kid_whole_sets_matches_clean_fid_and_formula() -> None:
    # one subset holding every point: the subset draw is only a permutation, so any seed agrees
    a, b = _feature_sets(40, 40, 12, seed=5)
    ours = kernel_inception_distance(a, b, num_subsets=1, max_subset_size=1000)
    assert ours == pytest.approx(kernel_distance(a, b, num_subsets=1, max_subset_size=1000), rel=1e-9)
    assert ours == pytest.approx(_mmd2_unbiased(b, a), rel=1e-9)


def test_kid_subsets_are_seeded() -> None:
    a, b = _feature_sets(60, 50, 12, seed=6)
    first = kernel_inception_distance(a, b, num_subsets=5, max_subset_size=20, seed=3)
    assert first == kernel_inception_distance(a, b, num_subsets=5, max_subset_size=20, seed=3)
    assert first != kernel_inception_distance(a, b, num_subsets=5, max_subset_size=20, seed=4)
    rng = np.random.default_rng(3)  # the same draws, written out
    expected = np.mean([_mmd2_unbiased(b[rng.choice(50, 20, replace=False)], a[rng.choice(60, 20, replace=False)])
                        for _ in range(5)])
    assert first == pytest.approx(expected, rel=1e-9)
