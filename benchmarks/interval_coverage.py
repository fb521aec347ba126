"""Are `evaluate`'s 95 % intervals honest? Coverage on disjoint seed blocks of the embedded FP model.

Samples K disjoint blocks of n class-balanced images from the full-precision digits model (block
k = `sample.seed=k`, so no two blocks share an initial noise), scores each block as `evaluate`
does (FID-digits with its re-centred bootstrap interval, class accuracy with Wilson's), and
checks what the intervals claim to cover: the metric's expected value at n samples.
The sample seed's blocks are fixed; the bootstrap seed of a block is its first sample seed.

- ``cover mean of others``: how often block k's interval contains the mean of the other K − 1
  blocks' values (an estimate of E[metric at n]). That mean is itself noisy, so an exactly
  calibrated 95 % interval covers it with probability P(|Z| < 1.96 / sqrt(1 + 1/(K − 1)))
  (the ``expected`` column), a little under 95 %.
- ``cover another block``: how often block k's interval contains block j's value (j ≠ k). An
  interval for the mean is not a prediction interval: the expected rate is P(|Z| < 1.96/√2) ≈ 83 %.
- ``boot sd / sd``: the bootstrap's standard deviation (mean over blocks) against the standard
  deviation of the K block values, with that ratio's 95 % range from the chi-square law of the
  K-block estimate (1 is calibrated; the range is wide for small K). For class accuracy the
  "bootstrap" sd is the binomial sqrt(p(1 − p)/n) behind Wilson's interval.
- ``fid_digits`` is the interval `evaluate` records (double bootstrap); ``fid_digits (plain
  bootstrap)`` the single-level bootstrap it corrects, for comparison.
- ``cover pooled``: how often an interval contains the metric of all K·n samples pooled. FID is
  biased in n (higher for fewer samples), so the pooled FID lies below the blocks' values and
  an interval at n is not meant to cover it; this row shows by how much.

The same analysis runs on blocks of 2n (pairs of blocks merged), where intervals should be
about 1/√2 as wide.

    python benchmarks/interval_coverage.py            # 16 blocks x 250 samples, DDIM 50, B = 1000
    python benchmarks/interval_coverage.py --quick    # 4 blocks x 60 samples, DDIM 10, B = 200

Sampled blocks are cached under runs/interval_coverage/ (an interrupted run resumes). Writes
benchmarks/results/interval_coverage.json (interval_coverage_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator
from lowbitdm_cli.evaluation.frechet import feature_statistics, frechet_distance
from lowbitdm_cli.evaluation.intervals import frechet_interval, frechet_replicates, recentred_interval, wilson_interval
from lowbitdm_cli.models.registry import load_model, model_entry
from lowbitdm_cli.sampling import SamplerSettings, balanced_labels, ddim_sample, to_uint8

ROOT = Path(__file__).resolve().parent.parent


def _block(model, settings: SamplerSettings, n: int, seed: int, cache: Path, batch: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    path = cache / f"block-seed{seed}-n{n}-steps{settings.steps}.npz"
    if path.is_file():
        data = np.load(path)
        return data["images"], data["labels"]
    labels = balanced_labels(n, 10)
    images = []
    for lo in range(0, n, batch):
        idx = list(range(lo, min(lo + batch, n)))
        images.append(to_uint8(ddim_sample(model, labels[idx], idx, seed, settings)))
    out = np.concatenate(images)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=out, labels=labels.numpy())
    tmp.replace(path)
    return out, labels.numpy()


def _analyse(name: str, values: np.ndarray, intervals: np.ndarray, sds: np.ndarray, pooled: float | None) -> dict:
    k = len(values)
    loo = np.array([(values.sum() - values[i]) / (k - 1) for i in range(k)])
    cover_mean = float(np.mean((intervals[:, 0] <= loo) & (loo <= intervals[:, 1])))
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    cover_other = float(np.mean([intervals[i, 0] <= values[j] <= intervals[i, 1] for i, j in pairs]))
    sd = float(values.std(ddof=1))
    ratio = float(sds.mean() / sd) if sd > 0 else float("nan")
    # sd_hat² (k−1)/σ² ~ χ²(k−1): the range of σ given sd_hat, hence of boot_sd/σ
    lo_sigma = sd * math.sqrt((k - 1) / stats.chi2.ppf(0.975, k - 1))
    hi_sigma = sd * math.sqrt((k - 1) / stats.chi2.ppf(0.025, k - 1))
    row = {"metric": name, "blocks": k, "mean_value": float(values.mean()), "sd_of_values": sd,
           "mean_boot_sd": float(sds.mean()), "mean_width": float((intervals[:, 1] - intervals[:, 0]).mean()),
           "cover_mean_of_others": cover_mean,
           "expected_cover_mean_of_others": float(2 * stats.norm.cdf(1.959964 / math.sqrt(1 + 1 / (k - 1))) - 1),
           "cover_another_block": cover_other,
           "expected_cover_another_block": float(2 * stats.norm.cdf(1.959964 / math.sqrt(2)) - 1),
           "boot_sd_over_sd": ratio,
           "boot_sd_over_sd_range": [float(sds.mean() / hi_sigma), float(sds.mean() / lo_sigma)] if sd > 0 else None,
           "values": values.tolist(), "intervals": intervals.tolist()}
    if pooled is not None:
        row["pooled_value"] = pooled
        row["cover_pooled"] = float(np.mean((intervals[:, 0] <= pooled) & (pooled <= intervals[:, 1])))
    return row


def _score(ev: DigitsEvaluator, feats: np.ndarray, logits: np.ndarray, labels: np.ndarray, resamples: int,
           seed: int) -> dict:
    mu, sigma = feature_statistics(feats)
    fid = frechet_distance(mu, sigma, ev.ref_mu, ev.ref_sigma)
    double = frechet_interval(fid, feats, ev.ref_mu, ev.ref_sigma, resamples, seed)  # what evaluate records
    reps = frechet_replicates(feats, ev.ref_mu, ev.ref_sigma, resamples, seed)  # the same outer level
    right = int((logits.argmax(1) == labels).sum())
    p = right / len(labels)
    return {"fid": fid, "fid_interval": (double["low"], double["high"]),
            "fid_sd": float(reps.std(ddof=1)) * double["correction"],
            "fid_plain_interval": recentred_interval(fid, reps), "fid_plain_sd": float(reps.std(ddof=1)),
            "fid_correction": double["correction"],
            "acc": p, "acc_interval": wilson_interval(right, len(labels)),
            "acc_sd": math.sqrt(max(p * (1 - p), 1e-12) / len(labels))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 blocks x 60 samples, DDIM 10, 200 resamples")
    parser.add_argument("--blocks", type=int, default=None, help="disjoint seed blocks (even; default 16)")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per block (default 250)")
    parser.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default 1000)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = args.blocks or (4 if args.quick else 16)
    n = args.num_samples or (60 if args.quick else 250)
    resamples = args.resamples or (200 if args.quick else 1000)
    if k < 4 or k % 2:
        parser.error(f"--blocks must be an even number >= 4, got {k}")
    defaults = model_entry("digits").sampler
    settings = SamplerSettings(steps=10 if args.quick else defaults["steps"], eta=defaults["eta"],
                               guidance=defaults["guidance"], clip_x0=defaults["clip_x0"])
    cache = ROOT / "runs" / "interval_coverage"
    cache.mkdir(parents=True, exist_ok=True)
    model, ev = load_model("digits"), DigitsEvaluator()
    t0 = time.time()
    blocks = []
    for seed in range(k):
        images, labels = _block(model, settings, n, seed, cache, batch=250)
        feats, logits = ev.features_and_logits(torch.from_numpy(images))
        blocks.append((feats, logits, labels))
        print(f"block {seed + 1}/{k} ({time.time() - t0:.0f} s)", flush=True)
    sampling_s = time.time() - t0

    all_feats = np.concatenate([b[0] for b in blocks])
    all_logits = np.concatenate([b[1] for b in blocks])
    all_labels = np.concatenate([b[2] for b in blocks])
    pooled_fid = frechet_distance(*feature_statistics(all_feats), ev.ref_mu, ev.ref_sigma)
    pooled_acc = float((all_logits.argmax(1) == all_labels).mean())
    rows = []
    for size, groups in ((n, [[i] for i in range(k)]), (2 * n, [[i, i + 1] for i in range(0, k, 2)])):
        scored = [_score(ev, np.concatenate([blocks[i][0] for i in g]), np.concatenate([blocks[i][1] for i in g]),
                         np.concatenate([blocks[i][2] for i in g]), resamples, seed=g[0]) for g in groups]
        for metric, key, iv_key, sd_key in (("fid_digits", "fid", "fid_interval", "fid_sd"),
                                            ("fid_digits (plain bootstrap)", "fid", "fid_plain_interval",
                                             "fid_plain_sd"),
                                            ("class_accuracy", "acc", "acc_interval", "acc_sd")):
            values = np.array([s[key] for s in scored])
            ivs = np.array([s[iv_key] for s in scored])
            sds = np.array([s[sd_key] for s in scored])
            row = _analyse(metric, values, ivs, sds, pooled_fid if key == "fid" else pooled_acc)
            row["samples_per_block"] = size
            if iv_key == "fid_interval":
                row["mean_correction"] = float(np.mean([s["fid_correction"] for s in scored]))
            rows.append(row)

    print(f"\nFP digits, DDIM {settings.steps}, CFG {settings.guidance}; {k} disjoint seed blocks of {n} "
          f"({k * n} samples, sampled in {sampling_s:.0f} s); bootstrap B = {resamples}; 95 % intervals\n")
    head = ("| metric | n | blocks | mean value | sd of values | mean boot sd | boot sd / sd (95 % range) | "
            "cover mean of others (expected) | cover another block (expected) | pooled value | cover pooled |")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    for r in rows:
        scale = 100 if r["metric"] == "class_accuracy" else 1
        rng = r["boot_sd_over_sd_range"]
        print(f"| {r['metric']} | {r['samples_per_block']} | {r['blocks']} | {scale * r['mean_value']:.2f} | "
              f"{scale * r['sd_of_values']:.2f} | {scale * r['mean_boot_sd']:.2f} | "
              f"{r['boot_sd_over_sd']:.2f} ({rng[0]:.2f}-{rng[1]:.2f}) | "
              f"{100 * r['cover_mean_of_others']:.0f} % ({100 * r['expected_cover_mean_of_others']:.0f} %) | "
              f"{100 * r['cover_another_block']:.0f} % ({100 * r['expected_cover_another_block']:.0f} %) | "
              f"{scale * r['pooled_value']:.2f} | {100 * r['cover_pooled']:.0f} % |")
    for r in rows:
        if "mean_correction" in r:
            print(f"n = {r['samples_per_block']}: mean double-bootstrap correction {r['mean_correction']:.2f}")
    result = {"quick": args.quick, "blocks": k, "samples_per_block": n, "resamples": resamples,
              "sampler": {"steps": settings.steps, "eta": settings.eta, "guidance": settings.guidance},
              "sampling_s": round(sampling_s, 1), "pooled_samples": k * n, "rows": rows}
    name = "interval_coverage_quick.json" if args.quick else "interval_coverage.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
