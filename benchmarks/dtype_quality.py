"""What bf16 compute does to quality on the embedded digits model: FID-digits and class accuracy of
the FP model and of naive PTQ at W8A8 and W4A4, each sampled with ``sample.dtype=fp32`` and with
``sample.dtype=bf16`` (`models.precision`: everything around the quantized layers in bf16, the whole
FP model in bf16), from the same calibrated and merged checkpoints, same seeds and labels.

The chain is `lowbitdm run` (`_matrix.run_cases`): calibrate (ptq recipe) → merge → sample on the
integer runtime → evaluate; the FP baseline per dtype comes with it. Stages already finished under
--runs-dir are reused.

    python benchmarks/dtype_quality.py                    # 1000 samples per run, 1 seed
    python benchmarks/dtype_quality.py --num-samples 250  # fewer (state it with the numbers)
    python benchmarks/dtype_quality.py --quick            # 50 samples

bf16 needs a CPU that runs it natively for speed, but runs anywhere (emulated, slowly).
Writes benchmarks/results/dtype_quality.json (or dtype_quality_quick.json).
"""

from __future__ import annotations

import argparse
import time

from _matrix import Case, add_matrix_args, cell, fmt, matrix_setup, print_table, run_cases, write_results

DTYPES = ["fp32", "bf16"]
BITS = ["w8a8", "w4a4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 samples per run")
    parser.add_argument("--bits", nargs="*", default=BITS)
    add_matrix_args(parser)
    args = parser.parse_args()
    if args.seeds is None:
        args.seeds = 1
    runs_dir, common = matrix_setup(args, parser)
    t0 = time.time()
    results = {}
    for dtype in DTYPES:  # each dtype its own FP baseline (the sample digest includes bf16)
        cases = [Case(label=f"ptq {dtype}", recipe="ptq", bits=bits, sets=(f"sample.dtype={dtype}",),
                      run_name=f"ptq-{dtype}") for bits in args.bits]
        results[dtype] = run_cases(cases, runs_dir, [*common, f"sample.dtype={dtype}"], seeds=args.seeds)
    headers = ["model", "dtype", "FID-digits ↓ [95 %]", "bf16 − fp32", "class acc ↑ [95 %]",
               "bf16 − fp32 (pts)"]
    table, rows = [], []
    for bits in ["fp", *args.bits]:
        pair = {}
        for dtype in DTYPES:
            fp_row, quant_rows = results[dtype]
            pair[dtype] = fp_row if bits == "fp" else next(r for r in quant_rows if r.bits == bits)
        for dtype in DTYPES:
            r = pair[dtype]
            d_fid = r.metrics["fid_digits"] - pair["fp32"].metrics["fid_digits"]
            d_acc = 100 * (r.metrics["class_accuracy"] - pair["fp32"].metrics["class_accuracy"])
            table.append([bits.upper() if bits != "fp" else "FP", dtype, cell(r, "fid_digits"),
                          "-" if dtype == "fp32" else fmt(d_fid, "+.2f"), cell(r, "class_accuracy"),
                          "-" if dtype == "fp32" else fmt(d_acc, "+.1f")])
            rows.append(r)
    markdown = print_table(headers, table)
    write_results("dtype_quality", args, common, time.time() - t0, results["fp32"][0], rows, markdown,
                  fp_bf16=results["bf16"][0].to_dict())


if __name__ == "__main__":
    main()
