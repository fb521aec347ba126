"""`--threads` and the OpenMP wait policy the CLI sets before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from typer.testing import CliRunner

from lowbitdm_cli.cli import app
from lowbitdm_cli.threads import configure_threads


def _policy(env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy:
        env["OMP_WAIT_POLICY"] = env_policy
    code = "import os, lowbitdm_cli.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_cli_makes_waiting_threads_sleep_unless_told_otherwise() -> None:
    assert _policy(None) == "PASSIVE"
    assert _policy("ACTIVE") == "ACTIVE"


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
