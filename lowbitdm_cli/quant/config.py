"""The quantization schema: how a model is quantized, one pydantic class tree (no torch).

Shaped like compressed-tensors' ``QuantizationArgs → QuantizationScheme → QuantizationConfig``:

- `QuantArgs`: how one stored tensor is quantized (bits or per-channel "mixed", int/uint,
  symmetric, per channel or per tensor, per-timestep activation parameters, a split input).
- `QuantScheme`: the recipe's ``[quant]`` section itself: which layers get what, by role
  (``keep_8bit``, ``skip``) and by name pattern (``overrides``), the weight and input-activation
  choices (``bits``, ``w_per_channel``, ``w_symmetric``, ``a_symmetric``, ``a_temporal``, the
  ``weight_init`` / ``act_init`` range observers), the attention matmuls (``attn_matmul``), and
  the transformer methods of linear layers, each scoped by role, part or name pattern
  (``a_per_token``, ``smooth``, ``rotate``, ``low_rank``; `quant.transforms` has their math).
  Learned rounding (AdaRound) is a calibration method (``calibrate.method``), folded into the
  weights before they are packed, so checkpoints hold round-to-nearest codes of folded weights.
- `LayerSpec`: one layer's resolved spec (what `quant.policy.build_layer_specs` gives each layer
  from a scheme); the calibrate manifest records them under ``info["layers"]``.
- `QuantizationConfig`: ``quantization_config.json`` of a merged (packed) checkpoint: format,
  version, the scheme it came from, per-layer `LayerEntry`s with their `QuantArgs`.

The same classes are what recipes embed, what manifests record and what checkpoints serialise;
loading validates them, so a wrong file is refused in one line. A new quantization method plugs
in here (its args / scheme fields) and in `quant.policy` (how the fields become layer specs);
the formats an artifact can hold are `FORMATS`, each opened by its loader in `export.load`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from lowbitdm_cli.errors import RecipeError

__all__ = ["CONFIG_VERSION", "FORMATS", "PARTS", "ROLES", "InputTransforms", "LayerEntry", "LayerOverride",
           "LayerSpec", "MatmulEntry", "ModelEntry", "QuantArgs", "QuantScheme", "QuantizationConfig",
           "QuantizationRecord", "migrate_config", "parse_bits"]

# version of `QuantizationConfig` (quantization_config.json's "format_version"); 2 records the scheme,
# 3 per-token dynamic activations and the input transforms of linear layers (smoothing, rotation, low rank)
CONFIG_VERSION = 3
# how an artifact holds its quantized model: "fake-quant" (FP weights + quantizer state, calibrate and
# finetune artifacts) or "pack-quantized" (packed integer codes + scales, merge artifacts)
FORMATS = ("fake-quant", "pack-quantized")
Format = Literal["fake-quant", "pack-quantized"]
Observer = Literal["minmax", "mse", "percentile"]
Role = Literal["conv_in", "conv_out", "time_embedding", "class_embedding", "adaln", "time_emb_proj", "shortcut",
               "downsample", "upsample", "attention", "cross_attention", "feed_forward", "conv", "linear",
               "attention_matmul"]
ROLES: tuple[str, ...] = Role.__args__  # type: ignore[attr-defined]
# finer labels inside the attention / cross_attention and feed_forward roles (`quant.policy.layer_part`):
# the q/k/v projections, the attention output projection, a feed-forward's first and second linear
PARTS: tuple[str, ...] = ("attention_qkv", "attention_out", "ff_in", "ff_out")
_BITS_RE = re.compile(r"^w(\d+|fp)a(\d+|fp)$")


def parse_bits(text: str) -> tuple[int | None, int | None]:
    """``w4a8`` → (4, 8); ``w4afp`` → (4, None); ``fp`` → (None, None). Bits must be 2..8."""
    t = text.strip().lower()
    if t == "fp":
        return None, None
    m = _BITS_RE.match(t)
    if not m:
        raise RecipeError(f"bits {text!r} not understood: use wXaY with X, Y in 2..8 (e.g. w4a4, w8a8), "
                          f"'fp' for either side, or 'fp' alone")
    out = []
    for side, value in zip(("weight", "activation"), m.groups()):
        if value == "fp":
            out.append(None)
            continue
        b = int(value)
        if not 2 <= b <= 8:
            raise RecipeError(f"bits {text!r}: {side} bits must be in 2..8, got {b}")
        out.append(b)
    return out[0], out[1]


def _bits_text(w_bits: int | None, a_bits: int | None) -> str:
    if w_bits is None and a_bits is None:
        return "fp"
    return f"w{'fp' if w_bits is None else w_bits}a{'fp' if a_bits is None else a_bits}"


def _without_none(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`data` without those of `keys` whose value is None (a serialiser's optional fields)."""
    for key in keys:
        if data.get(key) is None:
            data.pop(key, None)
    return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantArgs(_Strict):
    """How one tensor is quantized (compressed-tensors' ``QuantizationArgs``, plus per-timestep
    activation parameters and the input split of Q-Diffusion's shortcut splitting)."""

    num_bits: int | Literal["mixed"] = Field(description="bits, or 'mixed' (per-channel widths, MPQ-DM's OMQ)")
    type: Literal["int", "uint"] = "int"
    symmetric: bool = False
    strategy: Literal["tensor", "channel", "token"] = Field("tensor", description="'token': one scale per "
                                                            "token (row of a linear's input), computed at run time")
    dynamic: bool = Field(False, description="scales computed at run time from the values (strategy 'token')")
    per_timestep: bool = Field(False, description="activations: one (scale, zero point) per sampling timestep")
    split: int | None = Field(None, ge=1, description="input channels [:split] and [split:] have separate "
                              "parameters (Q-Diffusion shortcut splitting)")

    @field_validator("num_bits")
    @classmethod
    def _bits_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 8:
            raise ValueError(f"num_bits must be in 1..8, got {v}")
        return v

    @model_validator(mode="after")
    def _dynamic_per_token(self) -> QuantArgs:
        if self.dynamic != (self.strategy == "token"):
            raise ValueError("dynamic scales are per token (strategy 'token'), and per-token scales are dynamic")
        if self.dynamic and (not self.symmetric or self.per_timestep or self.split):
            raise ValueError("per-token dynamic activations are symmetric, with no timestep slots and no split")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # keys that say nothing when unset stay out, as in the checkpoints written before this class
        return _without_none(handler(self), "split")


class LayerOverride(_Strict):
    """Bits for every layer whose qualified name matches `pattern` (fnmatch), or `"fp"`."""

    pattern: str
    w_bits: int | Literal["fp"] | None = None
    a_bits: int | Literal["fp"] | None = None


class LayerSpec(_Strict):
    """What one layer gets (resolved from a `QuantScheme`). `None` bits: that side stays full precision."""

    role: str
    kind: Literal["conv", "linear", "matmul"]
    w_bits: int | None = Field(None, ge=1, le=8)
    a_bits: int | None = Field(None, ge=1, le=8)
    w_per_channel: bool = True
    w_symmetric: bool = False
    a_symmetric: bool = False
    a_temporal: bool = False
    lsq_grad_scale: bool = False
    a_split: int | None = Field(None, ge=1, description="Q-Diffusion shortcut splitting: input channels "
                                "[:a_split] and [a_split:] (a concatenated skip) get separate activation quantizers")
    p_bits: int | None = Field(None, ge=1, le=8, description="matmul specs: bits of the (unsigned) softmax output")
    part: str | None = Field(None, description="finer label inside the role (`PARTS`), e.g. attention_qkv")
    a_dynamic: bool = Field(False, description="per-token dynamic input scales (symmetric, max|x| of each token)")
    smooth: bool = Field(False, description="SmoothQuant: the input is divided by a per-channel s, the weight "
                         "multiplied by it (s from calibration)")
    rotate: int | None = Field(None, ge=2, description="Hadamard rotation of the input (and weight) in blocks "
                               "of this size (a power of two dividing in_features)")
    low_rank: int | None = Field(None, ge=1, description="SVDQuant: rank of the float32 branch W = L1·L2 + R, "
                                 "only R quantized")

    @property
    def transformed(self) -> bool:
        """Whether the layer has any input transform (smoothing, rotation, a low-rank branch)."""
        return self.smooth or self.rotate is not None or self.low_rank is not None


class QuantScheme(_Strict):
    """The recipe's ``[quant]`` section: which layers are quantized, how, at which bits.

    ``bits`` sets weights and input activations (``w4a8``); roles in ``keep_8bit`` stay at 8 bit,
    roles in ``skip`` in full precision; ``overrides`` set bits by layer-name pattern, last match
    wins. ``QuantScheme(w_bits=4, a_bits=8, ...)`` is accepted too (``bits`` is then derived).
    """

    bits: str = "w8a8"
    keep_8bit: list[str] = ["time_embedding", "conv_in", "conv_out"]
    skip: list[str] = []
    w_per_channel: bool = True
    w_symmetric: bool = False
    a_symmetric: bool = False
    a_temporal: bool = False
    lsq_grad_scale: bool = False
    weight_init: Observer = "minmax"
    act_init: Observer = "minmax"
    split_shortcut: bool = Field(False, description="Q-Diffusion shortcut splitting: the 1x1 conv_shortcut of each "
                                 "up-block ResnetBlock2D (its input concatenates the skip) gets one activation "
                                 "quantizer per half; the merged checkpoint stores such layers dequantized")
    attn_matmul: bool = Field(False, description="quantize the attention matmuls too: the inputs of QK^T and "
                              "softmax*V at the activation bits (the softmax output unsigned)")
    attn_softmax_bits: int = Field(8, ge=1, le=8, description="bits of the softmax output when attn_matmul is on")
    overrides: list[LayerOverride] = []
    # the transformer methods: each a list of scopes (a role, a part of `PARTS`, or an fnmatch pattern
    # of layer names); they apply to the quantized nn.Linear layers in scope
    a_per_token: list[str] = Field([], description="per-token dynamic input scales (ViDiT-Q): symmetric, "
                                   "one scale per token from its max|x| at run time; a_temporal and act_init "
                                   "do not apply to these inputs")
    smooth: list[str] = Field([], description="SmoothQuant smoothing: s_j = max|X_j|^α / max|W_j|^(1−α) from "
                              "calibration statistics, X/s and W·s")
    smooth_alpha: float = Field(0.5, ge=0.0, le=1.0, description="SmoothQuant's migration strength α")
    rotate: list[str] = Field([], description="normalised Walsh-Hadamard rotation of the input, XH and WH "
                              "(block-diagonal in the largest power-of-two block dividing in_features)")
    low_rank: list[str] = Field([], description="SVDQuant low-rank branch: the top-r SVD of the (smoothed, "
                                "rotated) weight stays float32 beside the quantized residual")
    low_rank_dim: int = Field(32, ge=1, description="rank r of the low_rank branch")

    @model_validator(mode="before")
    @classmethod
    def _bits_from_sides(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("w_bits" in data or "a_bits" in data):
            data = dict(data)
            if "bits" in data:
                raise ValueError("give bits or w_bits/a_bits, not both")
            data["bits"] = _bits_text(data.pop("w_bits", None), data.pop("a_bits", None))
        return data

    @field_validator("bits")
    @classmethod
    def _valid_bits(cls, v: str) -> str:
        try:
            parse_bits(v)
        except RecipeError as e:
            raise ValueError(str(e)) from None
        return v.lower()

    @field_validator("keep_8bit", "skip")
    @classmethod
    def _known_roles(cls, v: list[str]) -> list[str]:
        unknown = [r for r in v if r not in ROLES + PARTS]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r} (roles: {', '.join(ROLES)}; parts: {', '.join(PARTS)})")
        return v

    @property
    def w_bits(self) -> int | None:
        return parse_bits(self.bits)[0]

    @property
    def a_bits(self) -> int | None:
        return parse_bits(self.bits)[1]

    def policy(self) -> QuantScheme:
        """The scheme itself (it is what `build_layer_specs` reads); kept for callers of the old name."""
        return self


# ----------------------------------------------------------------------------- the packed checkpoint

class ConvGeometry(_Strict):
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int = Field(ge=1)


class InputTransforms(_Strict):
    """What a linear layer does to its input around the quantized product (`quant.transforms`):
    tensors ``<layer>.input_smooth`` [K] (smoothing divisor s), ``<layer>.low_rank_down`` [r, K] and
    ``<layer>.low_rank_up`` [O, r] (float32 branch on the raw input); the packed weight is the
    transformed residual."""

    smooth: bool = False
    rotate: int | None = Field(None, ge=2, description="Hadamard block size")
    low_rank: int | None = Field(None, ge=1, description="rank of the float32 branch")


class LayerEntry(_Strict):
    """One quantized layer of a packed checkpoint: its shape and args (`None`: that side is float)."""

    kind: Literal["conv", "linear"]
    weight_shape: list[int] = Field(min_length=2)
    conv: ConvGeometry | None = None
    weights: QuantArgs | None
    input_activations: QuantArgs | None
    transforms: InputTransforms | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_transforms(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_none(handler(self), "transforms")


class MatmulEntry(_Strict):
    """An attention module whose QKᵀ / softmax·V inputs are fake-quantized (inputs q, k, p, v)."""

    inputs: dict[Literal["q", "k", "p", "v"], QuantArgs]
    params: str

    @field_validator("inputs")
    @classmethod
    def _all_inputs(cls, v: dict[str, QuantArgs]) -> dict[str, QuantArgs]:
        if set(v) != {"q", "k", "p", "v"}:
            raise ValueError(f"inputs must be q, k, p and v, got {', '.join(sorted(v))}")
        return v


class PartsEntry(_Strict):
    """The full-precision parts beside the denoiser: where they load from, and their sha256."""

    names: list[str]
    digest: str
    source: str | None = None
    latent_scale: float | None = None


class ModelEntry(_Strict):
    """The float model the denoiser belongs to: its class and config, schedule, conditioning."""

    name: str
    architecture: str
    unet_config: dict[str, Any] | None = None
    denoiser_config: dict[str, Any] | None = None
    schedule: dict[Literal["alphas_cumprod"], list[float]]
    sample_shape: list[int]
    conditioning: str
    num_classes: int | None = None
    null_class: int | None = None
    parts: PartsEntry | None = None


class QuantizationConfig(_Strict):
    """``quantization_config.json`` of a merged checkpoint (format ``pack-quantized``)."""

    quant_method: Literal["lowbitdm"] = "lowbitdm"
    format: Literal["pack-quantized"] = "pack-quantized"
    quantization_status: Literal["compressed"] = "compressed"
    format_version: int = CONFIG_VERSION
    packing: str
    model: ModelEntry
    scheme: QuantScheme | None = Field(None, description="the recipe's [quant] the checkpoint was made with "
                                       "(absent in version-1 files)")
    timesteps: list[int] = []
    ignore: list[str] = []
    layers: dict[str, LayerEntry]
    attention_matmuls: dict[str, MatmulEntry] = {}

    @model_serializer(mode="wrap")
    def _omit_absent_parts(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data["model"].get("parts") is None:
            data["model"].pop("parts", None)
        return data


def _config_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 recorded no scheme: the layers carry everything a checkpoint needs."""
    return {**data, "format_version": 2, "scheme": None}


def _config_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added optional fields only (per-token activations, input transforms): nothing to change."""
    return {**data, "format_version": 3}


# one step per version: MIGRATIONS[v] turns a version-v dict into a version-(v+1) one
CONFIG_MIGRATIONS = {1: _config_v1_to_v2, 2: _config_v2_to_v3}


def migrate_config(data: dict[str, Any]) -> dict[str, Any]:
    """A ``quantization_config.json`` dict of any known version, as the current version.

    ValueError for a version newer than this lowbitdm reads (or not a version at all)."""
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"format_version {version!r} is not a version")
    if version > CONFIG_VERSION:
        raise ValueError(f"format_version {version} is newer than this lowbitdm reads ({CONFIG_VERSION}): "
                         f"upgrade lowbitdm to open it")
    while version < CONFIG_VERSION:
        data = CONFIG_MIGRATIONS[version](data)
        version += 1
    return data


class QuantizationRecord(_Strict):
    """What the manifest of a calibrate, finetune or merge artifact records of its quantized model:
    the format it is stored in (it picks the loader, `export.load`) and the version of this schema
    its records (``recipe.quant``, ``info.layers``, ``quantization_config.json``) were written with."""

    format: Format
    config_version: int = Field(CONFIG_VERSION, ge=1)
