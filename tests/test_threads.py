"""`--threads` and the OpenMP wait policy the CLI sets before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from typer.testing import CliRunner

from lowbitdm_cli.cli import app
from lowbitdm_cli.threads import configure_threads


def _wait(env_set: dict[str, str]) -> str:
    """OMP_WAIT_POLICY / GOMP_SPINCOUNT after importing the CLI (then torch) with `env_set`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env_set
    code = ("import os, lowbitdm_cli.cli, torch\n"
            "print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_cli_limits_spinning_unless_told_otherwise() -> None:
    assert _wait({}) == "- 10000"
    assert _wait({"OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE -"  # the user's policy, no spin count of ours
    assert _wait({"GOMP_SPINCOUNT": "300000"}) == "- 300000"


def test_threads_option() -> None:
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["--threads", "2", "models"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 2
        bad = CliRunner().invoke(app, ["--threads", "0", "models"])
        assert bad.exit_code == 2 and "--threads" in bad.output
        assert "--threads" in CliRunner().invoke(app, ["--help"]).output
        assert configure_threads(None) == torch.get_num_threads()  # None keeps the current setting
    finally:
        torch.set_num_threads(before)
