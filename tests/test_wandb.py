"""wandb_logger's mode choice, and a real offline W&B run with agreement metrics and heatmaps."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from kd_lightning import DistillationModule, TeacherAgreementCallback
from kd_lightning.callbacks import AgreementHeatmapCallback
from kd_lightning.reporting.loggers import has_wandb_credentials, resolve_wandb_mode, wandb_logger

from .conftest import make_trainer, small_mlp

FAKE_KEY = "0123456789" * 4  # well-formed (40 characters), never sent anywhere


@pytest.fixture
def home(monkeypatch, tmp_path) -> Iterator[Path]:
    """A W&B environment with no credentials: an empty HOME and netrc, no WANDB_* variables."""
    for name in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "WANDB_BASE_URL",
        "WANDB_PROJECT",
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "30")
    wandb.teardown()  # forget settings and credentials loaded from the real environment
    yield home
    wandb.teardown()


def read_wandb_records(path: Path) -> list[Any]:
    """Decode a run's ``.wandb`` file: a 7-byte W&B header, then LevelDB-log framed protobufs.

    The log is cut in 32 KiB blocks; each fragment has a 7-byte header (CRC32, uint16 length,
    type: 1 full, 2 first, 3 middle, 4 last), and a block tail shorter than a header is padding.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} has no W&B header"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding up to the end of the block
            position += block - position % block
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(path: Path) -> list[dict[str, object]]:
    """The rows of ``run.log`` calls, keyed ``a/b`` for nested keys."""
    return [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for r in read_wandb_records(path)
        if r.WhichOneof("record_type") == "history"
    ]


def test_offline_without_credentials(home, tmp_path, caplog):
    assert not has_wandb_credentials()
    assert resolve_wandb_mode() == "offline"
    with caplog.at_level(logging.WARNING, logger="kd_lightning.reporting.loggers"):
        wandb_logger(save_dir=tmp_path / "runs")
    (message,) = [
        r.getMessage() for r in caplog.records if r.name == "kd_lightning.reporting.loggers"
    ]
    assert "logging offline" in message
    assert f"wandb sync {tmp_path / 'runs' / 'wandb' / 'offline-run-*'}" in message


@pytest.mark.parametrize("mode", ["offline", "disabled", "dryrun"])
def test_wandb_mode_variable_is_respected(home, monkeypatch, mode):
    monkeypatch.setenv("WANDB_MODE", mode)
    assert resolve_wandb_mode() == mode


def test_explicit_mode_wins_over_the_variable(home, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_wandb_mode("offline") == "offline"
    assert resolve_wandb_mode("online") == "online"


def test_online_with_an_api_key_variable(home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_wandb_mode() == "online"


def test_online_with_a_netrc_entry(home):
    netrc = home / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode() == "online"


def test_a_netrc_entry_for_another_host_is_not_credentials(home):
    (home / ".netrc").write_text(f"machine example.com\n  login user\n  password {FAKE_KEY}\n")
    assert resolve_wandb_mode() == "offline"


def test_online_without_credentials_is_refused_rather_than_prompting(home, monkeypatch):
    with pytest.raises(ValueError, match=r"W&B mode='online' needs credentials"):
        resolve_wandb_mode("online")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ValueError, match=r"W&B WANDB_MODE='online' needs credentials"):
        wandb_logger()


def test_unknown_modes_name_their_source(home, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown W&B mode='cloud'"):
        resolve_wandb_mode("cloud")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match=r"unknown W&B WANDB_MODE='bogus'"):
        resolve_wandb_mode()


def test_project_and_dir_variables_are_respected(home, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    logger = wandb_logger(mode="disabled")
    assert logger.name == "from-env" and logger.save_dir == str(tmp_path)
    logger = wandb_logger(project="explicit", save_dir=tmp_path / "x", mode="disabled")
    assert logger.name == "explicit" and logger.save_dir == str(tmp_path / "x")


def test_offline_run_holds_agreement_metrics_and_heatmaps(home, tmp_path, teachers, datamodule):
    logger = wandb_logger(save_dir=tmp_path, name="kd-offline-test")
    callbacks = [TeacherAgreementCallback(), AgreementHeatmapCallback()]
    trainer = make_trainer(tmp_path, max_epochs=2, logger=logger, callbacks=callbacks)
    module = DistillationModule(small_mlp(), teachers)
    try:
        trainer.fit(module, datamodule=datamodule)
        trainer.test(module, datamodule=datamodule)
    finally:
        wandb.finish()
        wandb.teardown()  # stop wandb-core, which writes the .wandb file asynchronously

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    rows = history_rows(log_file)
    val_rows = [row for row in rows if "val/agreement/student_vs_a" in row]
    assert len(val_rows) == 2
    assert {"val/agreement/a_vs_b", "val/teacher_acc/c", "val/ensemble/jsd"} <= set(val_rows[-1])
    (test_row,) = [row for row in rows if "test/agreement/student_vs_a" in row]
    for name in "abc":
        key = f"test/agreement/student_vs_{name}"
        assert test_row[key] == pytest.approx(trainer.callback_metrics[key].item())

    for stage, epochs in (("val", 2), ("test", 1)):
        images = [row for row in rows if f"{stage}/agreement_heatmap/_type" in row]
        assert len(images) == epochs
        for row in images:
            (filename,) = row[f"{stage}/agreement_heatmap/filenames"]
            assert (run_dir / "files" / filename).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert (tmp_path / f"agreement_{stage}.png").is_file()
