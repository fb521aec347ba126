"""Full-precision quality of the embedded digits model (issue 2's acceptance numbers).

Samples class-balanced images with the model's own sampler (the registry's: DPM-Solver++(2M) 10
steps for both embedded models; `--ddim` for DDIM 50, η = 0) at the registry's guidance scale or
each of `--guidance`, for sample seeds 0 .. --seeds−1 (the seeds `sample` uses), scores them with
the digits-features evaluator, and compares with the floor set by real data: FID-digits of the
held-out split against the train-split statistics.

    python benchmarks/digits_fp.py            # 1000 samples, seed 0
    python benchmarks/digits_fp.py --quick    # 200 samples
    python benchmarks/digits_fp.py --model digits-dit --guidance 1.25 1.35 1.4 1.5   # the transformer's CFG sweep

Writes benchmarks/results/digits_fp.json and docs/digits_grid.png (10 classes x 10 samples);
digits_fp_digits-dit.json and docs/digits_dit_grid.png with --model digits-dit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator
from lowbitdm_cli.models.digits import load_digits_split
from lowbitdm_cli.models.registry import load_model, model_entry
from lowbitdm_cli.sampling import SamplerSettings, balanced_labels, run_sampler, save_grid, to_uint8

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 samples (20 steps with --ddim)")
    parser.add_argument("--ddim", action="store_true", help="DDIM 50 steps, η 0, instead of the model's sampler")
    parser.add_argument("--seeds", type=int, default=1, help="sample seeds 0 .. N-1, one row each")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--guidance", type=float, nargs="*", default=None,
                        help="guidance scales to compare (default: the registry's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="digits", help="digits (the UNet) or digits-dit (the transformer)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.num_samples or (200 if args.quick else 1000)
    defaults = model_entry(args.model).sampler
    sampler, steps = ("ddim", 20 if args.quick else 50) if args.ddim else (defaults["sampler"], defaults["steps"])
    scales = args.guidance or [defaults["guidance"]]
    model = load_model(args.model)
    ev = DigitsEvaluator()
    split = load_digits_split()
    floor = ev.evaluate(split.held_out_images, split.held_out_labels)
    rows = []
    for g in scales:
        for seed in range(args.seeds):
            settings = SamplerSettings(steps=steps, eta=0.0, guidance=g, clip_x0=defaults["clip_x0"], sampler=sampler)
            labels = balanced_labels(n, 10)
            t0 = time.time()
            images = []
            for lo in range(0, n, 250):
                idx = list(range(lo, min(lo + 250, n)))
                images.append(to_uint8(run_sampler(model, labels[idx], idx, seed, settings)))
            imgs = torch.from_numpy(np.concatenate(images))
            wall = time.time() - t0
            r = ev.evaluate(imgs, labels)
            rows.append({"guidance": g, "seed": seed, "sampler": sampler, "steps": steps, "eta": 0.0,
                         "num_samples": n, "fid_digits": r["fid_digits"], "class_accuracy": r["class_accuracy"],
                         "sampling_s": round(wall, 1), "fid_ratio_to_floor": r["fid_digits"] / floor["fid_digits"]})
            if g == scales[0] and seed == 0 and not args.quick:
                # 10 x 10 grid: row = sample round, column = class
                grid = imgs.numpy()[:100]
                save_grid(grid, ROOT / "docs" / f"{args.model.replace('-', '_')}_grid.png", nrow=10, scale=3)
    print(f"{sampler} {steps} steps")
    print(f"{'guidance':>8} {'seed':>4} {'samples':>7} {'FID-digits':>10} {'x floor':>7} {'class acc':>9} {'sampling s':>10}")
    print(f"{'real':>8} {'-':>4} {int(floor['num_images']):>7} {floor['fid_digits']:>10.2f} {1.0:>7.2f} "
          f"{100 * floor['class_accuracy']:>8.1f}% {'-':>10}   (held-out split vs train statistics)")
    for r in rows:
        print(f"{r['guidance']:>8.2f} {r['seed']:>4} {r['num_samples']:>7} {r['fid_digits']:>10.2f} {r['fid_ratio_to_floor']:>7.2f} "
              f"{100 * r['class_accuracy']:>8.1f}% {r['sampling_s']:>10.1f}")
    out = {"floor": {"fid_digits": floor["fid_digits"], "class_accuracy": floor["class_accuracy"],
                     "num_images": floor["num_images"]}, "rows": rows, "quick": args.quick,
           "sampler": sampler, "steps": steps}
    stem = "digits_fp" if args.model == "digits" else f"digits_fp_{args.model}"
    name = f"{stem}_quick.json" if args.quick else f"{stem}.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
