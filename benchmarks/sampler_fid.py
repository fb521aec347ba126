"""DPM-Solver++(2M) vs DDIM on the embedded digits model: FP FID-digits at equal seeds, and the noise.

Samples `--num-samples` class-balanced images per block (block b = global sample indices
b·N … (b+1)·N − 1, so blocks are disjoint seeds and each is class-balanced), with the registry's
guidance (1.25) and x0 clipping, for

- DDIM 50 steps (the reference setting) and DPM-Solver++(2M) at each of `--dpm-steps`
  (default 10,12,15,20), on every block
- DDIM at the first of `--dpm-steps` on block 0 (what fewer steps alone give)

and scores each block with the digits-features evaluator. The 500-sample noise of FID-digits is
judged two ways: the spread of DDIM 50 over the disjoint seed blocks, and a bootstrap over each
block's samples (features resampled with replacement, 200 times; the paired bootstrap of the
DPM − DDIM difference resamples the same indices for both, since they share seeds). ODE accuracy:
RMS distance of each sampler's x0 to DPM-Solver++(2M) 100 steps on the first 50 samples of block 0.

    python benchmarks/sampler_fid.py            # 500 samples, 2 blocks
    python benchmarks/sampler_fid.py --quick    # 100 samples, 2 blocks, smoke check

Writes benchmarks/results/sampler_fid.json (sampler_fid_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator
from lowbitdm_cli.evaluation.frechet import feature_statistics, frechet_distance
from lowbitdm_cli.export.kernel_probe import cpu_description
from lowbitdm_cli.models.registry import load_model, model_entry
from lowbitdm_cli.sampling import SamplerSettings, balanced_labels, run_sampler, to_uint8

ROOT = Path(__file__).resolve().parent.parent


def sample_block(model, settings: SamplerSettings, lo: int, n: int, batch: int) -> tuple[np.ndarray, torch.Tensor, float]:  # noqa: ANN001
    labels = balanced_labels(lo + n, model.num_classes)[lo:]
    out, t0 = [], time.time()
    with torch.inference_mode():
        for s in range(lo, lo + n, batch):
            idx = list(range(s, min(s + batch, lo + n)))
            out.append(run_sampler(model, labels[s - lo:idx[-1] - lo + 1], idx, 0, settings))
    return torch.cat(out), labels, time.time() - t0


def fid_of(ev: DigitsEvaluator, feats: np.ndarray) -> float:
    mu, sigma = feature_statistics(feats)
    return float(frechet_distance(mu, sigma, ev.ref_mu, ev.ref_sigma))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 samples per block")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per block (default 500)")
    parser.add_argument("--blocks", type=int, default=2, help="disjoint seed blocks (>= 2 for the spread)")
    parser.add_argument("--dpm-steps", default="10,12,15,20",
                        help="comma-separated DPM-Solver++(2M) step counts (default 10,12,15,20); DDIM also "
                             "runs at the first one, on block 0")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.num_samples or (100 if args.quick else 500)
    dpm_steps = [int(v) for v in str(args.dpm_steps).split(",") if v.strip()]
    d = model_entry("digits").sampler
    common = {"guidance": d["guidance"], "clip_x0": d["clip_x0"], "eta": 0.0}
    dpms = [f"dpmpp2m{k}" for k in dpm_steps]
    ddim_low = f"ddim{dpm_steps[0]}"
    settings = {"ddim50": SamplerSettings(steps=50, **common),
                **{f"dpmpp2m{k}": SamplerSettings(steps=k, sampler="dpmpp2m", **common) for k in dpm_steps},
                ddim_low: SamplerSettings(steps=dpm_steps[0], **common)}
    model = load_model("digits")
    ev = DigitsEvaluator()
    rng = np.random.default_rng(0)
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    feats: dict[tuple[str, int], np.ndarray] = {}
    x0_first: dict[str, torch.Tensor] = {}
    out_path = ROOT / "benchmarks" / "results" / ("sampler_fid_quick.json" if args.quick else "sampler_fid.json")
    order = [(b, k) for b in range(args.blocks) for k in settings if k != ddim_low] + [(0, ddim_low)]
    for b, name in order:  # DDIM 50 and every DPM setting, block by block; DDIM at the low step count last
        st = settings[name]
        x, labels, wall = sample_block(model, st, b * n, n, args.batch_size)
        f, logits = ev.features_and_logits(torch.from_numpy(to_uint8(x)))
        feats[(name, b)] = f
        acc = float((torch.from_numpy(logits).argmax(1) == labels).float().mean())
        boot = [fid_of(ev, f[rng.integers(0, n, n)]) for _ in range(args.bootstrap)]
        runs[name].append({"block": b, "fid_digits": fid_of(ev, f), "class_accuracy": acc,
                           "bootstrap_sd": float(np.std(boot, ddof=1)), "sampling_s": round(wall, 1)})
        if b == 0:
            x0_first[name] = x[:min(50, n)]
        print(f"block {b} {name:<10} FID-digits {runs[name][-1]['fid_digits']:6.2f}  "
              f"(bootstrap sd {runs[name][-1]['bootstrap_sd']:.2f})  acc {100 * acc:5.1f}%  {wall:6.0f} s",
              flush=True)
        out_path.write_text(json.dumps({"partial": True, "quick": args.quick, "num_samples_per_block": n,
                                        "runs": runs}, indent=2) + "\n")
    # paired bootstrap of FID(dpm) - FID(ddim50) on each block (same indices for both: shared seeds)
    paired: dict[str, list[dict]] = {}
    for dpm in dpms:
        paired[dpm] = []
        for b in range(args.blocks):
            fa, fb = feats[(dpm, b)], feats[("ddim50", b)]
            diffs = []
            for _ in range(args.bootstrap):
                i = rng.integers(0, n, n)
                diffs.append(fid_of(ev, fa[i]) - fid_of(ev, fb[i]))
            paired[dpm].append({"block": b, "diff": fid_of(ev, fa) - fid_of(ev, fb),
                                "paired_bootstrap_sd": float(np.std(diffs, ddof=1))})
    # ODE accuracy on the first 50 samples of block 0
    m = min(50, n)
    ref, _, _ = sample_block(model, SamplerSettings(steps=100, sampler="dpmpp2m", **common), 0, m, m)
    rms = {k: float((v - ref).pow(2).mean().sqrt()) for k, v in x0_first.items()}

    ddim_fids = [r["fid_digits"] for r in runs["ddim50"]]
    spread_sd = float(np.std(ddim_fids, ddof=1)) if len(ddim_fids) > 1 else float("nan")
    boot_sd = float(np.mean([r["bootstrap_sd"] for r in runs["ddim50"]]))
    noise = max(spread_sd, boot_sd)
    mean_diff = {dpm: float(np.mean([p["diff"] for p in paired[dpm]])) for dpm in dpms}
    within = {dpm: abs(v) <= noise for dpm, v in mean_diff.items()}  # within one sd of one N-sample FID

    print(f"\nCPU: {_cpu()} (torch ISA {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}); {n} class-balanced samples per block, {args.blocks} disjoint "
          f"seed blocks, guidance {common['guidance']}, x0 clipping; one block's samples share seeds across samplers")
    print(f"{'sampler':<22} {'steps':>5} " + " ".join(f"{'FID blk' + str(b):>9}" for b in range(args.blocks))
          + f" {'mean':>7} {'- DDIM50':>8} {'class acc':>9} {'x0 RMS vs ref':>13} {'s/block':>8}")
    for name, st in settings.items():
        fids = [r["fid_digits"] for r in runs[name]]
        cells = " ".join(f"{f:>9.2f}" for f in fids) + " " * (10 * (args.blocks - len(fids)))
        label = "DPM-Solver++(2M)" if st.sampler == "dpmpp2m" else "DDIM"
        diff = f"{mean_diff[name]:>+8.2f}" if name in mean_diff else f"{'':>8}"
        print(f"{label:<22} {st.steps:>5} {cells} {np.mean(fids):>7.2f} {diff} "
              f"{100 * np.mean([r['class_accuracy'] for r in runs[name]]):>8.1f}% {rms[name]:>13.4f} "
              f"{np.mean([r['sampling_s'] for r in runs[name]]):>8.0f}")
    print(f"\nnoise of a {n}-sample FID-digits (DDIM 50): spread over seed blocks sd {spread_sd:.2f}, bootstrap sd "
          f"{boot_sd:.2f}; criterion: |mean difference| <= 1 sd of one {n}-sample FID of DDIM 50 (the larger "
          f"estimate, {noise:.2f})")
    for dpm in dpms:
        cells = ", ".join(f"block {p['block']} {p['diff']:+.2f} (paired sd {p['paired_bootstrap_sd']:.2f})"
                          for p in paired[dpm])
        print(f"FID({dpm}) - FID(ddim50): {cells}; mean {mean_diff[dpm]:+.2f}: "
              f"{'within' if within[dpm] else 'NOT within'} the noise")
    out = {"quick": args.quick, "cpu": _cpu(), "num_samples_per_block": n, "blocks": args.blocks,
           "settings": {k: v.__dict__ for k, v in settings.items()}, "runs": runs, "paired": paired,
           "x0_rms_vs_dpmpp2m100_first50": rms, "noise": {"seed_block_sd": spread_sd, "bootstrap_sd": boot_sd},
           "mean_diff": mean_diff, "within_noise": within, "threads": args.threads,
           "loadavg_at_end": os.getloadavg()}
    out_path.write_text(json.dumps(out, indent=2) + "\n")


def _cpu() -> str:
    return cpu_description()["model"]


if __name__ == "__main__":
    main()
