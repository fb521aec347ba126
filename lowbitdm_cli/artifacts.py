"""Artifact folders: a `manifest.json` plus safetensors files, written atomically, resumable.

A stage writes into ``<out>.partial/`` (manifest status ``partial``, checkpoints beside it)
and renames it to ``<out>/`` once complete, so a crash never leaves a folder that looks
complete. Opening an artifact validates the manifest and every file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from safetensors.torch import load_file, save_file

from lowbitdm_cli.errors import ArtifactError, IntegrityError, ManifestError, StageOrderError
from lowbitdm_cli.manifest_versions import SCHEMA_VERSION, STAGE_FORMAT, migrate_manifest
from lowbitdm_cli.quant.config import QuantizationRecord
from lowbitdm_cli.version import __version__

__all__ = ["SCHEMA_VERSION", "Artifact", "FileEntry", "Manifest", "MetricInterval", "ModelRef", "ParentRef", "Stage",
           "StageRun", "digest_of", "sha256_file"]

MANIFEST = "manifest.json"
Stage = Literal["calibrate", "finetune", "merge", "sample", "evaluate"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_of(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _plain_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"file name {name!r} must be a plain name inside the artifact folder")
    return name


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    size: int


class ModelRef(BaseModel):
    """Which full-precision model an artifact derives from."""

    model_config = ConfigDict(extra="forbid")
    name: str
    source: str
    digest: str


class ParentRef(BaseModel):
    """The artifact this one was made from: path relative to this folder, and its manifest's sha256."""

    model_config = ConfigDict(extra="forbid")
    path: str
    stage: Stage
    manifest_sha256: str


class MetricInterval(BaseModel):
    """A metric's confidence interval, beside its value in `Manifest.metrics` (same key).

    `method`: ``bootstrap`` (resamples of the generated set, re-centred on the value: see
    `lowbitdm_cli.evaluation.intervals`), ``double-bootstrap`` (Fréchet distances: the same,
    its spread scaled by `correction`), ``wilson`` (a proportion) or ``normal`` (a mean);
    `resamples` and `seed` for the bootstrap.
    """

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    level: float = 0.95
    method: Literal["bootstrap", "double-bootstrap", "wilson", "normal"]
    resamples: int | None = None
    seed: int | None = None
    correction: float | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int
    stage: Stage
    status: Literal["partial", "complete"]
    tool_version: str
    torch_version: str
    created_at: str
    model: ModelRef
    parent: ParentRef | None = None
    inputs_digest: str
    recipe: dict[str, Any]
    files: dict[str, FileEntry] = {}
    metrics: dict[str, float] = {}
    intervals: dict[str, MetricInterval] = {}  # only in evaluate manifests; absent (empty) elsewhere
    timings: dict[str, float] = {}
    info: dict[str, Any] = {}
    quantization: QuantizationRecord | None = None
    self_digest: str = ""

    def to_json(self) -> str:
        """The manifest as written: `intervals` left out while empty, so manifests without intervals
        (every stage but evaluate, and evaluate manifests from before intervals) keep their bytes."""
        return self.model_dump_json(indent=2, exclude=None if self.intervals else {"intervals"})

    def compute_digest(self) -> str:
        """sha256 of the manifest's content without `self_digest` (detects hand edits)."""
        data = json.loads(self.to_json())
        data.pop("self_digest", None)
        return digest_of(data)

    @field_validator("files")
    @classmethod
    def _names_are_plain(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            _plain_name(name)
        return files


def _read_manifest(folder: Path) -> tuple[Manifest, str]:
    path = folder / MANIFEST
    if path.is_symlink():
        raise ManifestError(f"{path} is a symbolic link: an artifact's manifest must be a plain file")
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an artifact: it has no {MANIFEST}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema_version {version}, this lowbitdm ({__version__}) reads up to "
                            f"{SCHEMA_VERSION}: upgrade lowbitdm to open it")
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is invalid: manifest: not a JSON object")
    try:
        manifest = Manifest.model_validate(migrate_manifest(data))
    except ValueError as e:  # ValidationError is a ValueError
        if not isinstance(e, ValidationError):
            raise ManifestError(f"{path} is invalid: {e}") from None
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise ManifestError(f"{path} is invalid: {where}: {first['msg']}") from None
    # the digest covers the manifest as written (in its own version), not its migrated form
    if data.get("self_digest") != digest_of({k: v for k, v in data.items() if k != "self_digest"}):
        raise ManifestError(f"{path} was edited by hand (its content no longer matches its digest): "
                            f"rerun the stage with --force to regenerate it")
    return manifest, hashlib.sha256(raw).hexdigest()


class Artifact:
    """A complete, validated artifact folder."""

    def __init__(self, path: Path, manifest: Manifest, manifest_sha256: str) -> None:
        self.path = path
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256

    @classmethod
    def open(cls, path: Path | str, stages: tuple[str, ...] | None = None, verify: bool = True) -> Artifact:
        """Open and validate; `stages` restricts which stages are acceptable."""
        path = Path(path)
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            hint = f" (an interrupted run left {partial}: rerun that stage with --resume)" if partial.exists() else ""
            raise ArtifactError(f"artifact {path} does not exist{hint}")
        manifest, digest = _read_manifest(path)
        if manifest.status != "complete":
            raise ArtifactError(f"{path} is a partial artifact: rerun its stage with --resume to finish it")
        if stages is not None and manifest.stage not in stages:
            raise StageOrderError(f"{path} is a {manifest.stage} artifact, expected one of: {', '.join(stages)}")
        art = cls(path, manifest, digest)
        if verify:
            art.verify()
        return art

    def verify(self) -> None:
        for name, entry in self.manifest.files.items():
            fpath = self.path / name
            if fpath.is_symlink() or not fpath.is_file():
                raise IntegrityError(f"{fpath} is missing (or is a link): the artifact is incomplete")
            if fpath.stat().st_size != entry.size or sha256_file(fpath) != entry.sha256:
                raise IntegrityError(f"{fpath} does not match the sha256 in its manifest: the file was changed "
                                     f"or corrupted; rerun the stage with --force")

    def file(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise ArtifactError(f"{self.path} has no file {name!r}")
        return self.path / name

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.file(name)))

    @property
    def parent(self) -> Artifact | None:
        ref = self.manifest.parent
        if ref is None:
            return None
        parent = Artifact.open((self.path / ref.path).resolve(), verify=False)
        if parent.manifest_sha256 != ref.manifest_sha256:
            raise IntegrityError(f"parent {parent.path} of {self.path} changed since it was used "
                                 f"(manifest sha256 differs): rerun this stage")
        return parent

    def lineage(self) -> list[Artifact]:
        """This artifact and its ancestors, newest first."""
        chain, art = [self], self
        while (art := art.parent) is not None:
            chain.append(art)
        return chain

    def find(self, stage: str) -> Artifact | None:
        """The nearest artifact of `stage` in the lineage (self included)."""
        return next((a for a in self.lineage() if a.manifest.stage == stage), None)


# Locks this process holds, by artifact path. A stage that raised (Ctrl-C in a notebook, a test)
# may still be referenced by its traceback; rerunning it in the same process takes the lock over
# instead of reporting this very process as "another writer".
_HELD: dict[str, Any] = {}


def _lock(out: Path):  # noqa: ANN202 - an open file object holding an flock
    """An exclusive, non-blocking lock on ``<out>.lock``; another live writer makes this an error."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    stale = _HELD.pop(str(out.resolve()), None)
    if stale is not None:
        stale.close()
    handle = open(out.with_name(out.name + ".lock"), "w")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ArtifactError(f"another lowbitdm process is writing {out}: wait for it to finish") from None
    _HELD[str(out.resolve())] = handle
    return handle


def _unlock(out: Path, handle) -> None:  # noqa: ANN001
    """Remove ``<out>.lock`` and release it (unlink first: a later writer makes a fresh file)."""
    out.with_name(out.name + ".lock").unlink(missing_ok=True)
    _HELD.pop(str(out.resolve()), None)
    handle.close()


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ``/proc/self/clear_refs``), so the peak a
    stage records is its own, not that of an earlier stage run in the same process (`lowbitdm run`).
    False where the platform cannot (the peak is then the process's since it started). Free heap
    memory an earlier stage left with the process (`memory.keep_freed_memory`) goes back first."""
    from lowbitdm_cli.memory import release_freed_memory

    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident set size in MiB since the last `_reset_peak_rss` (or process start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StageRun:
    """Writes one artifact: skip if up to date, resume a partial folder, commit atomically.

    Use ``run = StageRun.start(...)``; if ``run.done`` the artifact is ``run.artifact``.
    Otherwise work inside ``run.dir`` and finish with ``run.commit(...)``.
    """

    def __init__(self, out: Path, manifest: Manifest, resumed: bool, prior_elapsed: float) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".partial")
        self.manifest = manifest
        self.resumed = resumed
        self._started = time.time() - prior_elapsed
        _reset_peak_rss()
        self.done = False
        self.artifact: Artifact | None = None

    @classmethod
    def start(cls, out: Path | str, stage: Stage, model: ModelRef, recipe: dict[str, Any],
              parent: Artifact | None = None, options: dict[str, Any] | None = None,
              resume: bool = False, force: bool = False, replace_stale: bool = False,
              recipe_sections: tuple[str, ...] | None = None) -> StageRun:
        """`force` redoes the stage; `replace_stale` redoes it only where its inputs changed.

        `recipe_sections` names the recipe sections the stage's result depends on (default: all);
        only those enter the inputs digest, so e.g. the FP baseline's samples are shared by every
        recipe with the same sampler. A lock held for the life of the process refuses a second
        process writing the same artifact (the OS drops it if the process is killed).
        """
        out = Path(out)
        parent_ref = None
        if parent is not None:
            rel = os.path.relpath(parent.path.resolve(), out.resolve())
            parent_ref = ParentRef(path=rel, stage=parent.manifest.stage, manifest_sha256=parent.manifest_sha256)
        relevant = recipe if recipe_sections is None else {k: recipe.get(k) for k in recipe_sections}
        inputs = digest_of({"stage": stage, "model": model.model_dump(), "recipe": relevant,
                            "parent": parent.manifest_sha256 if parent else None, "options": options or {}})
        manifest = Manifest(schema_version=SCHEMA_VERSION, stage=stage, status="partial", tool_version=__version__,
                            torch_version=torch.__version__,
                            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            model=model, parent=parent_ref, inputs_digest=inputs, recipe=recipe,
                            quantization=QuantizationRecord(format=STAGE_FORMAT[stage]) if stage in STAGE_FORMAT
                            else None)
        if out.exists() and not force:
            existing, digest = _read_manifest(out)
            if existing.inputs_digest == inputs:
                run = cls(out, existing, resumed=False, prior_elapsed=0.0)
                run.done, run.artifact = True, Artifact.open(out)
                return run
            if not replace_stale:
                raise ArtifactError(f"{out} already holds a {existing.stage} artifact made from other inputs: "
                                f"pass --force to replace it, or choose another --out")
        lock = _lock(out)
        try:
            partial = out.with_name(out.name + ".partial")
            prior = 0.0
            resumed = False
            if partial.exists():
                if force or not resume:
                    if not force:
                        raise ArtifactError(f"an interrupted run left {partial}: rerun with --resume to continue it, "
                                            f"or --force to start over")
                    shutil.rmtree(partial)
                else:
                    old, _ = _read_manifest(partial)
                    if old.inputs_digest == inputs and old.status == "complete":
                        # killed between marking the manifest complete and the rename: finish the rename
                        if out.exists():
                            shutil.rmtree(out)
                        os.replace(partial, out)
                        _unlock(out, lock)
                        run = cls(out, old, resumed=True, prior_elapsed=0.0)
                        run.done, run.artifact = True, Artifact.open(out)
                        return run
                    if old.inputs_digest == inputs:
                        prior, resumed = old.timings.get("wall_s", 0.0), True
                        manifest.created_at = old.created_at
                    elif replace_stale:
                        shutil.rmtree(partial)
                    else:
                        raise ArtifactError(f"{partial} was started with other inputs and cannot be resumed with "
                                            f"these: pass --force to start over")
        except BaseException:
            _unlock(out, lock)
            raise
        partial.mkdir(parents=True, exist_ok=True)
        run = cls(out, manifest, resumed, prior)
        run._lock = lock
        run._write_manifest()
        return run

    # --- writing inside the partial folder ------------------------------------------------
    def path(self, name: str) -> Path:
        return self.dir / _plain_name(name)

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                     ) -> Path:
        """Atomically write a safetensors file (tmp + rename), so a kill never leaves half a file."""
        target = self.path(name)
        tmp = target.with_name(target.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, target)
        return target

    def save_bytes(self, name: str, data: bytes) -> Path:
        target = self.path(name)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(name)))

    def checkpoint(self, **info: Any) -> None:
        """Record progress (elapsed time, `info`) in the partial manifest."""
        self.manifest.info.update(info)
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest.timings["wall_s"] = round(time.time() - self._started, 3)
        self.manifest.self_digest = self.manifest.compute_digest()
        self.save_bytes(MANIFEST, (self.manifest.to_json() + "\n").encode())

    def _release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            _unlock(self.out, lock)
            self._lock = None

    # --- commit ---------------------------------------------------------------------------
    def commit(self, files: list[str], metrics: dict[str, float] | None = None,
               info: dict[str, Any] | None = None, timings: dict[str, float] | None = None,
               intervals: dict[str, MetricInterval] | None = None) -> Artifact:
        """Hash `files`, drop everything else (checkpoints), mark complete, rename into place."""
        keep = set(files) | {MANIFEST}
        entries = {}
        for name in files:
            p = self.path(name)
            entries[name] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        for p in self.dir.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.manifest.files = entries
        self.manifest.metrics.update(metrics or {})
        self.manifest.intervals.update(intervals or {})
        self.manifest.info.update(info or {})
        self.manifest.timings.update(timings or {})
        self.manifest.timings["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        self.manifest.status = "complete"
        self._write_manifest()
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + f".old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        if old is not None:
            shutil.rmtree(old)
        self._release()
        self.done = True
        self.artifact = Artifact.open(self.out)
        return self.artifact
