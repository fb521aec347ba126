"""What every stage shares: turning a model name or an artifact into a runnable model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbitdm_cli.adapters.branch import apply_loras
from lowbitdm_cli.artifacts import MANIFEST, Artifact, Manifest, ModelRef, StageRun
from lowbitdm_cli.distributed import ProcessGroup, process_group
from lowbitdm_cli.errors import ArtifactError, RecipeError, StageOrderError
from lowbitdm_cli.export.load import load_quantized, recipe_prompts, same_model
from lowbitdm_cli.models.registry import MODELS, load_model, model_ref
from lowbitdm_cli.models.sources import is_hub_id
from lowbitdm_cli.models.text import prompts_digest, read_prompts
from lowbitdm_cli.models.wrapper import DiffusionModel
from lowbitdm_cli.sampling import SamplerSettings

__all__ = ["Source", "check_model", "load_fp_model", "load_quantized_from", "open_source", "prompt_options",
           "recipe_prompts", "run_on_ranks", "sampler_settings", "text_prompts"]

QUANT_STAGES = ("calibrate", "finetune", "merge")


@dataclass
class Source:
    """A model to sample from: FP (artifact is None) or the quantized model of an artifact."""

    model: DiffusionModel
    ref: ModelRef
    artifact: Artifact | None
    label: str
    runtime: str | None = None  # "int", "fake" or "compiled" for a merged checkpoint, None otherwise
    loras: list[dict] = field(default_factory=list)  # the LoRA adapters run beside its layers (path, sha256, scale)


def sampler_settings(sample_cfg) -> SamplerSettings:  # noqa: ANN001 - a recipes.SampleSection
    sampler = getattr(sample_cfg, "sampler", None) or "ddim"
    try:
        return SamplerSettings(steps=sample_cfg.steps, eta=sample_cfg.eta, guidance=sample_cfg.guidance,
                               clip_x0=bool(sample_cfg.clip_x0), sampler=sampler)
    except ValueError as e:
        raise RecipeError(f"sample: {e} (set sample.eta=0 or sample.sampler=ddim)") from None


def load_fp_model(name: str, recipe, with_denoiser: bool = True) -> DiffusionModel:  # noqa: ANN001
    """The full-precision model `name` with the recipe's prompts (text-to-image models)."""
    return load_model(name, recipe_prompts(recipe), with_denoiser=with_denoiser)


def text_prompts(recipe) -> list[str]:  # noqa: ANN001
    """The recipe's prompts, which a text-to-image model cannot do without."""
    prompts = recipe_prompts(recipe)
    if not prompts:
        raise RecipeError("a text-to-image model needs prompts: --prompts FILE (one per line) or model.prompts")
    return prompts


def work_device(device: str) -> str:
    """Validate a `--device` value (cpu, cuda, cuda:N) for a single-process stage."""
    if device == "cpu":
        return device
    if not device.startswith("cuda") or (device != "cuda" and not device.removeprefix("cuda:").isdigit()):
        raise RecipeError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise RecipeError(f"--device {device}: this PyTorch sees no CUDA device (torch {torch.__version__})")
    return device


def device_options(device: str) -> dict:
    """Stage options for a non-CPU device (float kernels differ by device, so it is an input)."""
    return {"device": device} if device != "cpu" else {}


def prompt_options(recipe) -> dict:  # noqa: ANN001 - a Recipe or a manifest's recipe dict
    """Stage options that make a stage's inputs digest cover the prompts' text, not only the
    file's path (empty without prompts, so other models' digests stay as they were)."""
    prompts = recipe_prompts(recipe)
    return {"prompts_sha256": prompts_digest(prompts)} if prompts else {}


def check_model(artifact: Artifact, model: DiffusionModel) -> ModelRef:
    """The FP model must be the one the artifact was made from (same weights digest)."""
    same_model(artifact, model)
    return model_ref(model)


def load_quantized_from(artifact: Artifact, runtime: str = "fake") -> DiffusionModel:
    """The quantized model of a calibrate, finetune or merge artifact (`export.load.load_quantized`):
    a merge artifact loads with `runtime` ("fake" or "int"); the others are always fake-quantized."""
    return load_quantized(artifact, runtime=runtime if artifact.manifest.stage == "merge" else "fake")


def open_source(source: str | Path, runtime: str = "int", prompts: str | Path | None = None,
                loras: list | None = None) -> Source:
    """A registered model name or diffusers folder (full precision), or a calibrate/finetune/merge
    artifact folder.

    `runtime` applies to merge artifacts only: "int" runs integer kernels, "fake" dequantizes,
    "compiled" loads the integer runtime, checks that `export.compiled_runtime` can express every
    layer, and leaves the compiling to the sample stage (after it sets the float dtype).
    `prompts` (a prompt file) is needed by a full-precision text-to-image model; artifacts use
    the prompts they were made with. `loras`: LoRA adapters (paths or (path, scale) pairs) run as
    float branches beside the layers they target (`adapters.branch.attach_loras`), on any source."""
    if runtime not in ("int", "fake", "compiled"):
        raise ValueError(f"runtime must be 'int', 'fake' or 'compiled', got {runtime!r}")
    text = str(source)
    path = Path(text)
    model_path = path.exists() and not (path / MANIFEST).exists() and text not in MODELS  # a model folder / file
    if (text in MODELS and not path.exists()) or model_path or is_hub_id(text):
        name = str(path.resolve()) if model_path else text
        model = load_model(name, read_prompts(prompts) if prompts else None)
        ref = model_ref(model)  # the FP weights' digest, before any adapter is attached
        apply_loras(model, loras or [])
        return Source(model, ref, None, f"{Path(name).name if model_path else name} (fp)",
                      loras=model.meta.get("loras", []))
    if not path.exists():
        raise ArtifactError(f"{text!r} is neither a known model ({', '.join(sorted(MODELS))}) nor an artifact folder")
    art = Artifact.open(path)
    if art.manifest.stage not in QUANT_STAGES:
        raise StageOrderError(f"{path} is a {art.manifest.stage} artifact; sample from a model name or a "
                              f"calibrate, finetune or merge artifact")
    merged = art.manifest.stage == "merge"
    if runtime == "compiled" and not merged:
        raise StageOrderError(f"{path} is a {art.manifest.stage} artifact: --runtime compiled runs merged "
                              f"checkpoints (lowbitdm merge)")
    with torch.no_grad():
        # compiled: the integer runtime now; the sample stage compiles it once it has set the dtype
        model = load_quantized(art, runtime=("int" if runtime == "compiled" else runtime) if merged else "fake",
                               loras=loras)
    if runtime == "compiled":
        from lowbitdm_cli.export.compiled_runtime import check_compilable

        check_compilable(model.denoiser)
    return Source(model, art.manifest.model, art, f"{art.manifest.model.name} ({art.manifest.stage})",
                  runtime=runtime if merged else None, loras=model.meta.get("loras", []))


def run_on_ranks(out: Path, device: str, open_run: Callable[[], StageRun], share: Callable[[StageRun], dict],
                 work: Callable[[ProcessGroup, StageRun, dict], Artifact | None]) -> Artifact:
    """Run a stage on one process or on every rank of a torchrun job; every rank returns the
    committed artifact.

    Rank 0 alone owns the artifact: `open_run()` starts (or resumes) its StageRun, taking the
    lock and writing the manifest, and `share(run)` says what the other ranks need to know
    (e.g. the batches still missing); a finished artifact is returned at once on every rank.
    The other ranks open the same partial folder from rank 0's manifest, never writing it.
    `work(group, run, shared)` does the stage's work on each rank and returns the artifact on
    rank 0 (None elsewhere); a barrier then waits for rank 0's commit.
    """
    main_run: StageRun | None = None

    def start() -> dict:  # rank 0 only
        nonlocal main_run
        main_run = open_run()
        if main_run.done:
            return {"done": True}
        return {"done": False, "manifest": main_run.manifest.model_dump_json(), **share(main_run)}

    with process_group(device) as group:
        shared = group.on_main(start)
        if shared["done"]:
            return main_run.artifact if group.is_main else Artifact.open(out)  # type: ignore[union-attr]
        run = main_run if group.is_main else StageRun(out, Manifest.model_validate_json(shared["manifest"]),
                                                      resumed=True, prior_elapsed=0.0)
        artifact = work(group, run, shared)  # type: ignore[arg-type]
        group.barrier()  # rank 0 has committed
        return artifact if group.is_main else Artifact.open(out)  # type: ignore[return-value]
