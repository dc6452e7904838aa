"""A NaN loss stops training naming the step, term and network, or (``on_nonfinite=skip``) is
skipped and counted; either way no update is applied and ``last.ckpt`` keeps the last good state."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from kd_lightning import DistillationModule
from kd_lightning.callbacks import NonFiniteLossGuard
from kd_lightning.cli.summary import format_summary
from kd_lightning.cli.teacher_checkpoints import train_teacher
from kd_lightning.cli.train import build_module, train, train_baseline
from kd_lightning.cli.validation import validate_config
from kd_lightning.errors import ConfigError, NonFiniteLossError
from kd_lightning.models import MLP
from kd_lightning.modules import ClassifierModule, DMLModule
from kd_lightning.teachers.cache.topk import TopKTeacherOutputs, compress_topk

from .app_helpers import FAST, compose_config
from .conftest import NUM_CLASSES, make_trainer, small_mlp

BATCHES = 4  # training batches per epoch (of the conftest datamodule)


class NaNAtCall(nn.Module):
    """``network``, except that its ``at``-th call in training mode (0-based; every call when
    ``at`` is a teacher's, which run in eval mode) returns NaN logits."""

    def __init__(self, network: nn.Module, at: int, count_eval: bool = False) -> None:
        super().__init__()
        self.network = network
        self.at = at
        self.count_eval = count_eval
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = self.network(inputs)
        if not (self.training or self.count_eval):
            return logits
        self.calls += 1
        return logits * float("nan") if self.calls - 1 == self.at else logits


class NaNMLP(MLP):
    """The MLP student, except that its ``nan_at``-th training-mode call gives NaN logits."""

    def __init__(self, *args, nan_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = super().forward(inputs)
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.nan_at:
                return logits * float("nan")
        return logits


def fit(module, tmp_path, guard: NonFiniteLossGuard | None, datamodule, **options):
    callbacks = [] if guard is None else [guard]
    trainer = make_trainer(
        tmp_path,
        callbacks=[*callbacks, *options.pop("callbacks", [])],
        limit_train_batches=BATCHES,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **options,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_a_nan_teacher_stops_training_naming_step_term_and_teacher(tmp_path, datamodule):
    # Teachers run in eval mode; one call per step, none elsewhere with validation off.
    bad = NaNAtCall(small_mlp(), at=BATCHES + 3, count_eval=True)  # epoch 1, batch 3
    module = DistillationModule(small_mlp(), {"good": small_mlp(), "bad": bad})
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    with pytest.raises(NonFiniteLossError) as raised:
        fit(
            module,
            tmp_path,
            NonFiniteLossGuard(),
            datamodule,
            max_epochs=3,
            enable_checkpointing=True,
            callbacks=[checkpoints],
        )
    message = str(raised.value)
    step = BATCHES + 3
    assert message.startswith(f"non-finite loss at global step {step} (epoch 1, batch 3): kd = nan")
    assert "teacher 'bad' produced NaN or inf logits" in message
    assert "ce = " not in message  # the labels' term stayed finite
    assert "on_nonfinite=skip" in message
    assert all_finite(module.student)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, BATCHES)  # the last good epoch end
    assert all(bool(torch.isfinite(value).all()) for value in last["state_dict"].values())


class TopKTeachers:
    """Teachers ``good`` and ``bad`` as top-k outputs of every class (each tail ``-inf``, no
    mass left), ``bad``'s values NaN at its ``nan_at``-th call."""

    def __init__(self, nan_at: int) -> None:
        self.models = {"good": small_mlp(), "bad": small_mlp()}
        self.nan_at = nan_at
        self.calls = 0

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def outputs(self, inputs, batch, stage) -> TopKTeacherOutputs:
        with torch.no_grad():
            logits = torch.stack([model(inputs) for model in self.models.values()])
        topk = compress_topk(logits, NUM_CLASSES)
        if self.calls == self.nan_at:
            topk.values[1] = float("nan")
        self.calls += 1
        return TopKTeacherOutputs(topk, (0, 1))

    def tap(self, layers) -> None:
        raise ValueError("no taps here")

    def networks(self) -> dict[str, nn.Module]:
        return self.models

    def shard(self, rank: int, world_size: int) -> TopKTeachers:
        return self


def test_nan_top_k_values_stop_training_naming_the_teacher(tmp_path, datamodule):
    module = DistillationModule(small_mlp(), TopKTeachers(nan_at=2))
    with pytest.raises(NonFiniteLossError) as raised:
        fit(module, tmp_path, NonFiniteLossGuard(), datamodule, max_epochs=1)
    message = str(raised.value)
    assert message.startswith("non-finite loss at global step 2 (epoch 0, batch 2): kd = nan")
    assert "teacher 'bad' produced NaN or inf logits" in message
    assert "'good'" not in message and "student" not in message.split(";")[1]


def test_a_nan_student_names_the_student_and_its_terms(tmp_path, datamodule):
    student = NaNAtCall(small_mlp(), at=2)
    module = DistillationModule(student, {"a": small_mlp()})
    with pytest.raises(NonFiniteLossError) as raised:
        fit(module, tmp_path, NonFiniteLossGuard(), datamodule, max_epochs=1)
    message = str(raised.value)
    assert "global step 2 (epoch 0, batch 2): ce = nan, kd = nan, loss = nan" in message
    assert "the student produced NaN or inf logits" in message
    assert "teacher" not in message.split(";")[1]


def test_skip_mode_skips_the_update_and_counts_it(tmp_path, datamodule):
    student = NaNAtCall(small_mlp(), at=BATCHES + 1)  # epoch 1, batch 1
    module = DistillationModule(student, {"a": small_mlp()})
    guard = NonFiniteLossGuard("skip")
    snapshots = []

    class Snapshot(Callback):  # the weights before and after the bad step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx in (0, 1):
                snapshots.append([p.detach().clone() for p in student.parameters()])

    trainer = fit(module, tmp_path, guard, datamodule, max_epochs=2, callbacks=[Snapshot()])
    assert guard.skipped_steps == 1
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1.0
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert all_finite(student)
    for before, after in zip(*snapshots, strict=True):
        assert torch.equal(before, after)  # no update at the skipped step
    assert trainer.global_step == 2 * BATCHES


def test_skip_mode_drops_a_nan_micro_batch_from_its_accumulated_step(tmp_path, datamodule):
    student = NaNAtCall(small_mlp(), at=2)
    module = ClassifierModule(student)
    guard = NonFiniteLossGuard("skip")
    fit(module, tmp_path, guard, datamodule, max_epochs=1, accumulate_grad_batches=2)
    assert guard.skipped_steps == 1
    assert all_finite(student)


def test_manual_optimisation_dml_stops_naming_the_peer(tmp_path, datamodule):
    module = DMLModule(small_mlp(), {"peer1": NaNAtCall(small_mlp(), at=2)})
    assert not module.automatic_optimization
    with pytest.raises(NonFiniteLossError) as raised:
        fit(module, tmp_path, NonFiniteLossGuard(), datamodule, max_epochs=1)
    message = str(raised.value)
    # Two optimizer steps per batch (one per peer): batch 2 starts at global step 4.
    assert message.startswith("non-finite loss at global step 4 (epoch 0, batch 2): loss = nan")
    assert "teacher 'peer1' produced NaN or inf logits" in message  # peers are logged as teachers
    assert all_finite(module)


def test_manual_optimisation_dml_skips_and_counts(tmp_path, datamodule):
    module = DMLModule(small_mlp(), {"peer1": NaNAtCall(small_mlp(), at=2)})
    guard = NonFiniteLossGuard("skip")
    trainer = fit(module, tmp_path, guard, datamodule, max_epochs=1)
    assert guard.skipped_steps == 1
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1.0
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert all_finite(module)


def test_skipped_steps_come_back_with_a_checkpoint():
    guard = NonFiniteLossGuard("skip")
    guard.skipped_steps = 3
    resumed = NonFiniteLossGuard("skip")
    resumed.load_state_dict(guard.state_dict())
    assert resumed.skipped_steps == 3


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite must be one of \\['stop', 'skip'\\]"):
        NonFiniteLossGuard("ignore")  # type: ignore[arg-type]


NAN_RUN = [
    *FAST,
    "teachers=[mlp]",
    "baseline=false",
    "student._target_=tests.test_nonfinite.NaNMLP",
    "+student.nan_at=5",  # experiment=smoke: 4 batches per epoch, so epoch 1, batch 1
]


def test_kd_train_skips_and_reports_skipped_steps_or_stops_keeping_last_ckpt(tmp_path):
    summary, objects = train(compose_config(tmp_path / "skip", [*NAN_RUN, "on_nonfinite=skip"]))
    assert summary["skipped_steps"] == 1
    written = json.loads((tmp_path / "skip" / "output" / "summary.json").read_text())
    assert written["skipped_steps"] == 1
    assert "training steps skipped for a non-finite loss: 1" in format_summary(summary)
    assert all_finite(objects["module"].student)

    cfg = compose_config(tmp_path / "stop", NAN_RUN, tmp_path / "skip" / "cache")  # its teacher
    with pytest.raises(
        NonFiniteLossError, match="at global step 5 \\(epoch 1, batch 1\\): ce = nan"
    ):
        train(cfg)
    checkpoints = tmp_path / "stop" / "output" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and not (tmp_path / "stop" / "output" / "summary.json").exists()


def test_an_unknown_on_nonfinite_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_config(tmp_path, [*FAST, "on_nonfinite=ignore"]))
    assert "on_nonfinite=ignore: choose one of ['stop', 'skip']" in raised.value.problems


HUGE_STEPS = [*FAST, "teachers=[mlp]", "optimizer.lr=1e30", "teachers.mlp.fit.optimizer.lr=1e30"]


def test_teacher_stage_and_baseline_trainings_stop_naming_what_they_train(tmp_path):
    """A first step of size 1e30 makes every later loss inf or NaN (``experiment=smoke``: 4
    steps per epoch): each training that ``kd-train`` runs besides the student stops at step 1,
    naming itself, before its weights are kept."""
    cfg = compose_config(tmp_path, [*HUGE_STEPS, "method=prokd"])
    datamodule = instantiate(cfg.data)
    with pytest.raises(
        NonFiniteLossError, match=r"^teacher mlp: non-finite loss at global step 1 "
    ):
        train_teacher("mlp", cfg, datamodule)
    assert not (tmp_path / "cache" / "teachers").exists()
    with pytest.raises(
        NonFiniteLossError, match=r"^scratch baseline: non-finite loss at global step 1 "
    ):
        train_baseline(cfg, datamodule, instantiate(cfg.student))
    with pytest.raises(
        NonFiniteLossError, match=r"^stage prokd-mlp: non-finite loss at global step 1 "
    ):
        build_module(cfg, datamodule)
    kept = sorted(path.stem for path in (tmp_path / "output" / "stages").glob("*.safetensors"))
    assert kept == ["prokd-mlp-0", "prokd-mlp-1"]  # a trajectory missing states is trained again

    cfg.on_nonfinite = "skip"
    with pytest.warns(
        UserWarning, match=r"^stage prokd-mlp: 3 training steps had a NaN or inf loss"
    ):
        build_module(cfg, datamodule)
    assert len(list((tmp_path / "output" / "stages").glob("*.safetensors"))) == 4
