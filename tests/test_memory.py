"""`memory.keep_freed_memory`: glibc's malloc keeps freed blocks for reuse; opt-out and bad values."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = "from lowbitdm_cli.memory import keep_freed_memory\nprint(keep_freed_memory())\n"


def _run(setting: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOWBITDM_MALLOC"}
    if setting is not None:
        env["LOWBITDM_MALLOC"] = setting
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keeps_freed_memory_on_glibc() -> None:
    assert _run(None).stdout.strip() == "True"
    assert _run("keep").stdout.strip() == "True"


def test_default_leaves_malloc_alone() -> None:
    assert _run("default").stdout.strip() == "False"


def test_bad_setting_is_an_error() -> None:
    out = _run("always")
    assert out.returncode != 0 and "LOWBITDM_MALLOC must be keep or default" in out.stderr


def test_cli_reports_a_bad_setting(runner, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbitdm_cli import memory
    from lowbitdm_cli.cli import app

    monkeypatch.setenv("LOWBITDM_MALLOC", "always")
    memory.keep_freed_memory.cache_clear()
    try:
        result = runner.invoke(app, ["models"])
    finally:
        memory.keep_freed_memory.cache_clear()
    assert result.exit_code == 2 and "LOWBITDM_MALLOC" in result.output
