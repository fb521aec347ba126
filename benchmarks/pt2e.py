"""PT2E (torchao's X86InductorQuantizer) + Inductor against lowbitdm's integer runtime, digits UNet.

Issue 26 item 3 asks whether the well-kept x86 int8 path, PT2E export + `X86InductorQuantizer` +
`torch.compile` with freezing (which lowers quantize / conv / linear / post-op patterns to fused
oneDNN kernels), should replace the hand-written integer runtime. This times, on the embedded
`digits` UNet at batch 64 and a fixed timestep (t = 500), 2 threads:

  fp32            FP32 eager (the reference of every ratio)
  fp32-compile    FP32 `torch.compile` (inductor)
  bf16-autocast   the FP model under torch.autocast("cpu", bf16), where the CPU has bf16
  pt2e-w8a8       PT2E W8A8 static, the quantizer's default config (per-channel symmetric int8
                  weights, per-tensor affine uint8 activations, HistogramObserver), calibrated on
                  the calibration data of lowbitdm's own W8A8 run (the same x_t, t and classes,
                  both CFG branches, regrouped into batches of 64), then `torch.compile` with `torch._inductor.config.freezing = True`
  pt2e-w8a8-bf16  the same compiled graph run under bf16 autocast (PyTorch's "int8-mixed-bf16"),
                  where the CPU has bf16
  int-w8a8 fp32   lowbitdm's merged W8A8 (ptq recipe, built by `merged_runtime._merged_small`) on
                  the integer runtime, float parts in fp32; `int-w8a8 bf16` in bf16

All cells are timed interleaved (A, B, C, A, B, C, ...; median of the repeats) in one process,
in several rounds; each round's ratios are taken against FP32 eager and bf16 autocast of the same
round, and the table reports the median ratio over rounds (the machine is shared with other jobs,
so absolute times move; ratios within a round much less).

Accuracy, on held-out inputs (x_t of every step of the FP model's own sampler trajectories, the
calibration's sampler and seed, sample indices after the calibration set's, conditional branch):
relative ε error ||ε_q − ε_fp|| / ||ε_fp|| over all of them, for PT2E's reference graph
(`convert_pt2e`, eager q/dq ops), PT2E compiled, lowbitdm fake and int; and how far each compiled /
integer path is from its own fake-quantized reference (lowbitdm: int vs fake; PT2E: compiled vs
`convert_pt2e`). Compile time: the first call of each compiled cell (and PT2E's export, calibration
and convert), on the shared machine.

Unless --no-prototype, `pt2e_layer` also measures, on one conv layer, lowbitdm's own W8A8 quantizer
driving PT2E (a second merged checkpoint, the same recipe with symmetric weights: PT2E's oneDNN
kernels take no weight zero point): the layer's integer weights (w − zw, Δw per channel) and input
(Δx, zx) go into the prepared graph through fixed-qparams observers, compiled with freezing, and
are compared bit for bit with lowbitdm's fake and integer layer on that layer's real input and on
saturating codes, natively and in a child process capped at AVX2; and timed. Benchmark code, not
product code.

Needs torchao (`pip install --no-deps torchao`; 0.18.0 imports with torch 2.14.1); lowbitdm does not
depend on it. Inductor compiles with TORCHINDUCTOR_COMPILE_THREADS=1 (a shared 2-core machine) into a
fresh cache folder, unless those variables are set.

    python benchmarks/pt2e.py            # 7 timed forwards per cell per round, 3 rounds
    python benchmarks/pt2e.py --quick    # 2 per cell, 2 rounds, small calibration

Writes benchmarks/results/pt2e.json (--quick: pt2e_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# compile times from scratch: a fresh Inductor cache (removed at the end) unless one is set
_FRESH_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="pt2e-inductor-")
if _FRESH_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _FRESH_CACHE
sys.path.insert(0, str(Path(__file__).resolve().parent))

import merged_runtime as mr
import pt2e_layer
import torch
from safetensors.torch import load_file
from torch import nn

from lowbitdm_cli.calibration.data import CalibrationData, collect_batch
from lowbitdm_cli.export.checkpoint import load_merged
from lowbitdm_cli.export.int_runtime import lowering_counts
from lowbitdm_cli.export.kernel_probe import kernel_report
from lowbitdm_cli.models.precision import bf16_native, use_dtype
from lowbitdm_cli.models.registry import load_model, sampler_defaults
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.stages.common import sampler_settings

ROOT = Path(__file__).resolve().parent.parent


class _Eps(nn.Module):
    """The denoiser as a function of tensors only, for torch.export: (x, t, class labels) → ε.
    `t` is a 0-d tensor: diffusers broadcasts it with ``t[None] * ones(B)``, a mul of unequal shapes
    that X86InductorQuantizer leaves alone (a [B] timestep makes it annotate that integer mul as a
    quantized one, and its HistogramObserver fails on int64)."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, timestep=t, class_labels=class_labels).sample


class _AsDenoiser(nn.Module):
    """A graph of `_Eps`'s signature called the way `DiffusionModel.forward` calls a denoiser, so the
    PT2E cells run through the same `merged_runtime._call` as every other cell."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph
        # DiffusionModel.device reads the first parameter; a converted graph may have none left
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.graph(sample, timestep[0], class_labels))


def _with_graph(fp: DiffusionModel, graph: nn.Module) -> DiffusionModel:
    return DiffusionModel(denoiser=_AsDenoiser(graph), schedule=fp.schedule, sample_shape=fp.sample_shape,
                          conditioning=fp.conditioning, num_classes=fp.num_classes, null_class=fp.null_class,
                          name=f"{fp.name}-pt2e")


def _denoiser_inputs(fp: DiffusionModel, data: CalibrationData, guidance: float, batch: int):
    """What the denoiser sees on the calibration data (both CFG branches, as `DiffusionModel.eps`
    batches them), step by step, regrouped into batches of exactly `batch` rows (the exported graph
    has a static batch); a step's last batch is filled up by cycling that step's rows (repeats
    change no min/max, only the histogram's weights)."""
    cond = data.conds
    for s, t in enumerate(data.ts.tolist()):
        x = data.xs[s]
        c = cond
        if fp.conditional and guidance != 1.0:
            x, c = torch.cat([x, x]), torch.cat([cond, torch.full_like(cond, fp.null_class)])
        n = x.shape[0]
        for i in range(0, n, batch):
            idx = torch.arange(i, i + batch) % n
            yield x[idx], int(t), c[idx]


@torch.no_grad()
def _pt2e(fp: DiffusionModel, data: CalibrationData, guidance: float, batch: int) -> dict:
    """Export → prepare (X86InductorQuantizer, default static config) → calibrate on lowbitdm's
    calibration data (the inputs `calibration.ptq.init_activations` gives the denoiser) → convert.
    Returns the converted graph (PT2E's q/dq reference) and the seconds each step took."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    g = torch.Generator().manual_seed(0)
    example = (torch.randn(batch, *fp.sample_shape, generator=g), torch.tensor(500),
               torch.arange(batch) % fp.num_classes)
    t0 = time.perf_counter()
    exported = torch.export.export(_Eps(fp.denoiser).eval(), example).module()
    t_export = time.perf_counter() - t0
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    observed = _with_graph(fp, prepared)
    t0 = time.perf_counter()
    for x, t, c in _denoiser_inputs(fp, data, guidance, batch):
        observed.forward(x, t, c)
    t_calib = time.perf_counter() - t0
    t0 = time.perf_counter()
    converted = convert_pt2e(prepared)
    t_convert = time.perf_counter() - t0
    return {"graph": converted, "export_s": t_export, "calibrate_s": t_calib, "convert_s": t_convert}


def _compiled(graph: torch.fx.GraphModule, autocast: bool = False) -> nn.Module:
    """`graph` under torch.compile with freezing. `autocast`: for running under bf16 autocast
    (int8-mixed-bf16), with export's dtype assertions (float32 where `.to()` was traced) removed,
    as autocast makes those tensors bf16."""
    torch._inductor.config.freezing = True
    graph = copy.deepcopy(graph)
    if autocast:
        for node in list(graph.graph.nodes):
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                graph.graph.erase_node(node)
        graph.recompile()
    return torch.compile(graph)


@torch.no_grad()
def _heldout(fp: DiffusionModel, recipe: object, start: int, n: int) -> CalibrationData:
    """x_t at every step of the FP sampler's trajectories for samples start..start+n-1."""
    settings = sampler_settings(recipe.sample)
    return collect_batch(fp, list(range(start, start + n)), recipe.calibrate.seed, settings,
                         list(range(settings.steps)))


@torch.no_grad()
def _eps_all(model: DiffusionModel, data: CalibrationData, autocast: bool = False) -> torch.Tensor:
    outs = []
    for s, t in enumerate(data.ts.tolist()):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            outs.append(model.forward(data.xs[s], int(t), data.conds).float())
    return torch.stack(outs)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def _accuracy(eps: dict[str, torch.Tensor]) -> dict:
    ref = eps["fp32"]
    out = {"rel_eps_error_vs_fp32": {k: _rel(v, ref) for k, v in eps.items() if k != "fp32"}}
    pairs = {"lowbitdm int vs fake (fp32)": ("int-w8a8 fp32", "fake-w8a8 fp32"),
             "lowbitdm int vs fake (bf16)": ("int-w8a8 bf16", "fake-w8a8 bf16"),
             "pt2e compiled vs convert_pt2e reference": ("pt2e-w8a8", "pt2e-w8a8 reference")}
    out["vs_own_reference"] = {
        name: {"max_abs_diff": float((eps[a] - eps[b]).abs().max()), "identical": float((eps[a] == eps[b]).float().mean()),
               "rel_diff": _rel(eps[a], eps[b])}
        for name, (a, b) in pairs.items() if a in eps and b in eps}
    return out


def _isa_flags() -> list[str]:
    """The x86 ISA extensions of this CPU that decide its int8 / bf16 kernels (/proc/cpuinfo)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
            if f in flags]


def _rounds(cells: dict, args: argparse.Namespace) -> dict:
    """`args.rounds` interleaved timing rounds; per round the medians and the ratios to FP32 eager
    and bf16 autocast of that round; then the median of each over the rounds."""
    rounds = []
    for r in range(args.rounds):
        ms = {k: v * 1e3 for k, v in mr._time_cells(cells, args.repeats, args.warmup).items()}
        entry = {"ms": ms, "vs_fp32": {k: ms["fp32"] / v for k, v in ms.items()}}
        if "bf16-autocast" in ms:
            entry["vs_bf16_autocast"] = {k: ms["bf16-autocast"] / v for k, v in ms.items()}
        rounds.append(entry)
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v:.0f} ms" for k, v in ms.items()), flush=True)
    summary = {key: {k: statistics.median(rd[key][k] for rd in rounds) for k in cells}
               for key in rounds[0]}
    return {"rounds": rounds, "median": summary}


def _print_table(timing: dict, accuracy: dict, compile_s: dict) -> None:
    med = timing["median"]
    has_bf16 = "vs_bf16_autocast" in med
    print(f"\n{'configuration':<16} {'median ms':>10} {'vs FP32 eager':>14} "
          + (f"{'vs bf16 autocast':>17} " if has_bf16 else "") + f"{'rel eps err':>12} {'compile s':>10}")
    errs = accuracy["rel_eps_error_vs_fp32"]
    for k in med["ms"]:
        err = errs.get(k)
        print(f"{k:<16} {med['ms'][k]:>10.1f} {med['vs_fp32'][k]:>13.2f}x "
              + (f"{med['vs_bf16_autocast'][k]:>16.2f}x " if has_bf16 else "")
              + (f"{100 * err:>11.2f}% " if err is not None else f"{'-':>12} ")
              + (f"{compile_s[k]:>10.0f}" if k in compile_s else f"{'-':>10}"))
    for name, d in accuracy["vs_own_reference"].items():
        print(f"{name}: max |diff| {d['max_abs_diff']:.3g}, identical {100 * d['identical']:.2f} %, "
              f"rel diff {100 * d['rel_diff']:.3f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed runs per cell, 2 rounds, small calibration")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3; --quick 2)")
    parser.add_argument("--no-prototype", action="store_true", help="skip the one-layer lowbitdm-scales prototype")
    parser.add_argument("--merged-dir", type=Path, default=None,
                        help="keep the merged W8A8 checkpoint here and reuse it (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/pt2e.json (--quick: pt2e_quick.json)")
    args = parser.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / f"pt2e{'_quick' if args.quick else ''}.json"
    args.repeats, args.warmup = (2, 1) if args.quick else (7, 2)
    args.rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    try:
        import torchao
    except ImportError:
        parser.error("needs torchao (not a lowbitdm dependency): pip install --no-deps torchao==0.18.0")

    small = "digits" if (mr.WEIGHTS_DIR / "digits_unet.safetensors").is_file() else "tiny-random"
    sets = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4"] if args.quick else []
    recipe = load_recipe("ptq", model=small, bits="w8a8", sets=sets).resolved(sampler_defaults(small))  # as calibrate
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.merged_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "W8A8" / "merge").is_dir():
            mr._merged_small(small, "W8A8", folder, args.quick)
        merged = folder / "W8A8" / "merge"
        calib = CalibrationData.from_tensors(load_file(str(folder / "W8A8" / "calibrate" / "calib_data.safetensors")))
        bf16 = bf16_native()
        fp = load_model(small)
        pt2e = _pt2e(fp, calib, recipe.sample.guidance, args.batch)
        pt2e_model = _with_graph(fp, _compiled(pt2e["graph"]))
        cells = mr._fp_cells(lambda: load_model(small), ["fp32", "bf16"] if bf16 else ["fp32"], args.batch)
        cells.pop("bf16", None)  # the model cast to bf16: not a configuration this comparison needs
        cells["pt2e-w8a8"] = mr._call(pt2e_model, args.batch)
        if bf16:
            pt2e_bf16 = _with_graph(fp, _compiled(pt2e["graph"], autocast=True))
            cells["pt2e-w8a8-bf16"] = mr._call(pt2e_bf16, args.batch, autocast=True)
        runtimes = {"int-w8a8 fp32": use_dtype(load_merged(merged, "int"), torch.float32)}
        if bf16:
            runtimes["int-w8a8 bf16"] = use_dtype(load_merged(merged, "int"), torch.bfloat16)
        for k, model in runtimes.items():
            cells[k] = mr._call(model, args.batch)
        compile_s = {}
        with torch.no_grad():
            for k in ("fp32-compile", "pt2e-w8a8", "pt2e-w8a8-bf16"):
                if k in cells:
                    t0 = time.perf_counter()
                    cells[k]()
                    compile_s[k] = time.perf_counter() - t0
                    print(f"{k}: first call (compile) {compile_s[k]:.0f} s", flush=True)
        timing = _rounds(cells, args)

        held = _heldout(fp, recipe, recipe.calibrate.num_samples, args.batch)  # the graphs' static batch
        eps = {"fp32": _eps_all(fp, held), "pt2e-w8a8 reference": _eps_all(_with_graph(fp, pt2e["graph"]), held),
               "pt2e-w8a8": _eps_all(pt2e_model, held), "fake-w8a8 fp32": _eps_all(load_merged(merged, "fake"), held)}
        if bf16:
            eps["pt2e-w8a8-bf16"] = _eps_all(pt2e_bf16, held, autocast=True)
            eps["bf16-autocast"] = _eps_all(fp, held, autocast=True)
            eps["fake-w8a8 bf16"] = _eps_all(use_dtype(load_merged(merged, "fake"), torch.bfloat16), held)
        eps.update({k: _eps_all(m, held) for k, m in runtimes.items()})
        accuracy = _accuracy(eps)
        accuracy["heldout"] = {"samples": args.batch, "steps": int(held.ts.numel()), "timesteps": held.ts.tolist(),
                               "branch": "conditional"}
        prototype = None
        if not args.no_prototype:
            prototype = pt2e_layer.run(args, folder, small, _compiled)
        report = kernel_report()
        payload = {
            "quick": args.quick, "model": small, "batch": args.batch, "timestep": 500, "threads": args.threads,
            "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds, "torch": torch.__version__,
            "torchao": torchao.__version__, "cpu": report["cpu"], "isa_flags": _isa_flags(), "kernel_probes": report["kernel_probes"],
            "bf16_native": bf16, "shared_machine": True,
            "note": "timed on a 2-core machine shared with other jobs (training, other benchmarks): absolute "
                    "times are not comparable between runs; ratios are taken within each round",
            "pt2e_steps_s": {k: v for k, v in pt2e.items() if k.endswith("_s")}, "compile_first_call_s": compile_s,
            "lowerings": {k: lowering_counts(m.denoiser) for k, m in runtimes.items()},
            "timing": timing, "accuracy": accuracy, "prototype": prototype}
    print(f"\ndigits UNet ({small}), batch {args.batch}, t=500, {args.threads} threads, "
          f"median of {args.rounds} rounds x {args.repeats} forwards\nCPU {report['cpu']['model']}, "
          f"{' '.join(_isa_flags())}; torch {torch.__version__}, torchao {torchao.__version__}; shared machine")
    _print_table(timing, accuracy, compile_s)
    if prototype:
        pt2e_layer.print_summary(prototype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    if _FRESH_CACHE:
        shutil.rmtree(_FRESH_CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
