"""Where a model's quantization error comes from, by layer group.

Two ways to ask it (`--mode`):

- ``raise`` (default): naive PTQ at `--bits` (default W8A4, so the weights are not the limit) with
  the inputs of one layer group raised to 8 bits at a time (`none` raises nothing, `all` every layer):
  which activation quantizers limit the low width;
- ``only``: everything in full precision except one layer group, quantized at `--bits` (weights and
  inputs): which groups break the model by themselves (the question at W8A8, where raising to 8
  bits changes nothing).

Groups are the layer roles of `lowbitdm_cli.quant.policy` (conv, attention, time_emb_proj, shortcut,
adaln, ...), with `--groups leaf` splitting the transformer roles further: attention into q/k/v
(`attention.qkv`) and output projection (`attention.out`), the MLP into `ff.fc1` and `ff.fc2`.
Each variant is calibrated by the `calibrate` stage (naive PTQ with the recipe's initialisation
and temporal activation quantizers) and measured by the mean squared error of its guided ε against
the FP model's on held-out trajectories (other samples than the calibration set's, the same
sampler), per denoising step, high noise first, and summed into the error each step's ε error puts
on the next state (ε MSE times the squared ε coefficient of the deterministic DDIM update). The
last column is each group's share of the quantized layers' MACs (`lowbitdm_cli.quant.cost`).

A second table gives each group's input outliers on the same held-out data at full precision:
per input channel the max |x| over all tokens (pixels), per token the max |x| over its channels;
"channel max/median" is the largest channel's max over the median channel's (the range a
per-tensor step spends on a few channels), "token max/median" the same over tokens.

    python benchmarks/act_sensitivity.py                                      # digits UNet, W8A4
    python benchmarks/act_sensitivity.py --model digits-dit --groups leaf --mode only --bits w8a8
    python benchmarks/act_sensitivity.py --quick    # 16 calibration / 8 held-out samples

Writes benchmarks/results/act_sensitivity[_MODEL][_MODE_BITS].json (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _matrix import print_table
from torch import nn

from lowbitdm_cli.calibration.data import collect_batch, select_steps
from lowbitdm_cli.export.kernel_probe import cpu_description
from lowbitdm_cli.models.registry import sampler_defaults
from lowbitdm_cli.quant.config import parse_bits
from lowbitdm_cli.quant.cost import bit_budget, layer_macs
from lowbitdm_cli.quant.policy import build_layer_specs
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import ddim_timesteps
from lowbitdm_cli.stages.calibrate import calibrate
from lowbitdm_cli.stages.common import load_fp_model, load_quantized_from, sampler_settings

ROOT = Path(__file__).resolve().parent.parent


def layer_group(name: str, role: str, groups: str) -> str:
    """The role, or with ``groups == "leaf"`` the transformer roles split by what the layer is."""
    if groups != "leaf":
        return role
    leaf = name.split(".")
    if role in ("attention", "cross_attention"):
        return f"{role}.{'out' if 'to_out' in leaf else 'qkv'}"
    if role == "feed_forward":
        return "ff.fc2" if leaf[-1] == "2" or "fc2" in leaf else "ff.fc1"
    return role


def input_outliers(fp, names: list[str], data) -> dict[str, dict[str, float]]:  # noqa: ANN001
    """Per layer: max/median over input channels of the channel's max |x|, and the same over tokens."""
    modules = dict(fp.denoiser.named_modules())
    chan: dict[str, torch.Tensor] = {}
    tok: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):  # noqa: ANN202
        def observe(module: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
            x = inp[0].detach().abs()
            x = x.movedim(1, -1) if isinstance(module, nn.Conv2d) else x  # channels last
            x = x.reshape(-1, x.shape[-1])
            c = x.amax(0)
            chan[name] = c if name not in chan else torch.maximum(chan[name], c)
            tok.setdefault(name, []).append(x.amax(1))
        return observe

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for s in range(len(data.ts)):
                fp.eps(data.xs[s], int(data.ts[s]), data.conds, 1.0)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        c, t = chan[n], torch.cat(tok[n])
        out[n] = {"channel_max_over_median": float(c.max() / c.median().clamp_min(1e-12)),
                  "token_max_over_median": float(t.max() / t.median().clamp_min(1e-12)), "max_abs": float(c.max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 calibration and 8 held-out samples")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--bits", default="w8a4")
    parser.add_argument("--mode", choices=["raise", "only"], default="raise",
                        help="raise: all at --bits, one group's inputs at 8 bits; only: one group at --bits, rest FP")
    parser.add_argument("--groups", choices=["role", "leaf"], default="role",
                        help="role: the policy's layer roles; leaf: attention and MLP split into their linears")
    parser.add_argument("--recipe", default="efficientdm", help="the recipe whose quant / calibrate settings are used")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="recipe override, repeatable")
    parser.add_argument("--held-out", type=int, default=None, help="held-out trajectories (default 64, 8 with --quick)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/act_sensitivity")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    held_out = args.held_out or (8 if args.quick else 64)
    runs = args.runs_dir or ROOT / ("runs-quick" if args.quick else "runs") / "act_sensitivity"
    sets = [*(["calibrate.num_samples=16", "calibrate.batch_size=16"] if args.quick else []), *args.sets]
    base = load_recipe(args.recipe, model=args.model, bits=args.bits, sets=sets, finetune_method="none")
    fp = load_fp_model(base.model.name, base)
    specs = build_layer_specs(fp.denoiser, base.quant)
    low = base.quant.a_bits
    w_bits, a_bits = parse_bits(args.bits)
    groups: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if spec.kind != "matmul" and (args.mode == "only" or spec.a_bits == low):
            groups.setdefault(layer_group(name, spec.role, args.groups), []).append(name)
    layer_names = [n for names in groups.values() for n in names]
    macs = layer_macs(fp, list(specs))
    total = sum(macs.values())
    variants = {"none": [], **groups, "all": layer_names}

    resolved = base.resolved(sampler_defaults(base.model.name))
    settings = sampler_settings(resolved.sample)
    keep = select_steps(settings.steps, None)
    t0 = time.time()
    start = base.calibrate.num_samples  # held-out sample indices follow the calibration set's
    data = collect_batch(fp, list(range(start, start + held_out)), base.calibrate.seed + 1, settings, keep)
    guidance = settings.guidance
    with torch.no_grad():
        ref = [fp.eps(data.xs[s], int(data.ts[s]), data.conds, guidance) for s in range(len(data.ts))]

    def bits_value(b: int | None) -> str:
        return '"fp"' if b is None else str(b)

    results = {}
    for label, names in variants.items():
        if args.mode == "raise":
            overrides = [f'{{pattern = "{n}", a_bits = 8}}' for n in names]
        else:  # everything FP, then this group at --bits ("none": all FP, "all": the plain recipe)
            overrides = ([] if label == "all" else ['{pattern = "*", w_bits = "fp", a_bits = "fp"}']) + [
                f'{{pattern = "{n}", w_bits = {bits_value(w_bits)}, a_bits = {bits_value(a_bits)}}}'
                for n in (names if label != "all" else [])]
        if args.mode == "only" and label == "none":
            errs = [0.0] * len(data.ts)  # nothing quantized: the FP model itself
            budget = {}
        else:
            recipe = load_recipe(args.recipe, model=args.model, bits=args.bits, finetune_method="none",
                                 sets=[*sets, f"quant.overrides = [{', '.join(overrides)}]"])
            tag = f"{args.model}-{args.bits}-{args.mode}-{label}"
            art = calibrate(recipe, runs / tag / "calibrate", resume=True)
            q = load_quantized_from(art)
            with torch.no_grad():
                errs = [((q.eps(data.xs[s], int(data.ts[s]), data.conds, guidance) - ref[s]) ** 2).mean().item()
                        for s in range(len(data.ts))]
            budget = bit_budget(build_layer_specs(fp.denoiser, recipe.quant), macs)
        share = sum(macs.get(n, 0) for n in names) / total
        results[label] = {"layers": len(names), "eps_mse": errs, "mac_share": share,
                          "mean_w_bits": budget.get("mean_w_bits"), "mean_a_bits": budget.get("mean_a_bits")}
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
    ref_label = "none" if args.mode == "raise" else "all"
    base_x = results[ref_label]["x_next_mse"]
    what = "inputs at 8 bits" if args.mode == "raise" else f"only this at {args.bits}"
    headers = [what, "layers", *(f"t={t}" for t in ts), f"x error vs {ref_label}", "MAC share"]
    rows = []
    for label, r in results.items():
        ratio = r["x_next_mse"] / base_x if base_x else float("nan")
        rows.append([label, str(r["layers"]), *(f"{e:.1e}" for e in r["eps_mse"]), f"{ratio:.2f}x",
                     f"{100 * r['mac_share']:.1f}%"])
    markdown = print_table(headers, rows)

    stats = input_outliers(fp, layer_names, data)
    out_rows = []
    outliers = {}
    for label, names in groups.items():
        ch = max(stats[n]["channel_max_over_median"] for n in names)
        tk = max(stats[n]["token_max_over_median"] for n in names)
        mx = max(stats[n]["max_abs"] for n in names)
        outliers[label] = {"channel_max_over_median": ch, "token_max_over_median": tk, "max_abs": mx}
        out_rows.append([label, str(len(names)), f"{ch:.1f}", f"{tk:.1f}", f"{mx:.2f}"])
    outlier_md = print_table(["input of", "layers", "channel max/median (worst layer)",
                              "token max/median (worst layer)", "max |x|"], out_rows)

    suffix = "" if (args.model, args.mode, args.bits) == ("digits", "raise", "w8a4") else \
        f"_{args.model}_{args.mode}_{args.bits}"
    path = ROOT / "benchmarks" / "results" / f"act_sensitivity{suffix}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"quick": args.quick, "model": args.model, "bits": args.bits, "mode": args.mode,
                                "groups": args.groups, "recipe": args.recipe, "sets": args.sets,
                                "held_out_samples": held_out, "timesteps": ts, "cpu": cpu_description(),
                                "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
                                "variants": results, "outliers": outliers, "layer_outliers": stats,
                                "markdown": markdown, "outlier_markdown": outlier_md}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
