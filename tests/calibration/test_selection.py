"""Time-aware calibration selection: PTQ4DM normal timesteps and greedy k-centre samples."""

from __future__ import annotations

import pytest
import scipy.stats
import torch

from lowbitdm_cli.calibration.selection import k_center, normal_steps
from lowbitdm_cli.sampling import ddim_timesteps


def test_normal_steps_deterministic_sorted_distinct_in_range():
    ts = ddim_timesteps(1000, 50)
    a = normal_steps(50, 12, seed=3, timesteps=ts, num_train_timesteps=1000)
    assert a == normal_steps(50, 12, seed=3, timesteps=ts, num_train_timesteps=1000)
    assert a != normal_steps(50, 12, seed=4, timesteps=ts, num_train_timesteps=1000)
    assert len(a) == 12 and a == sorted(set(a)) and 0 <= a[0] and a[-1] < 50
    # without timesteps, DDIM's uniform spacing is assumed: the same positions for T = 1000
    assert normal_steps(50, 12, seed=3) == a


@pytest.mark.parametrize("keep", [None, 5, 9], ids=["all", "equal", "more"])
def test_normal_steps_short_trajectory_returns_everything(keep):
    assert normal_steps(5, keep, seed=0) == [0, 1, 2, 3, 4]


def test_normal_steps_concentrate_around_0_4_T():
    # first draw of many seeds: t/T follows N(0.4, 0.4) clamped to [0, 1] (up to the 1/100 grid)
    ts = ddim_timesteps(1000, 100)
    fracs = torch.tensor([ts[normal_steps(100, 1, seed=s, timesteps=ts, num_train_timesteps=1000)[0]] / 1000
                          for s in range(3000)])
    z0, z1 = (0 - 0.4) / 0.4, (1 - 0.4) / 0.4
    # E[clamp(X, 0, 1)] for X ~ N(0.4, 0.4²)
    mean = 0.4 * (scipy.stats.norm.cdf(z1) - scipy.stats.norm.cdf(z0)) \
        + 0.4 * (scipy.stats.norm.pdf(z0) - scipy.stats.norm.pdf(z1)) + (1 - scipy.stats.norm.cdf(z1))
    # 3000 seeded draws (the same up to the last bits of torch's normal transform, which moves a pick only at a
    # tie with the 1/100 grid): the standard error of the mean is 0.35/sqrt(3000) ≈ 0.0064,
    # so ±0.02 is > 3 s.e. plus the 1/100 grid; the median's s.e. is ≈ 0.009
    assert fracs.mean().item() == pytest.approx(mean, abs=0.02)
    assert fracs.median().item() == pytest.approx(0.4, abs=0.03)
    assert 0.0 <= fracs.min() and fracs.max() <= 0.99


def test_normal_steps_selected_set_leans_to_0_4_T():
    ts = ddim_timesteps(1000, 100)
    picks = normal_steps(100, 20, seed=0, timesteps=ts, num_train_timesteps=1000)
    centre = sum(ts[p] for p in picks) / len(picks) / 1000
    assert abs(centre - 0.4) < 0.12  # 20 seeded picks of s.d. 0.35 (s.e. ≈ 0.08): a property of the seed, not the CPU


def _planted(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(60, 5, generator=gen) * 0.1
    far = [7, 23, 41]
    for i, (d, s) in zip(far, [(0, 10.0), (2, -20.0), (4, 30.0)]):
        feats[i, d] = s
    return feats, far


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_center_picks_planted_far_points_first(seed):
    feats, far = _planted()
    picks = k_center(feats, 4, seed)
    assert set(far) <= set(picks)
    if picks[0] not in far:  # after a central first pick, the farthest comes next
        assert picks[1] == 41
    assert picks == k_center(feats, 4, seed)
    assert k_center(feats, 10, seed)[:4] == picks  # a prefix is itself the greedy selection


def test_k_center_all_and_duplicates():
    feats, _ = _planted()
    assert sorted(k_center(feats, 100, 0)) == list(range(60))
    same = torch.ones(6, 3)
    assert sorted(k_center(same, 6, 0)) == list(range(6))
    with pytest.raises(ValueError):
        k_center(torch.ones(6), 2, 0)
