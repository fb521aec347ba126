"""Compare finished runs: one summary per run, a Markdown/HTML report and its figures.

`collect_runs` reads manifests only (no model is loaded); `write_report` writes
``report.md`` (links the PNGs beside it), ``report.html`` (the same, with the PNGs embedded
as base64 data URIs, so the file stands alone) and the figures:

- ``metric_vs_bits.png``: FID-digits and class accuracy against weight bits, one line per
  method and activation width, full-precision runs as horizontal lines; error bars (a band for
  full precision) are each configuration's 95 % interval (below);
- ``loss_curves.png``: finetune loss per epoch (only when some run was finetuned);
- ``omq_bits.png``: MPQ-DM OMQ per-layer bit allocation and kurtosis (only with OMQ records);
- ``samples.png``: the first images of every run, the same sample indices in every row block.
  Sampling seeds each image by its index, so equal indices start from equal noise.

Figures have fixed sizes and dpi, so a figure's pixel size depends only on how many runs
(or OMQ runs) it shows; `ReportFiles.sizes` gives them.

Uncertainty. Each run's metric cell shows its evaluate interval (``value [low, high]``).
Runs that differ only by their seeds (``calibrate.seed``, ``finetune.seed``, ``sample.seed``, as
`lowbitdm run --seeds N` makes them) form one *configuration* (`group_runs`): its value is the
mean over seeds and its 95 % interval the t interval of that mean (mean ± t(0.975, N−1)·sd/√N:
it covers training and sampling randomness alike); a configuration of one run keeps that run's
evaluate interval. `differences` compares configurations of one model (each against the
full-precision one, and configurations of equal bits with each other): a difference whose
intervals overlap is marked not significant (a conservative rule: non-overlap implies a
difference at well beyond 5 %, overlap does not prove there is none).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lowbitdm_cli.artifacts import MANIFEST, Artifact, digest_of
from lowbitdm_cli.errors import ArtifactError, LowbitError
from lowbitdm_cli.recipes import parse_bits

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["REPORT_METRICS", "Configuration", "Difference", "ReportFiles", "RunSummary", "collect_runs",
           "config_table", "differences", "group_runs", "report_sections", "table", "write_report"]

# metric key → (column header, higher is better)
REPORT_METRICS: dict[str, tuple[str, bool]] = {
    "fid_digits": ("FID-digits ↓", False),
    "class_accuracy": ("class acc ↑", True),
    "fid": ("FID ↓", False),
    "sfid": ("sFID ↓", False),
    "is": ("IS ↑", True),
    "precision": ("precision ↑", True),
    "recall": ("recall ↑", True),
}
_STAGES_NEWEST_FIRST = ("evaluate", "sample", "merge", "finetune", "calibrate")
_DPI = 100


@dataclass
class RunSummary:
    """What the report shows about one run, read from the manifests of its lineage.

    `bits` is the recipe's nominal ``wXaY`` (``fp`` for a full-precision run); layers kept at
    8 bit (`quant.keep_8bit`) are not reflected in `w_bits` / `a_bits`. Times are wall-clock
    seconds, memory is the peak resident set size in MB of any stage in the lineage.
    """

    label: str
    path: str                       # the run folder or artifact folder given
    head: str                       # the artifact the lineage was walked from
    model: str
    method: str                     # e.g. "fp", "ptq", "ptq+qalora", "ptq+omq+qalora"
    recipe: str | None
    bits: str
    w_bits: int | None
    a_bits: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    calibrate_s: float | None = None
    finetune_s: float | None = None
    peak_rss_mb: float | None = None
    merged_bytes: int | None = None
    fp_bytes: int | None = None
    size_ratio: float | None = None
    trainable_fraction: float | None = None
    loss_history: list[float] = field(default_factory=list)
    omq: dict[str, Any] | None = None
    samples: str | None = None       # path of samples.npz
    sample_seed: int | None = None
    intervals: dict[str, list[float]] = field(default_factory=dict)  # metric → [low, high] (95 %)
    seeds: dict[str, int] = field(default_factory=dict)  # calibrate / finetune / sample seeds of the lineage
    config: str = ""                 # digest of everything but the seeds: runs that share it form a configuration
    config_label: str = ""           # the label before it was made unique

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become None (JSON has no NaN)."""
        return _finite(asdict(self))


@dataclass
class ReportFiles:
    """Paths written by `write_report`; `sizes` maps each PNG's name to its (width, height) in pixels."""

    out_dir: Path
    markdown: Path
    html: Path
    images: dict[str, Path]
    sizes: dict[str, tuple[int, int]]


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# --- collecting ------------------------------------------------------------------------------

def _head_artifact(path: Path) -> Artifact:
    """The artifact to start from: `path` itself, or the furthest-along stage inside a run folder."""
    if not path.exists():
        raise ArtifactError(f"{path} does not exist: pass a run folder (runs/<model>-<recipe>-<bits>) "
                            f"or one of its stage folders")
    if (path / MANIFEST).exists():
        return Artifact.open(path)
    if path.is_dir():
        for stage in _STAGES_NEWEST_FIRST:
            if (path / stage / MANIFEST).exists():
                return Artifact.open(path / stage, stages=(stage,))
        partial = [s for s in _STAGES_NEWEST_FIRST if (path / f"{s}.partial").exists()]
        if partial:
            raise ArtifactError(f"{path} has no complete stage yet (only {partial[0]}.partial): finish the run "
                                f"with `lowbitdm run` or the stage's --resume first")
    raise LowbitError(f"{path} is neither a run folder (with calibrate/ ... evaluate/ inside) nor an artifact "
                      f"folder (with {MANIFEST}): pass e.g. runs/digits-ptq-w4a4 or runs/digits-ptq-w4a4/evaluate")


def _method(calib: Artifact, ft: Artifact | None) -> str:
    """calibrate method [+ mixed precision] [+ finetune method], each read from the stage that used it."""
    cal = calib.manifest.recipe.get("calibrate", {})
    parts = [str(calib.manifest.info.get("method", cal.get("method", "ptq")))]
    if cal.get("mixed", "none") != "none":
        parts.append(cal["mixed"])
    ft_method = ft.manifest.info.get("method", "none") if ft is not None else "none"
    if ft_method != "none":
        parts.append(ft_method)
    return "+".join(parts)


def _summarize(path: Path) -> RunSummary:
    head = _head_artifact(path)
    chain = head.lineage()
    by_stage = {a.manifest.stage: a for a in reversed(chain)}  # nearest artifact of each stage wins
    recipe = head.manifest.recipe
    model = head.manifest.model.name
    if Path(model).is_absolute():  # a model folder: its folder name, as the run folders are named
        model = Path(model).name
    calib, ft = by_stage.get("calibrate"), by_stage.get("finetune")
    merged, sampled, evaluated = by_stage.get("merge"), by_stage.get("sample"), by_stage.get("evaluate")
    quantized = calib is not None
    bits = str(calib.manifest.recipe.get("quant", {}).get("bits", "fp")) if quantized else "fp"
    w_bits, a_bits = parse_bits(bits)
    metrics = {k: float(v) for k, v in (evaluated.manifest.metrics if evaluated else {}).items()
               if k in REPORT_METRICS}
    intervals = {k: [iv.low, iv.high] for k, iv in (evaluated.manifest.intervals if evaluated else {}).items()
                 if k in metrics}
    peaks = [a.manifest.timings["peak_rss_mb"] for a in chain if "peak_rss_mb" in a.manifest.timings]
    summary = RunSummary(
        label="", path=str(path), head=str(head.path), model=model,
        method=_method(calib, ft) if calib is not None else "fp",
        recipe=str(recipe.get("name")) if quantized else None,
        bits=bits, w_bits=w_bits, a_bits=a_bits, metrics=metrics,
        peak_rss_mb=max(peaks) if peaks else None, intervals=intervals,
    )
    summary.seeds, summary.config = _seeds_and_config(recipe, model, quantized, sorted(metrics))
    if calib is not None:
        summary.calibrate_s = calib.manifest.timings.get("wall_s")
        summary.omq = calib.manifest.info.get("omq")
    if ft is not None:
        summary.finetune_s = ft.manifest.timings.get("wall_s")
        summary.loss_history = [float(v) for v in ft.manifest.info.get("loss_history", [])]
        summary.trainable_fraction = ft.manifest.info.get("trainable_fraction")
    if merged is not None:
        info = merged.manifest.info
        summary.merged_bytes = info.get("merged_denoiser_bytes")
        summary.fp_bytes = info.get("fp_denoiser_bytes")
        summary.size_ratio = info.get("size_ratio")
    if sampled is not None and "samples.npz" in sampled.manifest.files:
        summary.samples = str(sampled.path / "samples.npz")
        summary.sample_seed = sampled.manifest.recipe.get("sample", {}).get("seed")
    summary.label = f"{model} fp" if not quantized else f"{model} {bits} {summary.method}"
    return summary


_SEEDED = ("calibrate", "finetune", "sample")


def _seeds_and_config(recipe: dict[str, Any], model: str, quantized: bool, metrics: list[str]
                      ) -> tuple[dict[str, int], str]:
    """The lineage's seeds, and a digest of everything else that decides the result.

    A full-precision run depends only on the sampler (its recipe's other sections are those of
    whichever recipe ran the baseline first), so only the sample section enters its digest."""
    seeds: dict[str, int] = {}
    rest: dict[str, Any] = {}
    for section, value in recipe.items():
        if isinstance(value, dict) and section in _SEEDED:
            value = dict(value)
            if "seed" in value:
                seeds[section] = value.pop("seed")
        rest[section] = value
    if not quantized:
        seeds.pop("calibrate", None)
        seeds.pop("finetune", None)
        rest = {"sample": rest.get("sample")}
    return seeds, digest_of({"model": model, "quantized": quantized, "recipe": rest, "metrics": metrics})

def collect_runs(paths: list[Path | str]) -> list[RunSummary]:
    """Summarize each path: a run folder (its furthest-along stage is used) or any artifact folder.

    Raises `LowbitError` for a path that is neither, and the usual artifact errors for a
    damaged or stale lineage. Labels are ``[model] bits method`` (``[model] fp`` for full precision;
    the model only when the runs span several) and are made unique by appending the folder name.
    """
    if not paths:
        raise LowbitError("no runs given: pass one or more run folders, e.g. runs/digits-ptq-w4a4")
    runs = [_summarize(Path(p)) for p in paths]
    if len({r.model for r in runs}) == 1:  # the model is then the table's title, not every label's prefix
        for r in runs:
            r.label = r.label.removeprefix(f"{r.model} ")
    for r in runs:
        r.config_label = r.label
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            p = Path(r.path)
            r.label = f"{r.label} ({p.parent.name}/{p.name})" if p.name in _STAGES_NEWEST_FIRST else \
                f"{r.label} ({p.name})"
    return runs


# --- the comparison table --------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _metric_cell(key: str, value: float | None, interval: list[float] | None) -> str:
    """``59.74 [55.10, 64.38]`` (class accuracy in %), or the value alone without an interval."""
    pct = key == "class_accuracy"

    def one(v: float | None) -> str:
        return _fmt(100 * v, ".1f") if pct and v is not None else _fmt(v, ".2f")

    if value is None:
        return "-"
    text = one(value) + ("%" if pct else "")
    if interval is not None:
        text += f" [{one(interval[0])}, {one(interval[1])}]"
    return text


def table(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """The comparison table as (headers, rows of strings), shared by Markdown, HTML and the CLI.

    Metric columns appear only when some run has that metric; a value with a 95 % interval shows
    it as ``value [low, high]``.
    """
    keys = [k for k in REPORT_METRICS if any(k in r.metrics for r in runs)]
    headers = ["run", "recipe", *[REPORT_METRICS[k][0] for k in keys], "calibrate s", "finetune s", "peak MB",
               "merged MB", "size ratio"]
    rows = []
    for r in runs:
        cells = [r.label, r.recipe or "-"]
        for k in keys:
            cells.append(_metric_cell(k, r.metrics.get(k), r.intervals.get(k)))
        cells += [_fmt(r.calibrate_s, ".1f"), _fmt(r.finetune_s, ".1f"), _fmt(r.peak_rss_mb, ".0f"),
                  _fmt(r.merged_bytes / 2**20 if r.merged_bytes is not None else None, ".3f"),
                  _fmt(r.size_ratio, ".3f")]
        rows.append(cells)
    return headers, rows


# --- configurations: runs that differ only by seed ------------------------------------------------

@dataclass
class Configuration:
    """Runs sharing everything but their seeds. `metrics`: mean over the runs; `intervals`: the t
    interval of that mean over seeds (2+ runs) or the single run's evaluate interval; `interval_kind`
    says which, per metric."""

    label: str
    model: str
    method: str
    bits: str
    w_bits: int | None
    a_bits: int | None
    runs: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    interval_kind: dict[str, str] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)  # per run, in run order

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def t_interval(values: list[float], level: float = 0.95) -> list[float]:
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    half = float(t.ppf(0.5 + level / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


def group_runs(runs: list[RunSummary]) -> list[Configuration]:
    """Configurations in the order their first run appears (see the module docstring)."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    configs = []
    for members in groups.values():
        first = members[0]
        c = Configuration(label=first.config_label, model=first.model, method=first.method, bits=first.bits,
                          w_bits=first.w_bits, a_bits=first.a_bits, runs=[m.label for m in members])
        for key in REPORT_METRICS:
            vals = [m.metrics[key] for m in members if key in m.metrics and math.isfinite(m.metrics[key])]
            if not vals:
                continue
            c.values[key] = vals
            c.metrics[key] = float(np.mean(vals))
            if len(vals) >= 2:
                c.intervals[key], c.interval_kind[key] = t_interval(vals), f"t over {len(vals)} seeds"
            elif key in first.intervals:
                c.intervals[key], c.interval_kind[key] = list(first.intervals[key]), "evaluate (one run)"
        configs.append(c)
    return configs


@dataclass
class Difference:
    """`a` − `b` on one metric, and whether their 95 % intervals are disjoint."""

    a: str
    b: str
    metric: str
    difference: float
    significant: bool | None  # None: one side has no interval


def differences(configs: list[Configuration]) -> list[Difference]:
    """Each quantized configuration against the full-precision one of its model, and configurations
    of one model with equal bits against each other, on every metric both have."""
    out = []
    for i, a in enumerate(configs):
        for b in configs[:i] + configs[i + 1:]:
            if a.model != b.model or a.w_bits is None:
                continue
            against_fp = b.w_bits is None
            if not against_fp and not (a.bits == b.bits and configs.index(b) > i):
                continue
            for key in REPORT_METRICS:
                if key not in a.metrics or key not in b.metrics:
                    continue
                ia, ib = a.intervals.get(key), b.intervals.get(key)
                sig = None if ia is None or ib is None else (ia[1] < ib[0] or ib[1] < ia[0])
                out.append(Difference(a.label, b.label, key, a.metrics[key] - b.metrics[key], sig))
    return out


def config_table(configs: list[Configuration]) -> tuple[list[str], list[list[str]]]:
    """One row per configuration: runs (seeds), then per metric ``mean [low, high]``."""
    keys = [k for k in REPORT_METRICS if any(k in c.metrics for c in configs)]
    headers = ["configuration", "runs", *[REPORT_METRICS[k][0] for k in keys]]
    rows = [[c.label, str(len(c.runs)), *[_metric_cell(k, c.metrics.get(k), c.intervals.get(k)) for k in keys]]
            for c in configs]
    return headers, rows


def _difference_rows(diffs: list[Difference]) -> tuple[list[str], list[list[str]]]:
    headers = ["compared", "metric", "difference", "significant?"]
    rows = []
    for d in diffs:
        scale, unit = (100, " pts") if d.metric == "class_accuracy" else (1, "")
        verdict = ("no interval" if d.significant is None else
                   "yes (intervals disjoint)" if d.significant else "not significant (intervals overlap)")
        rows.append([f"{d.a} vs {d.b}", REPORT_METRICS[d.metric][0], f"{scale * d.difference:+.2f}{unit}", verdict])
    return headers, rows


# --- figures ---------------------------------------------------------------------------------

def _figure(width_px: int, height_px: int) -> Figure:
    """A matplotlib Figure on the Agg canvas (never pyplot: no global backend state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> tuple[int, int]:
    # no bbox_inches="tight": the pixel size must stay figsize × dpi; no Software stamp: stable bytes
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})
    w, h = fig.get_size_inches() * _DPI
    return round(w), round(h)


def _plot_metric_vs_bits(runs: list[RunSummary], path: Path) -> tuple[int, int]:
    """One point per configuration (the mean over its seeds), with its 95 % interval as error bar."""
    configs = group_runs(runs)
    fig = _figure(1000, 400)
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.25)
    panels = [("fid_digits", "FID-digits (lower is better)", 1.0),
              ("class_accuracy", "class accuracy % (higher is better)", 100.0)]
    for ax, (key, title, scale) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("weight bits")
        ax.set_xticks(range(2, 9))
        ax.set_xlim(1.5, 8.5)
        ax.grid(alpha=0.3)
        series: dict[str, list[tuple[int, float, float, float]]] = {}
        for c in configs:
            if key not in c.metrics or not math.isfinite(c.metrics[key]):
                continue
            v = scale * c.metrics[key]
            lo, hi = (scale * x for x in c.intervals[key]) if key in c.intervals else (v, v)
            if c.w_bits is None:
                ax.axhline(v, color="0.4", linestyle="--", linewidth=1, label=c.label)
                if hi > lo:
                    ax.axhspan(lo, hi, color="0.4", alpha=0.12, linewidth=0)
                continue
            name = f"{c.method} A{c.a_bits or 'fp'}" + (f" ({c.model})" if len({x.model for x in runs}) > 1 else "")
            series.setdefault(name, []).append((c.w_bits, v, v - lo, hi - v))
        for name, points in series.items():
            xs, ys, below, above = zip(*sorted(points))
            ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run has this metric", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def _plot_loss_curves(runs: list[RunSummary], path: Path) -> tuple[int, int]:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(700, 400)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
    positive = True
    for r in runs:
        if r.loss_history:
            ax.plot(range(1, len(r.loss_history) + 1), r.loss_history, marker="o", label=r.label)
            positive &= all(v > 0 for v in r.loss_history)
    if positive:
        ax.set_yscale("log")
    ax.set_title("finetune distillation loss (mean per epoch)", fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_omq(runs: list[RunSummary], path: Path) -> tuple[int, int]:
    """Per OMQ run: channels per bit width in each layer (stacked), and per-channel kurtosis coloured by bits."""
    fig = _figure(1200, 350 * len(runs))
    axes = np.asarray(fig.subplots(len(runs), 2)).reshape(len(runs), 2)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12 / len(runs), top=1 - 0.1 / len(runs),
                        hspace=0.45, wspace=0.18)
    for (ax_bits, ax_kurt), r in zip(axes, runs):
        layers = list(r.omq or {})
        all_bits = sorted({b for rec in r.omq.values() for b in rec["bits"]})
        colors = {b: f"C{i}" for i, b in enumerate(all_bits)}
        bottom = np.zeros(len(layers))
        for b in all_bits:
            frac = np.array([np.mean(np.asarray(r.omq[n]["bits"]) == b) for n in layers])
            ax_bits.bar(range(len(layers)), frac, bottom=bottom, color=colors[b], label=f"{b} bit", width=0.85)
            bottom += frac
        ax_bits.set_title(f"{r.label}: share of output channels per weight width", fontsize=9)
        ax_bits.set_xlabel("quantized layer (denoiser order)")
        ax_bits.set_ylim(0, 1)
        ax_bits.set_ylabel("share of channels")
        ax_bits.legend(fontsize=7, loc="lower right")
        for b in all_bits:
            xs, ys = [], []
            for i, n in enumerate(layers):
                k, bits = np.asarray(r.omq[n]["kurtosis"]), np.asarray(r.omq[n]["bits"])
                ys.extend(k[bits == b].tolist())
                xs.extend([i] * int((bits == b).sum()))
            ax_kurt.scatter(xs, ys, s=4, color=colors[b], label=f"{b} bit")
        kurt = np.concatenate([np.asarray(rec["kurtosis"], dtype=float) for rec in r.omq.values()])
        if kurt.size and kurt.min() > 0 and kurt.max() / kurt.min() > 20:  # heavy-tailed layers: log scale
            ax_kurt.set_yscale("log")
        ax_kurt.set_ylabel("kurtosis κ")
        ax_kurt.set_title(f"{r.label}: per-channel weight kurtosis", fontsize=9)
        ax_kurt.set_xlabel("quantized layer (denoiser order)")
        ax_kurt.legend(fontsize=7, markerscale=3)
    return _save(fig, path)


def _image_block(images: np.ndarray, ncol: int, cell: int, pad: int) -> np.ndarray:
    """uint8 NHWC (C = 1 or 3) → one RGB grid, each image scaled by an integer factor to `cell` px."""
    n, h, w, c = images.shape
    scale = max(1, cell // max(h, w))
    rows = (n + ncol - 1) // ncol
    hh, ww = h * scale, w * scale
    grid = np.full((rows * (hh + pad) + pad, ncol * (ww + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        img = images[i].repeat(scale, 0).repeat(scale, 1)
        if c == 1:
            img = np.repeat(img, 3, axis=2)
        r, col = divmod(i, ncol)
        y, x = pad + r * (hh + pad), pad + col * (ww + pad)
        grid[y:y + hh, x:x + ww] = img[..., :3]
    return grid


def _plot_samples(runs: list[RunSummary], arrays: list[np.ndarray], path: Path, num_images: int
                  ) -> tuple[int, int]:
    """Row blocks of the first `n` images (same indices in every block), placed pixel-exactly with figimage."""
    n = min(num_images, *(len(a) for a in arrays))
    ncol = min(10, n)
    blocks = [_image_block(a[:n], ncol, cell=48, pad=2) for a in arrays]
    margin, title_h, gap, caption_h = 10, 22, 10, 24
    width = max(600, 2 * margin + max(b.shape[1] for b in blocks))
    height = caption_h + sum(title_h + b.shape[0] + gap for b in blocks) + margin
    fig = _figure(width, height)
    seeds = sorted({r.sample_seed for r in runs if r.sample_seed is not None})
    fig.text(margin / width, 1 - 6 / height, f"samples 0–{n - 1}: an index has the same class and initial noise "
             f"in every run (seed {', '.join(map(str, seeds)) or '?'})", fontsize=9, va="top")
    top = caption_h
    for r, block in zip(runs, blocks):
        fig.text(margin / width, 1 - (top + 4) / height, r.label, fontsize=10, weight="bold", va="top")
        top += title_h
        fig.figimage(block, xo=margin, yo=height - top - block.shape[0], origin="upper")
        top += block.shape[0] + gap
    return _save(fig, path)


# --- writing ---------------------------------------------------------------------------------

_CAPTIONS = {
    "metric_vs_bits.png": "Quality against weight bits: one line per method and activation width, error bars "
                          "the 95 % interval (mean over seeds where a configuration has several runs); dashed "
                          "lines and bands are full-precision runs.",
    "loss_curves.png": "Finetune distillation loss per epoch.",
    "omq_bits.png": "MPQ-DM OMQ: per-layer weight bit allocation and per-channel kurtosis.",
    "samples.png": "The same sample indices (same seed and class) from every run.",
}


Section = tuple[str, str, list[str], list[list[str]]]  # title, note, headers, rows


def report_sections(runs: list[RunSummary]) -> list[Section]:
    """Extra tables after the run table: configurations (when some have several seeds), differences."""
    configs = group_runs(runs)
    out: list[Section] = []
    if any(len(c.runs) > 1 for c in configs):
        out.append(("Configurations", "Runs that differ only by their seeds: the mean over seeds and the 95 % t "
                    "interval of that mean (a configuration of one run: its evaluate interval).",
                    *config_table(configs)))
    diffs = differences(configs)
    if diffs:
        out.append(("Differences", "Each quantized configuration against full precision, and configurations of "
                    "equal bits against each other. Overlapping 95 % intervals: not significant.",
                    *_difference_rows(diffs)))
    return out


def _markdown(headers: list[str], rows: list[list[str]], images: dict[str, Path],
              sections: list[Section] = ()) -> str:  # type: ignore[assignment]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    right = "|".join([":---"] * 2 + ["---:"] * (len(headers) - 2))
    parts = ["# lowbitdm report", "", line(headers), f"|{right}|", *[line(r) for r in rows], ""]
    for title, note, heads, body in sections:
        align = "|".join([":---"] + ["---:"] * (len(heads) - 1))
        parts += [f"## {title}", "", note, "", line(heads), f"|{align}|", *[line(r) for r in body], ""]
    for name in images:
        parts += [f"![{_CAPTIONS[name]}]({name})", "", f"*{_CAPTIONS[name]}*", ""]
    return "\n".join(parts)


def _html(headers: list[str], rows: list[list[str]], images: dict[str, Path],
          sections: list[Section] = ()) -> str:  # type: ignore[assignment]
    esc = html.escape

    def html_table(heads: list[str], body_rows: list[list[str]]) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in heads)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>\n" for r in body_rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n"

    extra = "".join(f"<h2>{esc(title)}</h2>\n<p>{esc(note)}</p>\n" + html_table(heads, body)
                    for title, note, heads, body in sections)
    figures = []
    for name, p in images.items():
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        figures.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(_CAPTIONS[name])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}"
             "img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>lowbitdm report</title>'
            f"<style>{style}</style></head><body>\n<h1>lowbitdm report</h1>\n"
            + html_table(headers, rows) + extra
            + "\n".join(figures) + "\n</body></html>\n")


def write_report(runs: list[RunSummary], out_dir: Path | str, num_images: int = 20,
                 samples_of: list[RunSummary] | None = None) -> ReportFiles:
    """Write report.md, report.html and the PNGs into `out_dir` (created; existing files replaced).

    Figures without data are skipped: loss_curves.png without a finetuned run, omq_bits.png
    without an OMQ record, samples.png without samples. `num_images`: images per run in
    samples.png (the first ones; 20 = two per class for a 10-class model); `samples_of`: the runs
    shown there (default: all).
    """
    if not runs:
        raise LowbitError("no runs to report: pass one or more run folders")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    sizes["metric_vs_bits.png"] = _plot_metric_vs_bits(runs, out / "metric_vs_bits.png")
    if any(r.loss_history for r in runs):
        sizes["loss_curves.png"] = _plot_loss_curves(runs, out / "loss_curves.png")
    omq_runs = [r for r in runs if r.omq]
    if omq_runs:
        sizes["omq_bits.png"] = _plot_omq(omq_runs, out / "omq_bits.png")
    if num_images > 0:
        from lowbitdm_cli.npz import read_npz

        shown = runs if samples_of is None else samples_of
        with_samples = [(r, read_npz(Path(r.samples))["arr_0"]) for r in shown if r.samples]
        with_samples = [(r, a) for r, a in with_samples if len(a)]
        if with_samples:
            sample_runs, arrays = zip(*with_samples)
            sizes["samples.png"] = _plot_samples(list(sample_runs), list(arrays), out / "samples.png", num_images)
    for stale in set(_CAPTIONS) - set(sizes):  # a figure from an earlier report would be misleading
        (out / stale).unlink(missing_ok=True)
    images = {name: out / name for name in sizes}
    headers, rows = table(runs)
    md, page = out / "report.md", out / "report.html"
    sections = report_sections(runs)
    md.write_text(_markdown(headers, rows, images, sections), encoding="utf-8")
    page.write_text(_html(headers, rows, images, sections), encoding="utf-8")
    return ReportFiles(out_dir=out, markdown=md, html=page, images=images, sizes=sizes)
