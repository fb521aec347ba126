"""The conv kernels alone: oneDNN's int8 conv against the float convs a user would run instead.

How much faster can an int8 runtime be than the FP model in bf16? Its convs are the only part that
changes (norms, activations, attention and adds run the same ops in the same dtype), so the answer
is bounded by how much faster oneDNN's int8 conv is than its bf16 (or float32) conv on the model's
shapes, and by the share of the FP forward those convs take (`merged_runtime.py --profile`).

For each 3x3 conv shape of `merged_runtime.py`'s 26 M UNet (`unet-128-256-256`, batch 64) and of
the digits UNet, median time of: the float32 conv, the bf16 conv (channels-last, what bf16 autocast
runs), `onednn::qconv2d_pointwise` on uint8 codes (channels-last) with a float32, a bf16 and a
uint8 output (4-bit codes and weights: one exact call on every CPU), and where it runs the int16 kernel
(`export.s16`, 8-bit codes and weights, one exact call, int32 out), all interleaved in one process.
Every configuration runs twice: with glibc's default malloc (a fresh mmap for every block above
32 MiB) and with freed memory kept for reuse (`lowbitdm_cli.memory`, what the CLI does); each
setting runs in its own child process, as `mallopt` is per process.

    python benchmarks/conv_kernels.py            # 20 timed calls per cell
    python benchmarks/conv_kernels.py --quick    # 3 timed calls per cell

Writes benchmarks/results/conv_kernels.json (--quick: conv_kernels_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merged_runtime as mr  # noqa: E402 - sets the CLI's thread wait before torch loads
import torch  # noqa: E402

from lowbitdm_cli.export import s16  # noqa: E402
from lowbitdm_cli.export.kernel_probe import cpu_description, probe_onednn_conv  # noqa: E402
from lowbitdm_cli.memory import keep_freed_memory  # noqa: E402
from lowbitdm_cli.models.precision import bf16_native  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (model, N, C_in, H, C_out): the 3x3 convs' shapes, each once
SHAPES = [("unet-128-256-256", 64, 128, 32, 128), ("unet-128-256-256", 64, 256, 16, 256),
          ("unet-128-256-256", 64, 256, 8, 256), ("unet-128-256-256", 64, 512, 16, 256),
          ("digits", 64, 32, 16, 32), ("digits", 64, 64, 8, 64), ("digits", 64, 128, 4, 128)]
CL = torch.channels_last


@torch.no_grad()
def _cells(n: int, c: int, h: int, o: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=CL)
    w = torch.randn(o, c, 3, 3, generator=g).contiguous(memory_format=CL)
    fns = {"fp32": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1)}
    if bf16_native():
        xb, wb = x.bfloat16(), w.bfloat16()
        fns["bf16"] = lambda: torch.nn.functional.conv2d(xb, wb, None, 1, 1)
    if probe_onednn_conv() in ("int32", "pair16"):
        u = torch.randint(0, 16, x.shape, generator=g, dtype=torch.uint8).contiguous(memory_format=CL)
        wq = torch.randint(-8, 8, w.shape, generator=g, dtype=torch.int8)
        scales, zeros, geometry = torch.full((o,), 0.01), torch.zeros(o, dtype=torch.long), ([1, 1], [1, 1], [1, 1], 1)
        packed = torch.ops.onednn.qconv_prepack(wq, scales, 1.0, 0, *geometry, None)
        outs = {"int8->fp32": torch.float32, "int8->u8": torch.uint8}
        if bf16_native():
            outs["int8->bf16"] = torch.bfloat16
        for key, dtype in outs.items():
            out_scale = 0.05 if dtype == torch.uint8 else 1.0
            fns[key] = (lambda dtype=dtype, out_scale=out_scale: torch.ops.onednn.qconv2d_pointwise(
                u, 0.02, 8, packed, scales, zeros, None, *geometry, out_scale, 0, dtype, "none", [], ""))
    if s16.available():  # 8-bit codes and weights, one exact call (int32 out)
        u8 = torch.randint(0, 256, x.shape, generator=g, dtype=torch.uint8).contiguous(memory_format=CL)
        w16 = s16.pack_weight(torch.randint(-255, 256, w.shape, generator=g))
        zx = torch.tensor([128])
        fns["s16->i32"] = lambda: s16.conv(u8, zx, w16, (3, 3), (1, 1), (1, 1), (1, 1), o)
    return {k: v * 1e3 for k, v in mr._time_cells(fns, repeats, warmup=2).items()}  # interleaved medians


def _child(args: argparse.Namespace) -> dict:
    keep = keep_freed_memory()  # False with LOWBITDM_MALLOC=default
    torch.set_num_threads(args.threads)
    rows = []
    for model, n, c, h, o in SHAPES:
        ms = _cells(n, c, h, o, args.repeats)
        rows.append({"model": model, "shape": [n, c, h, h], "out_channels": o, "ms": ms})
    return {"malloc": "keep" if keep else "default", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed calls per cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.repeats = 3 if args.quick else 20
    if args.child:
        print(json.dumps(_child(args)))
        return
    runs = []
    for setting in ("default", "keep"):
        env = {**os.environ, "LOWBITDM_MALLOC": setting}
        cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), *(["--quick"] if args.quick else [])]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"CPU: {cpu_description()}, torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    keys = list(runs[0]["rows"][0]["ms"])
    for run in runs:
        print(f"\nmalloc: {run['malloc']}")
        print(f"{'model':18} {'input':>18} {'out':>4} " + " ".join(f"{k:>11}" for k in keys)
              + "   int8->bf16 vs bf16   int8->fp32 vs fp32   s16 vs fp32")
        for r in run["rows"]:
            ms = r["ms"]
            vs_bf16 = f"{ms['bf16'] / ms['int8->bf16']:>9.2f}x" if "int8->bf16" in ms and "bf16" in ms else f"{'-':>10}"
            vs_fp32 = f"{ms['fp32'] / ms['int8->fp32']:>9.2f}x" if "int8->fp32" in ms else f"{'-':>10}"
            s16_fp32 = f"{ms['fp32'] / ms['s16->i32']:>9.2f}x" if "s16->i32" in ms else f"{'-':>10}"
            print(f"{r['model']:18} {str(r['shape']):>18} {r['out_channels']:>4} "
                  + " ".join(f"{ms.get(k, float('nan')):>9.2f}ms" for k in keys)
                  + f"   {vs_bf16:>18}   {vs_fp32:>18}   {s16_fp32:>11}")
    payload = {"cpu": cpu_description(), "torch": torch.__version__, "threads": args.threads,
               "repeats": args.repeats, "runs": runs}
    out = args.out or ROOT / "benchmarks" / "results" / f"conv_kernels{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
