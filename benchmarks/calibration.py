"""Calibration methods on the embedded digits model: naive PTQ (min-max and MSE init),
Q-Diffusion (BRECQ + AdaRound + LSQ) and PQD (time-aware selection + QDrop reconstruction)
at W8A8, W4A8 and W4A4, side by side with the FP baseline.

Every run samples the same class-balanced images (same seeds) and is scored by the embedded
evaluator; `calibrate s` is the calibrate stage's wall time (calibration data, init and
reconstruction). Stages already finished under --runs-dir are reused, so an interrupted run
resumes.

    python benchmarks/calibration.py            # 250 samples per run, the recipes' settings
    python benchmarks/calibration.py --quick    # 50 samples, 20 reconstruction iterations

Writes benchmarks/results/calibration.json (or calibration_quick.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _matrix import FULL_SETS, QUICK_SETS, ROOT, Case, fmt, print_table, run_cases, write_results

ABLATIONS = [  # --ablations: (label, recipe, bits, sets, run folder name)
    ("qdiffusion, no act-step learning", "qdiffusion", "w4a4", ("calibrate.recon_act_lr=0",), "qdiffusion-noactlr"),
]
BITS = ["w4a8", "w4a4", "w8a8"]  # W4A8 first: the setting the claim is about
METHODS = [
    ("ptq minmax", "ptq", ()),
    ("ptq mse", "ptq", ("quant.weight_init=mse", "quant.act_init=mse")),
    ("qdiffusion", "qdiffusion", ()),
    ("pqd", "pqd", ()),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 samples per run and 20 reconstruction iterations")
    parser.add_argument("--bits", nargs="*", default=BITS)
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/ (runs-quick/ with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablations", action="store_true", help="also run the ABLATIONS cases (diagnostics)")
    parser.add_argument("--reverse", action="store_true",
                        help="work through the cases from the end (a second process can share the work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs_dir = args.runs_dir or ROOT / ("runs-quick" if args.quick else "runs")
    common = QUICK_SETS if args.quick else FULL_SETS
    quick_recon = ("calibrate.recon_iters=20",) if args.quick else ()

    cases = []
    for bits in args.bits:
        for label, recipe, sets in METHODS:
            recon = quick_recon if recipe in ("qdiffusion", "pqd") else ()
            run_name = recipe if label in ("ptq minmax", recipe) else label.replace(" ", "-")
            cases.append(Case(label=label, recipe=recipe, bits=bits, sets=(*sets, *recon), run_name=run_name))

    if args.ablations:
        cases += [Case(label=label, recipe=recipe, bits=bits, sets=(*sets, *quick_recon), run_name=name)
                  for label, recipe, bits, sets, name in ABLATIONS]
    t0 = time.time()
    fp, rows = run_cases(cases, runs_dir, common, reverse=args.reverse)
    headers = ["bits", "method", "FID-digits ↓", "vs FP", "class acc ↑", "calibrate s"]
    fp_fid = fp.metrics["fid_digits"]
    table = [["fp32", "-", fmt(fp_fid, ".2f"), "1.00x", fmt(100 * fp.metrics["class_accuracy"], ".1f") + "%", "-"]]
    for r in rows:
        fid = r.metrics["fid_digits"]
        table.append([r.bits, r.label, fmt(fid, ".2f"), f"{fid / fp_fid:.2f}x",
                      fmt(100 * r.metrics["class_accuracy"], ".1f") + "%", fmt(r.calibrate_s, ".0f")])
    markdown = print_table(headers, table)

    verdicts = {}
    for bits in args.bits:
        by = {r.label: r.metrics["fid_digits"] for r in rows if r.bits == bits}
        if "ptq minmax" not in by:
            continue
        best = min(("qdiffusion", "pqd"), key=lambda m: by[m])
        gain = 1 - by[best] / by["ptq minmax"]
        verdicts[bits] = {"best_reconstruction": best, "fid": by[best], "ptq_minmax_fid": by["ptq minmax"],
                          "ptq_mse_fid": by["ptq mse"], "fid_reduction_vs_minmax": round(gain, 4)}
        print(f"{bits}: best reconstruction {best} FID-digits {by[best]:.2f} vs ptq minmax {by['ptq minmax']:.2f} "
              f"({100 * gain:.1f} % lower), ptq mse {by['ptq mse']:.2f}")

    write_results("calibration", args, common, time.time() - t0, fp, rows, markdown, verdicts=verdicts)


if __name__ == "__main__":
    main()
