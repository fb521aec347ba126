"""Merged checkpoints: denoiser file size and forward time, the FP configurations a user would run
instead (FP32 eager, FP32 torch.compile, bf16 autocast, bf16, bf16 compiled) vs fake-quant vs integer runtime.

Two models, each at FP32, W8A8, W4A4 and W2A4 (per-channel asymmetric min-max weights,
per-tensor activations, the ptq recipe's layer policy):

  (i)  the embedded `digits` model through the real stage chain (calibrate → finetune → merge);
       if its weights are not there yet, the seeded `tiny-random` model of the same shape;
  (ii) a larger randomly initialised UNet2DModel (block_out_channels 128, 256, 256; 32x32x3,
       unconditional), quantized with the same library calls (`quantize_denoiser`, min-max
       `init_quantizer` on random calibration inputs, `export_tensors`) into a merged folder.

For each: bytes of the denoiser's safetensors file (FP32 state dict vs merged `model.safetensors`)
and the median denoiser forward time at batch 64 after warm-up, torch.set_num_threads(2), for
FP32 eager, FP32 `torch.compile` (inductor), and where the CPU runs bf16 natively (AMX-BF16 /
AVX512-BF16, `models.precision.bf16_native`) bf16 autocast, the model in bf16 and bf16 autocast under
`torch.compile` (on a small model often the fastest of all); then the
fake-quant and the integer runtime (`load_merged(..., "int")`) at each width in each of those
dtypes (`use_dtype`: everything around the quantized layers in that dtype). All cells of a model
are timed interleaved in one process (A, B, C, A, B, C, ...; medians), so load changes on a
shared machine hit them alike. `int/best` is the speed-up over the fastest FP configuration of
that CPU class, `int/fp32` over FP32 eager, `fake/fp` the fake runtime against the FP model in
the same dtype; `lowerings` counts the layers per kernel lowering.
For the embedded model also: samples (the model's own sampler, same seeds) from the integer and
the fake-quantized runtime, and the share of pixels on which they agree to one grey level.

Each CPU class runs in its own process on the same merged checkpoints: `native` (the kernels
this CPU has), `vnni` (oneDNN capped with ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI: AVX-512 VNNI
without bf16 or AMX) and `avx2` (oneDNN capped at AVX2 and ATEN_CPU_CAPABILITY=avx2, which is
what an AVX2-only CPU runs: 16-bit pair sums, split 8-bit weights). Each class's JSON names the
CPU, the ISA and what the kernel probes found. `--profile` adds the top operators of one forward
of the FP model and the W8A8 / W4A4 integer runtime of both models, per dtype.

    python benchmarks/merged_runtime.py            # 7 timed runs per cell, all classes
    python benchmarks/merged_runtime.py --quick    # 2 timed runs per cell, small calibration
    python benchmarks/merged_runtime.py --classes native --profile --skip-timing
    python benchmarks/merged_runtime.py --classes native --eager-passes   # int also with LOWBITDM_PASSES=0
    python benchmarks/merged_runtime.py --classes native --zero-points    # int also with LOWBITDM_ZERO_POINT_FREE=0
    python benchmarks/merged_runtime.py --model digits-dit --checkpoint W4A4=runs/digits-dit-efficientdm-tx-w4a4/merge

(`--checkpoint LABEL=MERGE_DIR`, repeatable: time existing merge artifacts, any recipe, against their
model's FP configurations instead of building ptq ones.)

Writes benchmarks/results/merged_runtime.json (--quick: merged_runtime_quick.json).
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
from collections.abc import Callable
from pathlib import Path

from lowbitdm_cli.memory import keep_freed_memory
from lowbitdm_cli.threads import limit_spin_wait

limit_spin_wait()  # as the CLI does, before torch loads: long-spinning OpenMP waiters ruin timings on a shared CPU

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lowbitdm_cli.export import fused_ops  # noqa: E402
from lowbitdm_cli.export.checkpoint import CONFIG_NAME, WEIGHTS_NAME, export_tensors, load_merged  # noqa: E402
from lowbitdm_cli.export.int_runtime import lowering_counts  # noqa: E402
from lowbitdm_cli.models.digits import WEIGHTS_DIR  # noqa: E402
from lowbitdm_cli.models.precision import DTYPES, bf16_native, use_dtype, use_layout  # noqa: E402
from lowbitdm_cli.models.registry import MODELS, load_model  # noqa: E402
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule  # noqa: E402
from lowbitdm_cli.quant.init import init_quantizer  # noqa: E402
from lowbitdm_cli.quant.layers import quant_layers  # noqa: E402
from lowbitdm_cli.quant.model import quantize_denoiser, set_quant_enabled  # noqa: E402
from lowbitdm_cli.quant.policy import QuantPolicy, build_layer_specs  # noqa: E402
from lowbitdm_cli.sampling import SamplerSettings, run_sampler, to_uint8  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BITS = {"W8A8": (8, 8), "W4A4": (4, 4), "W2A4": (2, 4)}
SYMMETRIC_WEIGHTS = "-symw"  # a width label's suffix: weights symmetric per channel (w − zw always int8)
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


def _call(model: DiffusionModel, batch: int, autocast: bool = False, fused: str = "0",
          order: str | None = None, passes: str = "1", zero_point_free: str = "1") -> Callable[[], object]:
    """One denoiser call (no CFG) on a fixed batch at t = 500; `autocast`: under torch.autocast("cpu", bf16);
    `fused`: LOWBITDM_FUSED during the call (the integer runtime's fused quantize / rescale loops);
    `order`: LOWBITDM_RESCALE_ORDER during the call (None: unset, the kernels' own order);
    `passes`: LOWBITDM_PASSES during the call ("0": the eager ops around the kernels, not `export.passes`);
    `zero_point_free`: LOWBITDM_ZERO_POINT_FREE during the call ("0": every conv passes its activation zero point
    to oneDNN, `IntConv2d.zero_point_free`)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    cond = torch.arange(batch) % model.num_classes if model.conditioning == "class" else None

    def run() -> object:
        os.environ["LOWBITDM_FUSED"] = fused
        os.environ["LOWBITDM_PASSES"] = passes
        os.environ["LOWBITDM_ZERO_POINT_FREE"] = zero_point_free
        _set_order(order)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return model.forward(x, 500, cond)
    return run


@torch.no_grad()
def _time_cells(cells: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per cell; the timed repeats interleave the cells (cell A, B, C, A, B, C, ...)
    so that a change in the machine's load hits every cell alike."""
    for fn in cells.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(repeats):
        for key, fn in cells.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _merged_small(name: str, label: str, folder: Path, quick: bool, bits: str | None = None,
                  extra: tuple[str, ...] = (), recipe: str = "ptq") -> Path:  # → folder/label/merge
    """The registered model through calibrate → finetune → merge (`recipe` at `bits`, default the
    label's; `extra`: more recipe settings, e.g. "quant.w_symmetric=true")."""
    from lowbitdm_cli.recipes import load_recipe
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    sets = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4"] if quick else []
    r = load_recipe(recipe, model=name, bits=bits or label.lower(), sets=sets + list(extra))
    calibrated = calibrate(r, folder / label / "calibrate")
    return merge(finetune(calibrated, r, folder / label / "finetune"), folder / label / "merge").path


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
    """quantize_denoiser + min-max init on random calibration inputs + export_tensors → merged folder
    (a label ending in `SYMMETRIC_WEIGHTS`: symmetric weights)."""
    w_bits, a_bits = BITS[label.removesuffix(SYMMETRIC_WEIGHTS)]
    model = _large_fp()
    policy = QuantPolicy(w_bits=w_bits, a_bits=a_bits, w_symmetric=label.endswith(SYMMETRIC_WEIGHTS))
    specs = build_layer_specs(model.denoiser, policy)
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


def _set_order(order: str | None) -> None:
    if order is None:
        os.environ.pop("LOWBITDM_RESCALE_ORDER", None)
    else:
        os.environ["LOWBITDM_RESCALE_ORDER"] = order


def _other_order() -> str | None:
    """The rescale order oneDNN's conv does not use here (None: it uses neither): with it, every layer
    rescales the kernel's exact accumulator itself, as the runtime did on AMX and AVX2 CPUs before
    it followed the kernels' order."""
    from lowbitdm_cli.export.kernel_probe import probe_rescale_order

    own = probe_rescale_order("conv")
    return None if own is None else {"sequential": "combined", "combined": "sequential"}[own]


LAYOUT_SUFFIX = {"nchw": "", "channels_last": "-cl"}


def _fp_cells(make_fp: Callable[[], DiffusionModel], dtypes: list[str], layouts: list[str], batch: int,
              compile_fp: bool = True) -> dict[str, Callable]:
    """What a user would run instead: FP32 eager, FP32 torch.compile and, where the CPU has bf16,
    bf16 autocast, the model converted to bf16 (`models.precision`, the dtype the quantized
    runtimes use) and bf16 autocast under torch.compile, each in every memory layout asked for (`-cl`:
    channels-last, `use_layout`)."""
    def compiled(layout: str) -> DiffusionModel:
        model = use_layout(make_fp(), layout)
        model.denoiser = torch.compile(model.denoiser)
        return model

    cells = {}
    for layout in layouts:
        sfx = LAYOUT_SUFFIX[layout]
        cells[f"fp32{sfx}"] = _call(use_layout(make_fp(), layout), batch)
        if compile_fp:
            cells[f"fp32-compile{sfx}"] = _call(compiled(layout), batch)
        if "bf16" in dtypes:
            cells[f"bf16-autocast{sfx}"] = _call(use_layout(make_fp(), layout), batch, autocast=True)
            cells[f"bf16{sfx}"] = _call(use_layout(use_dtype(make_fp(), torch.bfloat16), layout), batch)
            if compile_fp:  # often the fastest FP of all on a small model (Inductor fuses GroupNorm + SiLU)
                cells[f"bf16-compile{sfx}"] = _call(compiled(layout), batch, autocast=True)
    return cells


def _bench(title: str, make_fp: Callable[[], DiffusionModel], merged: dict[str, Path], folder: Path,
           args: argparse.Namespace) -> dict:
    """Every cell of one model, timed interleaved in one run: the FP configurations, and the fake and
    the integer runtime at each width in each float dtype this CPU runs natively."""
    fp = make_fp()
    fp_bytes = _file_bytes(fp.denoiser.state_dict(), folder, f"{fp.name}-fp32.safetensors")
    dtypes = ["fp32", "bf16"] if bf16_native() else ["fp32"]
    layouts = args.layouts.split(",")
    cells = _fp_cells(make_fp, dtypes, layouts, args.batch, compile_fp=not args.no_compile)
    integers: dict[str, DiffusionModel] = {}
    fused = args.fused and fused_ops.available()  # compiled loops that give the eager bits here
    other_order = _other_order() if args.self_rescale else None  # None: no int-self cells
    variants = [(dtype, layout, dtype + LAYOUT_SUFFIX[layout]) for layout in layouts for dtype in dtypes]
    for label, path in merged.items():
        for dtype, layout, variant in variants:
            for runtime in ("fake", "int"):
                model = use_layout(use_dtype(load_merged(path, runtime), DTYPES[dtype]), layout)
                cells[f"{label} {runtime} {variant}"] = _call(model, args.batch)
                if runtime == "int":
                    integers[f"{label} {variant}"] = model
                    if args.eager_passes:  # the same model object: LOWBITDM_PASSES is read per call
                        cells[f"{label} int-eager {variant}"] = _call(model, args.batch, passes="0")
                    if args.zero_points:  # the same model object: LOWBITDM_ZERO_POINT_FREE is read per call
                        cells[f"{label} int-zp {variant}"] = _call(model, args.batch, zero_point_free="0")
                    if fused:  # the same model object: LOWBITDM_FUSED is read per call
                        cells[f"{label} int-fused {variant}"] = _call(model, args.batch, fused="1")
                    if other_order:  # loaded and run in the other order
                        _set_order(other_order)
                        self_model = use_layout(use_dtype(load_merged(path, "int"), DTYPES[dtype]), layout)
                        _set_order(None)
                        cells[f"{label} int-self {variant}"] = _call(self_model, args.batch, order=other_order)
    ms = {k: v * 1e3 for k, v in _time_cells(cells, args.repeats, args.warmup).items()}
    fp_ms = {k: v for k, v in ms.items() if " " not in k}
    fastest = min(fp_ms, key=fp_ms.get)
    rows = []
    for label, path in merged.items():
        nbytes = (path / WEIGHTS_NAME).stat().st_size
        row = {"precision": label, "bytes": nbytes, "size_ratio": nbytes / fp_bytes, "per_dtype": {}}
        for *_, variant in variants:  # fp32, bf16, fp32-cl, bf16-cl (the JSON keeps the name per_dtype)
            integer = integers[f"{label} {variant}"]
            t_int, t_fake = ms[f"{label} int {variant}"], ms[f"{label} fake {variant}"]
            same_fp = ms[variant]  # the FP model in the same dtype and layout
            row["per_dtype"][variant] = {
                "int_ms": t_int, "fake_ms": t_fake, "int_vs_fp32": ms["fp32"] / t_int,
                "int_vs_fastest_fp": ms[fastest] / t_int, "fake_vs_same_dtype_fp": t_fake / same_fp,
                # as timed: where the first exact lowering was a split, the first forward autotuned
                "kernels": lowering_counts(integer.denoiser)}
            t_self = ms.get(f"{label} int-self {variant}")
            if t_self is not None:
                row["per_dtype"][variant].update(int_self_rescale_ms=t_self, kernel_rescale_speedup=t_self / t_int)
            t_eager = ms.get(f"{label} int-eager {variant}")
            if t_eager is not None:
                row["per_dtype"][variant].update(int_eager_ops_ms=t_eager, int_eager_ops_vs_fp32=ms["fp32"] / t_eager,
                                               passes_speedup=t_eager / t_int)
            t_zp = ms.get(f"{label} int-zp {variant}")
            if t_zp is not None:
                row["per_dtype"][variant].update(int_with_zero_points_ms=t_zp, zero_point_free_speedup=t_zp / t_int)
            t_fused = ms.get(f"{label} int-fused {variant}")
            if t_fused is not None:
                row["per_dtype"][variant].update(int_fused_ms=t_fused, int_fused_vs_fp32=ms["fp32"] / t_fused,
                                               int_fused_vs_fastest_fp=ms[fastest] / t_fused)
        report = integers[f"{label} {variants[0][2]}"].meta["runtime"]
        row.update(int_layers=report["int_layers"], fallback_layers=report["fallback_layers"])
        if args.agreement_samples and fp.name in MODELS:
            row["pixel_agreement"] = _agreement(fp.name, load_merged(path, "fake"), load_merged(path, "int"),
                                                args.agreement_samples)
        rows.append(row)
    return {"model": title, "params": sum(p.numel() for p in fp.denoiser.parameters()), "fp_bytes": fp_bytes,
            "fp_ms": fp_ms, "fastest_fp": fastest, "rows": rows}


def _model_sampler(name: str) -> SamplerSettings:
    """The registered model's own sampler settings."""
    sampler = MODELS[name].sampler
    return SamplerSettings(steps=sampler["steps"], eta=sampler["eta"], guidance=sampler["guidance"],
                           clip_x0=sampler["clip_x0"], sampler=sampler.get("sampler", "ddim"))


@torch.no_grad()
def _agreement(name: str, fake: DiffusionModel, integer: DiffusionModel, n: int) -> dict:
    """Share of pixels within one grey level between int and fake samples (same seeds and classes)."""
    settings = _model_sampler(name)
    idx = list(range(n))
    cond = torch.arange(n) % fake.num_classes if fake.conditioning == "class" else None
    ui = to_uint8(run_sampler(integer, cond, idx, 0, settings)).astype(int)
    uf = to_uint8(run_sampler(fake, cond, idx, 0, settings)).astype(int)
    diff = abs(ui - uf)
    return {"samples": n, "sampler": f"{settings.sampler} {settings.steps}", "within_one_level":
            float((diff <= 1).mean()), "identical": float((diff == 0).mean()), "max_diff": int(diff.max())}


def _print(result: dict, batch: int) -> None:
    fp = result["fp_ms"]
    print(f"\n{result['model']}  ({result['params'] / 1e6:.2f}M params, {result['fp_bytes']:,} bytes FP32, "
          f"batch {batch})")
    print("FP:  " + "   ".join(f"{k} {v:.1f} ms ({fp['fp32'] / v:.2f}x)" for k, v in fp.items())
          + f"   fastest: {result['fastest_fp']}")
    print(f"{'':6} {'dtype':5} {'ratio':>6} {'int ms':>9} {'fused ms':>9} {'fake ms':>9} {'int/fp32':>9} "
          f"{'int/best':>9} {'fused/best':>10} {'fake/fp':>8}  lowerings")
    for r in result["rows"]:
        for dtype, c in r["per_dtype"].items():
            fused_ms, fused_best = c.get("int_fused_ms"), c.get("int_fused_vs_fastest_fp")
            print(f"{r['precision']:6} {dtype:5} {r['size_ratio']:>6.3f} {c['int_ms']:>9.1f} "
                  + (f"{fused_ms:>9.1f} " if fused_ms else f"{'-':>9} ")
                  + f"{c['fake_ms']:>9.1f} {c['int_vs_fp32']:>8.2f}x {c['int_vs_fastest_fp']:>8.2f}x "
                  + (f"{fused_best:>9.2f}x " if fused_best else f"{'-':>10} ")
                  + f"{c['fake_vs_same_dtype_fp']:>7.2f}x  {c['kernels']}"
                  + (f"  (layers rescaling themselves: {c['int_self_rescale_ms']:.1f} ms, "
                     f"{c['kernel_rescale_speedup']:.2f}x slower)" if "int_self_rescale_ms" in c else "")
                  + (f"  (eager ops around the kernels: {c['int_eager_ops_ms']:.1f} ms, "
                     f"{c['int_eager_ops_vs_fp32']:.2f}x FP32; the C passes {c['passes_speedup']:.2f}x faster)"
                     if "int_eager_ops_ms" in c else "")
                  + (f"  (zero points passed to oneDNN: {c['int_with_zero_points_ms']:.1f} ms; zero-point-free "
                     f"{c['zero_point_free_speedup']:.2f}x faster)" if "int_with_zero_points_ms" in c else ""))
        if "pixel_agreement" in r:
            agree = r["pixel_agreement"]
            print(f"       pixels within 1 level (int vs fake, {agree['samples']} samples): "
                  f"{100 * agree['within_one_level']:.2f} %")


def _checkpoints(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> list[tuple[str, str]]:
    """--checkpoint LABEL=MERGE_DIR pairs, checked: each a merge artifact, --model given."""
    pairs = [tuple(c.split("=", 1)) for c in args.checkpoint]
    if parser is not None:
        if not args.model:
            parser.error("--checkpoint needs --model (the model the checkpoints were merged from)")
        for c, pair in zip(args.checkpoint, pairs):
            if len(pair) != 2 or not (Path(pair[1]) / WEIGHTS_NAME).is_file():
                parser.error(f"--checkpoint {c}: expected LABEL=MERGE_DIR with {WEIGHTS_NAME} in MERGE_DIR")
    return pairs


# per CPU class: ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY (None: what this CPU has)
CLASSES = {"native": (None, None), "vnni": ("AVX512_CORE_VNNI", None), "avx2": ("AVX2", "avx2")}


def class_env(cpu_class: str) -> dict[str, str]:
    """This process's environment with oneDNN and ATen capped as `cpu_class` runs (`CLASSES`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    onednn_isa, aten_isa = CLASSES[cpu_class]
    env.update({k: v for k, v in (("ONEDNN_MAX_CPU_ISA", onednn_isa), ("ATEN_CPU_CAPABILITY", aten_isa)) if v})
    return env


def _run_class(args: argparse.Namespace, merged_dir: Path, small: str) -> dict:
    """Every table row for the CPU class this process runs as (its oneDNN ISA is fixed at start)."""
    from lowbitdm_cli.export.kernel_probe import kernel_report

    results = []
    folder = merged_dir / f"scratch-{args.one_class}"
    folder.mkdir(exist_ok=True)
    widths = [w for w in BITS if w in args.widths.split(",")]
    if not args.skip_timing and "digits" in args.models:
        merged = ({label: Path(path) for label, path in _checkpoints(args)} if args.checkpoint
                  else {label: merged_dir / "small" / label / "merge" for label in widths})
        results.append(_bench(small, lambda: load_model(small), merged, folder, args))
        _print(results[-1], args.batch)
    if not args.skip_timing and "large" in args.models:
        merged = {label: merged_dir / f"large-{label}" for label in widths}
        results.append(_bench("unet-128-256-256 (random init, 32x32x3)", _large_fp, merged, folder, args))
        _print(results[-1], args.batch)
    if args.profile:
        results.append({"profile": _profile(merged_dir, small, args)})
    return {"cpu_class": args.one_class, "malloc": args.malloc, **kernel_report(), "results": results}


@torch.no_grad()
def _profile(merged_dir: Path, small: str, args: argparse.Namespace) -> dict:
    """Where the time goes: top operators (self time) of one forward of each model's W8A8 and W4A4
    integer runtime and of its FP model, in each float dtype this CPU runs natively."""
    from torch.profiler import ProfilerActivity, profile

    models = {"digits": (lambda: load_model(small), merged_dir / "small" / "{}" / "merge"),
              "unet-128-256-256": (_large_fp, merged_dir / "large-{}")}
    models = {k: v for k, v in models.items() if ("digits" if k == "digits" else "large") in args.models}
    out = {}
    for layout, dtype in [(lay, d) for lay in args.layouts.split(",")
                          for d in (["fp32", "bf16"] if bf16_native() else ["fp32"])]:
        for title, (make_fp, pattern) in models.items():
            variants = {"FP": make_fp()} | {f"int {label}": load_merged(str(pattern).format(label), "int")
                                           for label in ("W8A8", "W4A4")}
            for variant, model in variants.items():
                run = _call(use_layout(use_dtype(model, DTYPES[dtype]), layout), args.batch)
                run()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    run()
                averages = prof.key_averages()
                total = sum(e.self_cpu_time_total for e in averages)
                top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.profile_top]
                key = f"{title} {variant} {dtype}{LAYOUT_SUFFIX[layout]}"
                out[key] = {"total_ms": total / 1e3, "ops": [
                    {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                     "calls": e.count} for e in top]}
                print(f"\nprofile ({args.one_class}): {key}, {total / 1e3:.1f} ms self time in all; top operators")
                for e in out[key]["ops"]:
                    print(f"  {e['op']:<44} {e['self_ms']:>9.1f} ms {100 * e['share']:>5.1f} %  x{e['calls']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed runs per cell, tiny calibration")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agreement-samples", type=int, default=None,
                        help="samples for the int-vs-fake pixel agreement (default 100; --quick 10; 0 = skip)")
    parser.add_argument("--classes", default="native,vnni,avx2",
                        help="CPU classes to run, each in its own process: native (this CPU's kernels), vnni "
                             "(oneDNN capped at AVX512_CORE_VNNI: AVX-512 VNNI without bf16 or AMX), avx2 (oneDNN "
                             "capped at AVX2 and ATEN_CPU_CAPABILITY=avx2: what an AVX2-only CPU runs)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the top operators of the FP model and the W8A8 / W4A4 integer runtime")
    parser.add_argument("--profile-top", type=int, default=12, help="operators per profile table")
    parser.add_argument("--skip-timing", action="store_true", help="with --profile: only the profiles")
    parser.add_argument("--models", default="digits,large", help="digits and/or large (the 26 M UNet)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile cells (compiling a large UNet takes minutes)")
    parser.add_argument("--self-rescale", action="store_true",
                        help="also time each integer cell with every layer rescaling the kernel's accumulator itself "
                             "(LOWBITDM_RESCALE_ORDER set to the order the kernels do not use): what the runtime did "
                             "on AMX and AVX2 CPUs before it followed the kernels' order")
    parser.add_argument("--eager-passes", action="store_true",
                        help="also time the integer runtime with LOWBITDM_PASSES=0 (eager ops around its kernels "
                             "instead of export.passes' C loops), same model objects, interleaved")
    parser.add_argument("--zero-points", action="store_true",
                        help="also time the integer runtime with LOWBITDM_ZERO_POINT_FREE=0 (every conv passes its "
                             "activation zero point to oneDNN), same model objects, interleaved")
    parser.add_argument("--fused", action="store_true",
                        help="also time the integer runtime with LOWBITDM_FUSED=1 (compiles its loops first)")
    parser.add_argument("--widths", default=",".join(BITS),
                        help=f"weight/activation widths to time ({', '.join(BITS)})")
    parser.add_argument("--layouts", default="nchw,channels_last",
                        help="memory layouts to time every FP and quantized cell in (nchw, channels_last: "
                             "`sample --layout`); `-cl` marks channels-last cells")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc settings as they are (LOWBITDM_MALLOC=default) instead of keeping "
                             "freed memory for reuse as the CLI does (`lowbitdm_cli.memory`); applies to every cell")
    parser.add_argument("--merged-dir", type=Path, default=None,
                        help="keep the merged checkpoints in this folder and reuse them on the next run "
                             "(default: a temporary folder)")
    parser.add_argument("--model", default=None,
                        help="with --checkpoint: the registered model (or diffusers folder) they were merged from")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=MERGE_DIR",
                        help="time these merge artifacts (e.g. W4A4=runs/digits-dit-efficientdm-tx-w4a4/merge, "
                             "repeatable) against --model's FP configurations, instead of building ptq ones; "
                             "results go to merged_runtime_<model>.json")
    parser.add_argument("--one-class", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/merged_runtime.json (--quick: merged_runtime_quick.json)")
    args = parser.parse_args()
    if args.checkpoint:
        _checkpoints(args, parser)
        if args.profile:
            parser.error("--profile profiles the built ptq checkpoints; leave out --checkpoint")
        args.models = "digits"  # the one model the checkpoints belong to, in the `digits` slot
    suffix = f"_{Path(args.model).name}" if args.checkpoint else ""
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"merged_runtime{suffix}{'_quick' if args.quick else ''}.json"
    args.repeats, args.warmup = (2, 1) if args.quick else (7, 2)
    if args.agreement_samples is None:
        args.agreement_samples = 10 if args.quick else 100
    torch.set_num_threads(args.threads)
    unknown_layouts = set(args.layouts.split(",")) - set(LAYOUT_SUFFIX)
    if unknown_layouts:
        parser.error(f"unknown layout(s) {sorted(unknown_layouts)}; choose from {sorted(LAYOUT_SUFFIX)}")
    if args.default_malloc:
        os.environ["LOWBITDM_MALLOC"] = "default"
    args.malloc = "keep" if keep_freed_memory() else "default"  # every cell of this process alike
    wf = WEIGHTS_DIR / "digits_unet.safetensors"
    small = args.model if args.checkpoint else "digits" if wf.is_file() else "tiny-random"
    note = None if small != "tiny-random" else f"{wf} is absent (still training): tiny-random stands in for digits"
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
        folder = args.merged_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for label in [] if args.checkpoint else BITS:  # the same checkpoints for every class (merging does not touch int kernels)
            if not (folder / "small" / label / "merge").is_dir():
                _merged_small(small, label, folder / "small", args.quick)
            if not (folder / f"large-{label}").is_dir():
                _merged_large(label, folder, calib_batch=8 if args.quick else 32)
        for cpu_class in classes:
            env, (onednn_isa, aten_isa) = class_env(cpu_class), CLASSES[cpu_class]
            print(f"\n=== CPU class {cpu_class} (ONEDNN_MAX_CPU_ISA={onednn_isa or 'unset'}, "
                  f"ATEN_CPU_CAPABILITY={aten_isa or 'unset'}) ===")
            part = folder / f"{cpu_class}.json"
            cmd = [sys.executable, __file__, "--one-class", cpu_class, "--merged-dir", str(folder), "--out", str(part),
                   "--batch", str(args.batch), "--threads", str(args.threads),
                   "--agreement-samples", str(args.agreement_samples), "--profile-top", str(args.profile_top),
                   "--models", args.models, "--widths", args.widths, "--layouts", args.layouts,
                   *(["--model", args.model] if args.model else []),
                   *(a for c in args.checkpoint for a in ("--checkpoint", c))]
            flags = [f for f, on in (("--quick", args.quick), ("--profile", args.profile),
                                     ("--skip-timing", args.skip_timing), ("--fused", args.fused),
                                     ("--eager-passes", args.eager_passes), ("--zero-points", args.zero_points),
                                     ("--self-rescale", args.self_rescale), ("--default-malloc", args.default_malloc),
                                     ("--no-compile", args.no_compile)) if on]
            subprocess.run(cmd + flags, env=env, check=True)
            per_class.append(json.loads(part.read_text()))
            print(f"kernels: {per_class[-1]['kernel_probes']}  cpu: {per_class[-1]['cpu']}")
    payload = {"quick": args.quick, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
               "malloc": args.malloc, "layouts": args.layouts.split(","),
               "warmup": args.warmup, "torch": torch.__version__, "note": note, "classes": per_class}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
