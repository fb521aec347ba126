"""Build lowbitdm's own CPU kernels once per machine with the machine's compiler, and cache them.

`build` compiles one source file into a shared library under ``$LOWBITDM_KERNEL_CACHE`` (default
``~/.cache/lowbitdm/kernels``), named by a hash of the source, the flags, the compiler's version and
PyTorch's version, so that a change of any of them builds anew and a second process reuses the file.
The library is written in a temporary folder beside the cache and renamed into place (atomic on one
file system: two processes building the same key write the same library).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["build", "cache_dir", "compiler"]


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBITDM_KERNEL_CACHE", Path.home() / ".cache" / "lowbitdm" / "kernels"))


def compiler(language: str = "c++") -> str | None:
    """The compiler to build with: ``$CXX`` / ``$CC``, else c++ / g++ (cc / gcc for C); None when there is none."""
    if language == "c":
        return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(source: Path, compiler_path: str, flags: list[str], link: list[str] | None = None) -> Path:
    """The shared library of `source` compiled with `flags` (then `link`: libraries and paths), built
    once and reused; RuntimeError with the compiler's first error line when it fails."""
    version = subprocess.run([compiler_path, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([source.read_text(), torch.__version__, version, *flags, *(link or [])]).encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same file system: the rename is atomic
        out = Path(tmp) / target.name
        done = subprocess.run([compiler_path, *flags, str(source), "-o", str(out), *(link or [])],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or ["the compiler failed"]
            raise RuntimeError(errors[0].strip())
        os.replace(out, target)
    return target
