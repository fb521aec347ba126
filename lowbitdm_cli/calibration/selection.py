"""Time-aware calibration selection (PTQ4DM, used by PQD arXiv 2501.00124).

- `normal_steps`: trajectory positions whose timesteps follow t ~ N(0.4, 0.4)·T (PTQ4DM),
  instead of Q-Diffusion's uniform spacing (`calibration.data.select_steps`);
- `k_center`: a representative subset of calibration samples by greedy k-centre
  (farthest-point) selection on their features, so the kept set covers the distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NORMAL_MEAN", "NORMAL_STD", "k_center", "normal_steps"]

NORMAL_MEAN = 0.4
NORMAL_STD = 0.4
_DRAWS_PER_STEP = 10_000  # give up after keep × this many draws (only for pathologically thin tails)
_CHUNK = 256


def _position_fractions(num_steps: int, timesteps: Sequence[int] | None,
                        num_train_timesteps: int | None) -> torch.Tensor:
    """t/T of each trajectory position (position 0 is the noisiest)."""
    if timesteps is None:
        # DDIM's descending sub-sequence t_i = (n − 1 − i)·T/n (`sampling.ddim_timesteps`)
        return torch.tensor([(num_steps - 1 - i) / num_steps for i in range(num_steps)], dtype=torch.float64)
    if len(timesteps) != num_steps:
        raise ValueError(f"got {len(timesteps)} timesteps for {num_steps} trajectory steps")
    if not num_train_timesteps:
        raise ValueError("normal_steps needs num_train_timesteps together with timesteps")
    return torch.tensor([float(t) for t in timesteps], dtype=torch.float64) / num_train_timesteps


def normal_steps(num_steps: int, keep: int | None, seed: int, *, timesteps: Sequence[int] | None = None,
                 num_train_timesteps: int | None = None) -> list[int]:
    """`keep` distinct trajectory positions with t ~ N(0.4·T, (0.4·T)²), sorted ascending.

    Each draw u ~ N(0.4, 0.4) is clamped to [0, 1] (t = u·T on the trajectory) and mapped
    to the position whose timestep is nearest (ties: the lower position). `timesteps`
    (the trajectory's timestep values, one per position) and `num_train_timesteps` (T)
    give the exact mapping; without them DDIM's uniform spacing t_i = (n − 1 − i)·T/n is
    assumed. Duplicates: draws continue, in order from one seeded stream, until `keep`
    distinct positions are found, so the result depends only on the arguments. `keep`
    None or ≥ `num_steps` returns every position; if `keep`·10,000 draws do not find
    `keep` distinct positions, the ones found are returned (fewer than `keep`).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if keep is None or keep >= num_steps:
        return list(range(num_steps))
    fracs = _position_fractions(num_steps, timesteps, num_train_timesteps)
    gen = torch.Generator().manual_seed(int(seed))
    chosen: list[int] = []
    seen: set[int] = set()
    drawn = 0
    while len(chosen) < keep and drawn < keep * _DRAWS_PER_STEP:
        u = (torch.randn(_CHUNK, generator=gen, dtype=torch.float64) * NORMAL_STD + NORMAL_MEAN).clamp(0.0, 1.0)
        # argmin returns the first minimum: ties go to the lower position
        positions = (u[:, None] - fracs[None, :]).abs().argmin(dim=1).tolist()
        for p in positions:
            drawn += 1
            if p not in seen:
                seen.add(p)
                chosen.append(p)
                if len(chosen) == keep:
                    break
    return sorted(chosen)


def k_center(features: torch.Tensor, k: int, seed: int) -> list[int]:
    """Greedy k-centre (farthest-point) selection: indices into `features` [N, D], in pick order.

    The first centre is drawn uniformly with `seed`; each next one is the sample farthest
    (Euclidean) from all centres chosen so far (ties: the lowest index). The result is
    deterministic for given features, k and seed; every prefix is itself a greedy
    selection. `k` ≥ N returns all N indices (in pick order).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = features.detach().double()
    n = x.shape[0]
    k = min(k, n)
    gen = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=gen))
    picks = [first]
    min_dist = (x - x[first]).pow(2).sum(dim=1)
    min_dist[first] = -1.0  # never pick a centre twice, even among duplicates
    while len(picks) < k:
        nxt = int(min_dist.argmax())
        picks.append(nxt)
        min_dist = torch.minimum(min_dist, (x - x[nxt]).pow(2).sum(dim=1))
        min_dist[picks] = -1.0
    return picks
