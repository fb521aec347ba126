"""Recipes: TOML files validated by pydantic, overridden by flags and ``--set section.key=value``.

Precedence: command-line flags > ``--set`` > recipe file > defaults. Unknown keys are
errors. Sampler fields left unset take the model's own defaults when the recipe is
resolved, so every manifest stores the exact values used.
"""

from __future__ import annotations

import copy
import tomllib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.quant.config import QuantScheme, parse_bits

__all__ = ["RECIPE_VERSION", "Recipe", "available_recipes", "load_recipe", "parse_bits", "recipes_dir"]

# version of the recipe format (the TOML keys). A recipe may state `schema_version`; one newer than
# this is refused. Bump it, and add a migration of the older dicts in `load_recipe`, when keys change.
RECIPE_VERSION = 1



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # keys that came after artifacts already recorded the section: left out of the dump while unset
    # (None), so the inputs digests of those artifacts stay valid
    _omit_unset: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_unset:
            if getattr(self, key) is None:
                data.pop(key, None)
        return data


class ModelSection(_Section):
    name: str = Field("digits", description="a registered model (`lowbitdm models`) or a diffusers folder path")
    prompts: str | None = Field(None, description="text-to-image models: a text file, one prompt per line, used "
                                "for calibration, finetuning and sampling (sample i gets prompt i mod N)")

    _omit_unset = ("prompts",)


class CalibrateSection(_Section):
    method: Literal["ptq", "qdiffusion", "pqd"] = Field(
        "ptq", description="ptq: initialisation only; qdiffusion / pqd: then BRECQ block reconstruction "
                           "(AdaRound weights + LSQ activation steps; pqd with QDrop)")
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    num_timesteps: int | None = Field(None, ge=1, description="calibration timesteps kept; None = all steps")
    timestep_selection: Literal["uniform", "normal"] = Field(
        "uniform", description="uniform spacing (Q-Diffusion) or t ~ N(0.4, 0.4)·T (PTQ4DM/PQD)")
    representative: Literal["none", "kcenter"] = Field(
        "none", description="keep a representative subset of the samples (PQD): greedy k-centre")
    num_representative: int | None = Field(None, ge=1, description="samples kept by `representative`")
    mixed: Literal["none", "omq"] = Field("none", description="per-channel weight bits: MPQ-DM's OMQ")
    omq_fractions: list[float] = Field([0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                                       description="OMQ grid: fraction of channels that change width "
                                                   "(the paper's 0..50 %; [0.0, 0.1] is the reference code's)")
    max_values_per_step: int = Field(100_000, ge=1000)
    recon_iters: int = Field(200, ge=1, description="Adam iterations per block (Q-Diffusion/BRECQ: 20k)")
    recon_batch_size: int = Field(32, ge=1, description="rows per reconstruction mini-batch")
    recon_micro_batch: int | None = Field(
        None, ge=1, description="rows per forward/backward pass of a reconstruction mini-batch, their gradients "
                                "summed in index order: the same bits for any number of processes (torchrun "
                                "needs one micro-batch per process); None = one pass, all-reduced across processes")
    recon_samples: int = Field(1024, ge=1, description="rows of block inputs kept per block (seeded subsample; "
                                                       "under CFG each calibration sample gives two rows)")
    recon_lr: float = Field(1e-3, gt=0, description="Adam lr of the AdaRound variables V (BRECQ default)")
    recon_act_lr: float = Field(4e-5, ge=0, description="Adam lr of the activation steps Δ, LSQ "
                                                        "(Q-Diffusion default; 0 freezes them)")
    recon_reg_weight: float = Field(0.01, ge=0, description="weight of the AdaRound rounding regulariser")
    qdrop_prob: float = Field(0.0, ge=0.0, lt=1.0, description="QDrop (PQD): probability that an activation "
                                                              "quantizer's output is replaced by its input")
    seed: int = 1234

    @field_validator("omq_fractions")
    @classmethod
    def _valid_fractions(cls, v: list[float]) -> list[float]:
        if not v or not all(0.0 <= f <= 1.0 for f in v):
            raise ValueError("omq_fractions must be a non-empty list of fractions in [0, 1]")
        return v

    @model_validator(mode="after")
    def _qdrop_needs_reconstruction(self) -> CalibrateSection:
        if self.qdrop_prob > 0 and self.method == "ptq":
            raise ValueError("qdrop_prob applies during block reconstruction only: use method = 'qdiffusion' "
                             "or 'pqd', or set qdrop_prob = 0")
        return self

    _omit_unset = ("recon_micro_batch",)

    @model_validator(mode="after")
    def _representative_count(self) -> CalibrateSection:
        if self.representative != "none":
            if self.num_representative is None:
                raise ValueError(f"representative = {self.representative!r} needs num_representative (samples to keep)")
            if self.num_representative > self.num_samples:
                raise ValueError(f"num_representative ({self.num_representative}) exceeds "
                                 f"num_samples ({self.num_samples})")
        return self


class FinetuneSection(_Section):
    """Data-free distillation settings. Paper settings are documented beside each recipe."""

    method: Literal["none", "qalora", "quest", "qat"] = "none"
    loss: Literal["mse", "trd"] = "mse"
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    micro_batch: int | None = Field(
        None, ge=1, description="rows per forward/backward pass; each step's gradient is the sum over the batch's "
                                "micro-batches in index order, whatever the number of processes (torchrun shares "
                                "out whole micro-batches, so it needs one per process at least); None = the whole "
                                "batch in one pass")
    steps: int | None = Field(None, ge=1, description="teacher DDIM steps per epoch; None = sample.steps")
    eta: float = Field(0.0, ge=0.0)
    guidance: float | None = None
    trajectory: Literal["teacher", "student"] = Field(
        "teacher", description="whose prediction moves x_t to the next step: teacher (EfficientDM: the student "
                               "sees the FP trajectory) or student (the student sees the states it reaches itself, "
                               "the teacher's prediction there is the target)")
    lr: float = Field(1e-3, gt=0)
    act_lr: float = Field(5e-4, ge=0)
    lora_rank: int = Field(8, ge=1)
    scale_aware: Literal["lr", "grad", "none"] = "lr"
    train_act_zero_point: bool = True
    trd_weight: float = Field(100.0, ge=0)
    trd_window: int = Field(2, ge=1, description="TRD time smoothing: average the feature over this many "
                            "consecutive denoising steps (MPQ-DM: 2; 1 = no smoothing)")
    grad_clip: float | None = 1.0
    checkpoint_every: int = Field(1, ge=1)
    seed: int = 2024

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> FinetuneSection:
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise ValueError(f"micro_batch ({self.micro_batch}) must divide batch_size ({self.batch_size})")
        return self

    _omit_unset = ("micro_batch",)  # unset = one pass over the whole batch, what earlier artifacts ran


class SampleSection(_Section):
    num_samples: int = Field(500, ge=1)
    batch_size: int = Field(250, ge=1)
    steps: int | None = Field(None, ge=1)
    eta: float | None = Field(None, ge=0.0)
    guidance: float | None = None
    clip_x0: bool | None = None
    sampler: Literal["ddim", "dpmpp2m"] | None = Field(None, description="ddim or dpmpp2m (DPM-Solver++(2M), "
                                                       "deterministic, eta = 0); None = the model's default")
    seed: int = 0
    grid_samples: int = Field(100, ge=0)
    labels: Literal["balanced", "random"] = Field(
        "balanced", description="class labels of conditional samples: balanced (0, 1, ..., C-1, 0, ...: exactly N/C "
                                "per class when C divides N, e.g. 50 per class for 50,000 ImageNet samples) or random "
                                "(uniform, drawn per sample index from the seed)")

    decode_batch_size: int | None = Field(None, ge=1, description="latent models: images the autoencoder decodes at "
                                          "once (default: the whole batch_size)")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="float dtype of everything around the quantized layers (and of the whole FP model): "
                            "fp32 (default, until benchmarks/dtype_quality.py has measured bf16's quality cost), "
                            "bf16, or auto = bf16 where the CPU has AMX-BF16 or AVX512-BF16, else fp32 "
                            "($LOWBITDM_DTYPE overrides auto); resolved when the sample stage starts")
    layout: Literal["nchw", "channels_last"] = Field(
        "nchw", description="memory layout of a conv denoiser's activations (FP, fake and integer alike): nchw "
                            "(default), or channels_last, the layout oneDNN's convs compute in: no reorder of "
                            "input and output per conv (faster, see docs/integer-runtime.md); an FP model's "
                            "samples may differ in the last bits between layouts")

    @model_serializer(mode="wrap")
    def _omit_default_labels(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `labels` and `decode_batch_size` came after artifacts already recorded this section: leaving their
        # defaults out of the dump keeps those inputs digests (and the FP baseline folders named after them) valid
        data = handler(self)
        if self.labels == "balanced":
            data.pop("labels", None)
        if self.decode_batch_size is None:
            data.pop("decode_batch_size", None)
        if self.sampler is None:  # unset = DDIM for every model without a sampler default (digests unchanged)
            data.pop("sampler", None)
        if self.dtype in ("auto", "fp32"):  # fp32 was the only dtype before: those digests stay valid
            data.pop("dtype", None)
        if self.layout == "nchw":  # likewise the only layout before
            data.pop("layout", None)
        return data


class EvaluateSection(_Section):
    metrics: list[str] = ["fid_digits", "class_accuracy"]


class Recipe(_Section):
    schema_version: int = Field(RECIPE_VERSION, ge=1, description="version of the recipe format")
    name: str = "custom"
    description: str = ""
    model: ModelSection = ModelSection()
    quant: QuantScheme = Field(QuantScheme(), description="how the model is quantized: `quant.config.QuantScheme`")
    calibrate: CalibrateSection = CalibrateSection()
    finetune: FinetuneSection = FinetuneSection()
    sample: SampleSection = SampleSection()
    evaluate: EvaluateSection = EvaluateSection()

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > RECIPE_VERSION:
            raise ValueError(f"version {v} is newer than this lowbitdm reads ({RECIPE_VERSION}): "
                             f"upgrade lowbitdm to use this recipe")
        return v

    @model_serializer(mode="wrap")
    def _omit_current_version(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # manifests record the recipe under their own schema_version; leaving the current recipe
        # version out of the dump keeps the inputs digests of artifacts written before it valid
        data = handler(self)
        if self.schema_version == RECIPE_VERSION:
            data.pop("schema_version", None)
        return data

    def resolved(self, sampler_defaults: dict[str, Any]) -> Recipe:
        """Fill sampler fields left unset with the model's defaults."""
        sample = self.sample.model_copy(update={k: v for k, v in sampler_defaults.items()
                                                if getattr(self.sample, k) is None})
        return self.model_copy(update={"sample": sample})

    def with_sample_dtype(self) -> Recipe:
        """``sample.dtype = auto`` replaced by what this machine runs (`models.precision.resolve_dtype`);
        only the sample stage (and the FP baseline's key) resolve it, so other stages' digests never
        depend on the CPU."""
        from lowbitdm_cli.models.precision import resolve_dtype

        sample = self.sample.model_copy(update={"dtype": resolve_dtype(self.sample.dtype)})
        return self.model_copy(update={"sample": sample})


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_set(data: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise RecipeError(f"--set {assignment!r}: expected section.key=value, e.g. sample.num_samples=1000")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: {p} is not a section")
    node[parts[-1]] = _parse_value(value.strip())


def _is_registered(name: str) -> bool:
    from lowbitdm_cli.models.registry import MODELS

    return name in MODELS


def recipes_dir() -> Traversable:
    """The shipped recipes, package data of `lowbitdm_cli`.

    ``lowbitdm_cli/recipe_files`` is a symbolic link to the top-level ``recipes/`` folder, the one
    source: a source checkout or an editable install reads through the link, and a wheel build
    copies the files behind it into the package, so every kind of install reads them here."""
    return resources.files("lowbitdm_cli").joinpath("recipe_files")


def available_recipes() -> dict[str, Traversable]:
    folder = recipes_dir()
    if not folder.is_dir():
        return {}
    return {p.name.removesuffix(".toml"): p for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".toml")}


def load_recipe(recipe: str | Path | None = None, *, base: dict[str, Any] | None = None,
                sets: list[str] | None = None, bits: str | None = None,
                model: str | None = None, calibrate_method: str | None = None,
                finetune_method: str | None = None, prompts: str | Path | None = None) -> Recipe:
    """Load a recipe by name (``recipes/NAME.toml``) or path, then apply overrides.

    `base` (a resolved recipe stored in a manifest) is the starting point when no recipe is named.
    A model or prompt file given as a path is stored as an absolute path, so later stages find
    it from any working directory.
    """
    data: dict[str, Any] = copy.deepcopy(base) if base is not None and recipe is None else {}
    if recipe is not None:
        path: Path | Traversable = Path(recipe)
        if not Path(recipe).suffix:
            known = available_recipes()
            if str(recipe) not in known:
                raise RecipeError(f"unknown recipe {recipe!r}; known: {', '.join(known) or 'none'} "
                                  f"(or give a path to a .toml file)")
            path = known[str(recipe)]
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"recipe {path} is not valid TOML: {e}") from None
    for assignment in sets or []:
        _apply_set(data, assignment)
    if model is not None and Path(model).exists() and not _is_registered(model):
        model = str(Path(model).resolve())
    flags = {("quant", "bits"): bits, ("model", "name"): model, ("calibrate", "method"): calibrate_method,
             ("finetune", "method"): finetune_method,
             ("model", "prompts"): str(Path(prompts).resolve()) if prompts is not None else None}
    for (section, key), value in flags.items():
        if value is not None:
            data.setdefault(section, {})[key] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        raise RecipeError(f"recipe: {where}: {msg}") from None
