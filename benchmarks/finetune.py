"""Finetuning methods on the embedded digits model, side by side with naive PTQ and FP:
EfficientDM (QALoRA + TALSQ), QuEST, full QAT, MPQ-DM (OMQ + TRD) and lowbitdm's EfficientDM+
(8-bit 1x1 shortcuts + student-trajectory distillation) at W4A4, W3A4 and W2A4 — each with its
recipe's settings (recipes/*.toml); `--ablations` adds MPQ-DM's parts apart (OMQ only, TRD
only) at W2A4 and EfficientDM+'s at EfficientDM's 8 epochs (both changes, and 8-bit shortcuts
only, at every width; student trajectory only at W4A4).

Columns: FID-digits and class accuracy of the same class-balanced samples (same seeds), the
calibrate and finetune stages' wall times, the finetune stage's own peak RSS, the fraction
of parameters trained, and the MAC-weighted mean weight / activation bits of the layer policy
(`lowbitdm_cli.quant.cost`: recipes of one nominal width differ where they keep layers at 8 bits). Then the issues' targets, each with the measured numbers and whether it
is met. Finished stages under --runs-dir are reused, so an interrupted run resumes.

    python benchmarks/finetune.py              # the docs/methods.md table: 1000 samples per run, 3 seeds
    python benchmarks/finetune.py --ablations  # and the MPQ-DM ablation rows
    python benchmarks/finetune.py --quick      # 50 samples, 1 seed, 1 finetune epoch (a smoke run)
    python benchmarks/finetune.py --methods efficientdm-plus --keep-previous   # rerun some rows only

Each FID-digits and class-accuracy cell shows its 95 % interval: with N > 1 seeds the mean over
N seeds (calibration, finetuning and sampling redrawn) and the t interval of that mean, else the
run's own evaluate interval (bootstrap / Wilson). A target comparing two methods also says
whether their intervals are disjoint (significant) or overlap (not significant).

Writes benchmarks/results/finetune.json (or finetune_quick.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _matrix import (
    Case,
    Row,
    add_matrix_args,
    cell,
    disjoint,
    fmt,
    keep_previous_rows,
    matrix_setup,
    print_table,
    run_cases,
    write_results,
)

BITS = ["w4a4", "w3a4", "w2a4"]
METHODS = ["ptq", "efficientdm", "quest", "qat", "mpqdm", "efficientdm-plus"]  # the label is the recipe's name
# --ablations: a method's parts apart, (label, recipe, bits, sets, run folder name) by method.
# MPQ-DM's two parts at W2A4 (the paper's ablation, Table 3 of MPQ-DM); EfficientDM+'s two
# changes to EfficientDM apart at EfficientDM's 8 epochs (the 8-bit shortcuts at every width, the
# student trajectory at W4A4), and both at 8 epochs (the recipe trains 24).
ABLATIONS = {
    "mpqdm": [
        ("mpqdm omq only", "mpqdm", "w2a4", ("finetune.loss=mse",), "mpqdm-omq-only"),
        ("mpqdm trd only", "mpqdm", "w2a4", ("calibrate.mixed=none",), "mpqdm-trd-only"),
    ],
    "efficientdm-plus": [
        *(("efficientdm-plus 8 epochs", "efficientdm-plus", bits, ("finetune.epochs=8",), "efficientdm-plus-8-epochs")
          for bits in BITS),
        *(("efficientdm-plus 8-bit shortcuts only, 8 epochs", "efficientdm-plus", bits,
           ('finetune.trajectory="teacher"', "finetune.epochs=8"), "efficientdm-plus-shortcut8-only") for bits in BITS),
        ("efficientdm-plus student trajectory only, 8 epochs", "efficientdm-plus", "w4a4",
         ('quant.keep_8bit=["time_embedding", "conv_in", "conv_out"]', "finetune.epochs=8"),
         "efficientdm-plus-trajectory-only"),
    ],
}
ABLATION_ROWS = [a for rows in ABLATIONS.values() for a in rows]


def _targets(fp: Row, rows: list[Row]) -> list[dict]:
    by = {(r.label, r.bits): r for r in rows}
    fid = {k: r.metrics["fid_digits"] for k, r in by.items()}
    fp_fid = fp.metrics["fid_digits"]
    out = []

    def target(name: str, measured: str, met: bool, a: Row | None = None, b: Row | None = None) -> None:
        sig = disjoint(a, b, "fid_digits") if a is not None and b is not None else None
        if a is not None and b is not None:
            measured += ("; no intervals" if sig is None else "; intervals disjoint (significant)" if sig else
                         "; intervals overlap (not significant)")
        out.append({"target": name, "measured": measured, "met": met, "intervals_disjoint": sig})

    if ("efficientdm", "w4a4") in fid and ("ptq", "w4a4") in fid:
        e, p = fid["efficientdm", "w4a4"], fid["ptq", "w4a4"]
        target("EfficientDM W4A4 FID-digits <= 0.5 x naive PTQ W4A4", f"{e:.2f} vs {p:.2f} ({e / p:.2f}x)", e <= 0.5 * p,
               by["efficientdm", "w4a4"], by["ptq", "w4a4"])
        target("EfficientDM W4A4 FID-digits <= 1.5 x FP", f"{e:.2f} vs FP {fp_fid:.2f} ({e / fp_fid:.2f}x)",
               e <= 1.5 * fp_fid, by["efficientdm", "w4a4"], fp)
    for bits in ("w2a4", "w3a4"):
        if ("mpqdm", bits) in fid and ("efficientdm", bits) in fid:
            m, e = fid["mpqdm", bits], fid["efficientdm", bits]
            target(f"MPQ-DM {bits.upper()} FID-digits >= 30 % below EfficientDM {bits.upper()}",
                   f"{m:.2f} vs {e:.2f} ({100 * (1 - m / e):.1f} % below)", m <= 0.7 * e,
                   by["mpqdm", bits], by["efficientdm", bits])
    fp_iv = fp.extra.get("intervals", {}).get("fid_digits")
    for bits, limit in (("w4a4", None), ("w3a4", None), ("w2a4", 1.15)):
        cands = [r for r in rows if r.bits == bits and r.label in METHODS]
        if not cands:
            continue
        best = min(cands, key=lambda r: r.metrics["fid_digits"])
        b = best.metrics["fid_digits"]
        if limit is None:
            inside = fp_iv is not None and fp_iv[0] <= b <= fp_iv[1]
            where = f"FP {fp_fid:.2f} [{fp_iv[0]:.2f}, {fp_iv[1]:.2f}]" if fp_iv else f"FP {fp_fid:.2f}, no interval"
            target(f"best {bits.upper()} recipe inside FP's 95 % interval", f"{best.label} {b:.2f} vs {where}",
                   inside)
        else:
            target(f"best {bits.upper()} recipe FID-digits <= {limit} x FP",
                   f"{best.label} {b:.2f} vs FP {fp_fid:.2f} ({b / fp_fid:.2f}x)", b <= limit * fp_fid, best, fp)
    for bits in ("w4a4", "w4a8"):
        if ("efficientdm", bits) in by and ("qat", bits) in by:
            e, q = by["efficientdm", bits], by["qat", bits]
            fe, fq = e.metrics["fid_digits"], q.metrics["fid_digits"]
            te, tq = e.finetune_s or 0.0, q.finetune_s or 0.0
            target(f"EfficientDM {bits.upper()} within 10 % of QAT's FID-digits in <= 1/5 of QAT's time",
                   f"FID {fe:.2f} vs {fq:.2f} ({fe / fq:.2f}x); finetune {te:.0f} s vs {tq:.0f} s "
                   f"({te / max(tq, 1e-9):.2f}x)", fe <= 1.1 * fq and te <= tq / 5, e, q)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 samples per run, 1 finetune epoch")
    parser.add_argument("--bits", nargs="*", default=BITS, help=f"widths to run (default: {' '.join(BITS)}; w4a8 too)")
    parser.add_argument("--methods", nargs="*", default=METHODS, help=f"recipes to run (default: {' '.join(METHODS)})")
    parser.add_argument("--add", nargs="*", default=[], metavar="BITS:METHOD",
                        help="further cases beyond --bits x --methods, e.g. w2a4:efficientdm w2a4:mpqdm")
    parser.add_argument("--ablations", nargs="*", default=None, choices=sorted(ABLATIONS), metavar="METHOD",
                        help=f"also run these methods' ablation rows ({', '.join(ABLATIONS)}; none named: all)")
    parser.add_argument("--keep-previous", action="store_true",
                        help="keep the rows of the existing results file that this invocation does not run "
                             "(marked as kept; a rerun row is compared with its previous value)")
    add_matrix_args(parser)
    args = parser.parse_args()
    runs_dir, common = matrix_setup(args, parser)
    extra = ("finetune.epochs=1",) if args.quick else ()
    cases = [Case(label=method, recipe=method, bits=bits, sets=extra if method != "ptq" else ())
             for bits in args.bits for method in args.methods]
    for item in args.add:
        bits, _, method = item.partition(":")
        if method not in METHODS:
            parser.error(f"--add {item}: METHOD must be one of {', '.join(METHODS)}")
        cases.append(Case(label=method, recipe=method, bits=bits, sets=extra if method != "ptq" else ()))
    if args.ablations is not None:
        for method in args.ablations or ABLATIONS:
            cases += [Case(label=label, recipe=recipe, bits=bits, sets=(*sets, *extra), run_name=name)
                      for label, recipe, bits, sets, name in ABLATIONS[method]]

    t0 = time.time()
    fp, rows = run_cases(cases, runs_dir, common, reverse=args.reverse, seeds=args.seeds, model=args.model,
                         finished_only=args.finished_only)
    if args.keep_previous:
        rows = keep_previous_rows("finetune", rows, args.quick,
                                  labels={*METHODS, *(a[0] for a in ABLATION_ROWS)})
    order = {b: i for i, b in enumerate(["w4a4", "w4a8", "w3a4", "w2a4"])}
    labels = [*METHODS, *(a[0] for a in ABLATION_ROWS)]
    rows.sort(key=lambda r: (order.get(r.bits, 9), labels.index(r.label)))
    fp_fid = fp.metrics["fid_digits"]
    headers = ["bits", "method", "FID-digits ↓ [95 %]", "vs FP", "class acc ↑ [95 %]", "calibrate s", "finetune s",
               "finetune peak MB", "trained params", "mean bits w/a"]
    table = [["fp32", "-", cell(fp, "fid_digits"), "1.00x", cell(fp, "class_accuracy"), "-", "-", "-", "-", "32/32"]]
    for r in rows:
        budget = r.extra.get("bit_budget")
        fid = r.metrics["fid_digits"]
        kept = " *" if r.extra.get("kept_from_previous") else ""
        table.append([r.bits, r.label + kept, cell(r, "fid_digits"), f"{fid / fp_fid:.2f}x",
                      cell(r, "class_accuracy"), fmt(r.calibrate_s, ".0f"),
                      fmt(r.finetune_s, ".0f") if r.label != "ptq" else "-",
                      fmt(r.finetune_peak_mb, ".0f") if r.label != "ptq" else "-",
                      fmt(100 * r.trainable_fraction, ".1f") + "%" if r.trainable_fraction else "-",
                      f"{budget['mean_w_bits']:.2f}/{budget['mean_a_bits']:.2f}" if budget else "-"])
    markdown = print_table(headers, table)
    if any(r.extra.get("kept_from_previous") for r in rows):
        note = ("\n\n\\* kept from the previous results file (--keep-previous): not rerun by this invocation; "
                "its time columns are from that run")
        print(note.strip())
        markdown += note
    targets = _targets(fp, rows)
    for t in targets:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")

    write_results("finetune" if args.model == "digits" else f"finetune_{Path(args.model).name}", args, common, time.time() - t0, fp, rows, markdown, targets=targets)


if __name__ == "__main__":
    main()
