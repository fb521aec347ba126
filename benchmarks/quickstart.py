"""The README's main job, measured: `lowbitdm run --recipe ptq --bits w8a8` on the embedded model.

Runs the CLI as a user does (a fresh Python process, a fresh runs folder, an empty FP cache) and
prints FP vs quantized metrics, the whole job's wall time, each stage's wall time (from the
manifests) and the CPU it ran on (model name from /proc/cpuinfo, torch's ISA level).

    python benchmarks/quickstart.py                   # the README's setting (500 samples)
    python benchmarks/quickstart.py --quick           # 100 samples, for a smoke check
    python benchmarks/quickstart.py --against 398ffa4 # that revision's main job, then this code's, back to back
    python benchmarks/quickstart.py --against 398ffa4 --repeat 2  # old, new, old, new: medians compared

`--against REV` extracts git revision REV of this repository (`git archive`, into a temporary
folder; the repository and its worktrees are not touched) and runs its CLI with PYTHONPATH
pointed there, then the current code's, on the same machine one after the other, and prints the
ratio new / old per stage and in all. `--warm` adds a second run of the current code in another
runs folder with the same FP cache (the baseline is then copied, not recomputed). Both runs get
the caller's environment minus OMP_WAIT_POLICY / OMP_NUM_THREADS / LOWBITDM_THREADS, so each
code uses its own thread defaults.

Writes benchmarks/results/quickstart.json (quickstart_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from lowbitdm_cli.export.kernel_probe import cpu_description

ROOT = Path(__file__).resolve().parent.parent
STAGES = [("fp", "sample"), ("fp", "evaluate"), ("q", "calibrate"), ("q", "finetune"), ("q", "merge"),
          ("q", "sample"), ("q", "evaluate")]


def cpu_name() -> str:
    return cpu_description()["model"]


def extract_revision(rev: str, dest: Path) -> str:
    """Write the tree of `rev` into `dest` (git archive); returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=False)
    if commit.returncode != 0:
        raise SystemExit(f"--against {rev}: not a commit of {ROOT} ({commit.stderr.strip()})")
    archive = dest.with_suffix(".tar")
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit.stdout.strip()],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return commit.stdout.strip()


def run_job(code: Path, runs: Path, sets: list[str], label: str, fp_cache: Path) -> dict:
    """`python -m lowbitdm_cli --json run --recipe ptq --bits w8a8` of the code in `code`, its FP baselines
    cached in `fp_cache` (``$LOWBITDM_FP_CACHE``, which older revisions read too: without it an old run
    found the FP baseline in the user's default cache, filled by earlier runs, and skipped the FP stages
    that the new run did)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                             "LOWBITDM_THREADS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(code)
    env["LOWBITDM_FP_CACHE"] = str(fp_cache)
    cmd = [sys.executable, "-m", "lowbitdm_cli", "--json", "run", "--recipe", "ptq", "--bits", "w8a8",
           "--runs-dir", str(runs), *[a for s in sets for a in ("--set", s)]]
    print(f"[{label}] {' '.join(cmd[1:])}  (PYTHONPATH={code})", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=runs.parent, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"[{label}] failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    fp_dir = Path(result["rows"][0]["path"]).parent
    q_dir = Path(result["run_dir"])
    stages = {}
    for where, stage in STAGES:
        manifest = json.loads(((fp_dir if where == "fp" else q_dir) / stage / "manifest.json").read_text())
        stages[f"{where} {stage}"] = manifest["timings"].get("wall_s", 0.0)
    if result.get("fp_from_cache"):
        stages["fp sample"] = stages["fp evaluate"] = 0.0  # copied, not run (the manifests keep the original times)
    stages["startup, loading, copying"] = max(wall - sum(stages.values()), 0.0)
    fp, q = result["rows"][0]["metrics"], result["rows"][1]["metrics"]
    out = {"label": label, "code": str(code), "wall_s": round(wall, 1), "stages_s": {k: round(v, 1) for k, v in
                                                                                      stages.items()},
           "fp": fp, "w8a8": q, "fp_from_cache": bool(result.get("fp_from_cache")),
           "fid_w8a8_vs_fp": q["fid_digits"] / fp["fid_digits"] - 1, "loadavg_after": os.getloadavg()}
    print(f"[{label}] {wall:.0f} s; FID-digits fp {fp['fid_digits']:.2f}, w8a8 {q['fid_digits']:.2f} "
          f"({out['fid_w8a8_vs_fp']:+.1%})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 samples instead of 500")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/quickstart.json)")
    parser.add_argument("--against", metavar="REV", default=None, help="git revision to compare with (e.g. 398ffa4)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="with --against: run the old and the new job N times, alternating (old, new, old, "
                             "new, ...), and compare the medians (a shared machine drifts by tens of percent)")
    parser.add_argument("--warm", action="store_true", help="also rerun the current code in a new runs folder "
                                                            "with the FP cache filled")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra recipe override for every run (e.g. a smoke check with fewer samples)")
    args = parser.parse_args()
    import torch

    sets = (["sample.num_samples=100", "sample.batch_size=100"] if args.quick else []) + args.sets
    tmp = Path(tempfile.mkdtemp(prefix="lowbitdm-quickstart-"))
    info = {"quick": args.quick, "cpu": cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(),
            # ONEDNN_MAX_CPU_ISA=AVX2 runs the int8 kernels as an AVX2-only CPU does (16-bit pair sums)
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "loadavg_at_start": os.getloadavg(), "sets": sets}
    runs = []
    try:
        repeats = max(args.repeat, 1) if args.against else 1
        if args.against:
            old_code = tmp / "old"
            info["against"] = extract_revision(args.against, old_code)
        for i in range(repeats):  # each run in a fresh runs folder with an empty FP cache
            tag = "" if repeats == 1 else f" #{i + 1}"
            if args.against:
                runs.append(run_job(old_code, tmp / f"runs-old{i}", sets, f"old {args.against}{tag}",
                                    tmp / f"fp-cache-old{i}"))
            cache = tmp / f"fp-cache{i}"
            runs.append(run_job(ROOT, tmp / f"runs-new{i}", sets, f"new{tag}", cache))
        if args.warm:
            runs.append(run_job(ROOT, tmp / "runs-new-warm", sets, "new, FP cached", cache))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_at_end"] = os.getloadavg()

    new = next(r for r in runs if r["label"].startswith("new"))
    print(f"\nCPU: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ISA {info['isa']}; load average "
          f"{info['loadavg_at_start'][0]:.1f} at start, {info['loadavg_at_end'][0]:.1f} at end (1 min; other "
          f"users' jobs included)")
    print(f"{'model':<20} {'FID-digits':>10} {'vs FP':>7} {'class acc':>9}")
    print(f"{'digits fp32':<20} {new['fp']['fid_digits']:>10.2f} {'':>7} {100 * new['fp']['class_accuracy']:>8.1f}%")
    print(f"{'digits w8a8 ptq':<20} {new['w8a8']['fid_digits']:>10.2f} {new['fid_w8a8_vs_fp']:>+7.1%} "
          f"{100 * new['w8a8']['class_accuracy']:>8.1f}%")
    keys = list(new["stages_s"])
    print(f"\n{'stage (s)':<28}" + "".join(f"{r['label']:>18}" for r in runs)
          + (f"{'new / old':>11}" if args.against else ""))
    olds = [r for r in runs if r["label"].startswith("old")]
    news = [r for r in runs if r["label"].startswith("new") and not r["fp_from_cache"]]

    def median_of(k: str, rows: list[dict]) -> float:
        values = [r["wall_s"] if k == "whole job" else r["stages_s"].get(k, 0.0) for r in rows]
        return statistics.median(values) if values else 0.0

    for k in [*keys, "whole job"]:
        vals = [r["wall_s"] if k == "whole job" else r["stages_s"].get(k, 0.0) for r in runs]
        ratio = ""
        if args.against:
            o, n = median_of(k, olds), median_of(k, news)
            ratio = f"{n / o:>11.2f}" if o > 0 else f"{'-':>11}"
        print(f"{k:<28}" + "".join(f"{v:>18.1f}" for v in vals) + ratio)
    if args.against:
        old_wall, new_wall = median_of("whole job", olds), median_of("whole job", news)
        info["ratio_new_over_old"] = new_wall / old_wall
        info["median_wall_s"] = {"old": old_wall, "new": new_wall}
        old = olds[0]
        print(f"\nwhole job, new / old: {info['ratio_new_over_old']:.2f} ({new_wall:.0f} s vs {old_wall:.0f} s"
              + (f", medians of {len(olds)} alternating runs each" if len(olds) > 1 else "")
              + f"); old FID-digits fp {old['fp']['fid_digits']:.2f}, w8a8 {old['w8a8']['fid_digits']:.2f} "
              f"({old['fid_w8a8_vs_fp']:+.1%})")
    name = "quickstart_quick.json" if args.quick else "quickstart.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps({**info, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
