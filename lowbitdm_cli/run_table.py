"""The table `lowbitdm run` prints: FP vs quantized, per metric its value and 95 % interval, the
denoiser's size, sampling speed and wall time, laid out to stay readable in an 80-column terminal:
one row per model while that fits the width (a cell never wraps inside its interval; the row names
fold instead), else one row per metric and one column per model."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

__all__ = ["METRIC_HEADERS", "run_table", "skipped_line"]

# metric -> (header, scale): percentages shown as 0-100 with the unit in the header
METRIC_HEADERS: dict[str, tuple[str, float]] = {
    "fid_digits": ("FID-digits ↓", 1.0), "class_accuracy": ("class acc % ↑", 100.0), "fid": ("FID ↓", 1.0),
    "sfid": ("sFID ↓", 1.0), "is": ("IS ↑", 1.0), "precision": ("precision % ↑", 100.0),
    "recall": ("recall % ↑", 100.0), "kid": ("KID ↓", 1.0), "clip_score": ("CLIP score ↑", 1.0)}


def _num(x: float) -> str:
    """Three significant digits or so, never more than 5 characters for everyday values."""
    a = abs(x)
    if a and a < 0.1:
        return f"{x:.2g}"
    return f"{x:.2f}" if a < 10 else f"{x:.1f}" if a < 1000 else f"{x:.0f}"


def _cell(metrics: dict, intervals: dict, key: str, scale: float) -> str:
    if key not in metrics:
        return "-"
    text = _num(scale * metrics[key])
    iv = intervals.get(key)
    if iv:
        lo, hi = (iv["low"], iv["high"]) if isinstance(iv, dict) else iv
        text += f" [{_num(scale * lo)}, {_num(scale * hi)}]"
    return text


def _entries(result: dict, model_name: str) -> tuple[list[str], list[tuple[str, list[str], bool]]]:
    """(column headers after the name, [(row name, cells, bold)]) of the runs-as-rows layout."""
    rows = result["rows"]
    keys = [k for k in METRIC_HEADERS if any(k in r["metrics"] for r in rows)]
    keys += sorted({k for r in rows for k in r["metrics"]} - set(keys))
    heads = [METRIC_HEADERS.get(k, (k, 1.0))[0] for k in keys] + ["MiB", "img/s", "wall s"]
    scale = [METRIC_HEADERS.get(k, (k, 1.0))[1] for k in keys]
    cached = result.get("fp_from_cache", False)
    cached = cached if isinstance(cached, list) else [cached]
    prefix = model_name.rsplit("/", 1)[-1] + " "
    entries = []
    for i, row in enumerate(rows):  # (fp, quantized) per seed
        from_cache = i % 2 == 0 and i // 2 < len(cached) and cached[i // 2]
        speed = row.get("images_per_s")
        entries.append((row["label"].removeprefix(prefix),
                        [_cell(row["metrics"], row.get("intervals", {}), k, f) for k, f in zip(keys, scale)]
                        + [f"{row['denoiser_mb']:.3g}" if row.get("denoiser_mb") else "-",
                           "cached" if from_cache else (_num(speed) if speed else "-"),
                           "cached" if from_cache else f"{row['wall_s']:.0f}"], False))
    for c in result.get("configurations", []):
        entries.append((f"{c['label'].removeprefix(prefix)}: mean of {len(c['runs'])}",
                        [_cell(c["metrics"], c["intervals"], k, f) for k, f in zip(keys, scale)] + ["", "", ""], True))
    return heads, entries


def _table(title: str, caption: str | None) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, caption=caption)


def run_table(result: dict, title: str, model_name: str, width: int = 80) -> Table:
    """The rows of `pipeline.run_seeds`' result (and its configurations over seeds) as one table that
    fits `width` columns: runs as rows when that fits, else metrics as rows and runs as columns."""
    heads, entries = _entries(result, model_name)
    caption = "[95 % interval]" if any(r.get("intervals") for r in result["rows"]) else None
    wide = _table(title, caption)
    wide.add_column("model", overflow="fold", min_width=8)
    for h in heads:
        wide.add_column(h, justify="right", no_wrap=True)
    for name, cells, bold in entries:
        wide.add_row(name, *cells, style="bold" if bold else None)
    tall = _table(title, caption)
    tall.add_column("", no_wrap=True)
    for name, _, bold in entries:
        tall.add_column(f"[bold]{name}[/]" if bold else name, justify="right", overflow="fold")
    for j, h in enumerate(heads):
        tall.add_row(h, *[cells[j] for _, cells, _ in entries])
    natural = Console(width=10_000)  # measured unconstrained

    def fits(table: Table, bound: str) -> bool:
        return getattr(Measurement.get(natural, natural.options, table), bound) <= width

    if fits(wide, "maximum") or not fits(tall, "maximum") and fits(wide, "minimum"):
        return wide  # the row names fold; the value cells never wrap
    return tall


def skipped_line(skipped: dict[str, str]) -> str | None:
    """One line naming the metrics `run` skipped, grouped by why (None when none was)."""
    if not skipped:
        return None
    by_reason: dict[str, list[str]] = {}
    for metric, reason in skipped.items():
        by_reason.setdefault(reason, []).append(metric)
    return "metrics skipped: " + "; ".join(f"{', '.join(ms)}: {why}" for why, ms in by_reason.items())
