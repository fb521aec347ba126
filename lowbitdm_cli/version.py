"""The installed distribution's version, the one kept in ``pyproject.toml`` (read from package metadata)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("lowbitdm")
except PackageNotFoundError:  # a source tree on sys.path that was never installed (pip install -e .)
    __version__ = "0+unknown"
