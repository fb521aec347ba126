"""Read a LoRA adapter file into low-rank pairs per denoiser layer.

Accepted layouts (safetensors only; nothing is unpickled), as the tools people train with save them:

- PEFT / diffusers: ``<module>.lora_A.weight`` [r, in(, kh, kw)] and ``<module>.lora_B.weight``
  [out, r(, 1, 1)], module names prefixed by ``unet.``, ``transformer.`` or ``base_model.model.``
  or not at all; alpha from ``adapter_config.json`` beside the file (PEFT) or the file's
  ``lora_adapter_metadata`` (diffusers), else none;
- ``<module>.lora_down.weight`` / ``lora_up.weight`` with an optional ``<module>.alpha`` (kohya and
  diffusers' older exports; kohya's ``lora_unet_`` names with ``_`` for ``.`` are matched too);
- ``<module>.lora.down.weight`` / ``lora.up.weight`` and ``<attn>.processor.to_q_lora.down.weight``
  (diffusers' LoRACompatible layers and attention processors).

A pair's multiplier is ``alpha / r`` when alpha is known (PEFT's ``scaling``), else 1; the user's
``--lora-scale`` multiplies it. A key that matches no linear or conv layer of the denoiser, or a pair
whose shapes do not fit its layer, is an `AdapterError` naming them: never a partial load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbitdm_cli.artifacts import sha256_file
from lowbitdm_cli.errors import AdapterError

__all__ = ["Adapter", "LoraPair", "lora_inputs", "match_adapter", "read_adapter"]

# (key suffix, factor): "down" is A [r, in], "up" is B [out, r]
_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
             (".lora_up.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
             ("_lora.down.weight", "down"), ("_lora.up.weight", "up"), (".alpha", "alpha"))
_PREFIXES = ("base_model.model.", "unet.", "transformer.", "lora_unet_", "lora_transformer_")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")  # attention-processor LoRA → the projection
_FILE_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")


@dataclass(frozen=True)
class Adapter:
    """One adapter file and the user's scale for it (``--lora FILE --lora-scale S``)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def of(cls, spec: Adapter | str | Path | tuple) -> Adapter:
        """An `Adapter` from itself, a path, or a (path, scale) pair."""
        if isinstance(spec, Adapter):
            return spec
        if isinstance(spec, tuple):
            return cls(Path(spec[0]), float(spec[1]))
        return cls(Path(spec))

    def file(self) -> Path:
        """The safetensors file (a folder holding adapter_model.safetensors or pytorch_lora_weights.safetensors)."""
        if self.path.is_dir():
            for name in _FILE_NAMES:
                if (self.path / name).is_file():
                    return self.path / name
            raise AdapterError(f"{self.path} holds no {' or '.join(_FILE_NAMES)}")
        if not self.path.is_file():
            raise AdapterError(f"LoRA adapter {self.path} does not exist")
        if self.path.suffix != ".safetensors":
            raise AdapterError(f"LoRA adapter {self.path}: only .safetensors files are read (convert a pickled "
                               f".bin/.pt with safetensors.torch.save_file)")
        return self.path

    def record(self) -> dict:
        """What a manifest records: path, sha256 of the file, scale."""
        file = self.file()
        return {"path": str(file), "sha256": sha256_file(file), "scale": self.scale}


def lora_inputs(records: list[dict]) -> list[dict]:
    """What of the adapters' records is a stage input: each file's sha256 and scale (not its path, so a
    moved file is the same adapter)."""
    return [{"sha256": r["sha256"], "scale": r["scale"]} for r in records]


@dataclass
class LoraPair:
    """One layer's factors: down (A) [r, in] or [r, in, kh, kw]; up (B) [out, r] or [out, r, 1, 1]."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def multiplier(self, scale: float) -> float:
        """`scale` · alpha / r (PEFT's scaling), or `scale` when the file gives no alpha."""
        return scale * (self.alpha / self.rank if self.alpha is not None else 1.0)


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            for prefix in _PREFIXES:
                if stem.startswith(prefix):
                    stem = stem[len(prefix):]
                    break
            stem = _PROCESSOR.sub(lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out" else ""), stem)
            return stem, part
    return None


def _metadata_alpha(file: Path) -> tuple[float | None, int | None]:
    """(lora_alpha, r) from adapter_config.json beside the file (PEFT) or the file's diffusers metadata."""
    from safetensors import safe_open

    config = file.with_name("adapter_config.json")
    data: dict = {}
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"{config} is not readable JSON ({e})") from None
    else:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            data = json.loads(raw)
    if "lora_alpha" not in data:  # a pipeline's file: one config per component, keys prefixed by it
        for prefix in ("unet.", "transformer."):
            if f"{prefix}lora_alpha" in data:
                data = {"lora_alpha": data[f"{prefix}lora_alpha"], "r": data.get(f"{prefix}r")}
                break
    alpha = data.get("lora_alpha")
    return (float(alpha) if alpha is not None else None), data.get("r")


def read_adapter(adapter: Adapter) -> tuple[dict[str, LoraPair], list[str]]:
    """(pairs by module name as the file spells it, keys that are not LoRA factors)."""
    from safetensors.torch import load_file

    file = adapter.file()
    try:
        tensors = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
        raise AdapterError(f"{file} is not a readable safetensors file ({e})") from None
    file_alpha, _ = _metadata_alpha(file)
    pairs: dict[str, LoraPair] = {}
    foreign: list[str] = []
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            foreign.append(key)
            continue
        stem, part = split
        pair = pairs.setdefault(stem, LoraPair())
        if part == "alpha":
            pair.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(pair, part, value.detach().float())
    for stem, pair in pairs.items():
        if pair.down is None or pair.up is None:
            foreign.append(f"{stem} (no {'up/B' if pair.up is None else 'down/A'} factor)")
        elif pair.alpha is None:
            pair.alpha = file_alpha
    return {s: p for s, p in pairs.items() if p.down is not None and p.up is not None}, foreign


def _layer_shape(module: nn.Module) -> tuple[str, int, int, tuple[int, int]] | None:
    """("linear" | "conv", in, out, kernel) of a float, fake-quantized or integer linear/conv layer."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return "linear", int(module.in_features), int(module.out_features), (1, 1)
    if hasattr(module, "in_channels") and hasattr(module, "kernel_size") and hasattr(module, "stride"):
        k = module.kernel_size
        return "conv", int(module.in_channels), int(module.out_channels), (int(k[0]), int(k[1]))
    return None


def _fitted(pair: LoraPair, kind: str, fan_in: int, fan_out: int, kernel: tuple[int, int]) -> LoraPair | None:
    """The pair in the layer's shapes (linear: A [r, in], B [out, r]; conv: A [r, in, kh, kw], B [out, r, 1, 1]),
    or None when it does not fit."""
    down, up = pair.down, pair.up
    r = down.shape[0]
    if kind == "linear":
        down, up = down.reshape(r, -1) if down.dim() == 4 and down.shape[2:] == (1, 1) else down, up
        up = up.reshape(up.shape[0], -1) if up.dim() == 4 and up.shape[2:] == (1, 1) else up
        ok = down.shape == (r, fan_in) and up.shape == (fan_out, r)
    else:
        down = down.reshape(r, fan_in, 1, 1) if down.dim() == 2 and kernel == (1, 1) else down
        up = up.reshape(*up.shape, 1, 1) if up.dim() == 2 else up
        ok = down.shape == (r, fan_in, *kernel) and up.shape == (fan_out, r, 1, 1)
    return LoraPair(down.contiguous(), up.contiguous(), pair.alpha) if ok else None


def match_adapter(denoiser: nn.Module, adapter: Adapter) -> dict[str, LoraPair]:
    """The adapter's pairs by the denoiser's module names, in the layers' shapes; `AdapterError` naming
    every key that matches no linear or conv layer or does not fit its layer's shape."""
    pairs, unmatched = read_adapter(adapter)
    layers = {n: shape for n, m in denoiser.named_modules() if n and (shape := _layer_shape(m)) is not None}
    flat = {n.replace(".", "_"): n for n in layers}  # kohya's lora_unet_down_blocks_0_... names
    matched: dict[str, LoraPair] = {}
    misfit: list[str] = []
    for stem, pair in pairs.items():
        name = stem if stem in layers else flat.get(stem)
        if name is None:
            unmatched.append(stem)
            continue
        fitted = _fitted(pair, *layers[name])
        if fitted is None:
            kind, fan_in, fan_out, kernel = layers[name]
            misfit.append(f"{stem} (A {list(pair.down.shape)}, B {list(pair.up.shape)} vs {kind} {fan_in}->{fan_out}"
                          + (f" k{kernel[0]}x{kernel[1]})" if kind == "conv" else ")"))
            continue
        matched[name] = fitted
    if unmatched or misfit:
        shown = unmatched + misfit
        what = (f"{len(unmatched)} key(s) match no linear or conv layer of the denoiser" if unmatched else "")
        what += ("; " if unmatched and misfit else "") + (f"{len(misfit)} do not fit their layer" if misfit else "")
        raise AdapterError(f"LoRA adapter {adapter.path}: {what}: {', '.join(shown[:6])}"
                           f"{f' and {len(shown) - 6} more' if len(shown) > 6 else ''} (is it for another model?)")
    if not matched:
        raise AdapterError(f"LoRA adapter {adapter.path} holds no LoRA factors (lora_A/lora_B, lora_down/lora_up)")
    return matched
