"""Shared by the benchmark scripts that compare recipes on the embedded model: run a list of
cases through `run_recipe` (the FP baseline comes with the first), then read every run's
manifests back into one row each.

A case is (label, recipe, bits, extra `--set` overrides). Cases of the same recipe with different
overrides get their own run folder (`<model>-<recipe>-<label>-<bits>`), and a finished stage is
skipped when the runs folder already holds it with the same inputs, so an interrupted benchmark
resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.errors import ArtifactError
from lowbitdm_cli.pipeline import run_recipe
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.report import collect_runs

ROOT = Path(__file__).resolve().parent.parent
# Every comparison benchmark samples the same class-balanced set (same seeds), so they share one
# FP baseline and a case present in two benchmarks (naive PTQ) runs once. 250 samples keep a
# 12-case benchmark within an hour on 2 CPU cores; FID-digits at 250 samples is higher than at
# 1000 for every model alike (it is biased by the sample count), so compare within a table.
FULL_SETS = ["sample.num_samples=250", "sample.batch_size=250"]
QUICK_SETS = ["sample.num_samples=50", "sample.batch_size=50"]


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


def run_cases(cases: list[Case], runs_dir: Path, common_sets: list[str],
              log: Callable[[str], None] = lambda msg: print(msg, flush=True),
              reverse: bool = False) -> tuple[Row, list[Row]]:
    """Run every case (skipping finished stages); return the FP row and one row per case.

    Several processes may work through the same case list (e.g. one with `reverse`): a case whose
    stage another process is writing is put back at the end of the queue and retried later.
    """
    rows: list[Row] = []
    fp_dir: Path | None = None
    queue = list(reversed(cases)) if reverse else list(cases)
    while queue:
        case = queue.pop(0)
        t0 = time.time()
        recipe = load_recipe(case.recipe, model="digits", bits=case.bits, sets=[*common_sets, *case.sets])
        if case.run_name:
            recipe = recipe.model_copy(update={"name": case.run_name})
        try:
            result = run_recipe(recipe, runs_dir, log=log)
        except ArtifactError as e:
            if "another lowbitdm process" not in str(e):
                raise
            log(f"{case.bits} {case.label}: {e}; retrying after the other cases")
            queue.append(case)
            time.sleep(30 if len(queue) == 1 else 0)
            continue
        fp_dir = Path(result["rows"][0]["path"]).parent
        run_dir = Path(result["run_dir"])
        summary = collect_runs([run_dir])[0]
        row = Row(label=case.label, bits=case.bits, run_dir=str(run_dir), metrics=summary.metrics,
                  calibrate_s=summary.calibrate_s, finetune_s=summary.finetune_s,
                  finetune_peak_mb=_stage_timing(run_dir, "finetune", "peak_rss_mb"),
                  peak_rss_mb=summary.peak_rss_mb, trainable_fraction=summary.trainable_fraction)
        rows.append(row)
        log(f"[{time.time() - t0:.0f} s] {case.bits} {case.label}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in row.metrics.items()))
    if fp_dir is None:
        raise SystemExit("no cases")
    order = {c: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: next(i for c, i in order.items() if (c.label, c.bits) == (r.label, r.bits)))
    fp = collect_runs([fp_dir])[0]
    fp_row = Row(label="fp32", bits="fp", run_dir=str(fp_dir), metrics=fp.metrics, calibrate_s=None,
                 finetune_s=None, finetune_peak_mb=None, peak_rss_mb=fp.peak_rss_mb, trainable_fraction=None)
    return fp_row, rows


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
               "wall_s": round(wall_s, 1), "fp": fp.to_dict(), "runs": [r.to_dict() for r in rows], **extra,
               "markdown": markdown}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
