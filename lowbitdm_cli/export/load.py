"""One loader for every quantized artifact: calibrate, finetune and merge folders alike.

The manifest records the format its quantized model is stored in (``quantization.format``),
and that format picks the loader, as a stored ``quant_method`` picks diffusers' quantizer:

- ``fake-quant`` (calibrate, finetune): the FP model (from the source the manifest names, its
  weights digest checked), wrapped by the calibrate stage's layer specs, with the newest
  quantizer state of the lineage loaded; it runs fake-quantized.
- ``pack-quantized`` (merge): the packed checkpoint (`export.checkpoint.load_merged`) on
  integer kernels (``runtime="int"``) or dequantized (``"fake"``).

A new storage format registers its loader in `LOADERS`. Only JSON and safetensors are read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from lowbitdm_cli.artifacts import Artifact
from lowbitdm_cli.errors import ArtifactError, StageOrderError
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.quant.config import LayerSpec

__all__ = ["LOADERS", "load_quantized", "recipe_prompts", "same_model"]

Runtime = Literal["int", "fake", "compiled"]


def recipe_prompts(recipe) -> list[str] | None:
    """The prompt list of the recipe's ``model.prompts`` file (None when it names none)."""
    from lowbitdm_cli.models.text import read_prompts

    section = recipe.get("model", {}) if isinstance(recipe, dict) else recipe.model.model_dump()
    path = section.get("prompts")
    return read_prompts(path) if path else None


def same_model(artifact: Artifact, model: DiffusionModel) -> None:
    """The FP model must be the one the artifact was made from (same weights digest)."""
    from lowbitdm_cli.models.registry import model_ref

    if model_ref(model).digest != artifact.manifest.model.digest:
        raise ArtifactError(f"{artifact.path} was made from a different {artifact.manifest.model.name!r} model "
                            f"(weights digest differs): recalibrate with this model")


def _fake_quant(artifact: Artifact, runtime: Runtime) -> DiffusionModel:
    from lowbitdm_cli.models.registry import load_model
    from lowbitdm_cli.quant.model import load_quant_state, quantize_denoiser

    if runtime != "fake":
        raise ArtifactError(f"{artifact.path} is a {artifact.manifest.stage} artifact: it runs fake-quantized "
                            f"(runtime='fake'); integer kernels need a merged checkpoint (lowbitdm merge)")
    calib = artifact.find("calibrate")
    if calib is None:
        raise StageOrderError(f"{artifact.path} has no calibrate artifact in its lineage")
    recipe = artifact.manifest.recipe
    model = load_model(artifact.manifest.model.name, recipe_prompts(recipe))
    same_model(artifact, model)
    specs = {n: LayerSpec.model_validate(s) for n, s in calib.manifest.info["layers"].items()}
    quantize_denoiser(model.denoiser, specs, timesteps=calib.manifest.info.get("timesteps"))
    load_quant_state(model.denoiser, artifact.tensors("quant_state.safetensors"))
    model.denoiser.eval().requires_grad_(False)
    return model


def _pack_quantized(artifact: Artifact, runtime: Runtime) -> DiffusionModel:
    from lowbitdm_cli.export.checkpoint import load_merged

    return load_merged(artifact.path, runtime=runtime, prompts=recipe_prompts(artifact.manifest.recipe))


# format (`quant.config.FORMATS`) -> loader(artifact, runtime); the runtime a format runs by default first
LOADERS: dict[str, tuple[Callable[[Artifact, Runtime], DiffusionModel], Runtime]] = {
    "fake-quant": (_fake_quant, "fake"),
    "pack-quantized": (_pack_quantized, "int"),
}


def load_quantized(path: str | Path | Artifact, runtime: Runtime | None = None, loras: list | None = None
                   ) -> DiffusionModel:
    """Load a calibrate, finetune or merge artifact folder as a runnable `DiffusionModel`.

    The artifact is validated first (manifest, sha256 of every file, an older manifest migrated),
    so a changed file is an `IntegrityError`; nothing is unpickled. ``runtime``: ``"int"``
    (integer kernels, merge artifacts; their default), ``"fake"`` (fake-quantized; the default
    and only runtime of calibrate and finetune artifacts) or ``"compiled"`` (merge artifacts: the
    integer layers compiled with the whole denoiser by Inductor, `export.compiled_runtime`, in float32
    around them; for bf16: ``compile_runtime(use_dtype(load_quantized(path), torch.bfloat16))``). For a merged checkpoint
    ``model.meta["runtime"]`` reports how many layers run on integer kernels.

    ``loras``: LoRA adapter files (paths, ``(path, scale)`` pairs or `adapters.lora_file.Adapter`s)
    run as float low-rank branches beside the layers they target (`adapters.branch.attach_loras`);
    the packed weights are untouched and ``model.meta["loras"]`` records each file's sha256 and scale.
    An adapter key that matches no layer is an `AdapterError`.
    """
    if runtime not in (None, "int", "fake", "compiled"):
        raise ValueError(f"runtime must be 'int', 'fake' or 'compiled', got {runtime!r}")
    artifact = path if isinstance(path, Artifact) else Artifact.open(path)
    record = artifact.manifest.quantization
    if record is None:
        raise StageOrderError(f"{artifact.path} is a {artifact.manifest.stage} artifact: load_quantized opens "
                              f"calibrate, finetune and merge artifacts")
    if record.format not in LOADERS:
        raise ArtifactError(f"{artifact.path}: format {record.format!r} has no loader in this lowbitdm "
                            f"({', '.join(LOADERS)})")
    from lowbitdm_cli.adapters.branch import apply_loras

    loader, default = LOADERS[record.format]
    if runtime == "compiled":  # the integer runtime's layers, compiled (`export.compiled_runtime`)
        from lowbitdm_cli.export.compiled_runtime import compile_runtime

        if default != "int":
            raise StageOrderError(f"{artifact.path} is a {artifact.manifest.stage} artifact: runtime='compiled' "
                                  f"runs merged checkpoints (lowbitdm merge)")
        return compile_runtime(apply_loras(loader(artifact, "int"), loras or []))
    return apply_loras(loader(artifact, runtime or default), loras or [])
