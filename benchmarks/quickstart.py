"""The README's main job, measured: `lowbitdm run --recipe ptq --bits w8a8` on the embedded model.

Runs the whole chain (FP baseline, calibrate, finetune pass-through, merge, sample,
evaluate) in a fresh runs folder and prints FP vs quantized metrics with wall times.

    python benchmarks/quickstart.py            # the README's setting (500 samples)
    python benchmarks/quickstart.py --quick    # 100 samples, for a smoke check

Writes benchmarks/results/quickstart.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lowbitdm_cli.pipeline import run_recipe
from lowbitdm_cli.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recipe", default="ptq")
    parser.add_argument("--bits", default=["w8a8"], nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sets = ["sample.num_samples=100", "sample.batch_size=100"] if args.quick else []
    runs = Path(tempfile.mkdtemp(prefix="lowbitdm-bench-"))
    results = []
    try:
        for bits in args.bits:
            t0 = time.time()
            out = run_recipe(load_recipe(args.recipe, bits=bits, sets=sets), runs)
            results.append({"bits": bits, "recipe": args.recipe, "total_wall_s": round(time.time() - t0, 1),
                            "rows": out["rows"]})
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    fp = results[0]["rows"][0]["metrics"]
    print(f"{'model':<28} {'FID-digits':>10} {'vs FP':>7} {'class acc':>9} {'merged MB':>9} {'stage s':>8}")
    print(f"{'digits fp32':<28} {fp['fid_digits']:>10.2f} {'':>7} {100 * fp['class_accuracy']:>8.1f}% {'':>9} "
          f"{results[0]['rows'][0]['wall_s']:>8.0f}")
    for r in results:
        q = r["rows"][1]
        m = q["metrics"]
        print(f"{q['label']:<28} {m['fid_digits']:>10.2f} {m['fid_digits'] / fp['fid_digits'] - 1:>+7.1%} "
              f"{100 * m['class_accuracy']:>8.1f}% {q.get('merged_mb') or 0:>9.3f} {q['wall_s']:>8.0f}")
    print(f"whole run (both chains): {sum(r['total_wall_s'] for r in results):.0f} s")
    name = "quickstart_quick.json" if args.quick else "quickstart.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps({"quick": args.quick, "results": results},
                                                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
