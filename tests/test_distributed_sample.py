"""`sample` over several processes: torchrun gives the same bytes as one process; ranks split the shards.

The torchrun test starts two real CPU processes (gloo). The rank test runs one process as rank 1
of 2 (the process group replaced by a stand-in) to check what a non-zero rank writes, then
finishes the job as a single resumed process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import lowbitdm_cli.stages.common as stage_common
import lowbitdm_cli.stages.sample as sample_stage
from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.distributed import ProcessGroup, process_group, rank_device
from lowbitdm_cli.errors import ArtifactError, RecipeError
from lowbitdm_cli.npz import read_npz
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import random_labels
from lowbitdm_cli.stages.common import open_source

SETS = ["sample.num_samples=10", "sample.batch_size=3", "sample.steps=3"]  # 4 shards, the last one short


def _set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _hashes(out: Path) -> dict[str, str]:
    return {name: e.sha256 for name, e in Artifact.open(out).manifest.files.items()}


def test_torchrun_two_processes_match_one_process(runner: CliRunner, tmp_path: Path) -> None:
    args = ["sample", "tiny-random", *_set_args(SETS)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lowbitdm_cli", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one, two = Artifact.open(tmp_path / "one"), Artifact.open(tmp_path / "two")
    assert _hashes(tmp_path / "two") == _hashes(tmp_path / "one")  # samples.npz and grid.png, byte for byte
    assert (tmp_path / "two" / "samples.npz").read_bytes() == (tmp_path / "one" / "samples.npz").read_bytes()
    assert two.manifest.inputs_digest == one.manifest.inputs_digest
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["grid.png", "manifest.json", "samples.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial folder, no lock left
    assert proc.stderr.count("✓ sampled") == 1  # only rank 0 reports
    data = read_npz(tmp_path / "two" / "samples.npz")
    assert data["arr_0"].shape == (10, 16, 16, 1) and data["labels"].tolist() == [i % 10 for i in range(10)]


class _SecondRank(ProcessGroup):
    """Rank 1 of 2 without a real group: rank 0's start runs here, barriers return at once."""

    manifest_after_start: bytes = b""

    def barrier(self) -> None:
        pass

    def on_main(self, fn):  # noqa: ANN001, ANN201
        plan = fn()  # rank 0's part, so that its partial folder and manifest exist
        _SecondRank.manifest_after_start = (OUT[0].with_name(OUT[0].name + ".partial") / "manifest.json").read_bytes()
        return plan


OUT: list[Path] = []


@contextmanager
def _as_second_rank(device: str = "cpu") -> Iterator[ProcessGroup]:
    yield _SecondRank(rank=1, world_size=2, local_rank=1)


def test_nonzero_rank_writes_only_its_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(model="tiny-random", sets=SETS)
    out = tmp_path / "s"
    OUT[:] = [out]
    calls: list[Any] = []
    real = sample_stage.run_sampler
    monkeypatch.setattr(sample_stage, "run_sampler", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    with monkeypatch.context() as m:
        m.setattr(stage_common, "process_group", _as_second_rank)  # every stage opens its group there
        with pytest.raises(ArtifactError, match="--resume"):  # rank 0 never committed here
            sample_stage.sample(open_source("tiny-random"), recipe, out)
    partial = out.with_name("s.partial")
    assert sorted(p.name for p in partial.glob("shard_*")) == ["shard_00001.safetensors", "shard_00003.safetensors"]
    assert calls == [[3, 4, 5], [9]]  # rank 1 of 2 took every other missing shard
    assert (partial / "manifest.json").read_bytes() == _SecondRank.manifest_after_start  # never touched by rank 1

    calls.clear()  # a single process resumes: it makes only the shards rank 1 did not
    resumed = sample_stage.sample(open_source("tiny-random"), recipe, out, resume=True)
    assert calls == [[0, 1, 2], [6, 7, 8]]
    straight = sample_stage.sample(open_source("tiny-random"), recipe, tmp_path / "straight")
    assert _hashes(resumed.path) == _hashes(straight.path)
    assert resumed.manifest.info["shards_done"] == 4


def test_process_group_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group() as group:
        assert (group.rank, group.world_size, group.is_main) == (0, 1, True)
        assert group.split([0, 1, 2]) == [0, 1, 2] and group.broadcast("x") == "x"
        assert group.on_main(lambda: 7) == 7
        with pytest.raises(RecipeError, match="bad"):  # expected errors pass through unchanged
            group.on_main(lambda: (_ for _ in ()).throw(RecipeError("bad")))
    assert ProcessGroup(rank=1, world_size=3).split(list(range(7))) == [1, 4]
    assert rank_device("cuda", ProcessGroup(rank=1, world_size=2, local_rank=1)) == "cuda:1"
    assert rank_device("cuda", ProcessGroup()) == "cuda" and rank_device("cpu", ProcessGroup(1, 2, 1)) == "cpu"


def test_random_labels_per_index(tmp_path: Path) -> None:
    labels = random_labels(200, 10, seed=3)
    assert labels.tolist()[:50] == random_labels(50, 10, seed=3).tolist()  # label i depends on (seed, i) only
    assert labels.tolist() != random_labels(200, 10, seed=4).tolist()
    assert set(np.bincount(labels.numpy(), minlength=10)) != {20} and labels.min() >= 0 and labels.max() <= 9
    assert "labels" not in load_recipe(model="tiny-random").model_dump()["sample"]  # the default changes no digest
    recipe = load_recipe(model="tiny-random", sets=[*SETS, "sample.labels=random"])
    art = sample_stage.sample(open_source("tiny-random"), recipe, tmp_path / "r")
    assert read_npz(tmp_path / "r" / "samples.npz")["labels"].tolist() == random_labels(10, 10, seed=0).tolist()
    assert art.manifest.recipe["sample"]["labels"] == "random"
