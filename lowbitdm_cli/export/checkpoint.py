"""The low-bit checkpoint: packed integer weights + scales in safetensors, described by a
``quantization_config.json`` in the spirit of compressed-tensors, extended for Conv2d
(the original 4-D ``weight_shape``) and per-timestep activation parameters.

Every weight is stored as unsigned codes u ∈ [0, 2^b − 1] with W = Δ[o] · (u − z[o]);
symmetric codes are offset by 2^(b−1) first (as compressed-tensors does). Loading reads
JSON and safetensors only, so it never executes code: the denoiser is rebuilt with
``<class>.from_config(denoiser_config)`` for a whitelisted diffusers class name.

The checkpoint holds the denoiser only, the part that is quantized. The full-precision parts
beside it (autoencoder, text encoder, class embedder) are *not* copied: they load from the
model source the checkpoint records (registry name or folder), and their sha256
(``parts_digest``) must match the one recorded at merge time. Copies would add the FP
autoencoder and text encoder (for SD ~0.8 GB, more than the W4 UNet itself) to every
low-bit checkpoint, while the user has the source anyway to run calibrate.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from lowbitdm_cli.errors import ArtifactError, IntegrityError
from lowbitdm_cli.export.packing import pack, pack_mixed, packed_nbytes, unpack, unpack_mixed
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule
from lowbitdm_cli.quant.attention import MATMUL_INPUTS, attn_processors
from lowbitdm_cli.quant.config import (
    CONFIG_VERSION,
    ConvGeometry,
    InputTransforms,
    LayerEntry,
    LayerSpec,
    MatmulEntry,
    ModelEntry,
    QuantArgs,
    QuantizationConfig,
    QuantScheme,
    migrate_config,
)
from lowbitdm_cli.quant.layers import QuantLayerMixin, quant_layers
from lowbitdm_cli.quant.model import act_quantizers, quantize_denoiser
from lowbitdm_cli.quant.quantizer import UniformQuantizer

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_tensors", "load_merged", "read_config"]

CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = CONFIG_VERSION
DENOISER_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel",
                    "CompVisUNet2DModel")


def _json_config(module: nn.Module) -> dict | None:
    """A diffusers module's config as plain JSON (what ``from_config`` rebuilds it from)."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}, default=list))


def _weight_codes(layer: QuantLayerMixin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unsigned codes [O, K], zero points [O], scales [O], bits [O]) of the layer's merged weight."""
    q = layer.w_quant
    w = layer.merged_weight().detach()
    codes = q.quantize_codes(w)
    delta, zero = q.current_params()
    out_ch = w.shape[0]
    bits = q.bits.reshape(-1).expand(out_ch) if q.bits.numel() in (1, out_ch) else q.bits.reshape(-1)
    zero = torch.round(zero.detach()).reshape(-1).expand(out_ch)
    delta = delta.detach().reshape(-1).expand(out_ch)
    if q.mode == "symmetric":
        offset = 2 ** (bits - 1)
        codes = codes + offset.view(-1, *([1] * (w.ndim - 1)))
        zero = offset
    return codes.reshape(out_ch, -1).to(torch.uint8), zero.to(torch.int32), delta.float().contiguous(), \
        bits.to(torch.uint8)


def export_tensors(model: DiffusionModel, scheme: QuantScheme | dict | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and config (a `QuantizationConfig` dumped to JSON types) of a merged checkpoint
    from a fake-quantized model; `scheme` is the recipe's ``[quant]`` it was made with."""
    den = model.denoiser
    layers = quant_layers(den)
    tensors: dict[str, torch.Tensor] = {}
    layer_cfg: dict[str, LayerEntry] = {}
    for name, layer in layers.items():
        entry: dict = {"kind": "conv" if isinstance(layer, nn.Conv2d) else "linear",
                       "weight_shape": list(layer.weight.shape)}
        if isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str):
            entry["conv"] = ConvGeometry(stride=list(layer.stride), padding=list(layer.padding),
                                         dilation=list(layer.dilation), groups=layer.groups)
        if layer.w_quant is not None:
            codes, zero, scale, bits = _weight_codes(layer)
            uniform = bool((bits == bits[0]).all())
            tensors[f"{name}.weight_packed"] = pack(codes, int(bits[0])) if uniform else pack_mixed(codes, bits)
            tensors[f"{name}.weight_scale"] = scale
            tensors[f"{name}.weight_zero_point"] = zero
            if not uniform:
                tensors[f"{name}.weight_bits"] = bits
            entry["weights"] = QuantArgs(num_bits=int(bits[0]) if uniform else "mixed", type="int",
                                         symmetric=layer.w_quant.mode == "symmetric",
                                         strategy="channel" if layer.w_quant.channel_axis is not None else "tensor")
        else:
            tensors[f"{name}.weight"] = layer.qweight().detach().float().contiguous()
            entry["weights"] = None
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().float().contiguous()
        a = layer.a_quant
        if layer.spec.transformed:
            entry["transforms"], transform_tensors = _transform_entry(layer)
            tensors.update({f"{name}.{k}": v for k, v in transform_tensors.items()})
        if a is not None and a.dynamic:  # per-token scales come from the values: no tensors
            entry["input_activations"] = _act_entry(a)
        elif a is not None:
            # Q-Diffusion shortcut splitting: input channels [split:] (the concatenated skip) have
            # their own parameters, `input_skip_scale` / `input_skip_zero_point`
            parts = {"input": a, "input_skip": layer.a_quant_skip} if layer.a_quant_skip is not None else {"input": a}
            for prefix, q in parts.items():
                tensors[f"{name}.{prefix}_scale"] = q.delta.detach().reshape(-1).float().contiguous()
                tensors[f"{name}.{prefix}_zero_point"] = torch.round(q.zero_point.detach()).reshape(-1).to(torch.int32)
            entry["input_activations"] = _act_entry(a, split=layer.spec.a_split if layer.a_quant_skip else None)
        else:
            entry["input_activations"] = None
        layer_cfg[name] = LayerEntry(**entry)
    prefixes = tuple(f"{n}." for n in layers)
    for key, value in den.state_dict().items():
        if not key.startswith(prefixes):  # FP parts, and attention matmul quantizers (`<attn>.processor.*`)
            tensors[key] = value.detach().contiguous()
    matmuls = {name: MatmulEntry(inputs={w: _act_entry(proc.quantizer(w)) for w in MATMUL_INPUTS},
                                 params=f"{name}.processor.<q|k|p|v>_quant.(delta|zero_point)")
               for name, proc in attn_processors(den).items()}
    timesteps = next((q.timesteps.tolist() for q in act_quantizers(den) if q.temporal), [])
    ignore = [n for n, m in den.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in layers]
    config = QuantizationConfig(
        packing="dense little-endian bitstream, element i at bit i*b; symmetric codes offset by 2^(b-1)",
        model=ModelEntry(name=model.name, architecture=type(den).__name__, unet_config=model.meta.get("unet"),
                         denoiser_config=_json_config(den),
                         schedule={"alphas_cumprod": model.schedule.alphas_cumprod.tolist()},
                         sample_shape=list(model.sample_shape), conditioning=model.conditioning,
                         num_classes=model.num_classes, null_class=model.null_class, **_parts_entry(model)),
        scheme=QuantScheme.model_validate(scheme) if scheme is not None else None,
        timesteps=timesteps, ignore=ignore, layers=layer_cfg, attention_matmuls=matmuls)
    return tensors, config.model_dump(mode="json")


def _parts_entry(model: DiffusionModel) -> dict:
    """Where the FP parts beside the denoiser come from, and their digest (none for digits)."""
    from lowbitdm_cli.models.registry import parts_digest

    with_state = sorted(n for n, m in model.parts().items() if len(m.state_dict()))
    if not with_state:
        return {}
    return {"parts": {"names": with_state, "digest": parts_digest(model), "source": model.meta.get("source"),
                      "latent_scale": model.latent_scale}}


def _compvis_unet() -> type:
    """The CompVis converter's UNet2DModel with per-level head counts (LSUN-Church)."""
    from lowbitdm_cli.models.compvis import CompVisUNet2DModel

    return CompVisUNet2DModel


def _build_denoiser(mcfg: ModelEntry, path: Path) -> nn.Module:
    """The float denoiser architecture from the recorded class name and config (no code execution)."""
    import diffusers

    arch = mcfg.architecture
    if arch not in DENOISER_CLASSES:
        raise IntegrityError(f"{path}: architecture {arch!r} is not supported by this loader "
                             f"({', '.join(DENOISER_CLASSES)})")
    cls = _compvis_unet() if arch == "CompVisUNet2DModel" else getattr(diffusers, arch)
    if mcfg.denoiser_config:
        return cls.from_config(mcfg.denoiser_config)
    if arch == "UNet2DModel" and mcfg.unet_config:  # checkpoints written before denoiser_config
        return cls(**mcfg.unet_config)
    raise IntegrityError(f"{path}: {CONFIG_NAME} records no denoiser config")


def _with_parts(mcfg: ModelEntry, path: Path, den: nn.Module, prompts: list[str] | None, meta: dict
                ) -> DiffusionModel:
    """The merged denoiser inside its FP parts, loaded from the recorded source and checked by digest."""
    from lowbitdm_cli.models.registry import load_model, parts_digest

    parts = mcfg.parts
    model = load_model(mcfg.name, prompts, with_denoiser=False)
    if parts_digest(model) != parts.digest:
        raise ArtifactError(f"{path}: the full-precision parts ({', '.join(parts.names)}) of {mcfg.name!r} "
                            f"differ from those it was merged with (sha256): use the model it was made from")
    return replace(model, denoiser=den, meta={**model.meta, **meta})


def _act_entry(q: UniformQuantizer, split: int | None = None) -> QuantArgs:
    return QuantArgs(num_bits=q.max_bits, type="uint" if q.mode == "unsigned" else "int",
                     symmetric=q.mode == "symmetric", strategy="token" if q.dynamic else "tensor",
                     dynamic=q.dynamic, per_timestep=q.temporal, split=split)


# a transformed linear's buffers and their names in the checkpoint (`InputTransforms`)
_TRANSFORM_TENSORS = {"smooth": "input_smooth", "low_rank_down": "low_rank_down", "low_rank_up": "low_rank_up"}


def _transform_entry(layer: QuantLayerMixin) -> tuple[InputTransforms, dict[str, torch.Tensor]]:
    """The `InputTransforms` of a transformed linear and its float32 tensors by checkpoint suffix."""
    spec = layer.spec
    tensors = {stored: getattr(layer, buf).detach().float().contiguous() for buf, stored in _TRANSFORM_TENSORS.items()
               if getattr(layer, buf) is not None}
    return InputTransforms(smooth=spec.smooth, rotate=spec.rotate, low_rank=spec.low_rank), tensors


def _check(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise IntegrityError(f"{path}: {msg}: the checkpoint does not match its {CONFIG_NAME}")


def read_config(path: Path | str) -> QuantizationConfig:
    """The validated `QuantizationConfig` of a merged checkpoint folder (older versions migrated);
    `IntegrityError` in one line for a missing, unreadable, foreign or newer file."""
    file = Path(path) / CONFIG_NAME
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{file} is missing: not a merged checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{file} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("quant_method") != "lowbitdm":
        found = data.get("quant_method") if isinstance(data, dict) else type(data).__name__
        raise IntegrityError(f"{file} is not a lowbitdm quantization config (quant_method {found!r})")
    try:
        return QuantizationConfig.model_validate(migrate_config(data))
    except ValueError as e:  # ValidationError is a ValueError
        if isinstance(e, ValidationError):
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "config"
            raise IntegrityError(f"{file} is invalid: {where}: {first['msg']}") from None
        raise IntegrityError(f"{file}: {e}") from None


def _stored_codes(name: str, entry: LayerEntry, t: dict[str, torch.Tensor], path: Path
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes [O, K], zero points [O], scales [O]) of a packed weight, checked against the config."""
    shape = entry.weight_shape
    out_ch, per_row = shape[0], int(torch.tensor(shape[1:]).prod())
    packed = t.get(f"{name}.weight_packed")
    scale, zero = t.get(f"{name}.weight_scale"), t.get(f"{name}.weight_zero_point")
    _check(packed is not None and scale is not None and zero is not None, path, f"{name} lacks packed weights")
    _check(scale.shape == (out_ch,) and zero.shape == (out_ch,), path, f"{name} scale/zero point shape")
    bits_cfg = entry.weights.num_bits
    if bits_cfg == "mixed":
        bits = t.get(f"{name}.weight_bits")
        _check(bits is not None and bits.shape == (out_ch,), path, f"{name} lacks per-channel bits")
        need = (int(bits.long().sum()) * per_row + 7) // 8
        _check(packed.numel() == need, path, f"{name}.weight_packed has {packed.numel()} bytes, expected {need}")
        codes = unpack_mixed(packed, bits, per_row)
    else:
        need = packed_nbytes(out_ch * per_row, int(bits_cfg))
        _check(packed.numel() == need, path, f"{name}.weight_packed has {packed.numel()} bytes, expected {need}")
        codes = unpack(packed, int(bits_cfg), out_ch * per_row).reshape(out_ch, per_row)
    return codes, zero, scale


def _dequantized_weight(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, shape: list[int]
                        ) -> torch.Tensor:
    w = (codes.float() - zero.float().view(-1, 1)) * scale.view(-1, 1)
    return w.reshape(shape)


def _int_layer(name: str, entry: LayerEntry, layer: QuantLayerMixin, codes: tuple[torch.Tensor, ...] | None,
               t: dict[str, torch.Tensor], timesteps: list[int]) -> nn.Module:
    """The `IntConv2d`/`IntLinear` of one merged layer; ValueError (the reason) if it must stay float."""
    from lowbitdm_cli.export.int_runtime import IntConv2d, IntLinear

    act = entry.input_activations
    if codes is None:
        raise ValueError("weights stored as float")
    if act is None:
        raise ValueError("input not quantized")
    if act.dynamic or entry.transforms is not None:
        from lowbitdm_cli.export.int_transforms import int_transform_linear

        return int_transform_linear(name, entry, codes, t, timesteps)
    if act.split:
        raise ValueError("split input (two activation scales, Q-Diffusion shortcut splitting)")
    u, zero, scale = codes
    common = {"weight_zero_point": zero, "weight_scale": scale, "bias": t.get(f"{name}.bias"),
              "input_scale": t[f"{name}.input_scale"], "input_zero_point": t[f"{name}.input_zero_point"],
              "a_bits": int(act.num_bits), "a_symmetric": bool(act.symmetric),
              "timesteps": timesteps if act.per_timestep else None}
    if entry.kind == "linear":
        return IntLinear(u, **common)
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(f"conv with groups={layer.groups}, padding={layer.padding!r} ({layer.padding_mode})")
    return IntConv2d(u.reshape(entry.weight_shape), stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, **common)


def _to_int_runtime(den: nn.Module, config: QuantizationConfig, t: dict[str, torch.Tensor],
                    codes: dict[str, tuple[torch.Tensor, ...]]) -> dict:
    """Replace every merged layer that can run on integer kernels; the others keep float compute."""
    from lowbitdm_cli.export.int_runtime import IntLayer
    from lowbitdm_cli.export.kernel_probe import kernel_report

    modules = dict(den.named_modules())
    fallback: dict[str, str] = {}
    int_layers = 0
    for name, layer in quant_layers(den).items():
        try:
            int_layer = _int_layer(name, config.layers[name], layer, codes.get(name), t, config.timesteps)
        except ValueError as e:
            fallback[name] = str(e)
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else den, leaf, int_layer)
        int_layers += 1
    kernels: dict[str, int] = {}
    lowerings: dict[str, int] = {}
    layer_lowerings: dict[str, str] = {}
    for name, m in den.named_modules():
        if isinstance(m, IntLayer):
            kernels[m.kernel] = kernels.get(m.kernel, 0) + 1
            lowerings[m.lowering] = lowerings.get(m.lowering, 0) + 1
            layer_lowerings[name] = m.lowering
    return {"runtime": "int", "int_layers": int_layers, "kernels": kernels, "lowerings": lowerings,
            "layer_lowerings": layer_lowerings, **kernel_report(), "fallback_layers": len(fallback),
            "fallback": sorted(fallback), "fallback_reasons": fallback,
            # QKᵀ and softmax·V have two activation operands: they run as float products of the
            # fake-quantized (dequantized) inputs, exactly as in the fake-quantized model
            "float_attention_matmuls": 2 * len(config.attention_matmuls)}


def load_merged(path: Path | str, runtime: Literal["fake", "int"] = "fake",
                prompts: list[str] | None = None) -> DiffusionModel:
    """Rebuild a `DiffusionModel` from a merged checkpoint folder (JSON + safetensors only).

    ``runtime="fake"`` dequantizes the weights to float and fake-quantizes the inputs (the
    reference); ``"int"`` then replaces each quantized layer by `IntConv2d`/`IntLinear`
    (integer kernels). Layers that cannot run on them (float weights, unquantized input)
    keep float compute; ``model.meta["runtime"]`` counts both and names the fallbacks.
    `prompts`: the prompt list of a text-to-image model (its text encoder loads from the source).
    """
    if runtime not in ("fake", "int"):
        raise ValueError(f"runtime must be 'fake' or 'int', got {runtime!r}")
    path = Path(path)
    config = read_config(path)
    t = load_file(str(path / WEIGHTS_NAME))
    mcfg = config.model
    den = _build_denoiser(mcfg, path)
    specs = {}
    weights = {}
    codes = {}
    w_quant_state: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in config.layers.items():
        act = entry.input_activations
        w_bits = None
        if entry.weights is not None:
            codes[name] = _stored_codes(name, entry, t, path)
            weights[name] = _dequantized_weight(*codes[name], entry.weight_shape)
            # a weight quantizer over the stored codes (asymmetric over the unsigned codes: it gives
            # the same integers back), so the fake runtime evaluates exactly like the artifact did
            _, zero, scale = codes[name]
            view = (-1, *[1] * (len(entry.weight_shape) - 1))
            w_quant_state[name] = {"delta": scale.reshape(view), "zero_point": zero.float().reshape(view),
                                   "initialized": torch.tensor(True)}
            bits = t.get(f"{name}.weight_bits")
            if bits is not None:  # mixed per-channel widths; uniform ones come from the spec
                w_quant_state[name]["bits"] = bits.float().reshape(view)
            w_bits = int(bits.max()) if bits is not None else int(entry.weights.num_bits)
        else:
            _check(f"{name}.weight" in t, path, f"{name} lacks its float weight")
            weights[name] = t[f"{name}.weight"]
        specs[name] = LayerSpec(role="merged", kind=entry.kind, w_bits=w_bits,
                                a_bits=act.num_bits if act else None,
                                a_symmetric=bool(act and act.symmetric),
                                a_temporal=bool(act and act.per_timestep),
                                a_split=act.split if act else None, a_dynamic=bool(act and act.dynamic),
                                **(entry.transforms.model_dump() if entry.transforms else {}))
    for name, entry in config.attention_matmuls.items():
        qk, prob = entry.inputs["q"], entry.inputs["p"]
        specs[name] = LayerSpec(role="attention_matmul", kind="matmul", a_bits=qk.num_bits,
                                a_symmetric=qk.symmetric, a_temporal=qk.per_timestep, p_bits=prob.num_bits)
    quantize_denoiser(den, specs, timesteps=config.timesteps or None)
    layers = quant_layers(den)
    state = {k: v for k, v in t.items() if not k.startswith(tuple(f"{n}." for n in layers))}
    for name, layer in layers.items():
        w = weights[name]
        _check(tuple(w.shape) == tuple(layer.weight.shape), path, f"{name} weight shape {tuple(w.shape)}")
        state[f"{name}.weight"] = w
        state.update({f"{name}.w_quant.{k}": v for k, v in w_quant_state.get(name, {}).items()})
        if layer.bias is not None:
            state[f"{name}.bias"] = t[f"{name}.bias"]
        for buf, stored in _TRANSFORM_TENSORS.items():
            if getattr(layer, buf) is not None:
                _check(f"{name}.{stored}" in t, path, f"{name} lacks {stored}")
                state[f"{name}.{buf}"] = t[f"{name}.{stored}"]
        for prefix, key in (("input", "a_quant"), ("input_skip", "a_quant_skip")):
            q = getattr(layer, key)
            if q is None:
                continue
            if q.dynamic:  # no stored parameters: the quantizer's own (unused) ones
                state.update({f"{name}.{key}.{k}": v for k, v in q.state_dict().items()})
                continue
            scale, zero = t.get(f"{name}.{prefix}_scale"), t.get(f"{name}.{prefix}_zero_point")
            _check(scale is not None and zero is not None and scale.numel() == q.delta.numel(), path,
                   f"{name} activation parameters ({prefix})")
            state[f"{name}.{key}.delta"] = scale.reshape(q.delta.shape)
            state[f"{name}.{key}.zero_point"] = zero.float().reshape(q.zero_point.shape)
            state[f"{name}.{key}.initialized"] = torch.tensor(True)
    missing, unexpected = den.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".a_quant.bits", ".a_quant.timesteps", ".w_quant.bits",
                                                     ".w_quant.timesteps", ".a_quant_skip.bits",
                                                     ".a_quant_skip.timesteps"))]
    _check(not missing and not unexpected, path, f"tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    meta = {"unet": mcfg.unet_config} if mcfg.unet_config else {"denoiser_config": mcfg.denoiser_config}
    if runtime == "int":
        meta["runtime"] = _to_int_runtime(den, config, t, codes)
    den.eval().requires_grad_(False)
    if mcfg.parts:
        return _with_parts(mcfg, path, den, prompts, meta)
    acp = torch.tensor(mcfg.schedule["alphas_cumprod"], dtype=torch.float32)
    return DiffusionModel(denoiser=den, schedule=NoiseSchedule(acp), sample_shape=tuple(mcfg.sample_shape),
                          conditioning=mcfg.conditioning, num_classes=mcfg.num_classes,
                          null_class=mcfg.null_class, name=mcfg.name, meta=meta)
