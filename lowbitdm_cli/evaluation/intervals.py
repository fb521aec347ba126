"""95 % intervals for every metric `evaluate` records.

What an interval covers
-----------------------
FID-like metrics are biased in the sample count n (FID-digits of the same model is far higher at
250 samples than at 1000), so no interval computed from one set of n samples can cover "the"
FID of a model. The intervals here cover **the metric's expected value at this n against this
reference**: the score another, independent set of n samples from the same model would give on
average. That is what a comparison between two runs with equal n needs (the bias is then
shared), and it is what `benchmarks/interval_coverage.py` checks on disjoint seed blocks.

Bootstrap metrics (FID-digits, FID, sFID, KID, IS)
    B resamples of the generated set's features with replacement (seeded; the reference's
    statistics and features stay fixed). A resample has duplicated points, which biases a
    Fréchet distance upward by about as much as the n-sample bias itself, so the percentile
    interval of the replicates would sit above the value. The interval is therefore the
    replicates' spread re-centred on the value: ``value + quantile(T* − mean(T*), [2.5 %, 97.5 %])``
    (method ``bootstrap``).
Fréchet distances (FID-digits, FID, sFID): a double bootstrap
    When the feature dimension is not small against n (64-d features at a few hundred
    samples), a Fréchet distance's spread is dominated by its small-sample term, and the
    bootstrap's own resamples, drawn from a set whose covariance spectrum is already spread
    by sampling, exaggerate it: on the embedded model at 250 samples the plain bootstrap's
    standard deviation is about twice the spread of independent sample sets
    (`benchmarks/interval_coverage.py`). The interval's deviations are therefore scaled by
    sd(T*) / mean sd(T**), where T** are resamples of resamples: the inflation one bootstrap
    level adds, estimated one level down and removed (a factor of 1 when there is none, as for
    a statistic linear in the samples; never above 1). Method ``double-bootstrap``, with the
    factor as `correction`.
Proportions (class accuracy, precision)
    Wilson score interval over the n samples (each sample is a Bernoulli trial: classified
    right, or inside the reference manifold, whose radii are fixed by the reference).
CLIP score
    Normal interval of the mean of the per-image scores.
Recall
    No interval: it depends on the samples' own k-NN radii, which a resample with duplicated
    points collapses; the manifest says so.

Cost. A Fréchet replicate needs the resample's covariance and one symmetric eigenproblem of
the feature dimension. With the reference's Σ_r^½ computed once, the trace term is
Σ sqrt(eig(cov(X[I] Σ_r^½))), so a replicate is one covariance (n·d²) plus one ``eigvalsh``
(d³), or, when n < d, the n×n Gram matrix of the resample (n²·d plus n³). At 64-d (FID-digits)
1000 replicates take well under a second; at 2048-d (Inception pool3) each replicate costs
roughly what one FID does (a few seconds on a CPU at 50,000 samples), so pass a smaller
`resamples` (or 0 for none) on a CPU at paper scale. KID's replicates use kernel matrices
computed once (n × n within the samples, and each sample's mean kernel value against up to
5,000 reference points); beyond 5,000 samples the bootstrap runs on a seeded subset of 5,000
and its deviations are scaled by sqrt(5,000 / n) (the estimator's spread falls as 1/sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy.stats import norm

from lowbitdm_cli.evaluation.metrics import inception_score

__all__ = [
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "LEVEL",
    "bootstrap_indices",
    "bootstrap_interval",
    "frechet_interval",
    "frechet_replicates",
    "inception_score_replicates",
    "kid_replicates",
    "mean_interval",
    "recentred_interval",
    "wilson_interval",
]

LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
KID_BOOTSTRAP_CAP = 5_000
_CHUNK = 64  # replicates whose indices are drawn at once


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2))


def bootstrap_indices(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The resamples' indices, one array of n indices in [0, n) per replicate, in a fixed order.

    Replicate b is drawn from ``numpy.random.default_rng([seed, b])``, so its indices depend only on
    (seed, b, n), not on how many replicates are asked for or how they are batched.
    """
    if n < 1:
        raise ValueError(f"bootstrap needs at least one sample, got {n}")
    for b in range(resamples):
        yield np.random.default_rng([int(seed), b]).integers(0, n, n)


def recentred_interval(value: float, replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """``value + quantile(replicates − mean(replicates), [(1 − level)/2, (1 + level)/2])``."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2:
        raise ValueError(f"need at least 2 finite bootstrap replicates, got {len(reps)}")
    lo, hi = np.quantile(reps - reps.mean(), [(1 - level) / 2, (1 + level) / 2])
    return float(value + lo), float(value + hi)


def bootstrap_interval(value: float, statistic: Callable[[np.ndarray], float], n: int, resamples: int,
                       seed: int, level: float = LEVEL) -> tuple[float, float]:
    """The re-centred bootstrap interval of any statistic of the samples' indices (the naive way:
    `statistic(indices)` once per replicate). Used for the tests' references and small metrics."""
    reps = np.array([statistic(idx) for idx in bootstrap_indices(n, resamples, seed)])
    return recentred_interval(value, reps, level)


def _sym(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(_sym(np.asarray(m, dtype=np.float64)))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


class _FrechetBootstrap:
    """What every replicate against one reference shares: Σ_r^½ (one eigh), Y = X Σ_r^½, Tr Σ_r."""

    def __init__(self, feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> None:
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least 2 feature vectors [n, d], got shape {x.shape}")
        self.x = x
        self.mu_r = np.asarray(ref_mu, dtype=np.float64)
        sigma_r = _sym(np.asarray(ref_sigma, dtype=np.float64))
        self.y = x @ _sqrt_psd(sigma_r)
        self.tr_r = float(np.trace(sigma_r))

    def value(self, idx: np.ndarray) -> float:
        """d²(I) = |μ_I − μ_r|² + Tr Σ_I + Tr Σ_r − 2 Σ sqrt(eig(cov(Y[I])))."""
        xi, yi = self.x[idx], self.y[idx]
        n, d = xi.shape
        mu = xi.mean(0)
        xc, yc = xi - mu, yi - yi.mean(0)
        tr_i = float((xc * xc).sum()) / (n - 1)
        if n < d:  # non-zero eigenvalues of YcᵀYc/(n−1) are those of the n×n Gram matrix
            eig = np.linalg.eigvalsh(_sym(yc @ yc.T)) / (n - 1)
        else:
            eig = np.linalg.eigvalsh(_sym(yc.T @ yc)) / (n - 1)
        diff = mu - self.mu_r
        return float(diff @ diff + tr_i + self.tr_r - 2 * np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_replicates(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, resamples: int, seed: int,
                       progress: Callable[[int, int], None] = lambda *_: None) -> np.ndarray:
    """Fréchet distance of each bootstrap resample of `feats` [n, d] to the fixed reference (μ_r, Σ_r).

    d²(I) = |μ_I − μ_r|² + Tr Σ_I + Tr Σ_r − 2 Σ sqrt(eig(Σ_r^½ Σ_I Σ_r^½)), where
    Σ_r^½ Σ_I Σ_r^½ is the covariance of the resampled Y = X Σ_r^½ (computed once).
    """
    boot = _FrechetBootstrap(feats, ref_mu, ref_sigma)
    out = np.empty(resamples)
    for b, idx in enumerate(bootstrap_indices(len(boot.x), resamples, seed)):
        out[b] = boot.value(idx)
        if (b + 1) % 50 == 0 or b + 1 == resamples:
            progress(b + 1, resamples)
    return out


def frechet_interval(value: float, feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, resamples: int,
                     seed: int, level: float = LEVEL, inner: int = 25) -> dict[str, Any]:
    """The double-bootstrap interval of a Fréchet distance (see the module docstring), as
    `MetricInterval` fields: low, high, level, method, resamples, seed, correction.

    T*: `resamples` replicates (`frechet_replicates`). T**: for the first `inner` resamples,
    `inner` resamples of each (seeds derived from `seed`), whose standard deviations are
    averaged. correction = min(1, sd(T*) / mean sd(T**)); the interval is
    ``value + correction · quantile(T* − mean(T*), [(1 − level)/2, (1 + level)/2])``.
    """
    boot = _FrechetBootstrap(feats, ref_mu, ref_sigma)
    n = len(boot.x)
    reps = np.array([boot.value(idx) for idx in bootstrap_indices(n, resamples, seed)])
    correction = 1.0
    if inner >= 2 and n >= 4:
        # resample b of the outer level, resampled again: indices into it, mapped back to the samples
        inner_sd = [float(np.std([boot.value(idx[j]) for j in bootstrap_indices(n, inner, _inner_seed(seed, b))],
                                 ddof=1))
                    for b, idx in enumerate(bootstrap_indices(n, min(inner, resamples), seed))]
        outer = float(np.std(reps, ddof=1))
        if np.mean(inner_sd) > 0:
            correction = min(1.0, outer / float(np.mean(inner_sd)))
    lo, hi = recentred_interval(0.0, reps, level)
    return {"low": float(value + correction * lo), "high": float(value + correction * hi), "level": level,
            "method": "double-bootstrap", "resamples": resamples, "seed": seed, "correction": correction}


def _inner_seed(seed: int, b: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (b + 1)) % (2**63 - 1)


def inception_score_replicates(probs: np.ndarray, split_size: int, resamples: int, seed: int) -> np.ndarray:
    """Inception Score (mean over splits) of each bootstrap resample of the class probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    return np.array([inception_score(p[idx], split_size)[0] for idx in bootstrap_indices(len(p), resamples, seed)])


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid_replicates(feats: np.ndarray, ref_feats: np.ndarray, resamples: int, seed: int,
                   cap: int = KID_BOOTSTRAP_CAP) -> tuple[np.ndarray, float]:
    """The generated-set-dependent part of KID's unbiased MMD² for each bootstrap resample, and the
    factor its deviations are to be scaled by (1, or sqrt(cap / n) when n > cap).

    With the reference fixed, MMD²_u = Σ_{a≠b} k(x_a, x_b) / (n(n−1)) − 2 mean_a r(x_a) + const,
    r(x) the mean kernel value of x against the reference (up to `cap` reference points). For a
    resample with multiplicities w: Σ_{a≠b} = wᵀKw − wᵀ diag(K). Only deviations between
    replicates are meaningful (the constant reference term is left out).
    """
    x, ref = np.asarray(feats, dtype=np.float64), np.asarray(ref_feats, dtype=np.float64)
    if x.ndim != 2 or ref.ndim != 2 or x.shape[1] != ref.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {x.shape} and {ref.shape}")
    if len(x) < 2:
        raise ValueError(f"KID needs at least 2 samples, got {len(x)}")
    rng = np.random.default_rng([int(seed), 0x4B1D])
    scale = 1.0
    if len(x) > cap:
        scale = math.sqrt(cap / len(x))
        x = x[np.sort(rng.choice(len(x), cap, replace=False))]
    if len(ref) > cap:
        ref = ref[np.sort(rng.choice(len(ref), cap, replace=False))]
    n = len(x)
    k = _poly_kernel(x, x)
    diag = np.diag(k).copy()
    r = np.concatenate([_poly_kernel(x[i:i + 1024], ref).mean(1) for i in range(0, n, 1024)])
    out = np.empty(resamples)
    for b, idx in enumerate(bootstrap_indices(n, resamples, seed)):
        w = np.bincount(idx, minlength=n).astype(np.float64)
        out[b] = (w @ k @ w - w @ diag) / (n * (n - 1)) - 2 * (w @ r) / n
    return out, scale


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Normal interval of a mean: mean ± z·sd/√n (sd with n − 1)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        raise ValueError(f"need at least 2 values for an interval of their mean, got {len(v)}")
    half = _z(level) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)
