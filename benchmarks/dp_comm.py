"""What data-parallel finetune's order-fixed gradient sum costs in communication, at paper scale.

`finetune` under torchrun cuts each batch of B rows into n = B / micro_batch micro-batches; every
rank packs each of its micro-batches' gradients into one flat float32 vector of V = P + 1 + T
values (P trained values: LoRA factors and activation step sizes / zero points; the loss; one
used-flag per trained tensor, T of them) and all-gathers ⌈n / W⌉ such vectors per rank (W
processes), then adds all n in index order on every rank (`ProcessGroup.ordered_sum`). Per
optimizer step and rank, with a ring all-gather (gloo and nccl), that moves

    all-gather:  sent = received = (W − 1) · ⌈n / W⌉ · V · 4 bytes,  held = W · ⌈n / W⌉ · V · 4 bytes

against a ring all-reduce of one vector (DDP's; its result depends on the process count):

    all-reduce:  sent = received = 2 · (W − 1) / W · V · 4 bytes

so the order-fixed sum moves ⌈n / W⌉ · W / 2 times the bytes, n / 2 when W divides n. P is
counted with lowbitdm's own code: the model's real architecture built on the meta device (no
weights, nothing downloaded), quantized with the efficientdm recipe's policy (W4A4, temporal
activation steps over `--timesteps` steps), LoRA of `--rank` added by `finetune.methods.plan_method`.

    python benchmarks/dp_comm.py                 # SD v1.4, LDM-4, DiT-XL/2; rank 32, 100 steps
    python benchmarks/dp_comm.py --quick         # SD v1.4 only

Writes benchmarks/results/dp_comm.json (dp_comm_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from _matrix import print_table

from lowbitdm_cli.finetune.methods import plan_method
from lowbitdm_cli.quant.model import quantize_denoiser
from lowbitdm_cli.quant.policy import build_layer_specs
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import ddim_timesteps

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6


def trained_values(name: str, rank: int, timesteps: int) -> dict:
    """(P, T) for `name`: trained values and trained tensors of EfficientDM with LoRA rank `rank`."""
    from paper_scale import CIN256_V2_UNET, DIT_XL2, SD14_UNET  # the real configs

    import diffusers
    from lowbitdm_cli.models import compvis as cv

    with torch.device("meta"):  # shapes only: no weights are made
        if name == "sd-v1-4":
            den = diffusers.UNet2DConditionModel(**SD14_UNET)
        elif name == "ldm-4":
            cls_name, cfg = cv._diffusers_unet_config(cv._unet_layout(CIN256_V2_UNET))
            den = getattr(diffusers, cls_name)(**cfg)
        else:
            den = diffusers.DiTTransformer2DModel(**DIT_XL2)
        recipe = load_recipe("efficientdm", sets=[f"finetune.lora_rank={rank}", 'finetune.scale_aware="none"'])
        specs = build_layer_specs(den, recipe.quant.policy())
        quantize_denoiser(den, specs, timesteps=ddim_timesteps(1000, timesteps))
    # storage without values (pages untouched stay unallocated): plan_method reads the weight steps
    den.to_empty(device="cpu")
    plan = plan_method(recipe.finetune, den, 0)  # scale_aware only sets learning rates: the same tensors train
    params = plan.parameters()
    lora = sum(p.numel() for g in plan.groups if g["name"] != "activation_quantizers" for p in g["params"])
    return {"params_with_lora_m": round(plan.info["total_parameters"] / 1e6, 1), "quantized_layers": len(specs),
            "lora_values": lora, "act_values": sum(p.numel() for p in params) - lora,
            "trained_values": sum(p.numel() for p in params), "trained_tensors": len(params)}


def volumes(v: int, n: int, w: int) -> dict:
    """Bytes per optimizer step and rank (float32) for V values, n micro-batches, W processes."""
    per = math.ceil(n / w)
    return {"gather_sent_mb": (w - 1) * per * v * 4 / MB, "gather_held_mb": w * per * v * 4 / MB,
            "allreduce_sent_mb": 2 * (w - 1) / w * v * 4 / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD v1.4 only")
    parser.add_argument("--models", default="sd-v1-4,ldm-4,dit-xl-2")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (EfficientDM's paper setting: 32)")
    parser.add_argument("--timesteps", type=int, default=100, help="temporal activation steps (DDIM 100)")
    parser.add_argument("--batch", type=int, default=32, help="global batch B (EfficientDM: 32)")
    parser.add_argument("--micro", default="4,8", help="micro-batch sizes (comma-separated)")
    parser.add_argument("--processes", default="2,4,8", help="process counts W (comma-separated)")
    args = parser.parse_args()
    t0 = time.time()
    models = ["sd-v1-4"] if args.quick else args.models.split(",")
    micros = [int(m) for m in args.micro.split(",")]
    worlds = [int(w) for w in args.processes.split(",")]
    results, rows = {}, []
    for name in models:
        counts = trained_values(name, args.rank, args.timesteps)
        v = counts["trained_values"] + 1 + counts["trained_tensors"]
        results[name] = {**counts, "vector_values": v, "steps": []}
        for micro in micros:
            n = args.batch // micro
            for w in worlds:
                if w > n:
                    continue
                vol = volumes(v, n, w)
                results[name]["steps"].append({"micro_batch": micro, "micro_batches": n, "processes": w, **vol})
                rows.append([name, f"{counts['trained_values'] / 1e6:.2f} M", f"{v * 4 / MB:.1f}",
                             f"{args.batch} / {micro} = {n}", str(w), f"{vol['gather_sent_mb']:.0f}",
                             f"{vol['gather_held_mb']:.0f}", f"{vol['allreduce_sent_mb']:.0f}",
                             f"{vol['gather_sent_mb'] / vol['allreduce_sent_mb']:.1f}"])
    headers = ["model", "trained values", "MB / vector", "micro-batches", "W", "all-gather MB sent = received",
               "MB held", "all-reduce MB", "ratio"]
    print(f"EfficientDM, LoRA rank {args.rank}, W4A4, {args.timesteps} temporal activation steps, batch {args.batch}; "
          f"per optimizer step and rank, float32")
    markdown = print_table(headers, rows)
    path = ROOT / "benchmarks" / "results" / ("dp_comm_quick.json" if args.quick else "dp_comm.json")
    path.write_text(json.dumps({"quick": args.quick, "rank": args.rank, "timesteps": args.timesteps,
                                "batch": args.batch, "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
                                "results": results, "markdown": markdown}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
