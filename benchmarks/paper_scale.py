"""Full-size cost: the papers' real architectures with random weights, measured step by step,
then the papers' whole protocols projected from the measured steps.

Models (built from their real configs, random weights, nothing downloaded):

- LDM-4 ImageNet 256 (CompVis cin256-v2): the config's `unet_config` translated to a diffusers
  UNet2DConditionModel by lowbitdm's own CompVis converter (`models/compvis.py`), latent 3x64x64,
  class context from a 1001-row embedding (CFG);
- Stable Diffusion v1.4: the diffusers UNet2DConditionModel config of CompVis/stable-diffusion-v1-4
  (860 M parameters), latent 4x64x64 at 512 px, a random 77x768 text context per prompt (CFG);
- DiT-XL/2 256: the diffusers DiTTransformer2DModel config of facebook/DiT-XL-2-256, latent 4x32x32.

For each, with lowbitdm's own code (W4A4, per-timestep activation steps, EfficientDM's recipe):

- `traj`: one FP denoiser call under CFG (a calibration-trajectory step), per sample;
- `range`: one range-pass forward (weights quantized, activation observers on), per sample;
- `recon`: one BRECQ/AdaRound reconstruction iteration (`reconstruct_block`) at the papers'
  mini-batch of 32 rows (8 with --quick, scaled to 32 linearly), averaged over four blocks
  evenly spaced through the forward order;
- `distill`: one EfficientDM distillation step (`finetune.loop.distill`: teacher + student
  forward under CFG, backward into LoRA and step sizes, AdamW step), at batch b;

each the median of a handful of steps after a warm-up, with the process's peak memory (RSS on
the CPU, `torch.cuda.max_memory_allocated` on a GPU) over that measurement. Batches here are
smaller than the papers' (see the table's `b` column); per-sample cost is the slope of time
against batch between two batch sizes (full run), or time / batch at one batch (--quick: an
upper bound, since a larger batch uses the cores better), and the projection scales it to the
papers' batches.

    python benchmarks/paper_scale.py --quick          # smaller batches / SD at 256 px, a few steps
    python benchmarks/paper_scale.py --device cuda    # the same on a GPU
    python benchmarks/paper_scale.py --models ldm-4,sd-v1-4

Writes benchmarks/results/paper_scale.json (paper_scale_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbitdm_cli.calibration.data import CalibrationData
from lowbitdm_cli.calibration.ptq import init_activations, init_weights
from lowbitdm_cli.calibration.reconstruct import plan_blocks, reconstruct_block
from lowbitdm_cli.finetune.loop import DistillConfig, checkpoint_blocks, distill, make_optimizer
from lowbitdm_cli.finetune.methods import plan_method
from lowbitdm_cli.models import compvis as cv
from lowbitdm_cli.models.conditioning import ClassEmbedder, ClassLabels, Conditioner
from lowbitdm_cli.models.wrapper import DiffusionModel, NoiseSchedule
from lowbitdm_cli.quant.model import quantize_denoiser
from lowbitdm_cli.quant.policy import build_layer_specs
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.sampling import ddim_timesteps

ROOT = Path(__file__).resolve().parent
RECON_PICKS = 4  # blocks whose reconstruction iterations are timed

# --- the real configs -------------------------------------------------------------------------
CIN256_V2_UNET = {  # configs/latent-diffusion/cin256-v2.yaml, model.params.unet_config.params
    "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
    "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
    "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512,
}
SD14_UNET = {  # CompVis/stable-diffusion-v1-4 unet/config.json
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
DIT_XL2 = {  # facebook/DiT-XL-2-256 transformer/config.json
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}

# The protocols projected (the recipes' comments and docs/METHODS.md): sampler steps, CFG,
# Q-Diffusion calibration (samples x kept steps, 20k AdaRound iterations per block at mini-batch
# 32), EfficientDM distillation (epochs x teacher steps) and MPQ-DM's (800 epochs x 20 steps).
PROTOCOLS = {
    "ldm-4": {"qdiff_samples": 256, "qdiff_steps": 20, "recon_iters": 20_000, "recon_batch": 32,
              "efficientdm_epochs": 160, "efficientdm_steps": 100, "mpqdm_epochs": 800, "mpqdm_steps": 20,
              "distill_batch": 32},
    "sd-v1-4": {"qdiff_samples": 256, "qdiff_steps": 25, "recon_iters": 20_000, "recon_batch": 32,
                "efficientdm_epochs": 160, "efficientdm_steps": 100, "mpqdm_epochs": 800, "mpqdm_steps": 20,
                "distill_batch": 32},
    "dit-xl-2": {"qdiff_samples": 256, "qdiff_steps": 25, "recon_iters": 20_000, "recon_batch": 32,
                 "efficientdm_epochs": 160, "efficientdm_steps": 100, "mpqdm_epochs": 800, "mpqdm_steps": 20,
                 "distill_batch": 32},
}


class RandomContext(Conditioner):
    """A fixed random cross-attention context per condition index (stands in for CLIP prompts)."""

    kind = "class"

    def __init__(self, num: int, tokens: int, dim: int) -> None:
        super().__init__(num, null=num)
        self.table = nn.Parameter(torch.randn(num + 1, tokens, dim, generator=torch.Generator().manual_seed(0)),
                                  requires_grad=False)

    def denoiser_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.table[cond]}


def _schedule(kind: str, start: float, end: float) -> NoiseSchedule:
    return NoiseSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": kind, "beta_start": start,
                                      "beta_end": end})


def build(name: str, latent: int | None) -> DiffusionModel:
    """The FP model `name` with random weights (seeded); `latent` overrides the latent size."""
    import diffusers

    torch.manual_seed(0)
    if name == "ldm-4":
        cls_name, cfg = cv._diffusers_unet_config(cv._unet_layout(CIN256_V2_UNET))
        den = getattr(diffusers, cls_name)(**cfg)
        size = latent or 64
        cond = ClassEmbedder(nn.Embedding(1001, 512), 1000, 1000)
        return DiffusionModel(den, _schedule("scaled_linear", 0.0015, 0.0195), (3, size, size), "class", 1000, 1000,
                              name=name, conditioner=cond)
    if name == "sd-v1-4":
        den = diffusers.UNet2DConditionModel(**SD14_UNET)
        size = latent or 64
        return DiffusionModel(den, _schedule("scaled_linear", 0.00085, 0.012), (4, size, size), "class", 64, 64,
                              name=name, conditioner=RandomContext(64, 77, 768))
    if name == "dit-xl-2":
        den = diffusers.DiTTransformer2DModel(**DIT_XL2)
        size = latent or 32
        return DiffusionModel(den, _schedule("linear", 1e-4, 0.02), (4, size, size), "class", 1000, 1000, name=name,
                              conditioner=ClassLabels(1000, 1000))
    raise SystemExit(f"unknown model {name!r} (ldm-4, sd-v1-4, dit-xl-2)")


# --- measuring ----------------------------------------------------------------------------------
class Meter:
    """Peak memory of one measurement: process RSS high-water mark (CPU) or CUDA allocator peak."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
        return float("nan")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _median_step(times: list[float]) -> float:
    """Median of per-step durations after the first (warm-up) one."""
    steps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(steps[1:] if len(steps) > 2 else steps)


def _calib_data(model: DiffusionModel, batch: int, steps: int) -> CalibrationData:
    g = torch.Generator().manual_seed(1)
    ts = torch.tensor(ddim_timesteps(model.schedule.num_train_timesteps, 20)[:steps])
    xs = torch.randn(steps, batch, *model.sample_shape, generator=g)
    return CalibrationData(xs, ts, torch.arange(batch) % max(model.num_classes, 1))


def measure_traj(model: DiffusionModel, batch: int, reps: int, guidance: float, meter: Meter) -> dict:
    x = torch.randn(batch, *model.sample_shape).to(model.device)
    cond = (torch.arange(batch) % model.num_classes).to(model.device)
    meter.reset()
    times = [time.perf_counter()]
    with torch.no_grad():
        for _ in range(reps + 1):
            model.eps(x, 500, cond, guidance)
            meter.sync()
            times.append(time.perf_counter())
    return {"s": _median_step(times), "peak_gib": meter.peak_gib()}


def measure_range(student: DiffusionModel, batch: int, reps: int, guidance: float, meter: Meter) -> dict:
    data = _calib_data(student, batch, reps + 1)
    times: list[float] = []
    meter.reset()
    times.append(time.perf_counter())

    def tick(_n: int) -> None:
        meter.sync()
        times.append(time.perf_counter())

    init_activations(student, data, "minmax", guidance, batch, 1000, 0, progress=tick)
    return {"s": _median_step(times), "peak_gib": meter.peak_gib()}


def measure_recon(student: DiffusionModel, teacher: DiffusionModel, iters: int, batch: int, guidance: float,
                  meter: Meter) -> dict:
    cfg = load_recipe("qdiffusion").calibrate.model_copy(update={
        "recon_iters": iters, "recon_batch_size": batch, "recon_samples": batch})
    data = _calib_data(student, max(batch // 2, 1), 1)  # CFG: two rows per sample
    blocks, rows = plan_blocks(student, data, guidance)
    # evenly spaced through the forward order (not the ends: conv_in / time embedding / conv_out are
    # single layers), so the mean over the picks estimates the mean over all blocks
    picks = sorted({int((i + 0.5) * len(blocks) / RECON_PICKS) for i in range(RECON_PICKS)})
    per_iter, peaks = [], []
    for i in picks:
        times: list[float] = []
        meter.reset()

        def tick(_a: int, _t: int) -> None:
            meter.sync()
            times.append(time.perf_counter())

        reconstruct_block(student, teacher, data, blocks[i], i, cfg, guidance, rows, progress=tick)
        per_iter.append(_median_step(times))
        peaks.append(meter.peak_gib())
    return {"s": statistics.mean(per_iter), "peak_gib": max(peaks), "blocks": len(blocks),
            "measured_blocks": [blocks[i].name for i in picks], "per_block_s": per_iter}


def measure_distill(teacher: DiffusionModel, student: DiffusionModel, batch: int, steps: int, guidance: float,
                    meter: Meter, grad_checkpoint: bool, teacher_dtype: str | None, last: bool = True) -> dict:
    recipe = load_recipe("efficientdm")
    # LoRA goes onto a copy: the calibrated student stays as it is (the last batch size takes the student itself)
    den = student.denoiser if last else copy.deepcopy(student.denoiser)
    stu = DiffusionModel(den, student.schedule, student.sample_shape, student.conditioning, student.num_classes,
                         student.null_class, name=student.name, conditioner=teacher.conditioner)
    plan = plan_method(recipe.finetune, den, 0)
    if grad_checkpoint:
        checkpoint_blocks(den)
    cfg = DistillConfig(epochs=1, batch_size=batch, steps=steps, eta=0.0, guidance=guidance, seed=0,
                        teacher_dtype=teacher_dtype)
    opt, sched = make_optimizer(plan, steps)
    times: list[float] = []
    meter.reset()
    times.append(time.perf_counter())

    def tick(*_: Any) -> None:
        meter.sync()
        times.append(time.perf_counter())

    distill(teacher, stu, plan, cfg, opt, sched, 0, lambda *_: None, tick)
    out = {"s": _median_step(times), "peak_gib": meter.peak_gib(), "trainable": plan.info["trainable_parameters"]}
    del den, stu, opt, plan
    gc.collect()
    return out


def _slope(a: dict, b: dict, ba: int, bb: int) -> tuple[float, float]:
    """(seconds per sample, fixed seconds) from two batch sizes; one batch: no fixed part."""
    if ba == bb:
        return a["s"] / ba, 0.0
    per = max((b["s"] - a["s"]) / (bb - ba), 0.0)
    return per, max(a["s"] - per * ba, 0.0)


def project(name: str, res: dict) -> dict:
    """Per-sample seconds and the projected protocols (hours) from a model's measured steps."""
    batches = res["batches"]
    lo, hi = batches[0], batches[-1]
    traj, rng, dist = ({int(b): v for b, v in res[k].items()} for k in ("traj", "range", "distill"))
    recon, recon_batch = res["recon"], res["recon"]["batch"]
    p = PROTOCOLS[name]
    t_traj = _slope(traj[lo], traj[hi], lo, hi)
    t_rng = _slope(rng[lo], rng[hi], lo, hi)
    t_dist = _slope(dist[lo], dist[hi], lo, hi)

    def at(batch: int, slope: tuple[float, float]) -> float:
        return slope[0] * batch + slope[1]

    # recon iterations scale with rows: measured at recon_batch rows, the protocol's mini-batch is 32
    recon_iter_32 = recon["s"] * p["recon_batch"] / recon_batch
    calib_points = p["qdiff_samples"] * p["qdiff_steps"]
    traj_steps = p["qdiff_samples"] / 32 * p["qdiff_steps"]  # trajectories in batches of 32, every sampler step
    proj = {
        "qdiffusion_trajectories_h": traj_steps * at(32, t_traj) / 3600,
        "qdiffusion_ranges_h": calib_points / 32 * at(32, t_rng) / 3600,
        "qdiffusion_reconstruction_h": recon["blocks"] * p["recon_iters"] * recon_iter_32 / 3600,
        "efficientdm_h": p["efficientdm_epochs"] * p["efficientdm_steps"] * at(p["distill_batch"], t_dist) / 3600,
        "mpqdm_h": p["mpqdm_epochs"] * p["mpqdm_steps"] * at(p["distill_batch"], t_dist) / 3600,
    }
    return {"per_sample_s": {"traj": t_traj[0], "range": t_rng[0], "distill": t_dist[0]},
            "projection_h": proj, "protocol": p}


def run_model(name: str, args: argparse.Namespace) -> dict:
    quick = args.quick
    latent = (32 if name == "sd-v1-4" else None) if quick else None
    fp = build(name, latent)
    n_params = sum(p.numel() for p in fp.denoiser.parameters())
    fp.to(args.device).denoiser.eval().requires_grad_(False)
    guidance = 3.0 if name != "sd-v1-4" else 7.5
    recipe = load_recipe("efficientdm")
    student_den = copy.deepcopy(fp.denoiser)
    specs = build_layer_specs(student_den, recipe.quant.policy())
    quantize_denoiser(student_den, specs, timesteps=ddim_timesteps(1000, 20))
    student = DiffusionModel(student_den, fp.schedule, fp.sample_shape, fp.conditioning, fp.num_classes,
                             fp.null_class, name=name, conditioner=fp.conditioner)
    student.denoiser.to(args.device)
    init_weights(student, "minmax")
    meter = Meter(args.device)
    batches = args.batches or ([1] if quick else [2, 4])
    reps = args.steps
    print(f"{name}: {n_params / 1e6:.1f} M parameters, latent {fp.sample_shape}, {len(specs)} quantized layers, "
          f"batches {batches}", flush=True)
    res: dict[str, Any] = {"params_m": round(n_params / 1e6, 1), "latent": list(fp.sample_shape),
                           "quantized_layers": len(specs), "batches": batches}
    phases = args.phases
    lo, hi = batches[0], batches[-1]
    nan = {"s": float("nan"), "peak_gib": float("nan")}
    traj = rng = dist = dict.fromkeys(batches, nan)
    recon_batch = args.recon_batch or (8 if quick else 32)
    recon = {**nan, "blocks": 0, "measured_blocks": [], "per_block_s": []}
    if "traj" in phases:
        traj = {b: measure_traj(fp, b, reps, guidance, meter) for b in batches}
        print(f"  traj {[(b, round(v['s'], 3)) for b, v in traj.items()]}", flush=True)
    if "range" in phases:
        rng = {b: measure_range(student, b, reps, guidance, meter) for b in batches}
        print(f"  range {[(b, round(v['s'], 3)) for b, v in rng.items()]}", flush=True)
    if "recon" in phases:
        recon = measure_recon(student, fp, reps + 2, recon_batch, guidance, meter)
        print(f"  recon {recon['s']:.3f} s/iter at {recon_batch} rows over {recon['measured_blocks']}", flush=True)
    if "distill" in phases:
        dist = {b: measure_distill(fp, student, b, reps + 2, guidance, meter, args.grad_checkpoint,
                                   args.teacher_dtype, last=b == batches[-1]) for b in batches}
        print(f"  distill {[(b, round(v['s'], 3), round(v['peak_gib'], 2)) for b, v in dist.items()]}", flush=True)
    res["traj"] = {str(b): v for b, v in traj.items()}
    res["range"] = {str(b): v for b, v in rng.items()}
    res["recon"] = {**recon, "batch": recon_batch}
    res["distill"] = {str(b): v for b, v in dist.items()}
    res.update(project(name, res))
    del fp, student, student_den
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, ISA {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")


def _f(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # NaN: not measured


def print_table(results: dict, hw: str) -> str:
    lines = [f"Measured on {hw} (torch {torch.__version__}).", "",
             "| model | params | latent | b | traj s/step | range s/step | recon s/iter (rows) | distill s/step | "
             "peak GiB (range) | peak GiB (distill) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for b in r["batches"]:
            k = str(b)
            lines.append(f"| {name} | {r['params_m']:.0f} M | {'x'.join(map(str, r['latent']))} | {b} | "
                         f"{_f(r['traj'][k]['s'])} | {_f(r['range'][k]['s'])} | "
                         f"{_f(r['recon']['s'])} ({r['recon']['batch']}) | {_f(r['distill'][k]['s'])} | "
                         f"{_f(r['range'][k]['peak_gib'], 1)} | {_f(r['distill'][k]['peak_gib'], 1)} |")
    lines += ["", "Projected whole protocols on the same device (hours; from per-sample slopes, batch 32):", "",
              "| model | Q-Diffusion trajectories | ranges | reconstruction (blocks x 20k it) | "
              "EfficientDM 160 ep x 100 st | MPQ-DM 800 ep x 20 st |",
              "|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r["projection_h"]
        lines.append(f"| {name} | {_f(p['qdiffusion_trajectories_h'], 1)} | {_f(p['qdiffusion_ranges_h'], 1)} | "
                     f"{_f(p['qdiffusion_reconstruction_h'], 0)} ({r['recon']['blocks']} blocks) | "
                     f"{_f(p['efficientdm_h'], 0)} | {_f(p['mpqdm_h'], 0)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batches, SD at 256 px (latent 32), 8-row recon")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--models", default="ldm-4,sd-v1-4,dit-xl-2", help="comma-separated: ldm-4, sd-v1-4, dit-xl-2")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1 quick; 2,4 full)")
    ap.add_argument("--recon-batch", type=int, default=None, help="rows per reconstruction iteration (paper: 32)")
    ap.add_argument("--phases", default="traj,range,recon,distill", help="what to measure (comma-separated)")
    ap.add_argument("--grad-checkpoint", action="store_true", help="student activation checkpointing in distill")
    ap.add_argument("--teacher-dtype", choices=["bf16", "fp16"], default=None, help="teacher autocast in distill")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--update", default=None, help="a results JSON of an earlier run: replace the phases measured "
                                                   "now (same device and batches), recompute the projections")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/paper_scale[_quick].json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (2 if args.quick else 4)
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    args.phases = {p.strip() for p in args.phases.split(",")}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this PyTorch sees no CUDA device")
    hw = machine(args.device)
    results = {}
    if args.update:  # earlier measurements: this run replaces the phases it measures
        results = json.loads(Path(args.update).read_text())["results"]
    for name in args.models.split(","):
        name = name.strip()
        t0 = time.time()
        fresh = run_model(name, args)
        fresh["wall_s"] = round(time.time() - t0, 1)
        if name in results:
            keys = {"traj": "traj", "range": "range", "recon": "recon", "distill": "distill"}
            results[name].update({keys[ph]: fresh[keys[ph]] for ph in args.phases})
            results[name]["wall_s"] = results[name].get("wall_s", 0) + fresh["wall_s"]
            results[name].update(project(name, results[name]))
        else:
            results[name] = fresh
    table = print_table(results, hw)
    print(table)
    out = Path(args.out) if args.out else ROOT / "results" / f"paper_scale{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": hw, "device": args.device, "torch": torch.__version__, "quick": args.quick,
                               "steps": args.steps, "grad_checkpoint": args.grad_checkpoint,
                               "teacher_dtype": args.teacher_dtype, "phases": sorted(args.phases),
                               "results": results, "table": table},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
