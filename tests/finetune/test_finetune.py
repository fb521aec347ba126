"""The distillation loop and its methods on tiny-random: losses, trainable sets, resume equality."""

import pytest
import torch

from lowbitdm_cli.errors import NonFiniteError, RecipeError
from lowbitdm_cli.finetune.losses import relation_kl
from lowbitdm_cli.finetune.methods import QUEST_ROLES
from lowbitdm_cli.quant.layers import quant_layers
from lowbitdm_cli.recipes import load_recipe
from lowbitdm_cli.stages.calibrate import calibrate
from lowbitdm_cli.stages.common import load_quantized_from
from lowbitdm_cli.stages.finetune import finetune

TINY = ["calibrate.num_samples=4", "calibrate.batch_size=2", "sample.steps=4", "quant.a_temporal=true",
        "finetune.epochs=2", "finetune.batch_size=2", "finetune.lora_rank=2"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    recipe = load_recipe("ptq", model="tiny-random", bits="w4a4", sets=TINY)
    return calibrate(recipe, tmp_path_factory.mktemp("ft") / "calibrate")


def _recipe(method, *extra):
    return load_recipe("ptq", model="tiny-random", bits="w4a4", sets=TINY + list(extra), finetune_method=method)


def test_trd_zero_for_identical_features_and_gradient_reaches_student():
    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 4, 4)
    assert relation_kl(teacher.clone(), teacher).item() == 0.0  # the same ops on the same values: log p − log q = 0
    student = (teacher + 0.3 * torch.randn_like(teacher)).requires_grad_(True)
    loss = relation_kl(student, teacher)
    loss.backward()
    assert loss.item() > 0 and student.grad is not None and student.grad.abs().sum() > 0


def test_micro_batches_keep_the_batch_losses_and_lsq_scale():
    """finetune sums micro-batch gradients of (loss_k x rows_k / batch): that is the batch's gradient
    when every loss is a mean over rows and LSQ's gradient scale counts the whole batch's elements
    (`lsq_batch_factor`). In float64 the two sides differ by rounding only: a few hundred
    operations per value at 2^-53 each keep them within 1e-12 relative (the halves' raw LSQ
    scale, without the factor, is off by sqrt(2))."""
    from lowbitdm_cli.quant.quantizer import UniformQuantizer

    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(4, 8, 4, 4, generator=gen, dtype=torch.float64), torch.randn(4, 8, 4, 4, generator=gen,
                                                                                  dtype=torch.float64)
    halves = 0.5 * relation_kl(s[:2], t[:2]) + 0.5 * relation_kl(s[2:], t[2:])
    assert relation_kl(s, t).item() == pytest.approx(halves.item(), rel=1e-12)

    x = torch.randn(4, 16, generator=gen, dtype=torch.float64) * 3

    def delta_grad(rows: slice, factor: int) -> torch.Tensor:
        q = UniformQuantizer(4, lsq_grad_scale=True).double().train()
        q.delta.data.fill_(0.37)
        q.lsq_batch_factor = factor
        (q(x[rows]).pow(2).mean() * (x[rows].shape[0] / 4)).backward()
        return q.delta.grad

    full = delta_grad(slice(0, 4), 1)
    assert torch.allclose(delta_grad(slice(0, 2), 2) + delta_grad(slice(2, 4), 2), full, rtol=1e-12, atol=0)
    assert not torch.allclose(delta_grad(slice(0, 2), 1) + delta_grad(slice(2, 4), 1), full, rtol=1e-3, atol=0)


def test_quest_trains_only_selected_layers(calibrated, tmp_path):
    art = finetune(calibrated, _recipe("quest"), tmp_path / "ft")
    assert 0 < art.manifest.info["trainable_fraction"] < 0.5
    state = art.tensors("quant_state.safetensors")
    calib = calibrated.manifest.info["layers"]
    changed = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")}
    assert changed, "QuEST changed no weight"
    assert all(calib[name]["role"] in QUEST_ROLES for name in changed)
    # weight quantizer parameters stay frozen
    before = calibrated.tensors("quant_state.safetensors")
    for key in (k for k in state if ".w_quant." in k):
        torch.testing.assert_close(state[key], before[key])


def test_qat_changes_every_quantized_weight(calibrated, tmp_path):
    art = finetune(calibrated, _recipe("qat", "finetune.lr=1e-3"), tmp_path / "ft")
    state = art.tensors("quant_state.safetensors")
    changed = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight")}
    assert changed == set(calibrated.manifest.info["layers"])


def test_qalora_adds_lora_and_reloads(calibrated, tmp_path):
    art = finetune(calibrated, _recipe("qalora", 'finetune.loss="trd"'), tmp_path / "ft")
    state = art.tensors("quant_state.safetensors")
    assert any(k.endswith("lora_B") for k in state)
    model = load_quantized_from(art)
    layer = next(iter(quant_layers(model.denoiser).values()))
    assert layer.lora_A is not None
    assert len(art.manifest.info["loss_history"]) == 2


def test_trd_window_is_the_smoothing_length(calibrated, tmp_path):
    """Window 1 (no smoothing), 2 (MPQ-DM) and 3 train on different targets; 0 is refused."""
    histories = [tuple(finetune(calibrated, _recipe("qalora", 'finetune.loss="trd"', f"finetune.trd_window={w}"),
                                tmp_path / f"w{w}").manifest.info["loss_history"]) for w in (1, 2, 3)]
    assert len(set(histories)) == 3
    with pytest.raises(RecipeError, match="trd_window"):
        _recipe("qalora", "finetune.trd_window=0")


class _StopAfter:
    def __init__(self, n):
        self.n = n

    def __call__(self, desc, advance, total):
        self.n -= advance
        if self.n < 0:
            raise KeyboardInterrupt


def test_resume_reaches_the_same_weights(calibrated, tmp_path):
    recipe = _recipe("qalora", "finetune.epochs=3")
    full = finetune(calibrated, recipe, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        finetune(calibrated, recipe, tmp_path / "b", progress=_StopAfter(6))  # dies inside epoch 2
    assert (tmp_path / "b.partial" / "checkpoint.safetensors").exists()
    resumed = finetune(calibrated, recipe, tmp_path / "b", resume=True)
    assert resumed.manifest.files["quant_state.safetensors"].sha256 == \
        full.manifest.files["quant_state.safetensors"].sha256


def test_nonfinite_loss_stops_with_a_clear_error(calibrated, tmp_path):
    with pytest.raises(NonFiniteError, match="lower the learning rate"):
        finetune(calibrated, _recipe("qat", "finetune.lr=1e30", "finetune.grad_clip=0"), tmp_path / "ft")


def test_loss_curve_recorded_per_step(calibrated, tmp_path):
    art = finetune(calibrated, _recipe("qalora"), tmp_path / "ft")
    curve = art.tensors("loss_curve.safetensors")["step_loss"]
    assert curve.shape == (2 * 4,)  # epochs x teacher steps
    history = art.manifest.info["loss_history"]
    assert history[0] == sum(curve[:4].tolist()) / 4  # the stage's own float64 arithmetic on the stored losses


def test_calibrate_records_per_layer_output_error(calibrated):
    errors = calibrated.manifest.info["layer_output_error"]
    assert set(errors) == set(calibrated.manifest.info["layers"])
    assert all(e >= 0 for e in errors.values())
    # 8-bit layers (conv_in, conv_out) have far smaller error than the 4-bit ones on average
    layers = calibrated.manifest.info["layers"]
    low = [errors[n] for n, s in layers.items() if s["w_bits"] == 4]
    assert errors["conv_in"] < sum(low) / len(low)


@pytest.mark.parametrize("trajectory", ["teacher", "student"])
def test_trajectory_moves_x_with_the_chosen_prediction(calibrated, trajectory):
    """Each step's x_t is the previous x_t moved by DDIM with the teacher's ε (EfficientDM) or the
    student's own ε (trajectory = "student"); the teacher always sees the student's x_t."""
    from lowbitdm_cli.finetune.loop import DistillConfig, distill, make_optimizer
    from lowbitdm_cli.finetune.methods import plan_method
    from lowbitdm_cli.sampling import ddim_step, ddim_timesteps
    from lowbitdm_cli.stages.common import load_fp_model

    recipe = _recipe("qalora", f'finetune.trajectory="{trajectory}"', "finetune.epochs=1")
    teacher = load_fp_model("tiny-random", recipe)
    student = load_quantized_from(calibrated).with_conditioner(teacher.conditioner)
    plan = plan_method(recipe.finetune, student.denoiser, 0)
    seen = {"teacher": [], "student": []}

    def record(model, who):
        eps = model.eps

        def wrapped(x, t, cond, guidance):
            out = eps(x, t, cond, guidance)
            seen[who].append((x.detach().clone(), t, out.detach().float().clone()))
            return out
        model.eps = wrapped

    record(teacher, "teacher")
    record(student, "student")
    cfg = DistillConfig(epochs=1, batch_size=2, steps=4, eta=0.0, guidance=1.0, seed=0, trajectory=trajectory)
    opt, sched = make_optimizer(plan, 4)
    distill(teacher, student, plan, cfg, opt, sched, 0, lambda *_: None)
    ts = ddim_timesteps(teacher.schedule.num_train_timesteps, 4)
    assert len(seen["teacher"]) == len(seen["student"]) == 4
    for k in range(3):
        x, _t, eps_t = seen["teacher"][k]
        assert torch.equal(seen["student"][k][0], x)  # both see the same x_t
        eps_move = eps_t if trajectory == "teacher" else seen["student"][k][2]
        expected = ddim_step(teacher.schedule, x, eps_move, ts[k], ts[k + 1], 0.0, None)
        assert torch.equal(seen["teacher"][k + 1][0], expected)  # the same step on the same tensors
    student_moved = ddim_step(teacher.schedule, seen["teacher"][0][0], seen["student"][0][2], ts[0], ts[1], 0.0, None)
    assert (trajectory == "student") == torch.equal(seen["teacher"][1][0], student_moved)
