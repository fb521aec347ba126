"""Shared fixtures: tiny recipe settings, one calibrate artifact per session, a CLI runner.

Torch runs single-threaded here (and in the subprocesses the tests start): on a small,
busy machine a 2-thread pool on a tiny UNet is ~100x slower than one thread, and one
thread everywhere keeps in-process and subprocess results bit-identical.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# sample.dtype = auto resolves to fp32 here (tests that exercise bf16 ask for it): the same bits on every CPU
os.environ.setdefault("LOWBITDM_DTYPE", "fp32")

import json  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from lowbitdm_cli.artifacts import MANIFEST, Artifact, digest_of  # noqa: E402
from lowbitdm_cli.recipes import load_recipe  # noqa: E402

torch.set_num_threads(1)

TINY_SETS = [
    "calibrate.num_samples=4",
    "calibrate.batch_size=2",
    "sample.num_samples=8",
    "sample.batch_size=4",
    "sample.steps=4",
]


def set_args(sets: list[str]) -> list[str]:
    """["a.b=1", ...] → ["--set", "a.b=1", ...]."""
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture
def tiny_sets() -> list[str]:
    """The tiny settings as `section.key=value` strings (for `load_recipe(sets=...)`)."""
    return list(TINY_SETS)


@pytest.fixture
def tiny_recipe_args() -> list[str]:
    """The tiny settings as CLI options: ["--set", "calibrate.num_samples=4", ...]."""
    return set_args(TINY_SETS)


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """ONE calibrate artifact for tiny-random at w4a8; copy it (`copy_artifact`) before mutating it."""
    from lowbitdm_cli.stages.calibrate import calibrate

    recipe = load_recipe("ptq", model="tiny-random", bits="w4a8", sets=TINY_SETS)
    return calibrate(recipe, tmp_path_factory.mktemp("session") / "calibrate")


@pytest.fixture
def copy_artifact(tmp_path: Path) -> Callable[[Artifact | Path, str], Path]:
    """Copy an artifact folder into this test's tmp_path (so the test may damage it)."""

    def copy(art: Artifact | Path, name: str = "copy") -> Path:
        src = art.path if isinstance(art, Artifact) else Path(art)
        return Path(shutil.copytree(src, tmp_path / name))

    return copy


def _edit_manifest(folder: Path, mutate: Callable[[dict[str, Any]], None], redigest: bool = False) -> None:
    """Change manifest.json in place; `redigest` recomputes `self_digest` so only the change itself is wrong."""
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    mutate(data)
    if redigest:
        data["self_digest"] = digest_of({k: v for k, v in data.items() if k != "self_digest"})
    path.write_text(json.dumps(data, indent=2) + "\n")


def _flip_byte(path: Path, offset: int = -1) -> None:
    """Flip every bit of one byte (default: the last one) of a file."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def edit_manifest() -> Callable[..., None]:
    """`edit_manifest(folder, mutate, redigest=False)`: change an artifact's manifest.json in place."""
    return _edit_manifest


@pytest.fixture
def flip_byte() -> Callable[..., None]:
    """`flip_byte(path, offset=-1)`: corrupt one byte of a file."""
    return _flip_byte


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="where tests/test_device.py runs the chain against the CPU: cpu (those tests skip) or "
                          "cuda (benchmarks/gpu_check.sh)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The `--device` option (cpu unless given)."""
    return request.config.getoption("--device")


@pytest.fixture(autouse=True)
def _private_fp_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lowbitdm run` shares FP baselines through $LOWBITDM_FP_CACHE: each test gets its own, empty
    one (never the user's ~/.cache, and no test sees another's baseline)."""
    monkeypatch.setenv("LOWBITDM_FP_CACHE", str(tmp_path_factory.mktemp("fp-cache")))
