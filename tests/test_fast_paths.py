"""Teacher fast paths (autocast, inference mode, compile, stacked, one drawn teacher) and the
module's epoch means, checked for correctness on CPU against plain computations."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning import DistillationLoss, DistillationModule, TeacherAgreementCallback
from kd_lightning.errors import TeacherOutputError
from kd_lightning.fusion import RandomTeacher
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.metrics.running_means import RunningMeans
from kd_lightning.teachers import TeacherEnsemble

from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp


def same_architecture(count: int = 3) -> dict[str, nn.Module]:
    return {f"t{k}": small_mlp(hidden=16) for k in range(count)}


def loop_logits(teachers: dict[str, nn.Module], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(x) for model in teachers.values()])


def test_autocast_runs_teachers_in_bfloat16_and_returns_float32():
    teachers = same_architecture()
    seen = []
    teachers["t0"][0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x = torch.randn(5, NUM_FEATURES)
    logits = TeacherEnsemble(teachers, autocast_dtype="bf16")(x)
    assert seen == [torch.bfloat16]
    assert logits.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the logits agree to about 1e-2 of their scale
    torch.testing.assert_close(logits, loop_logits(teachers, x), atol=3e-2, rtol=3e-2)


def test_autocast_dtype_is_checked():
    with pytest.raises(ValueError, match="autocast_dtype"):
        TeacherEnsemble(same_architecture(), autocast_dtype="int8")


def test_inference_mode_gives_ordinary_logits_usable_in_backward():
    teachers = same_architecture()
    modes = []
    teachers["t1"].register_forward_hook(
        lambda m, i, out: modes.append(torch.is_inference_mode_enabled())
    )
    ensemble = TeacherEnsemble(teachers, inference_mode=True)
    x = torch.randn(6, NUM_FEATURES)
    logits = ensemble(x)
    assert modes == [True] and not logits.is_inference()
    torch.testing.assert_close(logits, loop_logits(teachers, x))
    student = small_mlp()
    loss = DistillationLoss(alpha=1.0, aggregation="loss")(
        student(x), logits, torch.zeros(6, dtype=torch.long)
    )
    loss.loss.backward()  # the teachers' logits were saved for backward without complaint
    assert all(p.grad is not None for p in student.parameters())
    assert not ensemble.view("t0")(x).is_inference()


def test_stacked_forward_equals_the_loop_and_follows_new_weights():
    teachers = same_architecture()
    ensemble = TeacherEnsemble(teachers, stacked=True)
    x = torch.randn(7, NUM_FEATURES)
    torch.testing.assert_close(ensemble(x), loop_logits(teachers, x))
    with torch.no_grad():
        teachers["t2"][0].weight.mul_(3.0)  # e.g. load_state_dict after construction
    torch.testing.assert_close(ensemble(x), loop_logits(teachers, x))
    torch.testing.assert_close(ensemble(x, only=[2, 0]), loop_logits(teachers, x)[[2, 0]])


def test_stacked_forward_refuses_mixed_architectures_and_transforms():
    with pytest.raises(ValueError, match="one architecture: 'b'"):
        TeacherEnsemble({"a": small_mlp(hidden=16), "b": small_mlp(hidden=8)}, stacked=True)
    with pytest.raises(ValueError, match="input_transforms"):
        TeacherEnsemble(same_architecture(), input_transforms={"t0": lambda x: -x}, stacked=True)


@pytest.mark.slow
def test_compiled_teachers_give_the_same_logits_and_state_dict():
    teachers = same_architecture(2)
    plain = TeacherEnsemble(teachers)
    compiled = TeacherEnsemble(teachers, compile_teachers=True)
    x = torch.randn(4, NUM_FEATURES)
    try:
        logits = compiled(x)
    except Exception as error:  # no working compiler toolchain on this machine
        pytest.skip(f"torch.compile unavailable: {error}")
    torch.testing.assert_close(logits, plain(x))
    assert compiled.state_dict().keys() == plain.state_dict().keys()


def test_only_runs_the_named_teachers_and_one_check_names_a_nan_teacher():
    teachers = same_architecture()
    calls = {name: 0 for name in teachers}
    for name, model in teachers.items():
        model.register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    ensemble = TeacherEnsemble(teachers)
    x = torch.randn(3, NUM_FEATURES)
    torch.testing.assert_close(ensemble(x, only=[1]), loop_logits(teachers, x)[1:2])
    assert calls == {"t0": 1, "t1": 2, "t2": 1}  # loop_logits ran each once
    with torch.no_grad():
        teachers["t2"][2].bias.fill_(float("nan"))
    with pytest.raises(TeacherOutputError, match="'t2' produced NaN"):
        ensemble(x)
    with pytest.raises(IndexError, match="3 teachers"):
        ensemble(x, only=[3])


def test_drawn_teacher_alone_gives_the_default_random_teacher_loss():
    teachers = same_architecture()
    ensemble = TeacherEnsemble(teachers)
    x, y = torch.randn(8, NUM_FEATURES), torch.randint(0, NUM_CLASSES, (8,))
    student_logits = torch.randn(8, NUM_CLASSES)
    for seed in range(4):
        torch.manual_seed(seed)
        full = DistillationLoss(RandomTeacher(), alpha=0.5)(student_logits, ensemble(x), y)
        torch.manual_seed(seed)
        rule = RandomTeacher(run_drawn_only=True)
        [drawn] = rule.teachers_to_run(len(ensemble))
        alone = DistillationLoss(rule, alpha=0.5)(student_logits, ensemble(x, only=[drawn]), y)
        assert full.weights[0].argmax().item() == drawn
        torch.testing.assert_close(alone.loss, full.loss)


def test_module_runs_only_the_drawn_teacher_in_training(tmp_path, datamodule):
    teachers = same_architecture()
    batches: dict[str, int] = {name: 0 for name in teachers}
    for name, model in teachers.items():
        model.register_forward_hook(
            lambda m, i, o, name=name: batches.__setitem__(name, batches[name] + 1)
        )
    loss = DistillationLoss(RandomTeacher(run_drawn_only=True), alpha=0.5)
    module = DistillationModule(small_mlp(), teachers, loss)
    trainer = make_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[TeacherAgreementCallback()],
    )
    trainer.fit(module, datamodule=datamodule)
    assert sum(batches.values()) == 3 + 3 * 2  # one teacher per training step, all in validation
    assert "val/agreement/student_vs_t0" in trainer.callback_metrics
    assert "train/agreement/student_vs_t0" not in trainer.callback_metrics
    with pytest.raises(ValueError, match="run_drawn_only"):
        DistillationModule(small_mlp(), teachers, loss, hints=FeatureHintLoss("0", {"t0": "0"}))
    with pytest.raises(ValueError, match="stacked=False"):
        DistillationModule(
            small_mlp(),
            TeacherEnsemble(same_architecture(), stacked=True),
            hints=FeatureHintLoss("0", {"t0": "0"}),
        )


def test_feature_hints_train_with_teachers_in_inference_mode(tmp_path, datamodule):
    ensemble = TeacherEnsemble(same_architecture(), inference_mode=True, autocast_dtype="bf16")
    hints = FeatureHintLoss("0", {"t0": "0", "t1": "0", "t2": "0"})
    module = DistillationModule(small_mlp(), ensemble, hints=hints)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    datamodule.setup("fit")
    module.materialize_hints(next(iter(datamodule.train_dataloader())))
    before = [p.detach().clone() for p in hints.parameters()]
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/hint"])
    assert all(not torch.equal(b, p) for b, p in zip(before, hints.parameters(), strict=True))


def test_epoch_means_weigh_batches_by_size_like_a_plain_loop(tmp_path, teachers, datamodule):
    """val/loss, ce, kd and acc over batches of 32 and 13 samples, recomputed by hand."""
    loss = DistillationLoss("mean_probs", alpha=0.3, temperature=2.0)
    module = DistillationModule(small_mlp(), teachers, loss, partial(torch.optim.SGD, lr=0.0))
    datamodule.setup("validate")
    subset = torch.utils.data.Subset(datamodule.val_set, range(45))
    loader = torch.utils.data.DataLoader(subset, batch_size=32)
    trainer = make_trainer(tmp_path)
    metrics = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    x = torch.stack([subset[i][0] for i in range(45)])
    y = torch.stack([torch.as_tensor(subset[i][1]) for i in range(45)])
    with torch.no_grad():
        s = module.student(x)
        t = loop_logits(teachers, x)
    p_mean = F.softmax(t / 2.0, -1).mean(0)
    kd_rows = 4.0 * (p_mean * (p_mean.log() - F.log_softmax(s / 2.0, -1))).sum(-1)
    ce_rows = F.cross_entropy(s, y, reduction="none")
    # per-batch means, weighted by batch size = the mean over samples
    assert metrics["val/ce"] == pytest.approx(ce_rows.mean().item(), rel=1e-5)
    assert metrics["val/kd"] == pytest.approx(kd_rows.mean().item(), rel=1e-5)
    expected = (0.7 * ce_rows + 0.3 * kd_rows).mean().item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/acc"] == pytest.approx((s.argmax(-1) == y).float().mean().item())


def test_running_means_reduce_sums_before_dividing():
    means = RunningMeans(["a", "b"])
    means.update([torch.tensor(1.0), torch.tensor(0.5)], [2.0, torch.tensor(4)])
    twice = means.compute(reduce=lambda totals: totals * 2)  # two identical processes
    assert twice["a"].item() == 1.0 and twice["b"].item() == 0.5
    means.update([torch.tensor(4.0), torch.tensor(1.0)], [1.0, 0.0])
    assert means.compute()["a"].item() == pytest.approx(2.0)
    assert means.compute()["b"].item() == 0.5
    means.reset()
    assert means.compute() == {}
    with pytest.raises(ValueError, match="distinct"):
        RunningMeans(["a", "a"])


def test_gpu_accelerators_run_teachers_in_bf16_inference_mode(tmp_path):
    from kd_lightning.cli.teacher_checkpoints import build_teachers

    from .app_helpers import FAST, compose_config

    for accelerator in ("gpu", "ddp"):
        cfg = compose_config(tmp_path, [*FAST, f"accelerator={accelerator}"])
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.teacher_runtime.autocast_dtype == "bf16" and cfg.teacher_runtime.inference_mode
    cfg = compose_config(tmp_path, FAST)
    assert cfg.teacher_runtime.autocast_dtype is None and not cfg.teacher_runtime.inference_mode
    options = {k: v for k, v in cfg.teacher_runtime.items() if k != "shard_across_ranks"}
    ensemble = TeacherEnsemble(same_architecture(), **options)
    assert ensemble.autocast_dtype is None and not ensemble.stacked
    cfg = compose_config(tmp_path, [*FAST, "+teacher_runtime.fastest=true"])
    with pytest.raises(ValueError, match=r"teacher_runtime keys \['fastest'\]"):
        build_teachers(cfg, datamodule=None)
    cfg = compose_config(tmp_path, [*FAST, "teacher_runtime.autocast_dtype=int8"])
    with pytest.raises(ValueError, match=r"teacher_runtime\.autocast_dtype"):
        build_teachers(cfg, datamodule=None)
