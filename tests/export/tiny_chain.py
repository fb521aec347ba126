"""The merged checkpoint of tiny-random the runtime tests build: calibrate (ptq) → finetune → merge."""

from __future__ import annotations

from pathlib import Path

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.recipes import load_recipe

TINY = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4"]


def merge_tiny(bits: str, sets: list[str], root: Path) -> Artifact:
    """tiny-random at `bits` with the tiny calibration and `sets`, merged under `root`."""
    from lowbitdm_cli.stages.calibrate import calibrate
    from lowbitdm_cli.stages.finetune import finetune
    from lowbitdm_cli.stages.merge import merge

    recipe = load_recipe("ptq", model="tiny-random", bits=bits, sets=TINY + sets)
    calibrated = calibrate(recipe, root / "calibrate")
    return merge(finetune(calibrated, recipe, root / "finetune"), root / "merge")
