"""The table `lowbitdm run` prints stays readable at 80 columns: no interval is cut or wrapped."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from lowbitdm_cli.run_table import run_table, skipped_line


def _row(label: str, metrics: dict, intervals: dict | None = None) -> dict:
    return {"label": label, "metrics": metrics, "wall_s": 1234.0, "images_per_s": 12.5, "denoiser_mb": 1.73,
            "intervals": {k: {"low": lo, "high": hi} for k, (lo, hi) in (intervals or {}).items()}}


DIGITS = {"fid_digits": 12.345, "class_accuracy": 0.9812}
DIGITS_IV = {"fid_digits": (10.12, 14.56), "class_accuracy": (0.9601, 0.9923)}
PAPER = {"fid": 123.45, "sfid": 45.6, "is": 7.89, "precision": 0.61, "recall": 0.52}
PAPER_IV = {"fid": (120.1, 126.7), "sfid": (40.2, 50.3), "is": (7.5, 8.2), "precision": (0.58, 0.64)}
CASES = {
    "digits": {"rows": [_row("digits fp32", DIGITS, DIGITS_IV),
                        _row("digits w4a4 efficientdm-plus", DIGITS, DIGITS_IV)]},
    "seeds": {"rows": [_row(f"digits {k} (seed +{s})", DIGITS, DIGITS_IV) for s in (0, 1)
                       for k in ("fp32", "w4a4 ptq")],
              "configurations": [{"label": "digits w4a4 ptq", "runs": [1, 2], "metrics": DIGITS,
                                  "intervals": {k: list(v) for k, v in DIGITS_IV.items()}}]},
    "paper": {"rows": [_row("my-ldm fp32", PAPER, PAPER_IV), _row("my-ldm w4a8 efficientdm", PAPER, PAPER_IV)]},
}


def _render(result: dict, model: str) -> list[str]:
    console = Console(width=80, record=True, color_system=None)
    console.print(run_table(result, f"{model}: full precision vs w4a4 (ptq)", model, width=80))
    return console.export_text().splitlines()


@pytest.mark.parametrize("case", list(CASES))
def test_intervals_stay_whole_at_80_columns(case: str) -> None:
    result = CASES[case]
    lines = _render(result, "digits" if case != "paper" else "my-ldm")
    assert all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    assert "…" not in text
    expected = set()
    for row in result["rows"]:
        for k, iv in row["intervals"].items():
            scale = 100 if k in ("class_accuracy", "precision") else 1
            lo, hi = iv["low"] * scale, iv["high"] * scale
            expected.add((lo, hi))
    found = re.findall(r"\[(-?[\d.e-]+), (-?[\d.e-]+)\]", text)
    assert found, text
    pairs = {(float(a), float(b)) for a, b in found}
    for lo, hi in expected:  # every interval appears on one line, rounded to about 3 digits
        assert any(abs(a - lo) <= 0.06 * max(1, abs(lo)) and abs(b - hi) <= 0.06 * max(1, abs(hi))
                   for a, b in pairs), (lo, hi, text)


def test_no_metrics_shows_size_and_speed() -> None:
    rows = [_row("my-ddpm fp32", {}), _row("my-ddpm w8a8 ptq", {})]
    text = "\n".join(_render({"rows": rows}, "my-ddpm"))
    assert "MiB" in text and "img/s" in text and "1.73" in text and "12.5" in text


def test_skipped_metrics_in_one_line() -> None:
    line = skipped_line({"fid": "no reference (--ref)", "sfid": "no reference (--ref)",
                         "clip_score": "no CLIP weights"})
    assert line == "metrics skipped: fid, sfid: no reference (--ref); clip_score: no CLIP weights"
    assert skipped_line({}) is None
