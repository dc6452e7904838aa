"""The agreement heatmap figure and AgreementHeatmapCallback with a real Trainer and TensorBoard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kd_lightning import DistillationModule, TeacherAgreementCallback
from kd_lightning.callbacks import AgreementHeatmapCallback
from kd_lightning.reporting.plots import agreement_heatmap

from .conftest import make_trainer, small_mlp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > len(PNG_MAGIC), f"{path} is not a PNG"


def test_heatmap_annotates_every_cell_and_names_both_axes():
    matrix = torch.tensor([[1.0, 0.5, 0.125], [0.5, 1.0, 0.0], [0.125, 0.0, 1.0]])
    fig = agreement_heatmap(matrix, ["cnn", "gru", "mlp"], title="val agreement")
    ax = fig.axes[0]
    assert [text.get_text() for text in ax.texts] == [
        "100.0%", "50.0%", "12.5%",
        "50.0%", "100.0%", "0.0%",
        "12.5%", "0.0%", "100.0%",
    ]  # fmt: skip
    cells = [(round(text.get_position()[1]), round(text.get_position()[0])) for text in ax.texts]
    assert cells == [(row, column) for row in range(3) for column in range(3)]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["cnn", "gru", "mlp"]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["cnn", "gru", "mlp"]
    assert ax.get_title() == "val agreement"
    assert ax.images[0].get_clim() == (0.0, 1.0)
    colorbar = fig.axes[1]
    assert colorbar.get_ylabel() == "top-1 agreement"


def test_heatmap_grows_with_the_number_of_teachers():
    small = agreement_heatmap(np.eye(2), ["a", "b"])
    large = agreement_heatmap(np.eye(8), list("abcdefgh"))
    assert large.get_figwidth() > small.get_figwidth()
    assert large.get_figheight() > small.get_figheight()


def test_heatmap_refuses_a_shape_that_does_not_match_the_names():
    with pytest.raises(
        ValueError, match=r"shape \(3, 3\) does not match the 2 teacher names \['a', 'b'\]"
    ):
        agreement_heatmap(np.eye(3), ["a", "b"])
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        agreement_heatmap(np.ones((2, 3)), ["a", "b"])


def test_heatmap_refuses_values_outside_zero_one():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got min 0 and max 75"):
        agreement_heatmap([[0.0, 75.0], [75.0, 0.0]], ["a", "b"])


def test_callback_saves_and_logs_heatmaps_to_tensorboard(tmp_path, teachers, datamodule):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(
        tmp_path,
        max_epochs=2,
        logger=logger,
        callbacks=[TeacherAgreementCallback(), AgreementHeatmapCallback()],
    )
    module = DistillationModule(small_mlp(), teachers)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)

    for stage in ("val", "test"):
        assert_png(tmp_path / "tb" / "version_0" / f"agreement_{stage}.png")
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"val/agreement_heatmap", "test/agreement_heatmap"} <= set(events.Tags()["images"])
    val_images = events.Images("val/agreement_heatmap")
    assert len(val_images) == 2  # one per epoch, none for the sanity check
    assert [image.step for image in val_images] == [4, 8]  # the global step: 4 batches per epoch
    assert val_images[0].encoded_image_string.startswith(PNG_MAGIC)


def test_callback_writes_to_dirpath_without_a_logger(tmp_path, teachers, datamodule):
    callbacks = [
        TeacherAgreementCallback(stages=("test",)),
        AgreementHeatmapCallback(stages=("test",), dirpath=str(tmp_path / "plots")),
    ]
    trainer = make_trainer(tmp_path, callbacks=callbacks)
    trainer.test(DistillationModule(small_mlp(), teachers), datamodule=datamodule)
    assert_png(tmp_path / "plots" / "agreement_test.png")
    assert not (tmp_path / "plots" / "agreement_val.png").exists()


def test_callback_needs_an_agreement_callback(tmp_path, teachers, datamodule):
    trainer = make_trainer(tmp_path, callbacks=[AgreementHeatmapCallback()])
    with pytest.raises(
        RuntimeError, match="AgreementHeatmapCallback needs a TeacherAgreementCallback"
    ):
        trainer.fit(DistillationModule(small_mlp(), teachers), datamodule=datamodule)


def test_callback_must_come_after_the_agreement_callback(tmp_path, teachers, datamodule):
    callbacks = [AgreementHeatmapCallback(), TeacherAgreementCallback()]
    trainer = make_trainer(tmp_path, callbacks=callbacks)
    with pytest.raises(
        RuntimeError,
        match=r"AgreementHeatmapCallback \(callback 0\) runs before TeacherAgreementCallback \(callback 1\)",
    ):
        trainer.fit(DistillationModule(small_mlp(), teachers), datamodule=datamodule)


def test_callback_refuses_stages_the_agreement_callback_skips(tmp_path, teachers, datamodule):
    callbacks = [TeacherAgreementCallback(stages=("val",)), AgreementHeatmapCallback()]
    trainer = make_trainer(tmp_path, callbacks=callbacks)
    with pytest.raises(ValueError, match=r"draws stages \['test'\] that TeacherAgreementCallback"):
        trainer.fit(DistillationModule(small_mlp(), teachers), datamodule=datamodule)


def test_callback_refuses_unknown_stages():
    with pytest.raises(ValueError, match=r"unknown stages \['train'\]"):
        AgreementHeatmapCallback(stages=("val", "train"))
