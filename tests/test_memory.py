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


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_stays_until_released() -> None:
    """With reuse on, a freed 512 MiB tensor stays resident (the next one reuses it) until
    `release_freed_memory`, which each stage calls before it resets its peak-memory counter."""
    script = (
        "import torch\n"
        "from pathlib import Path\n"
        "from lowbitdm_cli.memory import keep_freed_memory, release_freed_memory\n"
        "def rss():\n"
        "    line = next(x for x in Path('/proc/self/status').read_text().splitlines() if x.startswith('VmRSS:'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "assert keep_freed_memory()\n"
        "base = rss()\n"
        "big = torch.ones(512 * 2**20 // 4)\n"
        "del big\n"
        "kept = rss() - base\n"
        "release_freed_memory()\n"
        "print(kept, rss() - base)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    kept, after = map(float, out.stdout.split())
    assert kept > 450 and after < 100, (kept, after)
