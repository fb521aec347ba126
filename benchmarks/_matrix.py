"""Shared by the benchmark scripts that compare recipes on the embedded model: run a list of
cases through `run_recipe` (the FP baseline comes with the first), then read every run's
manifests back into one row each.

A case is (label, recipe, bits, extra `--set` overrides). Cases of the same recipe with different
overrides get their own run folder (`<model>-<recipe>-<label>-<bits>`), and a finished stage is
skipped when the runs folder already holds it with the same inputs, so an interrupted benchmark
resumes where it stopped.

With `seeds` > 1 every case (and the FP baseline) runs once per seed offset k = 0 .. seeds − 1
(`lowbitdm run --seeds`: calibrate, finetune and sample seeds moved by k; folders ``-seed<k>``),
and a row's metrics are the mean over seeds with the 95 % t interval of that mean in
``extra["intervals"]`` (a single seed: the run's own evaluate interval).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.errors import ArtifactError
from lowbitdm_cli.pipeline import run_folders, run_recipe
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.report import collect_runs, group_runs

ROOT = Path(__file__).resolve().parent.parent
# Every comparison benchmark samples the same class-balanced set (same seeds), so they share one
# FP baseline and a case present in two benchmarks (naive PTQ) runs once. The method
# tables: 1000 samples per run (FID-digits is biased by the sample count, so compare within a
# table), with the embedded model's default sampler (DPM-Solver++(2M), 10 steps), 3 seeds.
FULL_SAMPLES, QUICK_SAMPLES = 1000, 50
FULL_SEEDS = 3


def sample_sets(num_samples: int | None, quick: bool) -> list[str]:
    """The common sample overrides: `num_samples` per run (default 1000, 50 with `quick`), in
    batches of at most 250, in fp32. The sampler is the model's default (the recipes name none)."""
    n = num_samples or (QUICK_SAMPLES if quick else FULL_SAMPLES)
    # fp32 on every machine (sample.dtype auto is bf16 on AMX / AVX512-BF16 CPUs): the method tables
    # compare methods, not dtypes (benchmarks/dtype_quality.py does that), and stay comparable across CPUs
    return [f"sample.num_samples={n}", f"sample.batch_size={min(n, 250)}", "sample.dtype=fp32"]


def add_matrix_args(parser: argparse.ArgumentParser) -> None:
    """The options every method-table benchmark takes (runs folder, threads, seeds, samples, order)."""
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: runs/ (runs-quick/ with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"runs per case, seed offsets 0..N-1 (default {FULL_SEEDS}, 1 with --quick)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help=f"samples per run (default {FULL_SAMPLES}, {QUICK_SAMPLES} with --quick)")
    parser.add_argument("--model", default="digits", help="the embedded model (or a digits-shaped diffusers "
                        "folder) every case runs on")
    parser.add_argument("--reverse", action="store_true",
                        help="work through the cases from the end (a second process can share the work)")
    parser.add_argument("--finished-only", action="store_true",
                        help="run nothing: tabulate the seeds of each case whose run (and FP baseline) finished "
                             "evaluating in --runs-dir, each row saying how many seeds it has")


def matrix_setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Path, list[str]]:
    """Apply `add_matrix_args`' options: set the threads and `args.seeds` (its default filled in);
    return the runs folder and the common sample overrides."""
    import torch

    if args.seeds is None:
        args.seeds = 1 if args.quick else FULL_SEEDS
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    runs_dir = args.runs_dir or ROOT / ("runs-quick" if args.quick else "runs")
    return runs_dir, sample_sets(args.num_samples, args.quick)


@dataclass(frozen=True)
class Case:
    label: str            # what the table calls the method, e.g. "ptq mse"
    recipe: str           # recipes/NAME.toml
    bits: str
    sets: tuple[str, ...] = ()
    run_name: str | None = None  # run folder's recipe part; default: the recipe's name


@dataclass
class Row:
    label: str
    bits: str
    run_dir: str
    metrics: dict[str, float]
    calibrate_s: float | None
    finetune_s: float | None
    finetune_peak_mb: float | None
    peak_rss_mb: float | None
    trainable_fraction: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _stage_timing(run_dir: Path, stage: str, key: str) -> float | None:
    path = run_dir / stage
    return Artifact.open(path).manifest.timings.get(key) if path.is_dir() else None


def _bit_budget(run_dir: Path) -> dict | None:
    """The MAC-weighted bits that calibrate recorded for the run's layer policy (`quant.cost.bit_budget`: a
    float low-rank branch's MACs at 32 bits, keep_8bit layers at 8), or None for an FP run."""
    path = run_dir / "calibrate"
    return Artifact.open(path).manifest.info.get("bit_budget") if path.is_dir() else None


def _seeded_row(label: str, bits: str, run_dirs: list[Path]) -> Row:
    """One row from the runs of one case over seeds: mean metrics, intervals, per-seed values."""
    summaries = collect_runs(run_dirs)
    (config,) = group_runs(summaries)  # the runs differ only by seed
    first = summaries[0]

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    return Row(label=label, bits=bits, run_dir=str(run_dirs[0]), metrics=config.metrics,
               calibrate_s=mean([r.calibrate_s for r in summaries]), finetune_s=mean([r.finetune_s for r in summaries]),
               finetune_peak_mb=_stage_timing(run_dirs[0], "finetune", "peak_rss_mb"),
               peak_rss_mb=max((r.peak_rss_mb for r in summaries if r.peak_rss_mb is not None), default=None),
               trainable_fraction=first.trainable_fraction,
               extra={"intervals": config.intervals, "interval_kind": config.interval_kind, "values": config.values,
                      "run_dirs": [str(d) for d in run_dirs], "seeds": len(run_dirs), "bit_budget": _bit_budget(run_dirs[0])})


def _evaluated(run_dir: Path) -> bool:
    return (run_dir / "evaluate").is_dir()  # a stage's folder gets its name only when it completes (``.partial`` before)


def run_cases(cases: list[Case], runs_dir: Path, common_sets: list[str],
              log: Callable[[str], None] = lambda msg: print(msg, flush=True),
              reverse: bool = False, seeds: int = 1, model: str = "digits",
              finished_only: bool = False) -> tuple[Row, list[Row]]:
    """Run every case (skipping finished stages); return the FP row and one row per case.

    Several processes may work through the same case list (e.g. one with `reverse`): a case whose
    stage another process is writing is put back at the end of the queue and retried later.
    """
    rows: list[Row] = []
    fp_dirs: dict[int, Path] = {}
    done: dict[Case, dict[int, Path]] = {}
    queue = [(c, k) for c in (reversed(cases) if reverse else cases) for k in range(seeds)]
    while queue:
        case, k = queue.pop(0)
        t0 = time.time()
        recipe = load_recipe(case.recipe, model=model, bits=case.bits, sets=[*common_sets, *case.sets])
        if case.run_name:
            recipe = recipe.model_copy(update={"name": case.run_name})
        if finished_only and not all(_evaluated(d) for d in run_folders(recipe, runs_dir, k)):
            log(f"{case.bits} {case.label} seed +{k}: not finished in {runs_dir}, left out")
            continue
        try:
            result = run_recipe(recipe, runs_dir, log=log, seed_offset=k)
        except ArtifactError as e:
            if "another lowbitdm process" not in str(e):
                raise
            log(f"{case.bits} {case.label} seed +{k}: {e}; retrying after the other cases")
            queue.append((case, k))
            time.sleep(30 if len(queue) == 1 else 0)
            continue
        fp_dirs[k] = Path(result["rows"][0]["path"]).parent
        done.setdefault(case, {})[k] = Path(result["run_dir"])
        metrics = Artifact.open(Path(result["run_dir"]) / "evaluate").manifest.metrics
        log(f"[{time.time() - t0:.0f} s] {case.bits} {case.label} seed +{k}: "
            + ", ".join(f"{key} {v:.4g}" for key, v in metrics.items()))
    if not fp_dirs:
        raise SystemExit("no cases")
    for case in cases:
        if case in done:
            rows.append(_seeded_row(case.label, case.bits, [done[case][k] for k in sorted(done[case])]))
    fp_row = _seeded_row("fp32", "fp", [fp_dirs[k] for k in sorted(fp_dirs)])
    fp_row.calibrate_s = fp_row.finetune_s = fp_row.finetune_peak_mb = fp_row.trainable_fraction = None
    return fp_row, rows


def keep_previous_rows(name: str, rows: list[Row], quick: bool, labels: set[str],
                       log: Callable[[str], None] = print) -> list[Row]:
    """`rows` plus the rows of the existing results/NAME.json whose (label, bits) were not run now,
    each marked ``extra["kept_from_previous"]``; a case run again is compared with its previous
    value (the runs are deterministic, so equal values show the kept rows are still this code's).
    Rows whose label is not in `labels` (cases the benchmark no longer defines) are dropped."""
    path = ROOT / "benchmarks" / "results" / (f"{name}_quick.json" if quick else f"{name}.json")
    if not path.exists():
        return rows
    previous = [Row(**r) for r in json.loads(path.read_text())["runs"]]
    now = {(r.label, r.bits): r for r in rows}
    kept = []
    for old in previous:
        new = now.get((old.label, old.bits))
        if old.label not in labels:
            log(f"dropped {old.bits} {old.label} from {path.name}: no longer a case of this benchmark")
            continue
        if new is None:
            old.extra["kept_from_previous"] = True
            kept.append(old)
            continue
        a, b = old.metrics.get("fid_digits"), new.metrics.get("fid_digits")
        if a is not None and b is not None:
            log(f"rerun {old.bits} {old.label}: FID-digits {b:.4f} now, {a:.4f} in {path.name} "
                f"({'identical' if a == b else f'differs by {b - a:+.4f}'})")
    return rows + kept


def cell(row: Row, key: str) -> str:
    """``mean [low, high]`` of a metric (class accuracy in %), or the value alone without an interval."""
    v = row.metrics.get(key)
    if v is None:
        return "-"
    iv = row.extra.get("intervals", {}).get(key)
    scale, spec, unit = (100, ".1f", "%") if key == "class_accuracy" else (1, ".2f", "")
    text = f"{scale * v:{spec}}{unit}"
    return text + (f" [{scale * iv[0]:{spec}}, {scale * iv[1]:{spec}}]" if iv else "")


def disjoint(a: Row, b: Row, key: str) -> bool | None:
    """Whether the two rows' 95 % intervals of `key` are disjoint (None: one has none)."""
    ia, ib = a.extra.get("intervals", {}).get(key), b.extra.get("intervals", {}).get(key)
    if not ia or not ib:
        return None
    return ia[1] < ib[0] or ib[1] < ia[0]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(headers: list[str], rows: list[list[str]]) -> str:
    """Print and return a Markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, args: Any, common_sets: list[str], wall_s: float, fp: Row, rows: list[Row],
                  markdown: str, **extra: Any) -> None:
    """benchmarks/results/NAME.json (NAME_quick.json with --quick): settings, every row, the table."""
    import torch

    path = ROOT / "benchmarks" / "results" / (f"{name}_quick.json" if args.quick else f"{name}.json")
    payload = {"quick": args.quick, "threads": args.threads, "torch": torch.__version__, "common_sets": common_sets,
               "seeds": getattr(args, "seeds", 1), "finished_only": getattr(args, "finished_only", False),
               "wall_s": round(wall_s, 1), "fp": fp.to_dict(), "runs": [r.to_dict() for r in rows], **extra,
               "markdown": markdown}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
