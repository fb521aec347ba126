"""Thread settings on a busy machine: the digits denoiser's CFG step, idle and under CPU hogs.

Each setting runs in a fresh Python process (OpenMP reads OMP_WAIT_POLICY when torch loads):

- ``2 threads, default``: torch's default on a 2-core machine (libgomp spins at barriers)
- ``2 threads, PASSIVE``: OMP_WAIT_POLICY=PASSIVE (waiting threads sleep instead of spinning)
- ``2 threads, spin 10k``: GOMP_SPINCOUNT=10000 (spin briefly, then sleep: what the CLI sets)
- ``1 thread``: no thread pool at all

and each under 0, 1, ... `--hogs` busy-looping processes started by this script (each keeps one
core busy, like another job on the machine). Timed: one guided denoiser call (ε with CFG, the
sampler's unit of work) on `--batch` samples, median of up to `--reps` calls after one warm-up;
a setting is cut off after `--budget` seconds (its median is then over the calls that finished).

    python benchmarks/threads.py            # batch 64, hogs 0..2
    python benchmarks/threads.py --quick    # batch 16, hogs 0 and 1, fewer reps
    python benchmarks/threads.py --merged runs/digits-ptq-w4a4/merge   # the integer runtime instead

Writes benchmarks/results/threads.json (threads_int.json with --merged; _quick with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lowbitdm_cli.export.kernel_probe import cpu_description

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = [  # label, threads, OMP_WAIT_POLICY (None = unset: libgomp's default), GOMP_SPINCOUNT (None = unset)
    ("2 threads, default", 2, None, None),
    ("2 threads, PASSIVE", 2, "PASSIVE", None),
    ("2 threads, spin 10k", 2, None, "10000"),  # the CLI's setting: spin briefly, then sleep
    ("1 thread", 1, None, None),
]

CHILD = r"""
import json, os, statistics, sys, time
import torch
threads, batch, reps, budget = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(threads)
from lowbitdm_cli.models.registry import load_model
from lowbitdm_cli.export.checkpoint import load_merged
model = load_merged(sys.argv[5], "int") if sys.argv[5] else load_model("digits")
x = torch.randn(batch, *model.sample_shape, generator=torch.Generator().manual_seed(0))
cond = torch.arange(batch) % model.num_classes
times = []
with torch.inference_mode():
    model.eps(x, 500, cond, 1.25)  # warm-up
    start = time.perf_counter()
    while len(times) < reps and time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        model.eps(x, 500, cond, 1.25)
        times.append(time.perf_counter() - t0)
print(json.dumps({"ms": 1000 * statistics.median(times), "calls": len(times),
                  "cut_off": len(times) < reps}))
"""


def cpu_name() -> str:
    return cpu_description()["model"]


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:
        h.kill()
    for h in hogs:
        h.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 16, hogs 0 and 1, 3 reps")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--hogs", type=int, nargs="*", default=None, help="background busy loops (default 0 1 2)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per setting before it is cut off")
    parser.add_argument("--merged", default="", help="a merge artifact of the digits model: time its integer "
                                                     "runtime instead of the FP model (results: threads_int.json)")
    args = parser.parse_args()
    batch = args.batch or (16 if args.quick else 64)
    hog_levels = args.hogs if args.hogs is not None else ([0, 1] if args.quick else [0, 1, 2])
    reps = args.reps or (3 if args.quick else 7)
    import torch

    info = {"model": f"int {args.merged}" if args.merged else "digits FP32", "cpu": cpu_name(),
            "isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch": torch.__version__, "batch": batch, "reps": reps, "budget_s": args.budget,
            "loadavg_at_start": os.getloadavg()}
    rows = []
    for hogs in hog_levels:
        for label, threads, policy, spin in SETTINGS:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                                     "GOMP_SPINCOUNT")}
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            if spin:
                env["GOMP_SPINCOUNT"] = spin
            running = start_hogs(hogs)
            try:
                time.sleep(0.5 if hogs else 0.0)
                done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(batch), str(reps),
                                       str(args.budget), args.merged], env=env, capture_output=True, text=True, check=False,
                                      timeout=args.budget * 4 + 120)
            finally:
                stop_hogs(running)
            if done.returncode != 0:
                raise SystemExit(f"{label}: child failed:\n{done.stderr}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"hogs": hogs, "setting": label, "threads": threads, "omp_wait_policy": policy or "default",
                         "gomp_spincount": spin or "default", **r})
            print(f"hogs {hogs}  {label:<20} {r['ms']:>9.1f} ms  ({r['calls']} calls"
                  f"{', cut off' if r['cut_off'] else ''})", flush=True)
    info["loadavg_at_end"] = os.getloadavg()
    print(f"\nCPU: {info['cpu']} ({info['cores']} cores, torch ISA {info['isa']}); CFG ε call, batch {batch} "
          f"({2 * batch} denoiser rows); load average at start {info['loadavg_at_start'][0]:.2f} (other users' jobs "
          f"included)")
    print(f"{'hogs':>4} " + " ".join(f"{label:>20}" for label, *_ in SETTINGS) + "   (ms per call; x = vs 1 thread)")
    for hogs in hog_levels:
        cells = {r["setting"]: r for r in rows if r["hogs"] == hogs}
        one = cells["1 thread"]["ms"]
        print(f"{hogs:>4} " + " ".join(f"{cells[label]['ms']:>11.1f} ({cells[label]['ms'] / one:>4.2f}x)"
                                       + ("*" if cells[label]["cut_off"] else " ") for label, *_ in SETTINGS))
    print("* cut off after --budget seconds: fewer calls than --reps")
    name = f"threads{'_int' if args.merged else ''}{'_quick' if args.quick else ''}.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps({"quick": args.quick, **info, "rows": rows},
                                                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
