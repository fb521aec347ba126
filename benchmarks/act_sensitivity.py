"""Which activation quantizers limit A4: naive PTQ at `--bits` (default W8A4, so the weights are
not the limit) with the inputs of one layer role raised to 8 bits at a time.

For every role that has layers at the low activation width (conv, attention, time_emb_proj,
shortcut, downsample, upsample, ...), the recipe's layer policy gets overrides that put that
role's inputs at 8 bits; `none` raises nothing and `all` raises every layer. Each variant is
calibrated by the `calibrate` stage (naive PTQ, the efficientdm recipe's MSE initialisation and
temporal activation quantizers) and measured by the mean squared error of its guided ε against
the FP model's on held-out trajectories (other samples than the calibration set's, the same
sampler), per denoising step, high noise first, and summed into the error each step's ε error puts
on the next state (ε MSE times the squared ε coefficient of the deterministic DDIM update, so
the last step, where ε barely moves x, counts little). The last column is each role's share of the
quantized layers' MACs (`lowbitdm_cli.quant.cost`): what raising it costs.

    python benchmarks/act_sensitivity.py            # digits, W8A4, 64 held-out samples
    python benchmarks/act_sensitivity.py --quick    # 16 calibration / 8 held-out samples

Writes benchmarks/results/act_sensitivity.json (act_sensitivity_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _matrix import print_table

from lowbitdm_cli.calibration.data import collect_batch, select_steps
from lowbitdm_cli.export.kernel_probe import cpu_description
from lowbitdm_cli.models.registry import sampler_defaults
from lowbitdm_cli.quant.cost import bit_budget, layer_macs
from lowbitdm_cli.quant.policy import build_layer_specs
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import ddim_timesteps
from lowbitdm_cli.stages.calibrate import calibrate
from lowbitdm_cli.stages.common import load_fp_model, load_quantized_from, sampler_settings

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 calibration and 8 held-out samples")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--bits", default="w8a4")
    parser.add_argument("--recipe", default="efficientdm", help="the recipe whose quant / calibrate settings are used")
    parser.add_argument("--held-out", type=int, default=None, help="held-out trajectories (default 64, 8 with --quick)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/act_sensitivity")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    held_out = args.held_out or (8 if args.quick else 64)
    runs = args.runs_dir or ROOT / ("runs-quick" if args.quick else "runs") / "act_sensitivity"
    sets = ["calibrate.num_samples=16", "calibrate.batch_size=16"] if args.quick else []
    base = load_recipe(args.recipe, model=args.model, bits=args.bits, sets=sets, finetune_method="none")
    fp = load_fp_model(base.model.name, base)
    specs = build_layer_specs(fp.denoiser, base.quant)
    low = base.quant.a_bits
    roles: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if spec.kind != "matmul" and spec.a_bits == low:
            roles.setdefault(spec.role, []).append(name)
    macs = layer_macs(fp, list(specs))
    total = sum(macs.values())
    variants = {"none": [], **roles, "all": [n for names in roles.values() for n in names]}

    resolved = base.resolved(sampler_defaults(base.model.name))
    settings = sampler_settings(resolved.sample)
    keep = select_steps(settings.steps, None)
    t0 = time.time()
    start = base.calibrate.num_samples  # held-out sample indices follow the calibration set's
    data = collect_batch(fp, list(range(start, start + held_out)), base.calibrate.seed + 1, settings, keep)
    guidance = settings.guidance
    with torch.no_grad():
        ref = [fp.eps(data.xs[s], int(data.ts[s]), data.conds, guidance) for s in range(len(data.ts))]
    results = {}
    for label, names in variants.items():
        overrides = ", ".join(f'{{pattern = "{n}", a_bits = 8}}' for n in names)
        recipe = load_recipe(args.recipe, model=args.model, bits=args.bits, finetune_method="none",
                             sets=[*sets, f"quant.overrides = [{overrides}]"])
        art = calibrate(recipe, runs / f"{args.model}-{args.bits}-{label}" / "calibrate", resume=True)
        q = load_quantized_from(art)
        with torch.no_grad():
            errs = [((q.eps(data.xs[s], int(data.ts[s]), data.conds, guidance) - ref[s]) ** 2).mean().item()
                    for s in range(len(data.ts))]
        share = sum(macs.get(n, 0) for n in names) / total
        budget = bit_budget(build_layer_specs(fp.denoiser, recipe.quant), macs)
        results[label] = {"layers": len(names), "eps_mse": errs, "mac_share": share,
                          "mean_a_bits": budget["mean_a_bits"]}
        print(f"{label}: ε MSE per step " + " ".join(f"{e:.5f}" for e in errs), flush=True)

    ts = [int(t) for t in data.ts]
    grid = ddim_timesteps(fp.schedule.num_train_timesteps, settings.steps)
    acp = fp.schedule.alphas_cumprod
    weights = []
    for t in ts:
        nxt = grid.index(t) + 1
        a_t, a_prev = acp[t].item(), acp[grid[nxt]].item() if nxt < len(grid) else 1.0
        weights.append(((1 - a_prev) ** 0.5 - (a_prev / a_t) ** 0.5 * (1 - a_t) ** 0.5) ** 2)
    for r in results.values():
        r["x_next_mse"] = sum(w * e for w, e in zip(weights, r["eps_mse"], strict=True))
    base_x = results["none"]["x_next_mse"]
    headers = ["inputs at 8 bits", "layers", *(f"t={t}" for t in ts), "x error vs none", "MAC share"]
    rows = []
    for label, r in results.items():
        ratio = r["x_next_mse"] / base_x
        rows.append([label, str(r["layers"]), *(f"{e:.4f}" for e in r["eps_mse"]), f"{ratio:.2f}x",
                     f"{100 * r['mac_share']:.1f}%"])
    markdown = print_table(headers, rows)
    path = ROOT / "benchmarks" / "results" / ("act_sensitivity_quick.json" if args.quick else "act_sensitivity.json")
    path.write_text(json.dumps({"quick": args.quick, "model": args.model, "bits": args.bits, "recipe": args.recipe,
                                "held_out_samples": held_out, "timesteps": ts, "cpu": cpu_description(),
                                "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
                                "variants": results, "markdown": markdown}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
