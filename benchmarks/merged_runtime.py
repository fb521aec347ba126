"""Merged checkpoints: denoiser file size and forward time, FP32 vs fake-quant vs integer runtime.

Two models, each at FP32, W8A8, W4A4 and W2A4 (per-channel asymmetric min-max weights,
per-tensor activations, the ptq recipe's layer policy):

  (i)  the embedded `digits` model through the real stage chain (calibrate → finetune → merge);
       if its weights are not there yet, the seeded `tiny-random` model of the same shape;
  (ii) a larger randomly initialised UNet2DModel (block_out_channels 128, 256, 256; 32x32x3,
       unconditional), quantized with the same library calls (`quantize_denoiser`, min-max
       `init_quantizer` on random calibration inputs, `export_tensors`) into a merged folder.

For each: bytes of the denoiser's safetensors file (FP32 state dict vs merged `model.safetensors`)
and the median denoiser forward time at batch 64 after warm-up, torch.set_num_threads(2), for
FP32 eager, the fake-quant runtime and the integer runtime (`load_merged(..., "int")`; the
`kernels` column says how many layers ran on oneDNN's int8 kernels or on torch._int_mm).
For the embedded model also: samples (the model's own sampler, same seeds) from the integer and
the fake-quantized runtime, and the share of pixels on which they agree to one grey level.

Each CPU class runs in its own process on the same merged checkpoints: `native` (the kernels
this CPU has) and `avx2` (oneDNN capped with ONEDNN_MAX_CPU_ISA=AVX2, which is what an AVX2-only
CPU runs: 16-bit pair sums, split 8-bit weights). Each class's JSON names the CPU, the ISA and
what the kernel probes found; `kernels` counts the layers per lowering. `--profile` adds the top
operators of the integer runtime's forward on the larger UNet.

    python benchmarks/merged_runtime.py            # 7 timed runs per cell, both classes
    python benchmarks/merged_runtime.py --quick    # 2 timed runs per cell, small calibration
    python benchmarks/merged_runtime.py --classes avx2 --profile

Writes benchmarks/results/merged_runtime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbitdm_cli.export.checkpoint import CONFIG_NAME, WEIGHTS_NAME, export_tensors, load_merged
from lowbitdm_cli.export.int_runtime import lowering_counts
from lowbitdm_cli.models.digits import WEIGHTS_DIR
from lowbitdm_cli.models.registry import MODELS, load_model
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule
from lowbitdm_cli.quant.init import init_quantizer
from lowbitdm_cli.quant.layers import quant_layers
from lowbitdm_cli.quant.model import quantize_denoiser, set_quant_enabled
from lowbitdm_cli.quant.policy import QuantPolicy, build_layer_specs
from lowbitdm_cli.sampling import SamplerSettings, run_sampler, to_uint8

ROOT = Path(__file__).resolve().parent.parent
BITS = {"W8A8": (8, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
LARGE_CONFIG = {"sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
                "block_out_channels": (128, 256, 256),
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                "attention_head_dim": 32, "norm_num_groups": 32}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def _file_bytes(tensors: dict[str, torch.Tensor], folder: Path, name: str) -> int:
    path = folder / name
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return path.stat().st_size


@torch.no_grad()
def _time_forward(model: DiffusionModel, batch: int, repeats: int, warmup: int) -> float:
    """Median seconds of one denoiser call (no CFG) on a fixed batch at t = 500."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    cond = torch.arange(batch) % model.num_classes if model.conditioning == "class" else None
    for _ in range(warmup):
        model.forward(x, 500, cond)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward(x, 500, cond)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _merged_small(name: str, label: str, folder: Path, quick: bool) -> Path:  # → folder/label/merge
    """The registered model through calibrate → finetune → merge (ptq recipe)."""
    from lowbitdm_cli.recipes import load_recipe
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    sets = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4"] if quick else []
    recipe = load_recipe("ptq", model=name, bits=label.lower(), sets=sets)
    calibrated = calibrate(recipe, folder / label / "calibrate")
    return merge(finetune(calibrated, recipe, folder / label / "finetune"), folder / label / "merge").path


@torch.no_grad()
def _large_fp() -> DiffusionModel:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**LARGE_CONFIG).eval().requires_grad_(False)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in unet.config.items() if not k.startswith("_")}
    return DiffusionModel(denoiser=unet, schedule=NoiseSchedule.from_config(SCHEDULE), sample_shape=(3, 32, 32),
                          conditioning="none", name="unet-128-256-256-random", meta={"unet": cfg})


@torch.no_grad()
def _merged_large(label: str, folder: Path, calib_batch: int) -> Path:
    """quantize_denoiser + min-max init on random calibration inputs + export_tensors → merged folder."""
    w_bits, a_bits = BITS[label]
    model = _large_fp()
    specs = build_layer_specs(model.denoiser, QuantPolicy(w_bits=w_bits, a_bits=a_bits))
    quantize_denoiser(model.denoiser, specs)
    layers = quant_layers(model.denoiser)
    for layer in layers.values():
        init_quantizer(layer.w_quant, layer.merged_weight().detach(), "minmax")
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in layers.items():
        layer.observer = lambda _layer, x, name=name: seen.setdefault(name, []).append(x.detach().reshape(-1))
    set_quant_enabled(model.denoiser, weights=True, activations=False)
    g = torch.Generator().manual_seed(1)
    for t in (999, 500, 100):
        model.forward(torch.randn(calib_batch, 3, 32, 32, generator=g), t, None)
    for name, layer in layers.items():
        layer.observer = None
        init_quantizer(layer.a_quant, torch.cat(seen[name]), "minmax")
    set_quant_enabled(model.denoiser, weights=True, activations=True)
    tensors, config = export_tensors(model)
    out = folder / f"large-{label}"
    out.mkdir(parents=True)
    save_file(tensors, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(config) + "\n")
    return out


def _bench(title: str, fp: DiffusionModel, merged: dict[str, Path], folder: Path, args: argparse.Namespace) -> dict:
    fp_bytes = _file_bytes(fp.denoiser.state_dict(), folder, f"{fp.name}-fp32.safetensors")
    t_fp = _time_forward(fp, args.batch, args.repeats, args.warmup)
    rows = [{"precision": "FP32", "bytes": fp_bytes, "size_ratio": 1.0, "fp32_ms": t_fp * 1e3}]
    for label, path in merged.items():
        fake, integer = load_merged(path, "fake"), load_merged(path, "int")
        t_fake = _time_forward(fake, args.batch, args.repeats, args.warmup)
        t_int = _time_forward(integer, args.batch, args.repeats, args.warmup)
        nbytes = (path / WEIGHTS_NAME).stat().st_size
        report = integer.meta["runtime"]
        rows.append({"precision": label, "bytes": nbytes, "size_ratio": nbytes / fp_bytes, "fp32_ms": t_fp * 1e3,
                     "fake_ms": t_fake * 1e3, "int_ms": t_int * 1e3, "int_vs_fp32": t_fp / t_int,
                     "int_vs_fake": t_fake / t_int, "int_layers": report["int_layers"],
                     "fallback_layers": report["fallback_layers"],
                     # as timed: where the first exact lowering was a split, the first forward autotuned
                     "kernels": lowering_counts(integer.denoiser)})
        if args.agreement_samples and fp.name in MODELS:
            rows[-1]["pixel_agreement"] = _agreement(fp.name, fake, integer, args.agreement_samples)
    return {"model": title, "params": sum(p.numel() for p in fp.denoiser.parameters()), "rows": rows}


@torch.no_grad()
def _agreement(name: str, fake: DiffusionModel, integer: DiffusionModel, n: int) -> dict:
    """Share of pixels within one grey level between int and fake samples (same seeds and classes)."""
    sampler = MODELS[name].sampler
    settings = SamplerSettings(steps=sampler["steps"], eta=sampler["eta"], guidance=sampler["guidance"],
                               clip_x0=sampler["clip_x0"], sampler=sampler.get("sampler", "ddim"))
    idx = list(range(n))
    cond = torch.arange(n) % fake.num_classes if fake.conditioning == "class" else None
    ui = to_uint8(run_sampler(integer, cond, idx, 0, settings)).astype(int)
    uf = to_uint8(run_sampler(fake, cond, idx, 0, settings)).astype(int)
    diff = abs(ui - uf)
    return {"samples": n, "sampler": f"{settings.sampler} {settings.steps}", "within_one_level":
            float((diff <= 1).mean()), "identical": float((diff == 0).mean()), "max_diff": int(diff.max())}


def _print(result: dict, batch: int) -> None:
    print(f"\n{result['model']}  ({result['params'] / 1e6:.2f}M params, batch {batch})")
    print(f"{'':6} {'bytes':>11} {'ratio':>6} {'fp32 ms':>9} {'fake ms':>9} {'int ms':>9} {'int/fp32':>9} "
          f"{'int/fake':>9} {'int layers':>11}")
    for r in result["rows"]:
        if r["precision"] == "FP32":
            print(f"{'FP32':6} {r['bytes']:>11,} {1.0:>6.3f} {r['fp32_ms']:>9.1f}")
            continue
        print(f"{r['precision']:6} {r['bytes']:>11,} {r['size_ratio']:>6.3f} {r['fp32_ms']:>9.1f} "
              f"{r['fake_ms']:>9.1f} {r['int_ms']:>9.1f} {r['int_vs_fp32']:>8.2f}x {r['int_vs_fake']:>8.2f}x "
              f"{r['int_layers']:>5}+{r['fallback_layers']} fb  {r['kernels']}"
              + (f"  pixels within 1 level (int vs fake, {r['pixel_agreement']['samples']} samples): "
                 f"{100 * r['pixel_agreement']['within_one_level']:.2f} %" if "pixel_agreement" in r else ""))


CLASSES = {"native": None, "avx2": "AVX2"}  # ONEDNN_MAX_CPU_ISA per CPU class (None: what this CPU has)


def _run_class(args: argparse.Namespace, merged_dir: Path, small: str) -> dict:
    """Every table row for the CPU class this process runs as (its oneDNN ISA is fixed at start)."""
    from lowbitdm_cli.export.kernel_probe import kernel_report

    results = []
    folder = merged_dir / f"scratch-{args.one_class}"
    folder.mkdir(exist_ok=True)
    merged = {label: merged_dir / "small" / label / "merge" for label in BITS}
    results.append(_bench(small, load_model(small), merged, folder, args))
    _print(results[-1], args.batch)
    merged = {label: merged_dir / f"large-{label}" for label in BITS}
    results.append(_bench("unet-128-256-256 (random init, 32x32x3)", _large_fp(), merged, folder, args))
    _print(results[-1], args.batch)
    if args.profile:
        results.append({"profile": _profile(merged_dir, args)})
    return {"cpu_class": args.one_class, **kernel_report(), "results": results}


@torch.no_grad()
def _profile(merged_dir: Path, args: argparse.Namespace) -> dict:
    """Where the integer runtime's time goes: top operators of one large-UNet W4A4 and W8A8 forward."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label in ("W4A4", "W8A8"):
        model = load_merged(merged_dir / f"large-{label}", "int")
        x = torch.randn(args.batch, *model.sample_shape, generator=torch.Generator().manual_seed(0))
        model.forward(x, 500, None)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.forward(x, 500, None)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        out[label] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                       "calls": e.count} for e in events]
        print(f"\nprofile, large UNet {label}, int runtime ({args.one_class}): top operators by self time")
        for e in out[label]:
            print(f"  {e['op']:<40} {e['self_ms']:>9.1f} ms {100 * e['share']:>5.1f} %  x{e['calls']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed runs per cell, tiny calibration")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agreement-samples", type=int, default=None,
                        help="samples for the int-vs-fake pixel agreement (default 100; --quick 10; 0 = skip)")
    parser.add_argument("--classes", default="native,avx2",
                        help="CPU classes to run, each in its own process: native (this CPU's kernels), avx2 "
                             "(oneDNN capped with ONEDNN_MAX_CPU_ISA=AVX2: what an AVX2-only CPU runs)")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of the int runtime")
    parser.add_argument("--one-class", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--merged-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "merged_runtime.json")
    args = parser.parse_args()
    args.repeats, args.warmup = (2, 1) if args.quick else (7, 2)
    if args.agreement_samples is None:
        args.agreement_samples = 10 if args.quick else 100
    torch.set_num_threads(args.threads)
    wf = WEIGHTS_DIR / "digits_unet.safetensors"
    small = "digits" if wf.is_file() else "tiny-random"
    note = None if small == "digits" else f"{wf} is absent (still training): tiny-random stands in for digits"
    if args.one_class:  # a child: one CPU class on checkpoints the parent merged
        args.out.write_text(json.dumps(_run_class(args, args.merged_dir, small)) + "\n")
        return
    if note:
        print(f"note: {note}")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        parser.error(f"unknown CPU class(es) {unknown}; choose from {sorted(CLASSES)}")
    per_class = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label in BITS:  # the same checkpoints for every class (merging does not touch int kernels)
            _merged_small(small, label, folder / "small", args.quick)
            _merged_large(label, folder, calib_batch=8 if args.quick else 32)
        for cpu_class in classes:
            env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
            if CLASSES[cpu_class]:
                env["ONEDNN_MAX_CPU_ISA"] = CLASSES[cpu_class]
            print(f"\n=== CPU class {cpu_class} (ONEDNN_MAX_CPU_ISA={env.get('ONEDNN_MAX_CPU_ISA', 'unset')}) ===")
            part = folder / f"{cpu_class}.json"
            cmd = [sys.executable, __file__, "--one-class", cpu_class, "--merged-dir", str(folder), "--out", str(part),
                   "--batch", str(args.batch), "--threads", str(args.threads),
                   "--agreement-samples", str(args.agreement_samples)]
            subprocess.run(cmd + (["--quick"] if args.quick else []) + (["--profile"] if args.profile else []),
                           env=env, check=True)
            per_class.append(json.loads(part.read_text()))
            print(f"kernels: {per_class[-1]['kernel_probes']}  cpu: {per_class[-1]['cpu']}")
    payload = {"quick": args.quick, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
               "warmup": args.warmup, "torch": torch.__version__, "note": note, "classes": per_class}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
