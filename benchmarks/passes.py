"""The integer runtime's C passes (`export.passes`) one by one: this checkout's library, the eager ops they
replace, and optionally the library built from another git revision's `kernels/passes.c` (same compiler
flags), on the activation shapes of the digits UNet and the 26 M UNet of `merged_runtime.py` (batch 64).

Per shape, median milliseconds of each pass, all variants timed interleaved in one process
(torch.set_num_threads(2), glibc malloc keeping freed memory as the CLI does, each timed call after the
same write over 256 MiB, so every call starts from the same cache state):

  quantize NCHW       uint8 codes of a float32 NCHW input, same layout (an int8 kernel's input)
  operand NCHW->CL    the float path's float32 u − zx, written channels-last (its conv's input)
  rescale CL->NCHW    a channels-last float32 accumulator rescaled into an NCHW output (a conv's output)
  rescale CL->CL      the same, channels-last output (a channels-last model)

Every variant's output is checked equal to the eager ops' before timing.

    python benchmarks/passes.py                     # this checkout vs the eager ops
    python benchmarks/passes.py --against d71beb0   # and vs that revision's passes.c
    python benchmarks/passes.py --against HEAD      # the same library twice: the comparison's noise
    python benchmarks/passes.py --quick             # 3 timed runs, two shapes

Writes benchmarks/results/passes.json (--quick: passes_quick.json).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowbitdm_cli.export import native, passes
from lowbitdm_cli.memory import keep_freed_memory
from lowbitdm_cli.quant.integer import rescale as eager_rescale

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last
SHAPES = {"digits 32x16x16": (64, 32, 16, 16), "digits 128x4x4": (64, 128, 4, 4),
          "26M 128x32x32": (64, 128, 32, 32), "26M 384x32x32": (64, 384, 32, 32),
          "26M 256x16x16": (64, 256, 16, 16), "26M 512x8x8": (64, 512, 8, 8)}
QUICK_SHAPES = ("digits 32x16x16", "26M 128x32x32")
DELTA, Z, DX = 0.02, 20.0, 0.01
FLUSH_BYTES = 256 << 20  # written before every timed call: more than any last-level cache here


def _library_at(rev: str) -> ctypes.CDLL:
    """`kernels/passes.c` of git revision `rev`, built with this checkout's flags and argument types."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:lowbitdm_cli/export/kernels/passes.c"],
                            check=True, capture_output=True, text=True).stdout
    current = passes.load()
    if isinstance(current, str):
        raise SystemExit(current)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"passes_{rev}.c"
        path.write_text(source)
        lib = ctypes.CDLL(str(native.build(path, native.compiler("c"), passes.build_flags())))
    for name in ("lbd_quantize", "lbd_rescale"):
        getattr(lib, name).argtypes = getattr(current, name).argtypes
        getattr(lib, name).restype = None
    return lib


def _cells(shape: tuple[int, ...], libraries: dict[str, object]) -> dict[str, dict[str, Callable[[], object]]]:
    """Per pass: {variant: call}, each call's result checked against the eager ops' first."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2
    acc = (torch.randn(shape, generator=gen) * 1e4).round().contiguous(memory_format=CL)
    ws, bias = torch.rand(shape[1], generator=gen) * 1e-2, torch.randn(shape[1], generator=gen)
    dx = torch.tensor([DX])

    def eager_codes() -> torch.Tensor:
        return torch.div(x, torch.tensor([DELTA])).round_().add_(Z).clamp_(0.0, 255.0).to(torch.uint8)

    def eager_operand() -> torch.Tensor:
        q = torch.div(x, torch.tensor([DELTA])).round_().add_(Z).clamp_(0.0, 255.0).sub_(Z)
        return q.contiguous(memory_format=CL)

    def eager_rescaled(layout: torch.memory_format) -> torch.Tensor:
        return eager_rescale(acc.clone(), dx, ws, bias, 1, "conv", layout=layout, order="sequential")

    eager = {"quantize NCHW": eager_codes, "operand NCHW->CL": eager_operand,
             "rescale CL->NCHW": lambda: eager_rescaled(torch.contiguous_format),
             "rescale CL->CL": lambda: eager_rescaled(CL)}
    out: dict[str, dict[str, Callable[[], object]]] = {name: {"eager ops": fn} for name, fn in eager.items()}
    for label, lib in libraries.items():
        def bound(fn: Callable, lib: object = lib) -> Callable[[], object]:
            def run() -> object:
                saved, passes.load = passes.load, lambda: lib
                try:
                    return fn()
                finally:
                    passes.load = saved
            return run
        calls = {"quantize NCHW": bound(lambda: passes.quantize(x, DELTA, Z, 0.0, 255.0, 0.0)),
                 "operand NCHW->CL": bound(lambda: passes.operand(x, DELTA, Z, 0.0, 255.0, 0.0, int(Z), CL)),
                 "rescale CL->NCHW": bound(lambda: passes.rescale(acc, DX, ws, bias, False, torch.float32,
                                                                  torch.contiguous_format)),
                 "rescale CL->CL": bound(lambda: passes.rescale(acc, DX, ws, bias, False, torch.float32, CL))}
        for name, call in calls.items():
            got, expected = call(), eager[name]()
            if not (torch.equal(got, expected) and got.stride() == expected.stride()):
                raise SystemExit(f"{label}: {name} on {shape} differs from the eager ops")
            out[name][label] = call
    return out


def _time(cells: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per variant after one warm-up each, the variants interleaved with their order rotated each
    round (A, B, C, then B, C, A, ...), and every timed call preceded by the same write over `FLUSH_BYTES`
    (more than the last-level cache), so no call inherits a warmer or colder cache from the one before: with
    rotation alone a variant timed after the eager ops (which touch far more memory) twice in three rounds
    read about 6 % slower than the very same library timed beside it (`--against HEAD`)."""
    flush = torch.empty(FLUSH_BYTES // 4)
    for fn in cells.values():
        fn()
    keys = list(cells)
    times: dict[str, list[float]] = {k: [] for k in cells}
    for round_ in range(repeats):
        for key in keys[round_ % len(keys):] + keys[: round_ % len(keys)]:
            flush.fill_(1.0)
            start = time.perf_counter()
            cells[key]()
            times[key].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed runs per cell, two shapes")
    parser.add_argument("--against", help="a git revision whose kernels/passes.c is timed beside this checkout's")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per cell (default 15; --quick 3; rounded up to a multiple of the variants)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not passes.available():
        raise SystemExit(f"the passes do not run here: {passes.load()}")
    torch.set_num_threads(2)
    keep_freed_memory()
    repeats = args.repeats or (3 if args.quick else 15)
    variants_n = 2 + bool(args.against)
    repeats = -(-repeats // variants_n) * variants_n  # every variant in every slot equally often
    libraries: dict[str, object] = {"this checkout": passes.load()}
    if args.against:
        libraries[args.against] = _library_at(args.against)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k in QUICK_SHAPES}
    from lowbitdm_cli.export.kernel_probe import cpu_description

    results = []
    with torch.no_grad():
        for label, shape in shapes.items():
            for name, cells in _cells(shape, libraries).items():
                ms = _time(cells, repeats)
                results.append({"shape": label, "dims": list(shape), "pass": name, "ms": ms})
    variants = ["eager ops", *libraries]
    header = f"{'shape':<17} {'pass':<17}" + "".join(f" {v[:14]:>14}" for v in variants)
    cpu = cpu_description()
    print(f"CPU: {cpu}; torch {torch.__version__}, 2 threads, median of {repeats}, milliseconds")
    print(header + (f" {'speed-up':>9}" if args.against else ""))
    for r in results:
        row = f"{r['shape']:<17} {r['pass']:<17}" + "".join(f" {r['ms'][v]:>14.2f}" for v in variants)
        if args.against:
            r["speedup_vs_against"] = r["ms"][args.against] / r["ms"]["this checkout"]
            row += f" {r['speedup_vs_against']:>8.2f}x"
        print(row)
    out = args.out or ROOT / "benchmarks" / "results" / ("passes_quick.json" if args.quick else "passes.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "threads": 2, "repeats": repeats,
                               "against": args.against, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
