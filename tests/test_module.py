"""DistillationModule with a real Lightning Trainer: training, checkpoints, logging, bad input."""

from __future__ import annotations

import copy
import csv
from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from kd_lightning import (
    BatchAdapter,
    DistillationLoss,
    DistillationModule,
    TeacherAgreementCallback,
)
from kd_lightning.errors import BatchFormatError, TeacherOutputError
from kd_lightning.functional import per_teacher_accuracy, student_teacher_agreement
from kd_lightning.fusion import LearnedGate, LearnedWeights
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.teachers import TeacherOutputs, TeacherSource

from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp


def read_csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_fit_trains_the_student_and_leaves_teachers_untouched(tmp_path, teachers, datamodule):
    before = {name: copy.deepcopy(model.state_dict()) for name, model in teachers.items()}
    module = DistillationModule(small_mlp(), teachers, optimizer=partial(torch.optim.Adam, lr=1e-2))
    student_before = copy.deepcopy(module.student.state_dict())
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=datamodule)
    for name, model in module.teachers.teachers.items():
        assert not model.training
        assert all(p.grad is None for p in model.parameters())
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[name][key]), f"teacher {name} changed {key}"
    assert any(
        not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items()
    )
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}
    for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/kd", "val/ce"):
        assert key in trainer.callback_metrics


def test_learnable_fusion_weights_are_optimised_and_checkpointed(tmp_path, teachers, datamodule):
    loss = DistillationLoss(LearnedWeights(num_teachers=3), alpha=1.0)
    module = DistillationModule(
        small_mlp(), teachers, loss, optimizer=partial(torch.optim.SGD, lr=1.0)
    )
    initial = next(loss.parameters()).detach().clone()
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=datamodule)
    assert not torch.equal(initial, next(loss.parameters()))
    trainer.save_checkpoint(tmp_path / "with_loss.ckpt")
    state = torch.load(tmp_path / "with_loss.ckpt", weights_only=True)["state_dict"]
    assert any(key.startswith("loss.fusion.") for key in state)


def test_checkpoints_hold_no_teacher_weights_and_load_back(tmp_path, teachers, datamodule):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = DistillationModule(small_mlp(), teachers)
    trainer = make_trainer(
        tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]
    )
    trainer.fit(module, datamodule=datamodule)
    path = checkpoint.last_model_path
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teachers.") for key in state)
    fresh_teachers = {name: copy.deepcopy(model) for name, model in teachers.items()}
    restored = DistillationModule.load_from_checkpoint(
        path, student=small_mlp(), teachers=fresh_teachers
    )
    x = torch.randn(5, NUM_FEATURES)
    torch.testing.assert_close(restored(x), module.cpu()(x))
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(
        restored, datamodule=datamodule, ckpt_path=path
    )  # resuming works without teacher keys
    assert trainer.current_epoch == 2


def test_save_teachers_opts_in(tmp_path, teachers, datamodule):
    module = DistillationModule(small_mlp(), teachers, save_teachers=True)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "all.ckpt")
    state = torch.load(tmp_path / "all.ckpt", weights_only=True)["state_dict"]
    assert {key for key in state if key.startswith("teachers.")} == {
        f"teachers.{key}" for key in module.teachers.state_dict()
    }


def test_dict_batches_through_the_adapter(tmp_path, teachers):
    from kd_lightning.data import SyntheticDataModule

    datamodule = SyntheticDataModule(
        num_samples=128, in_features=NUM_FEATURES, num_classes=NUM_CLASSES, as_dict=True
    )
    module = DistillationModule(
        small_mlp(), teachers, batch_adapter=BatchAdapter("input", "target")
    )
    make_trainer(tmp_path, max_epochs=1).fit(module, datamodule=datamodule)
    wrong = DistillationModule(small_mlp(), teachers, batch_adapter=BatchAdapter("x", "y"))
    with pytest.raises(
        BatchFormatError, match=r"batch dict has keys \['input', 'target'\] but no \['x', 'y'\]"
    ):
        make_trainer(tmp_path, max_epochs=1).fit(wrong, datamodule=datamodule)


def test_scheduler_receives_total_steps(tmp_path, teachers, datamodule):
    seen = {}

    def cosine(optimizer, total_steps: int):
        seen["total_steps"] = total_steps
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    module = DistillationModule(small_mlp(), teachers, scheduler=cosine)
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=datamodule)
    assert (
        seen["total_steps"]
        == trainer.estimated_stepping_batches
        == 2 * len(datamodule.train_dataloader())
    )
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_student_teacher_class_mismatch_names_the_teachers(tmp_path, teachers, datamodule):
    module = DistillationModule(small_mlp(num_classes=NUM_CLASSES + 1), teachers)
    with pytest.raises(
        ValueError, match=r"outputs 5 classes but the teachers \['a', 'b', 'c'\] output 4"
    ):
        make_trainer(tmp_path).fit(module, datamodule=datamodule)


def test_labels_out_of_range_are_refused(tmp_path, teachers):
    from kd_lightning.data import SyntheticDataModule

    datamodule = SyntheticDataModule(
        num_samples=64, in_features=NUM_FEATURES, num_classes=NUM_CLASSES + 2
    )
    student_and_teachers_agree = DistillationModule(small_mlp(), teachers)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        make_trainer(tmp_path).fit(student_and_teachers_agree, datamodule=datamodule)


def test_nan_teacher_is_named(tmp_path, teachers, datamodule):
    with torch.no_grad():
        teachers["b"][0].weight[0, 0] = float("nan")
    with pytest.raises(TeacherOutputError, match="teacher 'b' produced NaN or inf"):
        make_trainer(tmp_path).fit(DistillationModule(small_mlp(), teachers), datamodule=datamodule)


def test_unpackable_batch_is_refused():
    module = DistillationModule(small_mlp(), {"a": small_mlp()})
    with pytest.raises(BatchFormatError, match="cannot unpack a batch of type Tensor"):
        module.training_step(torch.randn(4, NUM_FEATURES), 0)


def test_agreement_callback_logs_exact_values_to_a_lightning_logger(tmp_path, teachers, datamodule):
    logger = CSVLogger(tmp_path, name="csv")
    module = DistillationModule(small_mlp(), teachers, optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = make_trainer(
        tmp_path, max_epochs=2, logger=logger, callbacks=[TeacherAgreementCallback()]
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    rows = read_csv_metrics(logger)
    test_row = next(row for row in rows if row.get("test/agreement/student_vs_a"))
    x, y = map(torch.cat, zip(*datamodule.test_dataloader(), strict=True))
    with torch.no_grad():
        student, teacher_logits = module(x), module.teachers(x)
    agreement = student_teacher_agreement(student, teacher_logits)
    accuracy = per_teacher_accuracy(teacher_logits, y)
    for index, name in enumerate("abc"):
        assert float(test_row[f"test/agreement/student_vs_{name}"]) == pytest.approx(
            agreement[index].item()
        )
        assert float(test_row[f"test/teacher_acc/{name}"]) == pytest.approx(accuracy[index].item())
        assert float(test_row[f"test/fusion_weight/{name}"]) == pytest.approx(1 / 3)
    assert "test/agreement/a_vs_c" in test_row and "test/ensemble/jsd" in test_row
    val_epochs = [row for row in rows if row.get("val/agreement/student_vs_a")]
    train_epochs = [row for row in rows if row.get("train/agreement/b_vs_c")]
    assert len(val_epochs) == 2 and len(train_epochs) == 2
    assert 0.0 <= float(val_epochs[-1]["val/ensemble/disagreement"]) <= 1.0


def test_agreement_callback_needs_teachers(tmp_path, datamodule):
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[TeacherAgreementCallback()])
    with pytest.raises(TypeError, match="BoringModel has no `teacher_names`"):
        trainer.fit(BoringModel())


class FirstAndLast:
    """A user's own teacher source (neither a TeacherEnsemble nor an nn.Module): the first and
    last teachers in training steps, every teacher otherwise."""

    def __init__(self, teachers: dict[str, torch.nn.Module]) -> None:
        self.models = teachers

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def outputs(self, inputs, batch, stage) -> TeacherOutputs:
        ran = (0, len(self.models) - 1) if stage == "train" else tuple(range(len(self.models)))
        models = list(self.models.values())
        with torch.no_grad():
            return TeacherOutputs(torch.stack([models[k](inputs) for k in ran]), ran)

    def tap(self, layers) -> None:
        raise ValueError("no taps here")

    def networks(self) -> dict[str, torch.nn.Module]:
        return self.models

    def shard(self, rank: int, world_size: int) -> FirstAndLast:
        return self


def test_any_teacher_source_serves_the_module_and_its_rows_are_named(
    tmp_path, teachers, datamodule
):
    source = FirstAndLast(teachers)
    assert isinstance(source, TeacherSource)
    module = DistillationModule(small_mlp(), source)
    x, y = torch.randn(6, NUM_FEATURES), torch.randint(0, NUM_CLASSES, (6,))
    step = module.training_step((x, y), 0)
    assert step["teacher_indices"].tolist() == [0, 2] and step["teacher_logits"].shape[0] == 2
    assert step["fusion_weights"].shape == (6, 2)
    step = module.validation_step((x, y), 0)
    assert step["teacher_indices"].tolist() == [0, 1, 2] and step["fusion_weights"].shape == (6, 3)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[TeacherAgreementCallback()])
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    assert {"train/agreement/student_vs_a", "train/agreement/a_vs_c"} <= set(metrics)
    assert "train/agreement/student_vs_b" not in metrics and "train/agreement/a_vs_b" not in metrics
    assert {"val/agreement/student_vs_b", "val/agreement/a_vs_b", "val/ensemble/jsd"} <= set(
        metrics
    )


def test_the_student_layers_of_the_fusion_rule_and_the_hints_are_tapped_together(teachers):
    gate = LearnedGate(num_teachers=len(teachers), student_layer="0")
    hints = FeatureHintLoss("1", {"a": "1", "b": "1", "c": "0"})
    module = DistillationModule(small_mlp(), teachers, DistillationLoss(gate), hints=hints)
    batch = (torch.randn(6, NUM_FEATURES), torch.randint(0, NUM_CLASSES, (6,)))
    with pytest.raises(RuntimeError, match=r"call materialize\(student_feature"):
        module.training_step(batch, 0)
    module.materialize(batch)
    assert gate.theta.shape == (3, 16) and set(hints.adapters) == {"a", "b", "c"}
    step = module.training_step(batch, 0)
    step["loss"].backward()
    assert gate.theta.grad is not None and hints.adapters["a"].proj.weight.grad is not None
    with pytest.raises(ValueError, match="has no submodule 'hidden'"):
        DistillationModule(
            small_mlp(), teachers, hints=FeatureHintLoss("hidden", dict.fromkeys(teachers, "0"))
        )
