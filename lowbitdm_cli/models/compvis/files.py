"""Reading a CompVis model's files: locating checkpoint and YAML, parsing the YAML safely, reading
the checkpoint's tensors without executing pickled code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lowbitdm_cli.errors import ModelNotFoundError
from lowbitdm_cli.models.pickled import pickle_refusal


def _fail(msg: str) -> ModelNotFoundError:
    return ModelNotFoundError(msg)


# ----------------------------------------------------------------------------- files


def compvis_files(path: str | Path, config_path: str | Path | None = None) -> tuple[Path, Path]:
    """Resolve (checkpoint, config) for a CompVis model.

    `path` is either a folder holding ``model.ckpt`` (or ``model.safetensors``) and ``config.yaml``
    — the layout of the CompVis model zips — or the checkpoint file itself; then `config_path`
    names the YAML, or a ``config.yaml``/``<stem>.yaml`` next to the checkpoint is used.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        ckpts = [p / n for n in ("model.ckpt", "model.safetensors") if (p / n).is_file()]
        if not ckpts:
            raise _fail(f"{p}: no model.ckpt or model.safetensors in this folder")
        ckpt = ckpts[0]
        cfg = Path(config_path).expanduser() if config_path else p / "config.yaml"
    elif p.is_file():
        ckpt = p
        if config_path:
            cfg = Path(config_path).expanduser()
        else:
            cands = [p.with_name("config.yaml"), p.with_suffix(".yaml")]
            cfg = next((c for c in cands if c.is_file()), cands[0])
    else:
        raise _fail(f"{p}: no such CompVis checkpoint or folder")
    if not cfg.is_file():
        raise _fail(f"{cfg}: config YAML not found (pass the model's original YAML config)")
    return ckpt, cfg


def read_config(path: str | Path) -> dict:
    """The YAML config as a dict (``yaml.safe_load``: plain data only), with ``model.params`` checked."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _fail(f"{path}: unreadable YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) \
            or not isinstance(data["model"].get("params"), dict):
        raise _fail(f"{path}: not a CompVis config (expected a top-level `model: {{target, params}}` mapping)")
    return data


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a CompVis checkpoint, read without executing any pickled code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``, which only rebuilds tensors and plain
    containers. A checkpoint that needs other objects unpickled (e.g. a pickled training callback)
    is refused. A top-level ``state_dict`` entry (Lightning checkpoints) is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (OSError, SafetensorError) as e:
            raise _fail(f"{path}: unreadable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _fail(pickle_refusal(path, e)) from None
        except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise _fail(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise _fail(f"{path}: no state dict in this checkpoint")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise _fail(f"{path}: the state dict holds non-tensor entries ({', '.join(map(str, bad[:5]))})")
    return obj

