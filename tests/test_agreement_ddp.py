"""The agreement metric gives the same counts on two gloo processes as on one."""

from __future__ import annotations

import pytest
import torch

from kd_lightning import DistillationModule, TeacherAgreementCallback

from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp


def validate(tmp_path, teachers, datamodule, **trainer_options) -> dict[str, float]:
    torch.manual_seed(0)
    module = DistillationModule(small_mlp(), teachers)
    trainer = make_trainer(
        tmp_path, callbacks=[TeacherAgreementCallback(stages=("val",))], **trainer_options
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items() if "/" in key}


@pytest.mark.slow
def test_two_processes_log_the_same_agreement_as_one(tmp_path, teachers):
    from kd_lightning.data import SyntheticDataModule

    # 96 validation samples: divisible by 2 ranks, so the distributed sampler pads nothing.
    datamodule = SyntheticDataModule(
        num_samples=384, in_features=NUM_FEATURES, num_classes=NUM_CLASSES, batch_size=10
    )
    single = validate(tmp_path / "one", teachers, datamodule)
    double = validate(tmp_path / "two", teachers, datamodule, strategy="ddp_spawn", devices=2)
    agreement_keys = [key for key in single if "/agreement/" in key or "/teacher_acc/" in key]
    assert len(agreement_keys) == 3 + 3 + 3
    for key in agreement_keys:
        assert double[key] == pytest.approx(single[key], abs=1e-6), key
    for key in ("val/kl/a_to_student", "val/ensemble/jsd"):
        assert double[key] == pytest.approx(single[key], rel=1e-5)
