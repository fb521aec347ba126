"""The `lowbitdm` command line: parses options, calls stages, prints with rich. No logic."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from lowbitdm_cli.threads import limit_spin_wait

limit_spin_wait()  # before anything imports torch: OpenMP reads GOMP_SPINCOUNT when it loads

import typer  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from lowbitdm_cli import __version__  # noqa: E402
from lowbitdm_cli.errors import LowbitError  # noqa: E402
from lowbitdm_cli.recipes import load_recipe  # noqa: E402

app = typer.Typer(
    name="lowbitdm",
    help="Quantize diffusion models to 2-8 bits as a chain of resumable stages:\n\n"
         "calibrate -> finetune -> merge -> sample -> evaluate\n\n"
         "Each stage reads one artifact folder and writes the next. `lowbitdm run` runs a recipe's whole "
         "chain on the embedded `digits` model by default, e.g. `lowbitdm run --recipe ptq --bits w8a8`.",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
)
err = Console(stderr=True)
out = Console()
_state: dict[str, Any] = {"json": False}

RecipeOpt = Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe name in recipes/ (ptq, ...) or a "
                                                                         "path to a TOML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: section.key=value, "
                                                                  "e.g. --set sample.num_samples=1000. Repeatable.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Artifact folder to write (default: next to the "
                                                                 "parent, named after the stage).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its artifact exists.")]
PromptsOpt = Annotated[Path | None, typer.Option("--prompts", help="Text-to-image models: a text file with one prompt "
                                                                   "per line (sets model.prompts).")]
WorkDeviceOpt = Annotated[str, typer.Option("--device", help="Where the model runs: cpu, cuda or cuda:N "
                                                           "(under torchrun, cuda is each rank's own GPU; "
                                                           "calibration data stays on the CPU).")]
LoraOpt = Annotated[list[Path] | None, typer.Option(
    "--lora", help="A LoRA adapter (.safetensors with diffusers / PEFT lora_A/lora_B or kohya lora_down/lora_up "
                   "keys, or a folder holding adapter_model.safetensors): `sample` runs it as a float branch "
                   "beside the layers it targets, `merge` folds it into the weights. Repeatable.")]
LoraScaleOpt = Annotated[list[float] | None, typer.Option(
    "--lora-scale", help="Scale of each --lora, in the same order (one per --lora; default 1.0 each), times the "
                         "file's alpha/rank when it records alpha.")]
MetricOpt = Annotated[list[str] | None, typer.Option(
    "--metric", help="Metric(s), repeatable or comma-separated: fid, sfid, is, precision, recall, kid (Inception, "
                     "any model), clip_score (text-to-image, with --clip-weights) or fid_digits, class_accuracy "
                     "(embedded models). Default: fid_digits and class_accuracy for digits / tiny-random, "
                     "clip_score for text-to-image models, fid sfid is precision recall for the others.")]
RefOpt = Annotated[str | None, typer.Option(
    "--ref", help="Reference for fid, sfid, precision, recall, kid: an image folder, an .npz of images (arr_0) or "
                  "of statistics (mu/sigma, mu_s/sigma_s, feats), an ADM reference batch "
                  "(VIRTUAL_imagenet256_labeled.npz), a --make-ref file, or a sample artifact. Default for the "
                  "embedded models: digits-train (their 1497 training images).")]
InceptionWeightsOpt = Annotated[Path | None, typer.Option(
    "--inception-weights", help="Local Inception weights (never downloaded): pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth or clean-fid's inception-2015-12-05.pt. "
                                "Default: $LOWBITDM_INCEPTION_WEIGHTS (pytorch-fid) or $LOWBITDM_CLEANFID_WEIGHTS "
                                "(clean-fid), then the backend's own download cache.")]
ClipWeightsOpt = Annotated[Path | None, typer.Option(
    "--clip-weights", help="clip_score: a local transformers CLIPModel folder (never downloaded; default "
                           "$LOWBITDM_CLIP_WEIGHTS).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Registered model (see `lowbitdm models`), a "
                                                                    "diffusers pipeline folder, a CompVis folder "
                                                                    "(model.ckpt + config.yaml) or a hub id "
                                                                    "owner/repo.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowbitdm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON results on stdout.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, envvar="LOWBITDM_THREADS",
                                                help="CPU threads for torch (default: one per core, or "
                                                     "$OMP_NUM_THREADS). Waiting threads spin briefly, then "
                                                     "sleep (GOMP_SPINCOUNT=10000 unless it or OMP_WAIT_POLICY "
                                                     "is set), so other work on the cores does not stall them.")
                                   ] = None,
) -> None:
    _state["json"] = json_output
    from lowbitdm_cli.memory import keep_freed_memory
    from lowbitdm_cli.threads import configure_threads

    configure_threads(threads)
    try:  # large tensors reuse freed heap memory instead of a fresh mmap each (see `memory`)
        keep_freed_memory()
    except ValueError as exc:
        _fail(str(exc))


class _Bars:
    """A rich progress display that stages report to as (description, advance, total)."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)
        self.tasks: dict[str, Any] = {}

    def __call__(self, desc: str, advance: int, total: int) -> None:
        task = self.tasks.get(desc)
        if task is None or next(t for t in self.progress.tasks if t.id == task).finished:
            # a finished bar with the same name (e.g. FP then quantized sampling) starts a new one
            task = self.tasks[desc] = self.progress.add_task(desc, total=total)
        self.progress.update(task, advance=advance)

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _fail(message: str, code: int = 2) -> None:
    # escaped: a message may hold brackets (pip extras, paths, shapes) that rich would read as markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):  # noqa: ANN001, ANN202
    """Run a stage; expected errors become one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (LowbitError, ValidationError) as e:
        _fail(str(e).splitlines()[0] if isinstance(e, ValidationError) else str(e))
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] the partial artifact was kept; rerun the same command with --resume")
        raise typer.Exit(130) from None


def _report(artifact, title: str) -> None:  # noqa: ANN001
    m = artifact.manifest
    if _state["json"]:
        out.print_json(json.dumps({"path": str(artifact.path), "stage": m.stage, "status": m.status,
                                   "metrics": m.metrics, "timings": m.timings,
                                   **({"intervals": {k: v.model_dump() for k, v in m.intervals.items()}}
                                      if m.intervals else {})}))
        return
    err.print(f"[green]✓[/] {title}: [bold]{artifact.path}[/] ({m.timings.get('wall_s', 0):.1f}s)")
    if m.metrics:
        out.print(_metrics_table([(str(artifact.path), m.metrics)], intervals=m.intervals))


def _metrics_table(rows: list[tuple[str, dict[str, float]]], title: str | None = None,
                   intervals: dict | None = None) -> Table:
    """One row per (name, metrics); with `intervals` (one manifest's), each value shows its 95 % interval."""
    keys = sorted({k for _, metrics in rows for k in metrics})
    table = Table(title=title)
    table.add_column("model")
    for k in keys:
        table.add_column(k + (" [95 % interval]" if intervals and k in intervals else ""), justify="right")

    def cell(metrics: dict[str, float], k: str) -> str:
        if k not in metrics:
            return "-"
        iv = (intervals or {}).get(k)
        return f"{metrics[k]:.4g}" + (f" [{iv.low:.4g}, {iv.high:.4g}]" if iv is not None else "")

    for name, metrics in rows:
        table.add_row(name, *[cell(metrics, k) for k in keys])
    return table


def _adapters(loras: list[Path] | None, scales: list[float] | None) -> list:
    """--lora / --lora-scale pairs as `Adapter`s (one scale per adapter, or none: 1.0 each)."""
    from lowbitdm_cli.adapters.lora_file import Adapter

    loras, scales = loras or [], scales or []
    if scales and len(scales) != len(loras):
        _fail(f"give one --lora-scale per --lora ({len(loras)} adapter(s), {len(scales)} scale(s)), or none")
    return [Adapter(p, s) for p, s in zip(loras, scales or [1.0] * len(loras), strict=True)]


def _lora_suffix(records: list[dict]) -> str:
    """The default folder's suffix for a stage run with adapters: -lora-<digest of their sha256 and scales>."""
    from lowbitdm_cli.adapters.lora_file import lora_inputs
    from lowbitdm_cli.artifacts import digest_of

    return f"-lora-{digest_of(lora_inputs(records))[:8]}" if records else ""


def _default_run_dir(model: str, recipe_name: str, bits: str) -> Path:
    return Path("runs") / f"{Path(model).name}-{recipe_name}-{bits}"  # a folder path runs under its folder name


@app.command()
def calibrate(
    model: ModelOpt = None,
    bits: Annotated[str | None, typer.Option("--bits", "-b", help="wXaY, X and Y in 2..8 or fp (e.g. w4a4).")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Calibration method: ptq | qdiffusion | pqd.")] = None,
    mixed: Annotated[str | None, typer.Option("--mixed", help="none | omq (MPQ-DM per-channel weight bits "
                                                               "by kurtosis).")] = None,
    recipe: RecipeOpt = None, sets: SetOpt = None, out_dir: OutOpt = None, resume: ResumeOpt = False,
    force: ForceOpt = False, prompts: PromptsOpt = None, device: WorkDeviceOpt = "cpu",
) -> None:
    """Calibrate a full-precision model to low bits (PTQ on data-free DDIM trajectories).

    Writes a calibrate artifact: calibration data and quantizer parameters. Example:
    `lowbitdm calibrate --model digits --bits w4a8`, `lowbitdm calibrate --model ldm-4 --bits w4a4`,
    `lowbitdm calibrate --model sd-v1-4 --bits w4a8 --prompts prompts.txt`.
    Several processes or GPUs with torchrun (the same data and ranges as one process; --resume
    with any count): `torchrun --nproc_per_node 8 -m lowbitdm_cli calibrate ... --device cuda`.
    """
    from lowbitdm_cli.stages.calibrate import calibrate as run_stage

    extra = [f'calibrate.mixed="{mixed}"'] if mixed else []
    r = _guard(load_recipe, recipe, sets=(sets or []) + extra, bits=bits, model=model, calibrate_method=method,
               prompts=prompts)
    target = out_dir or _default_run_dir(r.model.name, r.name, r.quant.bits) / "calibrate"
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker: rank 0 shows progress and the result
        _guard(run_stage, r, target, resume=resume, force=force, device=device)
        return
    with _Bars() as bars:
        art = _guard(run_stage, r, target, resume=resume, force=force, progress=bars, device=device)
    if not _state["json"]:
        out.print(_layer_table(art.manifest.info["layers"]))
    _report(art, "calibrated")


def _layer_table(layers: dict[str, dict]) -> Table:
    table = Table(title=f"layer policy ({len(layers)} quantized layers)")
    for col in ("layer", "role", "w_bits", "a_bits", "temporal", "methods"):
        table.add_column(col)
    for name, s in layers.items():
        table.add_row(name, s["role"], str(s["w_bits"] or "fp"), str(s["a_bits"] or "fp"),
                      "yes" if s["a_temporal"] else "", _methods_cell(s))
    return table


def _methods_cell(spec: dict) -> str:
    """The transformer methods of one layer spec, e.g. ``per-token smooth rotate16 low-rank32``."""
    parts = [("per-token", spec.get("a_dynamic")), ("smooth", spec.get("smooth")),
             (f"rotate{spec.get('rotate')}", spec.get("rotate")),
             (f"low-rank{spec.get('low_rank')}", spec.get("low_rank"))]
    return " ".join(label for label, on in parts if on)


def _open_parent(path: Path, stages: tuple[str, ...]):  # noqa: ANN202
    from lowbitdm_cli.artifacts import Artifact

    return _guard(Artifact.open, path, stages)


@app.command()
def finetune(
    parent: Annotated[Path, typer.Argument(help="A calibrate artifact folder.")],
    method: Annotated[str | None, typer.Option("--method", help="none | qalora (EfficientDM) | quest | qat.")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help="mse | trd (MPQ-DM relation distillation added).")] = None,
    recipe: RecipeOpt = None, sets: SetOpt = None, out_dir: OutOpt = None, resume: ResumeOpt = False,
    force: ForceOpt = False, prompts: PromptsOpt = None, device: WorkDeviceOpt = "cpu",
    grad_checkpoint: Annotated[bool, typer.Option(
        "--grad-checkpoint", help="Recompute the student's block activations in the backward pass: less "
                                  "memory, same result, each block's forward runs twice.")] = False,
    teacher_dtype: Annotated[str | None, typer.Option(
        "--teacher-dtype", help="Run the frozen FP teacher under bf16 or fp16 autocast (for GPUs; changes "
                                "the result slightly). Default: float32.")] = None,
) -> None:
    """Finetune a calibrated model by data-free distillation from the full-precision model.

    `qalora` trains LoRA factors merged before weight quantization plus per-timestep activation
    step sizes (EfficientDM); `quest` trains time-embedding projections and attention layers
    (QuEST); `qat` trains every weight; `none` passes the calibrated state through.
    Example: `lowbitdm finetune runs/digits-ptq-w4a4/calibrate --method qalora`.
    Data parallel over several processes or GPUs with torchrun (same result as one process
    with the same global batch, up to float summation order; --resume with any count):
    `torchrun --nproc_per_node 8 -m lowbitdm_cli finetune RUN/calibrate --device cuda`.
    """
    from lowbitdm_cli.stages.finetune import finetune as run_stage

    art = _open_parent(parent, ("calibrate",))
    extra = [f'finetune.loss="{loss}"'] if loss else []
    r = _guard(load_recipe, recipe, base=art.manifest.recipe, sets=(sets or []) + extra, finetune_method=method,
               prompts=prompts)
    kwargs = {"resume": resume, "force": force, "device": device, "grad_checkpoint": grad_checkpoint,
              "teacher_dtype": teacher_dtype}
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker: rank 0 shows progress and the result
        _guard(run_stage, art, r, out_dir or art.path.parent / "finetune", **kwargs)
        return
    with _Bars() as bars:
        result = _guard(run_stage, art, r, out_dir or art.path.parent / "finetune", progress=bars, **kwargs)
    _report(result, "finetuned")


@app.command()
def merge(
    parent: Annotated[Path, typer.Argument(help="A finetune (or calibrate) artifact folder.")],
    out_dir: OutOpt = None, force: ForceOpt = False, lora: LoraOpt = None, lora_scale: LoraScaleOpt = None,
) -> None:
    """Fold everything learned into packed low-bit integer weights (a real low-bit checkpoint).

    `--lora FILE [--lora-scale S]` (repeatable) folds an adapter into the weights before they are
    quantized, Q(W + s·B·A): one file, the adapter quantized with the layer (default folder
    merge-lora-<digest>). To keep adapters exact and swappable, merge without them and pass
    --lora to `lowbitdm sample` instead (a float branch beside each layer).
    """
    from lowbitdm_cli.stages.merge import merge as run_stage

    art = _open_parent(parent, ("finetune", "calibrate"))
    adapters = _adapters(lora, lora_scale)
    name = "merge" + _lora_suffix([_guard(a.record) for a in adapters])
    result = _guard(run_stage, art, out_dir or art.path.parent / name, force=force, loras=adapters)
    _report(result, "merged")


@app.command()
def sample(
    source: Annotated[str, typer.Argument(help="A model name (full precision) or a calibrate, finetune or merge "
                                               "artifact folder.")],
    recipe: RecipeOpt = None, sets: SetOpt = None, out_dir: OutOpt = None, resume: ResumeOpt = False,
    force: ForceOpt = False,
    runtime: Annotated[Literal["int", "fake", "compiled"], typer.Option(
        "--runtime", help="How a merge artifact runs: integer kernels by default (equal to `fake` bit for bit); "
                          "`fake` dequantizes to float for comparison; `compiled` hands the same integer layers "
                          "to PyTorch's x86 int8 lowering and compiles the whole denoiser with Inductor (needs "
                          "torchao: pip install 'lowbitdm\\[compiled]'; the first call per input shape "
                          "compiles, some 30-50 s on a 2-core Xeon; faster on CPUs, samples not bit-equal to fake; "
                          "docs/integer-runtime.md)."
                          )] = "int",
    device: Annotated[str, typer.Option(
        "--device", help="Where the model runs: cpu, or cuda (under torchrun: each rank's own GPU, nccl).")] = "cpu",
    prompts: PromptsOpt = None, lora: LoraOpt = None, lora_scale: LoraScaleOpt = None,
    dtype: Annotated[Literal["auto", "fp32", "bf16"] | None, typer.Option(
        "--dtype", help="Float dtype around the quantized layers (the whole model for FP): auto = bf16 where the "
                        "CPU has AMX-BF16 or AVX512-BF16, else fp32 (same as --set sample.dtype=...; default: the "
                        "recipe's, fp32). In bf16 each quantized layer rounds its exact accumulator to bf16 before "
                        "the rescale, as a bf16 product of the codes does (fake and int runtime alike). The "
                        "manifest records the resolved one.")] = None,
    layout: Annotated[Literal["nchw", "channels_last"] | None, typer.Option(
        "--layout", help="Memory layout of a conv denoiser's activations: channels_last runs every conv (float, "
                         "bf16, int8) without reordering its input and output (faster on larger conv models, e.g. "
                         "1.0-1.2x on a 26 M UNet; not on the small digits UNet); same as --set "
                         "sample.layout=...; default: the recipe's, nchw. Integer and fake runtimes stay equal bit "
                         "for bit in either.")] = None,
) -> None:
    """Generate samples into samples.npz (ADM layout: arr_0 uint8 NHWC + labels) and grid.png.

    Labels are class-balanced (0, 1, ..., C-1, 0, ...; --set sample.labels=random for
    uniform ones). Seeds are per global sample index, so the images do not depend on the
    batch size or the number of processes. Several processes (one machine or many) with
    torchrun: each rank writes its share of the shards, rank 0 assembles samples.npz after
    a barrier, and an interrupted run continues with --resume, with any number of processes:

    `torchrun --nproc_per_node 8 -m lowbitdm_cli sample SOURCE --device cuda --out DIR`

    (on CPUs leave out --device: the processes talk over gloo).

    LoRA adapters (`--lora FILE [--lora-scale S]`, repeatable) run as float low-rank branches
    beside the layers they target, on any source (FP, fake-quantized, integer): the packed
    weights stay as they are, and the manifest records each adapter's sha256 and scale.
    Default folder with adapters: sample-lora-<digest>.
    """
    from lowbitdm_cli.stages.common import open_source
    from lowbitdm_cli.stages.sample import sample as run_stage

    src = _guard(open_source, source, runtime=runtime, prompts=prompts, loras=_adapters(lora, lora_scale))
    base = src.artifact.manifest.recipe if src.artifact else None
    sets = [*(sets or []), *([f"sample.dtype={dtype}"] if dtype else []), *([f"sample.layout={layout}"] if layout else [])]
    r = _guard(load_recipe, recipe, base=base, sets=sets, model=src.ref.name, prompts=prompts)
    name = "sample" + _lora_suffix(src.loras)
    fp_dir = Path("runs") / f"{Path(source).name}-fp" / name
    target = out_dir or (src.artifact.path.parent / name if src.artifact else fp_dir)
    if os.environ.get("RANK", "0") != "0":  # a torchrun worker: rank 0 shows progress and the result
        _guard(run_stage, src, r, target, resume=resume, force=force, device=device)
        return
    with _Bars() as bars:
        art = _guard(run_stage, src, r, target, resume=resume, force=force, progress=bars, device=device)
    _report(art, "sampled")


@app.command()
def evaluate(
    samples: Annotated[Path, typer.Argument(help="A sample artifact folder. With --make-ref: the reference images "
                                                 "instead (an image folder, an .npz with arr_0, a sample artifact, "
                                                 "or digits-train).")],
    metric: MetricOpt = None, ref: RefOpt = None,
    ref_stats: Annotated[Literal["auto", "file", "images"], typer.Option(
        "--ref-stats", help="Where the reference statistics come from. file: the .npz's own mu/sigma (mu_s/sigma_s), "
                            "as ADM's evaluator does; images: recomputed from its images with the samples' Inception; "
                            "auto: a --make-ref file from the same Inception as is, else images when the file has "
                            "them, else the file.")] = "auto",
    backend: Annotated[Literal["pytorch-fid", "clean-fid"], typer.Option(
        "--backend", help="Inception port: pytorch-fid (all metrics) or clean-fid (no sfid: its TorchScript file "
                          "exposes no mixed_6/conv features).")] = "pytorch-fid",
    mode: Annotated[str | None, typer.Option(
        "--mode", help="Resizing to 299x299: legacy_pytorch (pytorch-fid, bilinear); clean (clean-fid's default, PIL "
                       "bicubic) or legacy_tensorflow (clean-fid).")] = None,
    inception_weights: InceptionWeightsOpt = None, clip_weights: ClipWeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per Inception forward pass.")] = 50,
    device: Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu, cuda or cuda:N.")] = "auto",
    make_ref: Annotated[bool, typer.Option(
        "--make-ref", help="Instead of scoring: write reference statistics of the images given as the argument into "
                           "--out FILE.npz (mu, sigma, mu_s, sigma_s, pool features and which Inception made them), "
                           "to pass later as --ref.")] = False,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", min=0, help="Resamples of the samples' features for the 95 % intervals of fid_digits, fid, "
                                   "sfid (double bootstrap), kid and is (0: none; the reference stays fixed). "
                                   "Class accuracy and precision get Wilson intervals, clip_score a normal one, "
                                   "recall none.")] = 1000,
    bootstrap_seed: Annotated[int, typer.Option("--bootstrap-seed", help="Seed of the bootstrap resamples.")] = 0,
    out_dir: OutOpt = None, force: ForceOpt = False,
) -> None:
    """Score samples: FID-digits and class accuracy, or FID, sFID, IS, precision/recall, KID.

    Inception metrics follow the ADM evaluation suite: FID on pool3 (2048-d), sFID on the
    first 7 channels of mixed_6/conv (2023-d), IS from the logits over splits of 5000,
    precision and recall with k = 3 nearest neighbours. The Inception weights must be a local
    file (--inception-weights); the manifest records their sha256, the backend and mode,
    the sample count and the reference. Examples:

    `lowbitdm evaluate runs/x/sample` (FID-digits and class accuracy)

    `lowbitdm evaluate runs/x/sample --metric fid,is --inception-weights pt_inception-2015-12-05-6726825d.pth`

    `lowbitdm evaluate runs/ldm-4-fp/sample --ref VIRTUAL_imagenet256_labeled.npz`

    `lowbitdm evaluate imagenet_val/ --make-ref --out imagenet_ref.npz`
    """
    from lowbitdm_cli.stages.evaluate import InceptionOptions, default_metrics
    from lowbitdm_cli.stages.evaluate import evaluate as run_stage

    opts = InceptionOptions(backend=backend, mode=mode, weights=inception_weights, reference=ref, ref_stats=ref_stats,
                            batch_size=batch_size, device=device)
    if make_ref:
        _make_ref(samples, opts, out_dir, force)
        return
    art = _open_parent(samples, ("sample",))
    metrics = _metric_names(metric) or default_metrics(art.manifest.model.name)
    with _Bars() as bars:
        result = _guard(run_stage, art, metrics, out_dir or art.path.parent / "evaluate", force=force, inception=opts,
                        clip_weights=clip_weights, progress=bars, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed)
    _report(result, "evaluated")


def _metric_names(metric: list[str] | None) -> list[str]:
    """--metric values (repeatable, comma-separated, fid-digits or fid_digits) as metric names, in order."""
    names = [m.strip().lower().replace("-", "_") for entry in (metric or []) for m in entry.split(",") if m.strip()]
    return list(dict.fromkeys(names))


def _make_ref(source: Path, opts, out_file: Path | None, force: bool) -> None:  # noqa: ANN001 - InceptionOptions
    from lowbitdm_cli.evaluation.inception import open_extractor
    from lowbitdm_cli.evaluation.reference import make_reference

    if out_file is None:
        _fail("--make-ref needs --out FILE.npz (where to write the reference statistics)")
    extractor = _guard(open_extractor, opts.backend, opts.mode, opts.weights, opts.device)
    with _Bars() as bars:
        summary = _guard(make_reference, source, extractor, out_file, opts.batch_size, force=force, progress=bars)
    if _state["json"]:
        out.print_json(json.dumps(summary))
        return
    err.print(f"[green]✓[/] reference statistics of {summary['num_images']} images ({extractor.backend}, "
              f"{extractor.mode}): [bold]{summary['path']}[/]", highlight=False)


@app.command()
def run(
    recipe: RecipeOpt = "ptq",
    bits: Annotated[str | None, typer.Option("--bits", "-b", help="wXaY, X and Y in 2..8 or fp.")] = None,
    model: ModelOpt = None,
    sets: SetOpt = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where run folders are created.")] = Path("runs"),
    seeds: Annotated[int, typer.Option(
        "--seeds", min=1, help="Run the chain N times, seed offset k = 0..N-1 added to calibrate.seed, "
                               "finetune.seed and sample.seed (folders <model>-<recipe>-<bits>-seed<k> for k >= 1, "
                               "each with its FP baseline), and end with the mean and 95 % interval over seeds.")] = 1,
    force: ForceOpt = False, prompts: PromptsOpt = None,
    fp_cache: Annotated[Path | None, typer.Option("--fp-cache", help="Folder sharing full-precision baselines "
                                                  "across --runs-dir folders, keyed by the model's weights digest "
                                                  "and the sample settings (default: $LOWBITDM_FP_CACHE or "
                                                  "~/.cache/lowbitdm/fp-baselines).")] = None,
    no_fp_cache: Annotated[bool, typer.Option("--no-fp-cache", help="Neither read nor fill the FP cache.")] = False,
    metric: MetricOpt = None, ref: RefOpt = None, inception_weights: InceptionWeightsOpt = None,
    clip_weights: ClipWeightsOpt = None,
) -> None:
    """Run a recipe's whole chain (calibrate, finetune, merge, sample, evaluate) plus the FP baseline.

    Any model: the embedded digits (scored with FID-digits and class accuracy) or your own
    diffusers folder, e.g. `lowbitdm run --model ./my-ddpm --recipe ptq --bits w8a8 --ref
    train_images/ --inception-weights pt_inception-2015-12-05-6726825d.pth`. Metrics are scored
    with what is given; those that cannot be (no reference, no Inception or CLIP weights) are
    skipped and named in one line, and with none left the run stops after sampling and writes the
    FP and quantized grids side by side (<run>/fp_vs_quantized.png).

    Stages that are complete for the same inputs are skipped and interrupted ones resume,
    so rerunning after a crash continues where it stopped. The FP baseline is copied from (and
    into) the FP cache, so another --runs-dir with the same model and sample settings reuses it
    (hashes checked). Ends with an FP vs quantized table (values with their 95 % intervals, the
    denoiser's MiB, sampling images per second, wall seconds; with --seeds N, one row per seed and
    the mean over seeds).
    """
    from lowbitdm_cli.pipeline import RunEvaluation, default_fp_cache, run_seeds
    from lowbitdm_cli.run_table import run_table, skipped_line
    from lowbitdm_cli.stages.evaluate import InceptionOptions

    r = _guard(load_recipe, recipe, sets=sets, bits=bits, model=model, prompts=prompts)
    cache = None if no_fp_cache else (fp_cache or default_fp_cache())
    scoring = RunEvaluation(metrics=_metric_names(metric) or None, clip_weights=clip_weights,
                            inception=InceptionOptions(weights=inception_weights, reference=ref))
    with _Bars() as bars:
        result = _guard(run_seeds, r, runs_dir, seeds, force=force, progress=bars,
                        log=lambda msg: err.print(msg, highlight=False), fp_cache=cache, evaluation=scoring)
    if _state["json"]:
        out.print_json(json.dumps(result))
        return
    title = f"{r.model.name}: full precision vs {r.quant.bits} ({r.name})" + (f", {seeds} seeds" if seeds > 1 else "")
    out.print(run_table(result, title, r.model.name, width=out.width))
    line = skipped_line(result.get("skipped", {}))
    if line:
        err.print(line, highlight=False, soft_wrap=True)
    grids = result.get("grids")
    if grids:
        err.print(f"FP and quantized samples side by side: {', '.join(grids) if isinstance(grids, list) else grids}",
                  highlight=False, soft_wrap=True)
    err.print(f"artifacts in [bold]{', '.join(result.get('run_dirs', [result['run_dir']]))}[/]")


@app.command()
def models() -> None:
    """List the model registry: names, availability and sampler defaults."""
    from lowbitdm_cli.models.registry import MODELS

    rows = [{"name": n, "available": e.available, "description": e.description, "sampler": e.sampler,
             "needs": e.needs.replace("<name>", n), "family": e.family, "hub_id": e.hub_id,
             "conditioning": e.conditioning, "resolution": e.resolution,
             "local_dir": None if e.loader else str(e.local_dir)} for n, e in MODELS.items()]
    if _state["json"]:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="models")
    for col in ("name", "available", "sampler defaults", "description"):
        table.add_column(col)
    for row in rows:
        s = row["sampler"]
        table.add_row(row["name"], "yes" if row["available"] else f"needs {row['hub_id'] or 'local copy'}",
                      f"{'DPM-Solver++(2M)' if s.get('sampler') == 'dpmpp2m' else 'DDIM'} {s.get('steps')} steps, "
                      f"eta {s.get('eta')}, cfg {s.get('guidance')}", row["description"])
    out.print(table)


@app.command()
def show(artifact: Annotated[Path, typer.Argument(help="Any artifact folder.")]) -> None:
    """Show an artifact's manifest: stage, lineage, metrics, timings, files."""
    from lowbitdm_cli.artifacts import Artifact

    art = _guard(Artifact.open, artifact)
    chain = _guard(art.lineage)
    m = art.manifest
    if _state["json"]:
        data = json.loads(m.model_dump_json())
        data["lineage"] = [str(a.path) for a in chain]
        out.print_json(json.dumps(data))
        return
    out.print(f"[bold]{art.path}[/]  {m.stage} ({m.status}), schema {m.schema_version}, lowbitdm {m.tool_version}, "
              f"torch {m.torch_version}, created {m.created_at}")
    out.print(f"model: {m.model.name} ({m.model.source}, weights sha256 {m.model.digest[:12]}…)")
    out.print("lineage: " + " ← ".join(f"{a.manifest.stage}:{a.path}" for a in chain))
    if m.metrics:
        out.print(_metrics_table([(m.stage, m.metrics)], title="metrics", intervals=m.intervals))
    out.print("timings: " + ", ".join(f"{k}={v}" for k, v in m.timings.items()))
    files = Table(title="files")
    for col in ("file", "bytes", "sha256"):
        files.add_column(col)
    for name, entry in m.files.items():
        files.add_row(name, str(entry.size), entry.sha256[:16] + "…")
    out.print(files)
    info = {k: v for k, v in m.info.items() if k != "layers"}
    if info:
        out.print("info: " + json.dumps(info, default=str)[:2000])


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (runs/<model>-<recipe>-<bits>) or any "
                                                        "artifact folders, in the order to show them.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.md, report.html and the "
                                                              "PNGs.")] = Path("report"),
    num_images: Annotated[int, typer.Option("--num-images", min=0, help="Images per run in samples.png "
                                                                        "(the first ones; 0 skips it).")] = 20,
) -> None:
    """Compare finished runs: a table, plus report.md / report.html with figures.

    Reads manifests only. For a run folder the furthest-along stage (evaluate, else sample, ...)
    is used and its lineage supplies metrics (with their 95 % intervals), timings, peak memory,
    merged size, finetune loss and OMQ bit allocations. Runs that differ only by their seeds
    (`run --seeds N`) are grouped into configurations: mean and 95 % interval over seeds, and
    differences whose intervals overlap marked not significant. Figures: metric_vs_bits.png, loss_curves.png, omq_bits.png
    and samples.png (the same sample indices, hence seeds, from every run). report.html
    embeds the images, so it can be sent as one file. Example:
    `lowbitdm report runs/digits-fp-* runs/digits-ptq-w8a8 runs/digits-ptq-w4a4 --out report/`.
    """
    from lowbitdm_cli.report import collect_runs, report_sections, table, write_report

    runs = _guard(collect_runs, run_dirs)
    files = _guard(write_report, runs, out_dir, num_images=num_images)
    if _state["json"]:
        from dataclasses import asdict

        from lowbitdm_cli.report import differences, group_runs

        configs = group_runs(runs)
        out.print_json(json.dumps({"runs": [r.to_dict() for r in runs],
                                   "configurations": [c.to_dict() for c in configs],
                                   "differences": [asdict(d) for d in differences(configs)],
                                   "report": str(files.markdown),
                                   "html": str(files.html), "images": {n: {"path": str(p), "size": files.sizes[n]}
                                                                       for n, p in files.images.items()}}))
        return
    headers, rows = table(runs)
    grid = Table(title=", ".join(sorted({r.model for r in runs})) + f": {len(runs)} runs", box=box.SIMPLE_HEAD)
    for i, col in enumerate(headers):  # one word per header line keeps the table narrow; fold, never cut
        grid.add_column(col.replace(" ", "\n"), justify="left" if i < 2 else "right", overflow="fold")
    for row in rows:
        grid.add_row(*row)
    out.print(grid)
    for title, note, heads, body in report_sections(runs):
        extra = Table(title=title, caption=note, box=box.SIMPLE_HEAD)
        for i, col in enumerate(heads):
            extra.add_column(col, justify="left" if i == 0 or col == "significant?" else "right", overflow="fold")
        for row in body:
            extra.add_row(*row)
        out.print(extra)
    err.print(f"wrote [bold]{files.markdown}[/], {files.html.name} and {', '.join(files.images)} in {files.out_dir}",
              highlight=False)


def entrypoint() -> None:
    app(prog_name="lowbitdm")


if __name__ == "__main__":
    sys.exit(entrypoint())
