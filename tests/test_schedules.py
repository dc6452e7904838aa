"""Temperature and α schedules: pinned values, and a real Trainer driving the loss."""

from __future__ import annotations

import csv
import math

import pytest
from lightning.pytorch.loggers import CSVLogger

from kd_lightning import DistillationModule
from kd_lightning.callbacks import LossSchedule
from kd_lightning.losses.schedules import schedule_value

from .conftest import make_trainer, small_mlp


@pytest.mark.parametrize(
    "kind,progress,expected",
    [
        ("constant", 0.7, 4.0),
        ("linear", 0.25, 4.0 + (1.0 - 4.0) * 0.25),
        ("cosine", 0.25, 4.0 + (1.0 - 4.0) * 0.5 * (1 - math.cos(math.pi / 4))),
        ("ramp_up", 0.5, 4.0 + (1.0 - 4.0) * math.exp(-5 * 0.25)),
        ("ramp_up", 1.0, 1.0),
        ("linear", 1.7, 1.0),  # clamped to the end
    ],
)
def test_schedule_values(kind, progress, expected):
    assert schedule_value(kind, 4.0, 1.0, progress) == pytest.approx(expected)


def test_unknown_kind_and_attribute_are_refused(tmp_path, teachers, datamodule):
    with pytest.raises(ValueError, match="unknown schedule kind 'exp'"):
        LossSchedule("temperature", 1.0, 2.0, kind="exp")
    trainer = make_trainer(tmp_path, callbacks=[LossSchedule("temprature", 1.0, 2.0)])
    with pytest.raises(AttributeError, match="has no attribute 'temprature'"):
        trainer.fit(DistillationModule(small_mlp(), teachers), datamodule=datamodule)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_trainer_drives_the_loss_from_start_to_end(tmp_path, teachers, datamodule, interval):
    module = DistillationModule(small_mlp(), teachers)
    logger = CSVLogger(tmp_path, name="csv")
    schedule = LossSchedule("temperature", start=8.0, end=2.0, kind="linear", interval=interval)
    trainer = make_trainer(
        tmp_path, max_epochs=3, logger=logger, log_every_n_steps=1, callbacks=[schedule]
    )
    trainer.fit(module, datamodule=datamodule)
    assert module.loss.temperature == pytest.approx(2.0)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        values = [
            float(row["train/schedule/temperature"])
            for row in csv.DictReader(handle)
            if row.get("train/schedule/temperature")
        ]
    assert values[0] == pytest.approx(8.0) and values[-1] == pytest.approx(2.0)
    assert values == sorted(values, reverse=True)
