"""`calibrate` and `finetune` over real gloo processes (torchrun) against one process.

One module fixture makes every artifact once:

- one process, in-process through the CLI: PTQ (mse ranges, temporal), PQD (reconstruction with
  QDrop), EfficientDM finetune of the PTQ artifact with the MSE loss and with TRD;
- one `python -m lowbitdm_cli` process killed at its first reconstruction-block checkpoint (a
  partial PQD calibrate);
- ONE torchrun job of 2 processes running six commands (`worker.py`): the same PTQ, PQD and
  both finetunes, and the killed PQD resumed with 2 processes;
- ONE torchrun job of 3 processes running both finetunes;
- a 2-process torchrun finetune killed at its first epoch checkpoint, resumed in one process.

Finetune cuts each batch of 3 into micro-batches of 1 row (2 processes take 2 + 1, 3 take
1 + 1 + 1) and sums their gradients in index order on every rank, so its results are asserted
byte for byte: no tolerance, on any CPU. Reconstruction all-reduces its gradients (the order of
that sum is gloo's): see `test_reconstruction_two_processes_match` for its bound.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.cli import app
from lowbitdm_cli.distributed import ProcessGroup

WORKER = Path(__file__).with_name("worker.py")
# the subprocesses import this checkout's lowbitdm_cli, whatever the cwd (worker.py's own folder comes
# first on its sys.path, ahead of the installed package)
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
TIMEOUT_S = 400

COMMON = ["--model", "tiny-random", "--bits", "w4a4",
          *[a for s in ["calibrate.num_samples=6", "calibrate.batch_size=2", "sample.steps=4"] for a in ("--set", s)]]
PTQ = ["calibrate", *COMMON, "--set", 'quant.act_init="mse"', "--set", "quant.a_temporal=true",
       "--set", "calibrate.max_values_per_step=1000"]  # 3 trajectory batches: split 2 + 1
PQD = ["calibrate", *COMMON, "--method", "pqd",
       *[a for s in ["calibrate.recon_iters=12", "calibrate.recon_samples=8", "calibrate.recon_batch_size=4",
                     "calibrate.recon_micro_batch=2", "calibrate.qdrop_prob=0.5"] for a in ("--set", s)]]
FT_SETS = [a for s in ["finetune.epochs=3", "finetune.batch_size=3", "finetune.micro_batch=1", "finetune.steps=3"]
           for a in ("--set", s)]


def _ft(parent: Path, loss: str = "mse") -> list[str]:
    # global batch 3 in micro-batches of 1: ranks take 2 + 1 or 1 + 1 + 1 of them
    return ["finetune", str(parent), "--method", "qalora", *FT_SETS, "--set", f'finetune.loss="{loss}"']


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (parents read from /proc/*/stat)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun's workers run in sessions of their own)."""
    pids = [*_descendants(pid), pid]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:  # their locks go when they are gone
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_killed(cmd: list[str], checkpoint: Path, log: Path) -> None:
    """Run `cmd` and SIGKILL it and its children once `checkpoint` exists."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not checkpoint.exists():
            assert proc.poll() is None, f"exited ({proc.returncode}) before {checkpoint.name}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {checkpoint.name}:\n{log.read_text()[-3000:]}"
            time.sleep(0.005)
        _kill_tree(proc.pid)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"finished (rc {proc.returncode}) before it could be killed"
    _wait_unlocked(checkpoint.parent.with_name(checkpoint.parent.name.removesuffix(".partial")))


def _wait_unlocked(out: Path, timeout_s: float = 60.0) -> None:
    """Wait until no killed writer holds ``<out>.lock``: a killed multi-threaded process shows as a
    zombie while its other threads still exit, and its files (the flock) close only after them."""
    lock = out.with_name(out.name + ".lock")
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                pass
        assert time.monotonic() < deadline, f"{lock} is still held {timeout_s:.0f} s after the kill"
        time.sleep(0.05)


def _torchrun(args: list[str], processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]


def _run_jobs(root: Path, name: str, processes: int, jobs: list[list[str]]) -> None:
    """Run `jobs` (argument lists) in one torchrun job of `processes` processes (`worker.py`)."""
    (root / f"{name}.json").write_text(json.dumps(jobs))
    proc = subprocess.run(_torchrun([str(WORKER), str(root / f"{name}.json")], processes), env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (root / f"{name}.log").write_text(proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    runner = CliRunner()
    for args in ([*PTQ, "--out", str(root / "one/ptq")], [*PQD, "--out", str(root / "one/pqd")],
                 [*_ft(root / "one/ptq"), "--out", str(root / "one/ft")],
                 [*_ft(root / "one/ptq", "trd"), "--out", str(root / "one/ft_trd")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output

    # a partial PQD calibrate from one process, to be resumed by two
    _run_killed([sys.executable, "-m", "lowbitdm_cli", *PQD, "--out", str(root / "resumed/pqd")],
                root / "resumed/pqd.partial/recon_block_000.safetensors", root / "killed_pqd.log")

    _run_jobs(root, "two", 2, [[*PTQ, "--out", str(root / "two/ptq")], [*PQD, "--out", str(root / "two/pqd")],
                               [*PQD, "--resume", "--out", str(root / "resumed/pqd")],
                               [*_ft(root / "one/ptq"), "--out", str(root / "two/ft")],
                               [*_ft(root / "one/ptq", "trd"), "--out", str(root / "two/ft_trd")]])
    _run_jobs(root, "three", 3, [[*_ft(root / "one/ptq"), "--out", str(root / "three/ft")],
                                 [*_ft(root / "one/ptq", "trd"), "--out", str(root / "three/ft_trd")]])

    # a partial finetune from two processes, to be resumed by one
    _run_killed(_torchrun(["-m", "lowbitdm_cli", *_ft(root / "one/ptq"), "--out", str(root / "resumed/ft")]),
                root / "resumed/ft.partial/checkpoint.json", root / "killed_ft.log")
    (root / "killed_ft_epoch").write_text(str(json.loads((root / "resumed/ft.partial/checkpoint.json").read_text())["epoch"]))
    result = runner.invoke(app, [*_ft(root / "one/ptq"), "--resume", "--out", str(root / "resumed/ft")])
    assert result.exit_code == 0, result.output
    return root


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "quant_state.safetensors"))


def test_calibrate_two_processes_byte_identical(runs: Path) -> None:
    one, two = Artifact.open(runs / "one/ptq"), Artifact.open(runs / "two/ptq")
    assert two.manifest.inputs_digest == one.manifest.inputs_digest  # the process count is no input
    for name in ("calib_data.safetensors", "quant_state.safetensors"):  # trajectories; mse-searched ranges
        assert (runs / "two/ptq" / name).read_bytes() == (runs / "one/ptq" / name).read_bytes(), name
    assert one.manifest.info["layer_output_error"] == two.manifest.info["layer_output_error"]
    assert sorted(p.name for p in (runs / "two").iterdir()) == ["ft", "ft_trd", "pqd", "ptq"]  # no partial folder left
    assert (runs / "two.log").read_text().count("✓ calibrated") == 3  # rank 0 reports, once per command


def _assert_calibrate_identical(a: Path, b: Path) -> None:
    """The same trajectories, quantizer state and reconstruction records, bit for bit."""
    for name in ("calib_data.safetensors", "quant_state.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a} and {b} differ in {name}"
    rec_a, rec_b = (Artifact.open(p).manifest.info["reconstruction"] for p in (a, b))
    assert rec_a and rec_a == rec_b


def test_reconstruction_two_processes_byte_identical(runs: Path) -> None:
    # micro-batches of 2 rows (calibrate.recon_micro_batch), summed in index order on every rank
    _assert_calibrate_identical(runs / "one/pqd", runs / "two/pqd")
    rec = Artifact.open(runs / "one/pqd").manifest.info["reconstruction"]
    assert any(r["mse_after"] < r["mse_before"] for r in rec.values())  # it trained


def _assert_finetune_identical(a: Path, b: Path) -> None:
    """The same trained tensors, loss curve and epoch losses, bit for bit."""
    for name in ("quant_state.safetensors", "loss_curve.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{a} and {b} differ in {name}"
    h1, h2 = (Artifact.open(p).manifest.info["loss_history"] for p in (a, b))
    assert len(h1) == 3 and h1 == h2


def _assert_trained(ft: Path, parent: Path) -> None:
    """`ft` moved every activation step of `parent` and trained every LoRA B (zero at the start)."""
    tf, tp = _tensors(ft), _tensors(parent)
    steps = [k for k in tp if k.endswith("a_quant.delta")]
    assert steps and all(not torch.equal(tf[k], tp[k]) for k in steps)
    lora_b = [k for k in tf if k.endswith("lora_B")]
    assert lora_b and all(bool(tf[k].abs().max() > 0) for k in lora_b)


@pytest.mark.parametrize("loss", ["mse", "trd"])
def test_finetune_on_two_and_three_processes_is_byte_identical(runs: Path, loss: str) -> None:
    name = "ft" if loss == "mse" else "ft_trd"
    _assert_trained(runs / "one" / name, runs / "one/ptq")
    for processes, folder in ((2, "two"), (3, "three")):
        _assert_finetune_identical(runs / "one" / name, runs / folder / name)
        art = Artifact.open(runs / folder / name)
        assert art.manifest.info["processes"] == processes and art.manifest.info["loss"] == loss
        assert art.manifest.inputs_digest == Artifact.open(runs / "one" / name).manifest.inputs_digest
    assert not (runs / "one/ft_trd/quant_state.safetensors").read_bytes() == \
        (runs / "one/ft/quant_state.safetensors").read_bytes()  # the TRD term trains too


def test_resume_across_process_counts(runs: Path) -> None:
    # calibrate: killed with 1 process after its first block, finished by 2
    _assert_calibrate_identical(runs / "one/pqd", runs / "resumed/pqd")
    # finetune: killed with 2 processes after its first epoch, finished by 1
    assert int((runs / "killed_ft_epoch").read_text()) < 2  # the 2-process run stopped before its last epoch
    _assert_finetune_identical(runs / "one/ft", runs / "resumed/ft")
    resumed = Artifact.open(runs / "resumed/ft")
    assert resumed.manifest.info["epochs_done"] == 3 and "processes" not in resumed.manifest.info


def test_grad_checkpoint_gives_the_same_weights(runs: Path) -> None:
    result = CliRunner().invoke(app, [*_ft(runs / "one/ptq"), "--grad-checkpoint", "--out", str(runs / "gc")])
    assert result.exit_code == 0, result.output
    one, gc = Artifact.open(runs / "one/ft"), Artifact.open(runs / "gc")
    assert gc.manifest.inputs_digest == one.manifest.inputs_digest  # a memory option, not an input
    _assert_finetune_identical(runs / "one/ft", runs / "gc")


def test_too_few_micro_batches_for_the_processes_is_an_error() -> None:
    from lowbitdm_cli.finetune.loop import DistillConfig, distill, micro_batches

    cfg = DistillConfig(epochs=1, batch_size=4, steps=1, eta=0.0, guidance=1.0, seed=0, micro_batch=2)
    with pytest.raises(ValueError, match=r"3 processes share out whole micro-batches: finetune.batch_size \(4\) in "
                                         r"micro-batches of finetune.micro_batch \(2\) gives 2; set "
                                         r"finetune.micro_batch to a divisor of batch_size of at most 1"):
        distill(None, None, None, cfg, None, None, 0, lambda *_: None,  # type: ignore[arg-type]
                group=ProcessGroup(rank=2, world_size=3, local_rank=2))
    with pytest.raises(ValueError, match=r"micro-batches of finetune.micro_batch \(unset: the whole batch\) gives 1"):
        micro_batches(3, None, 2)
    assert micro_batches(3, None, 1) == (3, 1) and micro_batches(12, 4, 3) == (4, 3)
    assert [ProcessGroup(r, 3).shard(7) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [ProcessGroup(r, 3).shard(2) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
