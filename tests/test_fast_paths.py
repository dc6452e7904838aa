"""Teacher fast paths (autocast, inference mode, compile, stacked, teachers drawn per step) and the
module's epoch means, checked for correctness on CPU against plain computations."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning import DistillationLoss, DistillationModule, TeacherAgreementCallback
from kd_lightning.errors import TeacherOutputError
from kd_lightning.fusion import StaticWeights
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.metrics.running_means import RunningMeans
from kd_lightning.teachers import DrawnTeachers, TeacherEnsemble, TeacherSource

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


def test_check_finite_checks_each_teacher_first_by_default_or_always_or_never(monkeypatch):
    from kd_lightning.teachers import ensemble as ensemble_module
    from kd_lightning.teachers.runtime import check_finite_logits

    reads: list[list[str]] = []

    def counted(names, logits):
        reads.append(list(names))
        check_finite_logits(names, logits)

    monkeypatch.setattr(ensemble_module, "check_finite_logits", counted)
    teachers = same_architecture()
    x = torch.randn(3, NUM_FEATURES)
    first = TeacherEnsemble(teachers)  # check_finite="first_step"
    first(x, only=[1])
    first(x)
    first(x)
    # t0 and t2 first ran in the second forward: checked there, with t1 (one reduction), then
    # never again.
    assert reads == [["t1"], ["t0", "t1", "t2"]]
    always = TeacherEnsemble(teachers, check_finite="always")
    reads.clear()
    always(x)
    always(x)
    assert reads == [["t0", "t1", "t2"]] * 2

    with torch.no_grad():
        teachers["t1"][2].bias.fill_(float("nan"))
    with pytest.raises(TeacherOutputError, match="'t1' produced NaN"):
        TeacherEnsemble(teachers)(x)  # a broken teacher fails at its first step
    with pytest.raises(TeacherOutputError, match="'t1' produced NaN"):
        TeacherEnsemble(teachers).view("t1")(x)
    with pytest.raises(TeacherOutputError, match="'t1' produced NaN"):
        always(x)
    assert first(x)[1].isnan().all()  # found finite once: not read again
    reads.clear()
    never = TeacherEnsemble(teachers, check_finite="never")
    assert never(x)[1].isnan().all() and never.view("t1")(x).isnan().all()
    assert reads == [] and never.select(["t0"]).check_finite == "never"
    with pytest.raises(ValueError, match=r"teacher_runtime\.check_finite in kd-train\) must be"):
        TeacherEnsemble(teachers, check_finite=True)  # type: ignore[arg-type]


def test_drawn_teacher_alone_gives_that_teachers_loss_under_any_fusion_rule():
    ensemble = TeacherEnsemble(same_architecture())
    drawn = DrawnTeachers(ensemble, per_step=1)
    x, y = torch.randn(8, NUM_FEATURES), torch.randint(0, NUM_CLASSES, (8,))
    student_logits = torch.randn(8, NUM_CLASSES)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        outputs = drawn.outputs(x, batch=None, stage="train")
        torch.manual_seed(seed)
        assert drawn.outputs(x, batch=None, stage="train").ran == outputs.ran  # seeded draws
        [k] = outputs.ran
        seen.add(k)
        one_hot = StaticWeights([float(k == j) for j in range(len(ensemble))])
        alone = DistillationLoss(one_hot, alpha=0.5)(student_logits, ensemble(x), y)
        for rule in ("mean_probs", "random", "confidence"):
            fused = DistillationLoss(rule, alpha=0.5)(student_logits, outputs.logits, y)
            torch.testing.assert_close(fused.loss, alone.loss)
            assert fused.weights.shape == (8, 1)
    assert seen == {0, 1, 2}


def test_drawn_teachers_draw_per_step_without_repeats_and_run_all_outside_training():
    ensemble = TeacherEnsemble(same_architecture(4))
    drawn = DrawnTeachers(ensemble, per_step=2)
    x = torch.randn(3, NUM_FEATURES)
    for _ in range(5):
        outputs = drawn.outputs(x, batch=None, stage="train")
        assert len(set(outputs.ran)) == 2 and list(outputs.ran) == sorted(outputs.ran)
        torch.testing.assert_close(outputs.logits, ensemble(x)[list(outputs.ran)])
    for stage in ("val", "test"):
        everyone = drawn.outputs(x, batch=None, stage=stage)
        assert everyone.ran == (0, 1, 2, 3)
        torch.testing.assert_close(everyone.logits, ensemble(x))
    assert isinstance(drawn, TeacherSource) and drawn.names == ensemble.names
    assert drawn.networks()["t1"] is ensemble.teachers["t1"]
    for per_step in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="per_step must be an integer from 1 to"):
            DrawnTeachers(ensemble, per_step=per_step)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need every teacher at every step"):
        drawn.tap({"t0": "0"})
    with pytest.raises(ValueError, match="draw teachers or shard them, not both"):
        drawn.shard(0, 1)


class RecordDraws(L.Callback):
    """The teacher indices of every training step's outputs."""

    def __init__(self) -> None:
        self.draws: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert outputs["teacher_logits"].shape[0] == len(outputs["teacher_indices"])
        assert outputs["fusion_weights"].shape[-1] == len(outputs["teacher_indices"])
        self.draws.append(outputs["teacher_indices"].tolist())


def test_module_runs_only_the_drawn_teacher_in_training_and_logs_its_agreement(
    tmp_path, datamodule
):
    teachers = same_architecture()
    batches: dict[str, int] = {name: 0 for name in teachers}
    for name, model in teachers.items():
        model.register_forward_hook(
            lambda m, i, o, name=name: batches.__setitem__(name, batches[name] + 1)
        )
    drawn = DrawnTeachers(TeacherEnsemble(teachers), per_step=1)

    def fit(seed: int) -> tuple[L.Trainer, list[list[int]]]:
        L.seed_everything(seed, verbose=False)
        module = DistillationModule(small_mlp(), drawn, DistillationLoss(alpha=0.5))
        record = RecordDraws()
        trainer = make_trainer(
            tmp_path,
            max_epochs=1,
            limit_val_batches=2,
            num_sanity_val_steps=0,
            callbacks=[TeacherAgreementCallback(), record],
        )
        trainer.fit(module, datamodule=datamodule)
        return trainer, record.draws

    trainer, draws = fit(0)
    assert len(draws) == len(datamodule.train_dataloader()) and all(len(d) == 1 for d in draws)
    assert sum(batches.values()) == len(draws) + 3 * 2  # one teacher per training step, all in val
    assert fit(0)[1] == draws  # seeded runs draw the same teachers
    metrics = trainer.callback_metrics
    names = list(teachers)
    for index, name in enumerate(names):
        assert (f"train/agreement/student_vs_{name}" in metrics) == ([index] in draws)
        assert f"val/agreement/student_vs_{name}" in metrics
    assert "train/ensemble/accuracy" not in metrics  # never did every teacher run
    assert "val/ensemble/accuracy" in metrics and "val/agreement/t0_vs_t2" in metrics
    hints = FeatureHintLoss("0", dict.fromkeys(teachers, "0"))
    with pytest.raises(ValueError, match="need every teacher at every step"):
        DistillationModule(small_mlp(), drawn, hints=hints)
    with pytest.raises(ValueError, match="stacked=False"):
        DistillationModule(
            small_mlp(), TeacherEnsemble(same_architecture(), stacked=True), hints=hints
        )


def test_teacher_source_of_a_config_draws_when_asked(tmp_path):
    from kd_lightning.cli.logit_cache import check_cacheable
    from kd_lightning.cli.teacher_checkpoints import build_teachers, teacher_source

    from .app_helpers import FAST, compose_config

    ensemble = TeacherEnsemble(same_architecture())
    cfg = compose_config(tmp_path, FAST)
    assert cfg.teacher_runtime.draw_per_step is None
    assert teacher_source(cfg, ensemble) is ensemble
    cfg = compose_config(tmp_path, [*FAST, "teacher_runtime.draw_per_step=1"])
    source = teacher_source(cfg, ensemble)
    assert isinstance(source, DrawnTeachers) and source.ensemble is ensemble
    assert source.per_step == 1
    with pytest.raises(ValueError, match=r"cache=true with teacher_runtime\.draw_per_step=1"):
        check_cacheable(
            compose_config(tmp_path, [*FAST, "cache=true", "teacher_runtime.draw_per_step=1"])
        )
    cfg = compose_config(tmp_path, [*FAST, "teacher_runtime.draw_per_step=9"])
    with pytest.raises(ValueError, match=r"draw_per_step=9: must be null or an integer from 1"):
        build_teachers(cfg, datamodule=None)  # before any teacher is trained


def test_feature_hints_train_with_teachers_in_inference_mode(tmp_path, datamodule):
    ensemble = TeacherEnsemble(same_architecture(), inference_mode=True, autocast_dtype="bf16")
    hints = FeatureHintLoss("0", {"t0": "0", "t1": "0", "t2": "0"})
    module = DistillationModule(small_mlp(), ensemble, hints=hints)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    datamodule.setup("fit")
    module.materialize(next(iter(datamodule.train_dataloader())))
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
    from kd_lightning.cli.teacher_checkpoints import STEP_OPTIONS, build_teachers

    from .app_helpers import FAST, compose_config

    for accelerator in ("gpu", "ddp"):
        cfg = compose_config(tmp_path, [*FAST, f"accelerator={accelerator}"])
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.teacher_runtime.autocast_dtype == "bf16" and cfg.teacher_runtime.inference_mode
    cfg = compose_config(tmp_path, FAST)
    assert cfg.teacher_runtime.autocast_dtype is None and not cfg.teacher_runtime.inference_mode
    options = {k: v for k, v in cfg.teacher_runtime.items() if k not in STEP_OPTIONS}
    ensemble = TeacherEnsemble(same_architecture(), **options)
    assert ensemble.autocast_dtype is None and not ensemble.stacked
    cfg = compose_config(tmp_path, [*FAST, "+teacher_runtime.fastest=true"])
    with pytest.raises(ValueError, match=r"teacher_runtime keys \['fastest'\]"):
        build_teachers(cfg, datamodule=None)
    cfg = compose_config(tmp_path, [*FAST, "teacher_runtime.autocast_dtype=int8"])
    with pytest.raises(ValueError, match=r"teacher_runtime\.autocast_dtype"):
        build_teachers(cfg, datamodule=None)
