"""The compiled runtime (`sample --runtime compiled`) against what a user would run instead and
against lowbitdm's eager integer runtime, per CPU class; and what it does to the samples.

Cells, per model, timed interleaved in one process (A, B, C, A, B, C, ...; medians after a warm-up
that also compiles), batch 64, torch.set_num_threads(2):

  FP        fp32 (eager), fp32-compile (Inductor with freezing) and, where the CPU runs bf16 natively,
            bf16-autocast-cl (eager bf16 autocast, channels-last: the fastest eager FP here) and
            bf16-compile (bf16 autocast + Inductor with freezing: the fastest FP configuration);
  per width int (the eager integer runtime, everything around the int8 kernels in fp32, or bf16)
            and compiled (`export.compiled_runtime`, in fp32 and bf16).

Models: the embedded `digits` UNet merged through the chain (`--recipe`, default ptq; calibrate →
finetune → merge), the embedded `digits-dit` transformer likewise (`--dit-recipe`, default
efficientdm-tx: per-token inputs, smoothing, rotation and a low-rank branch on its attention and MLP
linears; on request, `--models digits,digits-dit,large`) and merged_runtime.py's 26 M UNet (random
init, min-max ptq at the same widths).
`best` is the speed-up over the fastest FP cell of that CPU class; `first s`, a compiled cell's first
call (it compiles the whole denoiser; Inductor's on-disk cache off, as on a first run).

Quality (digits and digits-dit, native class only, `--samples`, default 500): samples of the fake,
integer and compiled runtimes with the model's own sampler and the same seeds and classes: FID-digits and
class accuracy from the embedded evaluator, and the share of pixels on which int and compiled agree
with fake (identical, within one grey level).

CPU classes as in merged_runtime.py, each its own process: native, vnni (ONEDNN_MAX_CPU_ISA=
AVX512_CORE_VNNI) and avx2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2).

--profile (native class only, instead of the timings): where one forward's time goes, per model, for
the fastest FP cell and the compiled runtime at `--profile-width` (default W4A4) in bf16 (fp32 where the CPU has no bf16), without
and (where any layer folds) with the rescale folded into the kernels (`compile_runtime(fold=False)`:
every rescale after the kernel): torch.profiler's self time per forward, grouped into int8 kernels, float conv / matmul,
attention, Inductor's generated loops (named per kernel), copies and the rest, beside the wall time
of an unprofiled forward. Writes compiled_runtime_profile.json.

    python benchmarks/compiled_runtime.py                  # all classes, 5 timed runs per cell
    python benchmarks/compiled_runtime.py --classes native --models digits --repeats 21 --samples 0
    python benchmarks/compiled_runtime.py --quick          # native, digits only, 2 runs, 50 samples
    python benchmarks/compiled_runtime.py --classes native --models large
    python benchmarks/compiled_runtime.py --classes native --models digits-dit \
        --out benchmarks/results/compiled_runtime_dit.json
    python benchmarks/compiled_runtime.py --profile --merged-dir /tmp/ck   # reuses the checkpoints there
    python benchmarks/compiled_runtime.py --classes avx2 --widths W8A8 --products float,int8   # routes side by side

Writes benchmarks/results/compiled_runtime.json (--quick: compiled_runtime_quick.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import merged_runtime as mr  # sets the CLI's OpenMP wait policy before torch loads
import torch
from torch._inductor import config as inductor_config

from lowbitdm_cli.evaluation.digits_features import DigitsEvaluator
from lowbitdm_cli.export.checkpoint import load_merged
from lowbitdm_cli.export.compiled_runtime import PRODUCTS, RefLayer, available, compile_runtime
from lowbitdm_cli.export.int_runtime import lowering_counts
from lowbitdm_cli.export.kernel_probe import kernel_report
from lowbitdm_cli.memory import keep_freed_memory
from lowbitdm_cli.models.precision import DTYPES, bf16_native, use_dtype, use_layout
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.sampling import run_sampler, to_uint8

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = ("W8A8", "W4A4")
SMALL = ("digits", "digits-dit")  # the embedded models, merged through the chain
# on request (--widths): W8A8 with symmetric weights, whose layers are never shifted (w − zw is int8)
OPTIONAL_WIDTHS = ("W8A8" + mr.SYMMETRIC_WEIGHTS,)


def _fp_cells(make_fp: Callable[[], DiffusionModel], batch: int) -> dict[str, Callable]:
    cells = {"fp32": mr._call(make_fp(), batch)}
    compiled = make_fp()
    compiled.denoiser = torch.compile(compiled.denoiser, dynamic=False)
    cells["fp32-compile"] = mr._call(compiled, batch)
    if bf16_native():
        cells["bf16-autocast-cl"] = mr._call(use_layout(make_fp(), "channels_last"), batch, autocast=True)
        compiled = make_fp()
        compiled.denoiser = torch.compile(compiled.denoiser, dynamic=False)
        cells["bf16-compile"] = mr._call(compiled, batch, autocast=True)
    return cells


def _bench(title: str, make_fp: Callable[[], DiffusionModel], merged: dict[str, Path], args: argparse.Namespace
           ) -> dict:
    cells = _fp_cells(make_fp, args.batch)
    dtypes = ["fp32", "bf16"] if bf16_native() else ["fp32"]
    lowerings, int_models = {}, {}
    for label, path in merged.items():
        for dtype in dtypes:
            integer = use_dtype(load_merged(path, "int"), DTYPES[dtype])
            cells[f"{label} int {dtype}"] = mr._call(integer, args.batch)
            int_models[f"{label} int {dtype}"] = integer  # its lowerings are known after the first forward
            compiled = compile_runtime(use_dtype(load_merged(path, "int"), DTYPES[dtype]))
            cells[f"{label} compiled {dtype}"] = mr._call(compiled, args.batch)
            counts = Counter(m.lowering for m in compiled.denoiser.inner.modules() if isinstance(m, RefLayer))
            lowerings[f"{label} compiled {dtype}"] = dict(counts)
            rerouted = any(k.startswith(("inductor-float", "inductor-s16")) for k in counts)
            for product in args.products.split(",") if args.products and rerouted else ():
                # the same checkpoint with another route where oneDNN cannot run a layer in one exact call
                other = compile_runtime(use_dtype(load_merged(path, "int"), DTYPES[dtype]), product=product)
                cells[f"{label} compiled-{product} {dtype}"] = mr._call(other, args.batch)
                lowerings[f"{label} compiled-{product} {dtype}"] = dict(Counter(
                    m.lowering for m in other.denoiser.inner.modules() if isinstance(m, RefLayer)))
    first = {}  # a compiled cell's first call compiles: timed without Inductor's on-disk cache, as a first run
    with inductor_config.patch(fx_graph_cache=False):
        for key, fn in cells.items():
            if "compile" in key:
                t0 = time.perf_counter()
                fn()
                first[key] = time.perf_counter() - t0
    ms = {k: v * 1e3 for k, v in mr._time_cells(cells, args.repeats, args.warmup).items()}
    lowerings.update({key: lowering_counts(model.denoiser) for key, model in int_models.items()})
    fp = {k: v for k, v in ms.items() if " " not in k}
    fastest = min(fp, key=fp.get)
    rows = [{"precision": label, "runtime": runtime, "dtype": dtype, "ms": ms[f"{label} {runtime} {dtype}"],
             "vs_fp32": ms["fp32"] / ms[f"{label} {runtime} {dtype}"],
             "vs_fastest_fp": ms[fastest] / ms[f"{label} {runtime} {dtype}"],
             "first_call_s": first.get(f"{label} {runtime} {dtype}"),
             "lowerings": lowerings.get(f"{label} {runtime} {dtype}")}
            for label in merged for dtype in dtypes
            for runtime in ("int", "compiled", *(f"compiled-{p}" for p in PRODUCTS))
            if f"{label} {runtime} {dtype}" in ms]
    return {"model": title, "fp_ms": fp, "fastest_fp": fastest, "rows": rows,
            "fp_first_call_s": {k: v for k, v in first.items() if " " not in k}}


@torch.no_grad()
def _quality(name: str, merged: dict[str, Path], n: int) -> list[dict]:
    """`name`'s (digits or digits-dit) FID-digits / accuracy per runtime (fp32 around the int8 kernels;
    and the compiled runtime in bf16 where the CPU has it), and the share of pixels on which int and
    compiled agree with fake; for scale, the same for the FP model eager vs compiled."""
    settings = mr._model_sampler(name)
    evaluator = DigitsEvaluator()
    cond = torch.arange(n) % 10

    def images(model: DiffusionModel) -> torch.Tensor:  # uint8, as `sample` stores them
        chunks = [run_sampler(model, cond[i:i + 100], list(range(i, min(i + 100, n))), 0, settings)
                  for i in range(0, n, 100)]
        return torch.from_numpy(to_uint8(torch.cat(chunks))).int()

    def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
        diff = (a - b).abs()
        return {"identical": float((diff == 0).float().mean()), "within_one_level": float((diff <= 1).float().mean())}

    def metrics(x: torch.Tensor) -> dict:
        return {k: float(v) for k, v in evaluator.evaluate(x.to(torch.uint8), cond).items()}

    fp_compiled = load_model(name)
    fp_compiled.denoiser = torch.compile(fp_compiled.denoiser, dynamic=False)
    fp = {"eager": images(load_model(name)), "compiled": images(fp_compiled)}
    out = [{"model": name, "precision": "FP32", "samples": n, "sampler": f"{settings.sampler} {settings.steps}",
            "eager": metrics(fp["eager"]), "compiled": metrics(fp["compiled"]),
            "compiled_vs_eager": agreement(fp["compiled"], fp["eager"])}]
    for label, path in merged.items():
        runs = {"fake": load_merged(path, "fake"), "int": load_merged(path, "int"),
                "compiled": compile_runtime(load_merged(path, "int"))}
        if bf16_native():  # the bf16 model, folded layers writing bf16 from the kernel
            runs["compiled-bf16"] = compile_runtime(use_dtype(load_merged(path, "int"), torch.bfloat16))
        x = {runtime: images(model) for runtime, model in runs.items()}
        row = {"model": name, "precision": label, "samples": n, "sampler": f"{settings.sampler} {settings.steps}",
               **{runtime: metrics(v) for runtime, v in x.items()}}
        row.update({f"{runtime}_vs_fake": agreement(x[runtime], x["fake"]) for runtime in x if runtime != "fake"})
        out.append(row)
    return out


PROFILE_GROUPS = {  # profiler event → group, by prefix of its name (Inductor's kernels: "graph_")
    "int8 kernels": ("onednn::q",),
    "float conv / matmul": ("aten::mkldnn_convolution", "mkldnn::_convolution", "aten::bmm", "aten::addmm",
                            "aten::mm", "mkl::", "aten::_int_mm", "aten::convolution_overrideable"),
    "attention": ("aten::_scaled_dot_product",),
    "Inductor loops": ("graph_",),
    "copies": ("aten::copy_", "aten::_to_copy", "aten::clone"),
}


def _profile(cells: dict[str, Callable], forwards: int) -> dict:
    """Self time per forward (ms) of each cell, grouped (`PROFILE_GROUPS`), and its wall time unprofiled."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    walls = mr._time_cells(cells, forwards, 1)  # interleaved, as in the timing table
    for key, fn in cells.items():
        wall = walls[key] * 1e3
        with profile(activities=[ProfilerActivity.CPU]):  # a compiled FP cell recompiles once under the
            fn()  # profiler: not in the measured run
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                fn()
        groups = dict.fromkeys([*PROFILE_GROUPS, "other"], 0.0)
        loops = []
        for event in prof.key_averages():
            ms = event.self_cpu_time_total / 1e3 / forwards
            group = next((g for g, prefixes in PROFILE_GROUPS.items() if event.key.startswith(prefixes)), "other")
            groups[group] += ms
            if group == "Inductor loops":
                loops.append((ms, re.sub(r"^graph_\d+_", "", event.key)))
        out[key] = {"wall_ms": wall, "profiled_ms": sum(groups.values()), "groups_ms": groups,
                    "top_loops_ms": [{"ms": ms, "kernel": name} for ms, name in sorted(loops, reverse=True)[:5]]}
    return out


def _profile_class(args: argparse.Namespace, folder: Path) -> dict:
    """--profile: the fastest FP cell and the compiled runtime at `--profile-width` (folded or not) per model."""
    dtype_name = "bf16" if bf16_native() else "fp32"
    models = {**{name: (functools.partial(load_model, name), folder / name / args.profile_width / "merge") for name in SMALL},
              "large": (mr._large_fp, folder / f"large-{args.profile_width}")}
    results = []
    for name in args.models.split(","):
        make_fp, path = models[name]
        fp = _fp_cells(make_fp, args.batch)
        fastest = min(mr._time_cells(fp, 2, 1).items(), key=lambda kv: kv[1])[0]
        cells = {f"FP {fastest}": fp[fastest]}
        for fold in (False, True):
            model = compile_runtime(use_dtype(load_merged(path, "int"), DTYPES[dtype_name]), fold=fold)
            layers = [m for m in model.denoiser.inner.modules() if isinstance(m, RefLayer)]
            folded = sum(m.folded for m in layers)
            if fold and not folded:
                print(f"{name}: no layer folds (pair-safe splits everywhere)")
                break
            cells[f"{args.profile_width} compiled {dtype_name}" + (f" folded {folded}/{len(layers)}" if fold else "")] = mr._call(
                model, args.batch)
        results.append({"model": name, "cells": _profile(cells, args.repeats)})
        print(f"\n{name} (ms per forward; profiled self time by group, wall time unprofiled)")
        print(f"{'cell':44} {'wall':>7} " + " ".join(f"{g[:14]:>14}" for g in [*PROFILE_GROUPS, 'other']))
        for key, r in results[-1]["cells"].items():
            print(f"{key:44} {r['wall_ms']:>7.1f} " + " ".join(f"{v:>14.1f}" for v in r["groups_ms"].values()))
            for loop in r["top_loops_ms"][:3]:
                print(f"{'':46}{loop['ms']:>6.1f}  {loop['kernel'][:100]}")
    return {"cpu_class": "native", **kernel_report(), "profile": results}


def _print(result: dict) -> None:
    fp = result["fp_ms"]
    print(f"\n{result['model']}   FP: " + "   ".join(f"{k} {v:.0f} ms ({fp['fp32'] / v:.2f}x)" for k, v in fp.items())
          + f"   fastest: {result['fastest_fp']}")
    print("first call (compiles): " + "   ".join(f"{k} {v:.1f} s" for k, v in result["fp_first_call_s"].items()))
    print(f"{'':9} {'runtime':18} {'dtype':5} {'ms':>8} {'x fp32':>7} {'x best':>7} {'first s':>8}  lowerings")
    for r in result["rows"]:
        first = "" if r["first_call_s"] is None else f"{r['first_call_s']:>8.1f}"
        print(f"{r['precision']:9} {r['runtime']:18} {r['dtype']:5} {r['ms']:>8.1f} {r['vs_fp32']:>6.2f}x "
              f"{r['vs_fastest_fp']:>6.2f}x {first:>8}  {r.get('lowerings') or ''}")


def _run_class(args: argparse.Namespace, folder: Path) -> dict:
    widths = [w for w in (*WIDTHS, *OPTIONAL_WIDTHS) if w in args.widths.split(",")]
    results = []
    models = args.models.split(",")
    for name in (m for m in SMALL if m in models):
        merged = {w: folder / name / w / "merge" for w in widths}
        results.append(_bench(name, functools.partial(load_model, name), merged, args))
        _print(results[-1])
    if "large" in models:
        merged = {w: folder / f"large-{w}" for w in widths}
        results.append(_bench("unet-128-256-256 (random init, 32x32x3)", mr._large_fp, merged, args))
        _print(results[-1])
    quality = None
    if args.one_class == "native" and args.samples and any(m in models for m in SMALL):
        quality = [q for name in SMALL if name in models
                   for q in _quality(name, {w: folder / name / w / "merge" for w in widths}, args.samples)]
        for q in quality:
            runtimes = ("eager", "compiled") if q["precision"] == "FP32" else [
                k for k in ("fake", "int", "compiled", "compiled-bf16") if k in q]
            pairs = {k: v for k, v in q.items() if k.endswith(("_vs_fake", "_vs_eager"))}
            print(f"{q['model']} {q['precision']} ({q['samples']} samples, {q['sampler']}): " + "   ".join(
                f"{rt} FID {q[rt]['fid_digits']:.2f} acc {q[rt]['class_accuracy']:.3f}" for rt in runtimes)
                + "   identical pixels: " + ", ".join(f"{k} {v['identical']:.1%} (within one level "
                                                     f"{v['within_one_level']:.1%})" for k, v in pairs.items()))
    return {"cpu_class": args.one_class, **kernel_report(), "results": results, "quality": quality}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="native class, digits, 2 timed runs, 50 samples")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classes", default="native,vnni,avx2", help=f"CPU classes ({', '.join(mr.CLASSES)})")
    parser.add_argument("--models", default="digits,large",
                        help="of digits, digits-dit (the embedded DiT) and large (the 26 M UNet)")
    parser.add_argument("--widths", default=",".join(WIDTHS),
                        help=f"of {', '.join((*WIDTHS, *OPTIONAL_WIDTHS))} ({mr.SYMMETRIC_WEIGHTS}: symmetric weights)")
    parser.add_argument("--recipe", default="ptq", help="the recipe that makes the digits checkpoints")
    parser.add_argument("--dit-recipe", default="efficientdm-tx", help="the recipe that makes the digits-dit ones")
    parser.add_argument("--samples", type=int, default=None, help="quality samples per runtime (0: skip)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed forwards per cell, interleaved, the median kept (default 5; --quick 2)")
    parser.add_argument("--merged-dir", type=Path, default=None, help="keep / reuse the merged checkpoints here")
    parser.add_argument("--profile", action="store_true", help="where the time goes (native class), no table")
    parser.add_argument("--profile-width", default="W4A4", choices=[*WIDTHS, *OPTIONAL_WIDTHS],
                        help="the width --profile compiles (default W4A4)")
    parser.add_argument("--products", default="",
                        help="also time each compiled cell that has layers oneDNN cannot run in one exact call "
                             "(CPUs whose int8 kernels add pairs in 16 bits: AVX2) with these routes there "
                             "(`compile_runtime(product=...)`, of int8 (the weight split in two int8 calls), float "
                             "and s16): runtime compiled-<route>")
    parser.add_argument("--one-class", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if available():
        parser.error(available())
    if args.quick:
        args.classes, args.models = "native", "digits"
    if set(filter(None, args.products.split(","))) - set(PRODUCTS[1:]):
        parser.error(f"--products: choose of {', '.join(PRODUCTS[1:])}")
    unknown = set(args.models.split(",")) - {*SMALL, "large"}
    if unknown:
        parser.error(f"unknown --models {', '.join(sorted(unknown))}: choose of {', '.join((*SMALL, 'large'))}")
    args.repeats, args.warmup = args.repeats or (2 if args.quick else 5), 1
    args.samples = args.samples if args.samples is not None else (50 if args.quick else 500)
    suffix = "_profile" if args.profile else "_quick" if args.quick else ""
    args.out = args.out or ROOT / "benchmarks" / "results" / f"compiled_runtime{suffix}.json"
    if args.profile:
        args.classes = "native"
        inductor_config.cpp.enable_kernel_profile = True  # names each generated loop in the profile
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    inductor_config.freezing = True  # every compiled cell, FP ones too: weights folded as constants
    # every compiled model of one diffusers class shares a code object and dynamo's recompile limit (8):
    # room for all cells, and an error rather than a silent eager fallback past it
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if args.one_class:
        run = _profile_class if args.profile else _run_class
        args.out.write_text(json.dumps(run(args, args.merged_dir)) + "\n")
        return
    per_class = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.merged_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        models = args.models.split(",")
        for w in args.widths.split(","):
            for name in (m for m in SMALL if m in models and not (folder / m / w / "merge").is_dir()):
                symmetric = w.endswith(mr.SYMMETRIC_WEIGHTS)
                mr._merged_small(name, w, folder / name, args.quick,
                                 recipe=args.dit_recipe if name == "digits-dit" else args.recipe,
                                 bits=w.removesuffix(mr.SYMMETRIC_WEIGHTS).lower(),
                                 extra=("quant.w_symmetric=true",) if symmetric else ())
            if "large" in models and not (folder / f"large-{w}").is_dir():
                mr._merged_large(w, folder, calib_batch=32)
        for cpu_class in args.classes.split(","):
            env, (onednn_isa, aten_isa) = mr.class_env(cpu_class), mr.CLASSES[cpu_class]
            print(f"\n=== CPU class {cpu_class} (ONEDNN_MAX_CPU_ISA={onednn_isa or 'unset'}, "
                  f"ATEN_CPU_CAPABILITY={aten_isa or 'unset'}) ===", flush=True)
            part = folder / f"compiled-{cpu_class}.json"
            cmd = [sys.executable, __file__, "--one-class", cpu_class, "--merged-dir", str(folder), "--out", str(part),
                   "--batch", str(args.batch), "--threads", str(args.threads), "--models", args.models,
                   "--widths", args.widths, "--samples", str(args.samples), "--repeats", str(args.repeats),
                   *(["--quick"] if args.quick else []), "--products", args.products,
                   *(["--profile", "--profile-width", args.profile_width] if args.profile else [])]
            subprocess.run(cmd, env=env, check=True)
            per_class.append(json.loads(part.read_text()))
            print(f"kernels: {per_class[-1]['kernel_probes']}  cpu: {per_class[-1]['cpu']}")
    payload = {"quick": args.quick, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
               "recipe": args.recipe, "dit_recipe": args.dit_recipe, "torch": torch.__version__, "classes": per_class}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
