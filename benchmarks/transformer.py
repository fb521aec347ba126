"""The transformer methods on a diffusion transformer (and on the digits UNet: nothing may get
worse there), each alone and combined, side by side with FP and naive PTQ:

- per-token dynamic input scales (`quant.a_per_token`, ViDiT-Q),
- SmoothQuant smoothing (`quant.smooth`, α = `quant.smooth_alpha`),
- Hadamard rotation of the inputs (`quant.rotate`),
- SVDQuant's float low-rank branch (`quant.low_rank`, rank `quant.low_rank_dim`),

applied to the attention and MLP linears (roles ``attention`` and ``feed_forward``) on top of naive
PTQ with temporal MSE-initialised activations (the efficientdm recipe's calibration, no training),
at W8A8, W4A8 and W4A4; then the `efficientdm` recipe and the transformer recipe
(`recipes/efficientdm-tx.toml`) at the widths of its targets. Columns as in `benchmarks/finetune.py`:
FID-digits and class accuracy with 95 % intervals (over seeds with --seeds > 1), the ratio to FP,
stage times, the MAC-weighted mean bits of the layer policy (a float low-rank branch counts at
32 bits for its MACs).

    python benchmarks/transformer.py                          # digits-dit, 1000 samples x 3 seeds
    python benchmarks/transformer.py --model digits --parts ablation   # the same options on the UNet
    python benchmarks/transformer.py --quick                  # 50 samples, 1 seed, 1 finetune epoch
    python benchmarks/transformer.py --model runs/validation-models/digits-dit-val --parts recipe

Writes benchmarks/results/transformer_<model>[_<part>].json (``_quick`` with --quick; the part's name
when only one of --parts ran).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _matrix import Case, add_matrix_args, cell, fmt, matrix_setup, print_table, run_cases, write_results

SCOPE = '["attention", "feed_forward"]'
OPTIONS = {  # label: the --set overrides turning one method on
    "per-token": (f"quant.a_per_token={SCOPE}",),
    "smooth": (f"quant.smooth={SCOPE}",),
    "rotate": (f"quant.rotate={SCOPE}",),
    "low-rank": (f"quant.low_rank={SCOPE}",),
}
ALL = tuple(s for sets in OPTIONS.values() for s in sets)
# the efficientdm recipe's calibration without its training: naive PTQ, temporal MSE-initialised activations
BASE = ("finetune.method=none",)
ABLATION_BITS = ["w8a8", "w4a8", "w4a4"]
RECIPE_BITS = ["w8a8", "w4a8", "w4a4"]
RECIPE = "efficientdm-tx"


def cases(parts: list[str], quick: bool) -> list[Case]:
    extra = ("finetune.epochs=1",) if quick else ()
    out: list[Case] = []
    if "ablation" in parts:
        for bits in ABLATION_BITS:
            out.append(Case("ptq", "efficientdm", bits, BASE, "ptq-tx-base"))
            for label, sets in OPTIONS.items():
                out.append(Case(f"ptq + {label}", "efficientdm", bits, (*BASE, *sets), f"ptq-tx-{label}"))
            out.append(Case("ptq + all four", "efficientdm", bits, (*BASE, *ALL), "ptq-tx-all"))
    if "recipe" in parts:
        out.append(Case("efficientdm", "efficientdm", "w4a4", extra))
        for bits in RECIPE_BITS:
            out.append(Case(RECIPE, RECIPE, bits, extra))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 samples per run, 1 seed, 1 finetune epoch")
    parser.add_argument("--parts", nargs="*", default=["ablation", "recipe"], choices=["ablation", "recipe"])
    parser.add_argument("--bits", nargs="*", default=None, help="only these widths")
    parser.add_argument("--methods", nargs="*", default=None, metavar="LABEL",
                        help="only the cases with these labels (e.g. efficientdm-tx 'ptq + rotate')")
    add_matrix_args(parser)
    parser.set_defaults(model="digits-dit")
    args = parser.parse_args()
    runs_dir, common = matrix_setup(args, parser)
    todo = [c for c in cases(args.parts, args.quick)
            if (args.bits is None or c.bits in args.bits) and (args.methods is None or c.label in args.methods)]
    if not todo:
        parser.error("no case matches --parts / --bits / --methods")
    t0 = time.time()
    fp, rows = run_cases(todo, runs_dir, common, reverse=args.reverse, seeds=args.seeds, model=args.model,
                         finished_only=args.finished_only)
    by_label = {(c.label, c.bits): c for c in todo}
    for r in rows:
        r.extra["sets"] = list(by_label[r.label, r.bits].sets)
    fp_fid = fp.metrics["fid_digits"]
    headers = ["bits", "method", "FID-digits ↓ [95 %]", "vs FP", "class acc ↑ [95 %]", "calibrate s", "finetune s",
               "mean bits w/a"]
    table = [["fp32", "-", cell(fp, "fid_digits"), "1.00x", cell(fp, "class_accuracy"), "-", "-", "32/32"]]
    for r in rows:
        b = r.extra["bit_budget"]
        table.append([r.bits, r.label, cell(r, "fid_digits"), f"{r.metrics['fid_digits'] / fp_fid:.2f}x",
                      cell(r, "class_accuracy"), fmt(r.calibrate_s, ".0f"), fmt(r.finetune_s, ".0f"),
                      f"{b['mean_w_bits']:.2f}/{b['mean_a_bits']:.2f}"])
    markdown = print_table(headers, table)
    parts = "" if set(args.parts) == {"ablation", "recipe"} else "_" + "-".join(sorted(set(args.parts)))
    name = f"transformer_{Path(args.model).name}{parts}"
    write_results(name, args, common, time.time() - t0, fp, rows, markdown, model=args.model)


if __name__ == "__main__":
    main()
