"""The formulas of the ADM evaluation suite: FID / sFID, Inception Score, precision / recall, KID.

Pure functions on feature arrays (numpy in, floats out), so each is tested against an
independent reference. The protocol follows guided-diffusion's `evaluations/evaluator.py`:

- FID and sFID: Fréchet distance between Gaussians fitted to two feature sets (pool3, 2048-d,
  and the first 7 channels of `mixed_6/conv`, 2023-d, respectively).
- IS: exp E[KL(p(y|x) || p(y))] per consecutive split of `split_size` = 5000 images, averaged
  (ADM reports the mean only; `inception_score` also returns the spread).
- Precision / recall (Kynkäänniemi et al. 2019): a point lies on a set's manifold if it is within
  the k-th nearest-neighbour distance (k = 3) of some point of that set; precision is the
  fraction of samples on the reference manifold, recall the fraction of reference points on
  the samples' manifold.
- KID (Bińkowski et al. 2018): unbiased MMD² with the kernel (x·y/d + 1)³, averaged over
  random subsets, as clean-fid computes it (with a seeded generator here).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import softmax, xlogy

from lowbitdm_cli.evaluation.frechet import feature_statistics

__all__ = [
    "frechet_distance_features",
    "frechet_distance_psd",
    "inception_score",
    "kernel_inception_distance",
    "manifold_radii",
    "precision_recall",
    "softmax_probs",
    "trace_sqrt_product",
]


def _symmetric(m: np.ndarray) -> np.ndarray:
    m = np.atleast_2d(np.asarray(m, dtype=np.float64))
    return (m + m.T) / 2


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1 Σ2)^½) for two covariance (symmetric PSD) matrices.

    Σ1 Σ2 is similar to Σ1^½ Σ2 Σ1^½, which is symmetric PSD, so the trace is the sum of the
    square roots of that matrix's eigenvalues: two symmetric eigenproblems instead of
    `scipy.linalg.sqrtm` of a non-symmetric product (about 6x faster at 2048-d, and never complex).
    Eigenvalues that rounding pushed below zero count as zero.
    """
    s1, s2 = _symmetric(sigma1), _symmetric(sigma2)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = _symmetric(root @ s2 @ root)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum())


def frechet_distance_psd(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = |μ1 − μ2|² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1 Σ2)^½), the trace term by `trace_sqrt_product`."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = _symmetric(sigma1), _symmetric(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets.

    When n1·n2 <= d² the trace term comes exactly from the feature matrices: with centred
    features A (n1×d) and B (n2×d), Σ1 = AᵀA/(n1−1), Σ2 = BᵀB/(n2−1), and the non-zero
    eigenvalues of Σ1Σ2 are the squared singular values of A Bᵀ / √((n1−1)(n2−1)), so
    Tr((Σ1Σ2)^½) is that matrix's nuclear norm. This is cheap for small sets and exact where
    the covariances are singular (fewer images than dimensions). Otherwise the statistics go
    through `frechet_distance_psd`.
    """
    a, b = np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"need at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    n1, n2, d = len(a), len(b), a.shape[1]
    if n1 * n2 > d * d:
        return frechet_distance_psd(*feature_statistics(a), *feature_statistics(b))
    mu1, mu2 = a.mean(0), b.mean(0)
    ac, bc = a - mu1, b - mu2
    tr_cov = float(np.linalg.svd(ac @ bc.T, compute_uv=False).sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + (ac * ac).sum() / (n1 - 1) + (bc * bc).sum() / (n2 - 1) - 2 * tr_cov)


def softmax_probs(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, in float64."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> tuple[float, float]:
    """Inception Score of class probabilities p(y|x) [N, C]: mean and std over splits.

    Splits are consecutive blocks of `split_size` images (ADM: 5000; the last block may be
    shorter). Each split scores exp(mean_x KL(p(y|x) || p̄(y))) with p̄ the split's mean.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"expected probabilities [N, C], got shape {p.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)  # 0·log 0 = 0
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances [len(a), len(b)] (as ADM's DistanceBlock)."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def _as_tensor(x: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)


def manifold_radii(feats: np.ndarray, k: int = 3, batch_size: int = 10_000, device: str = "cpu") -> np.ndarray:
    """Squared distance of every point to its k-th nearest other point in the same set."""
    x = _as_tensor(feats, device)
    if x.ndim != 2 or len(x) <= k:
        raise ValueError(f"need more than k = {k} feature vectors [N, D], got shape {tuple(x.shape)}")
    radii = torch.empty(len(x), dtype=torch.float64, device=device)
    for start in range(0, len(x), batch_size):
        d = _squared_distances(x[start:start + batch_size], x)
        # the point itself is the smallest (distance 0), so the k-th neighbour is the (k+1)-th smallest
        radii[start:start + batch_size] = torch.kthvalue(d, k + 1, dim=1).values
    return radii.cpu().numpy()


def precision_recall(ref_feats: np.ndarray, sample_feats: np.ndarray, k: int = 3, batch_size: int = 10_000,
                     device: str = "cpu") -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds), as ADM's `ManifoldEstimator` with k = 3.

    precision: fraction of samples within the k-NN radius of some reference point;
    recall: fraction of reference points within the k-NN radius of some sample.
    Distances are squared Euclidean in float64; a point exactly on a radius counts as inside.
    """
    ref, smp = _as_tensor(ref_feats, device), _as_tensor(sample_feats, device)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {tuple(ref.shape)} and {tuple(smp.shape)}")
    r_ref = torch.as_tensor(manifold_radii(ref_feats, k, batch_size, device), device=device)
    r_smp = torch.as_tensor(manifold_radii(sample_feats, k, batch_size, device), device=device)
    sample_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for start in range(0, len(ref), batch_size):
        d = _squared_distances(ref[start:start + batch_size], smp)  # [b, n_samples]
        sample_in |= (d <= r_ref[start:start + batch_size, None]).any(dim=0)
        ref_in[start:start + batch_size] = (d <= r_smp[None, :]).any(dim=1)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID: the unbiased MMD² estimate with kernel k(x, y) = (x·y/d + 1)³, averaged over
    `num_subsets` random subsets of m = min(n1, n2, max_subset_size) points from each set
    (clean-fid's `kernel_distance`, with a seeded generator so the result is reproducible)."""
    f1, f2 = np.asarray(feats1, dtype=np.float64), np.asarray(feats2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {f1.shape} and {f2.shape}")
    d = f1.shape[1]
    m = min(len(f1), len(f2), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = f2[rng.choice(len(f2), m, replace=False)]
        y = f1[rng.choice(len(f1), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2 * kxy.mean()
    return float(total / num_subsets)
