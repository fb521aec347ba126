"""Naive PTQ on the embedded digits model at W8A8, W4A8, W4A4 and W2A4, compared in one report.

Runs `run_recipe` (ptq recipe; the FP baseline comes with it) for each bit width, skipping
stages already complete under --runs-dir, then `write_report` into docs/report/: the table,
metric_vs_bits.png (all runs) and samples.png (FP, W8A8, W4A4, W2A4: the same sample indices,
so the same initial noise and class, in every row block) for docs/evaluation.md.

    python benchmarks/report_digits.py            # the recipe's 500 samples per run
    python benchmarks/report_digits.py --quick    # 100 samples per run

Writes docs/report/ and benchmarks/results/report_digits.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbitdm_cli.pipeline import run_recipe
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.report import collect_runs, table, write_report

ROOT = Path(__file__).resolve().parent.parent
BITS = ["w8a8", "w4a8", "w4a4", "w2a4"]
IN_SAMPLES = ["fp", "w8a8", "w4a4", "w2a4"]  # samples.png rows (bits of each run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 samples per run instead of the recipe's 500")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where run folders are kept")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "report_digits.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the report table in docs/evaluation.md was made with DDIM 50 (the digits default is now DPM-Solver++(2M) 20)
    sets = (["sample.num_samples=100", "sample.batch_size=100"] if args.quick else []) + \
        ["sample.sampler=ddim", "sample.steps=50"]

    t0 = time.time()
    run_dirs: list[Path] = []
    for bits in BITS:
        result = run_recipe(load_recipe("ptq", model="digits", bits=bits, sets=sets), args.runs_dir,
                            log=lambda msg: print(msg, flush=True))
        if not run_dirs:
            run_dirs.append(Path(result["rows"][0]["path"]).parent)  # the shared FP baseline
        run_dirs.append(Path(result["run_dir"]))
    runs = collect_runs(run_dirs)
    files = write_report(runs, args.out, samples_of=[r for r in runs if r.bits in IN_SAMPLES])

    headers, rows = table(runs)
    print(" | ".join(headers))
    for row in rows:
        print(" | ".join(row))
    payload = {
        "quick": args.quick, "sets": sets, "threads": args.threads, "torch": torch.__version__,
        "wall_s": round(time.time() - t0, 1),
        "runs": [{k: v for k, v in r.to_dict().items() if k not in ("omq", "path", "head", "samples")} for r in runs],
        "report": {"dir": str(files.out_dir.relative_to(ROOT)) if files.out_dir.is_relative_to(ROOT)
                   else str(files.out_dir), "images": {n: list(s) for n, s in files.sizes.items()}},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {files.markdown}, {files.html} and {args.json}")


if __name__ == "__main__":
    main()
