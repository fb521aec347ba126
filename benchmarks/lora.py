"""A LoRA adapter on low-bit checkpoints: does it change the W8A8 and W4A4 models' samples the way it
changes the FP model's?

The adapter is tests/fixtures/lora (thicker strokes, trained on the digits UNet's FP weights by
`python -m lowbitdm_cli.training.digits_lora`). Protocol of the method tables (benchmarks/_matrix.py):
the embedded digits model, its default sampler, the same class-balanced samples (same seeds) for
every row; the quantized models are the `lowbitdm run` chains of naive PTQ at W8A8 and EfficientDM+
at W4A4 (with --quick: 1 finetune epoch). Each model is sampled without the adapter and with it
as a float branch beside its layers (integer runtime; `sample --lora`), and the quantized ones also
with it folded into the weights before packing (`merge --lora`, Q(W + s·B·A)).

Columns, on the samples' pixels and the digits classifier's features:
- ink: mean pixel intensity in [0, 1] (stroke mass; the adapter raises it), with its 95 % interval;
- FID-dilated: FID-digits to the training images dilated as the adapter was trained (lower when the
  samples look like the adapter's style), FID-digits to the plain training images, class accuracy.
Then the gaps: quantized minus FP without the adapter and with it (the adapter's effect should
survive quantization: the two gaps alike), and the adapter's effect (with minus without) per model.

    python benchmarks/lora.py --quick                 # 50 samples, 1 seed, EfficientDM+ 1 epoch
    python benchmarks/lora.py                         # the method tables' protocol: 1000 samples, 3 seeds

With several seeds (`--seeds N`: every chain, FP baseline and adapter sample once per seed offset
k = 0 .. N-1, as `lowbitdm run --seeds`), a cell is the mean over seeds with the 95 % t interval of
that mean (its per-seed values in the JSON); with one seed, the sample's own interval (bootstrap
for FID, t over samples for ink).

Writes benchmarks/results/lora.json (lora_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _matrix import FULL_SAMPLES, FULL_SEEDS, QUICK_SAMPLES, ROOT, print_table

from lowbitdm_cli.adapters.lora_file import Adapter
from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator
from lowbitdm_cli.evaluation.frechet import feature_statistics, frechet_distance
from lowbitdm_cli.evaluation.intervals import frechet_interval, mean_interval
from lowbitdm_cli.models.digits import load_digits_split
from lowbitdm_cli.npz import read_npz
from lowbitdm_cli.pipeline import run_recipe, with_seed_offset
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.report import t_interval
from lowbitdm_cli.stages.common import open_source
from lowbitdm_cli.stages.merge import merge
from lowbitdm_cli.stages.sample import sample
from lowbitdm_cli.training.digits_lora import dilate

ADAPTER = ROOT / "tests" / "fixtures" / "lora" / "digits_thick_lora.safetensors"
CASES = [("W8A8 ptq", "ptq", "w8a8", ()), ("W4A4 efficientdm-plus", "efficientdm-plus", "w4a4", ())]
RESAMPLES = 200


def _scores(samples: Artifact, ev: DigitsEvaluator, dilated: tuple[np.ndarray, np.ndarray]) -> dict:
    data = read_npz(samples.file("samples.npz"))
    images, labels = data["arr_0"], data["labels"]
    ink = images.astype(np.float64).reshape(len(images), -1).mean(1) / 255.0
    feats, logits = ev.features_and_logits(torch.from_numpy(images))
    mu, sigma = feature_statistics(feats)
    fid_dil = frechet_distance(mu, sigma, *dilated)
    fid = frechet_distance(mu, sigma, ev.ref_mu, ev.ref_sigma)
    return {"ink": float(ink.mean()), "ink_interval": list(mean_interval(ink)),
            "fid_dilated": fid_dil,
            "fid_dilated_interval": [frechet_interval(fid_dil, feats, *dilated, RESAMPLES, 0)[k]
                                     for k in ("low", "high")],
            "fid_digits": fid, "class_accuracy": float((logits.argmax(1) == labels).mean()),
            "num_samples": len(images), "path": str(samples.path)}


GAP_COLUMNS = [("gap_without", "gap without"), ("gap_with_branch", "gap with (branch)"),
               ("gap_with_folded", "gap with (folded)"), ("effect_fp", "effect FP"),
               ("effect_branch", "effect (branch)"), ("effect_folded", "effect (folded)")]


def _gaps_of(rows: dict[str, dict], label: str, key: str) -> dict[str, float]:
    """Quantized minus FP without and with the adapter, and the adapter's effect per model, on one seed."""
    return {"gap_without": rows[label][key] - rows["FP"][key],
            "gap_with_branch": rows[f"{label} + LoRA"][key] - rows["FP + LoRA"][key],
            "gap_with_folded": rows[f"{label} + LoRA folded"][key] - rows["FP + LoRA"][key],
            "effect_fp": rows["FP + LoRA"][key] - rows["FP"][key],
            "effect_branch": rows[f"{label} + LoRA"][key] - rows[label][key],
            "effect_folded": rows[f"{label} + LoRA folded"][key] - rows[label][key]}


def _gaps(per_seed: list[dict[str, dict]]) -> list[dict]:
    """The gaps per case and metric: mean over seeds, and with several seeds the 95 % t interval of the
    mean of the paired per-seed differences (same seeds for every row, so seed-to-seed variation cancels)."""
    out = []
    for label, *_ in CASES:
        for key in ("ink", "fid_dilated"):
            each = [_gaps_of(rows, label, key) for rows in per_seed]
            g: dict = {"model": label, "metric": key}
            for name, _ in GAP_COLUMNS:
                values = [e[name] for e in each]
                g[name] = float(np.mean(values))
                if len(values) > 1:
                    g[f"{name}_values"] = values
                    g[f"{name}_interval"] = t_interval(values)
            out.append(g)
    return out


def _over_seeds(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Each row's metrics as the mean over seeds, intervals the 95 % t interval of that mean."""
    out = {}
    for label in per_seed[0]:
        runs = [rows[label] for rows in per_seed]
        row = {"seeds": len(runs), "num_samples": runs[0]["num_samples"], "paths": [r["path"] for r in runs]}
        for key in ("ink", "fid_dilated", "fid_digits", "class_accuracy"):
            values = [r[key] for r in runs]
            row[key] = float(np.mean(values))
            row[f"{key}_values"] = values
            row[f"{key}_interval"] = t_interval(values)
        out[label] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SAMPLES} samples, EfficientDM+ 1 epoch")
    parser.add_argument("--num-samples", type=int, default=None, help=f"default {FULL_SAMPLES} ({QUICK_SAMPLES} "
                                                                      f"with --quick)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/ (runs-quick/ with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="the adapter's --lora-scale")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"runs per row, seed offsets 0..N-1 (default {FULL_SEEDS}, 1 with --quick)")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else FULL_SEEDS)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    n = args.num_samples or (QUICK_SAMPLES if args.quick else FULL_SAMPLES)
    runs_dir = args.runs_dir or ROOT / ("runs-quick" if args.quick else "runs")
    sets = [f"sample.num_samples={n}", f"sample.batch_size={min(n, 250)}"]
    adapter = Adapter(ADAPTER, args.scale)
    ev = DigitsEvaluator()
    with torch.no_grad():
        dilated = feature_statistics(ev.features_and_logits(dilate(load_digits_split().train_images))[0])
    per_seed: list[dict[str, dict]] = []

    for k in range(seeds):
        rows: dict[str, dict] = {}
        per_seed.append(rows)

        def score(label: str, art: Artifact, rows: dict = rows, k: int = k) -> None:
            rows[label] = _scores(art, ev, dilated)
            r = rows[label]
            print(f"[{time.time() - t0:.0f} s] seed +{k} {label}: ink {r['ink']:.4f}, FID-dilated "
                  f"{r['fid_dilated']:.2f}, FID-digits {r['fid_digits']:.2f}, class acc {r['class_accuracy']:.3f}",
                  flush=True)

        fp_done = False
        for label, recipe_name, bits, extra in CASES:
            epochs = ("finetune.epochs=1",) if args.quick and recipe_name != "ptq" else ()
            recipe = load_recipe(recipe_name, model="digits", bits=bits, sets=[*sets, *extra, *epochs])
            result = run_recipe(recipe, runs_dir, log=lambda m: print(m, flush=True), seed_offset=k)
            recipe = with_seed_offset(recipe, k)  # the adapter samples use the chain's seeds
            run_dir = Path(result["run_dir"])
            if not fp_done:
                fp_dir = Path(result["rows"][0]["path"]).parent
                score("FP", Artifact.open(fp_dir / "sample"))
                score("FP + LoRA", sample(open_source("digits", loras=[adapter]), recipe, fp_dir / "sample-lora",
                                          resume=True, replace_stale=True))
                fp_done = True
            score(label, Artifact.open(run_dir / "sample"))
            score(f"{label} + LoRA", sample(open_source(str(run_dir / "merge"), loras=[adapter]), recipe,
                                            run_dir / "sample-lora", resume=True, replace_stale=True))
            folded = merge(Artifact.open(run_dir / "finetune"), run_dir / "merge-lora", replace_stale=True,
                           loras=[adapter])
            score(f"{label} + LoRA folded", sample(open_source(str(folded.path)), recipe,
                                                   run_dir / "sample-lora-folded", resume=True, replace_stale=True))
    rows = per_seed[0] if seeds == 1 else _over_seeds(per_seed)

    def iv(r: dict, key: str, spec: str) -> str:
        lo, hi = r[f"{key}_interval"]
        return f"{format(r[key], spec)} [{format(lo, spec)}, {format(hi, spec)}]"

    headers = ["model", "ink ↑ [95 %]", "FID-dilated ↓ [95 %]", "FID-digits", "class acc"]
    table = [[k, iv(r, "ink", ".4f"), iv(r, "fid_dilated", ".2f"), f"{r['fid_digits']:.2f}",
              f"{100 * r['class_accuracy']:.1f}%"] for k, r in rows.items()]
    markdown = print_table(headers, table)
    gaps = _gaps(per_seed)
    def signed(g: dict, key: str) -> str:
        spec = "+.4f" if g["metric"] == "ink" else "+.2f"
        text = format(g[key], spec)
        if f"{key}_interval" in g:
            lo, hi = g[f"{key}_interval"]
            text += f" [{format(lo, spec)}, {format(hi, spec)}]"
        return text

    gap_md = print_table(["model", "metric", *(name for _, name in GAP_COLUMNS)],
                         [[g["model"], g["metric"], *(signed(g, k) for k, _ in GAP_COLUMNS)] for g in gaps])
    path = ROOT / "benchmarks" / "results" / ("lora_quick.json" if args.quick else "lora.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"quick": args.quick, "num_samples": n, "threads": args.threads,
                                "seeds": seeds, "torch": torch.__version__, "adapter": adapter.record(), "rows": rows, "gaps": gaps,
                                "wall_s": round(time.time() - t0, 1), "markdown": markdown + "\n\n" + gap_md},
                               indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
