"""The Hydra app: every config option composes, `train(cfg)` runs end to end, bad input fails early."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule

from kd_lightning.cli import teacher_checkpoints as teacher_cache
from kd_lightning.cli import train as train_command
from kd_lightning.cli.config import CONFIG_DIR, method_arguments
from kd_lightning.cli.summary import build_summary, format_summary
from kd_lightning.cli.teachers import train_teachers
from kd_lightning.cli.train import train
from kd_lightning.errors import ConfigError
from kd_lightning.fusion import FusionRule
from kd_lightning.modules import stages

from .app_helpers import FAST, compose_config, run_command

GROUPS = [
    "data",
    "student",
    "fusion",
    "method",
    "accelerator",
    "logger",
    "callbacks",
    "teachers",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(group, option) for group in GROUPS for option in options(group)]
)
def test_every_option_composes_and_instantiates(tmp_path, monkeypatch, group, option):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    override = f"teachers=[{option}]" if group == "teachers" else f"{group}={option}"
    cfg = compose_config(tmp_path, [override])
    if group == "data":
        assert isinstance(instantiate(cfg.data), LightningDataModule)
    elif group == "student":
        assert isinstance(instantiate(cfg.student), torch.nn.Module)
    elif group == "fusion":
        assert isinstance(instantiate(cfg.fusion), FusionRule)
    elif group == "method":  # test_validation builds each method's module from this partial
        method = instantiate(cfg.method, _convert_="all")
        assert isinstance(method, functools.partial) and "student" in method_arguments(cfg)
        assert "name" not in cfg.method  # the option's name is Hydra's choice
        assert HydraConfig.get().runtime.choices["method"] == option
    elif group == "teachers":
        assert list(cfg.teachers) == [option]
        assert isinstance(instantiate(cfg.teachers[option].model), torch.nn.Module)
    elif group == "accelerator":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("no GPU on this machine")
        instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    else:
        for entry in (cfg.get(group) or {}).values():
            instantiate(entry)


def test_default_config_is_the_documented_experiment(tmp_path):
    cfg = compose_config(tmp_path, [])
    assert list(cfg.teachers) == ["cnn", "gru", "mlp"]
    assert cfg.data._target_.endswith("MNIST1DDataModule") and cfg.student._target_.endswith("MLP")
    assert cfg.baseline and cfg.trainer.accelerator == "cpu"


def test_train_end_to_end_writes_summary_and_caches_teachers(tmp_path, monkeypatch, capsys):
    cfg = compose_config(tmp_path, [*FAST, "teachers=[cnn,mlp]", "fusion=confidence"])
    summary, _ = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert written == summary
    assert set(summary["test_accuracy"]["teachers"]) == {"cnn", "mlp"}
    assert summary["fusion"] == "confidence" and summary["method"] == "ensemble"
    assert summary["test_accuracy"]["baseline"] is not None
    assert set(summary["agreement"]["teachers"]) == {"cnn_vs_mlp"}
    assert "student (distilled)" in capsys.readouterr().out
    cached = sorted(path.name for path in (tmp_path / "cache" / "teachers").iterdir())
    assert len(cached) == 2 and all(name.endswith(".safetensors") for name in cached)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached teacher was trained again")

    monkeypatch.setattr(teacher_cache, "train_teacher", refuse)
    again, _ = train(
        compose_config(
            tmp_path / "again", [*FAST, "teachers=[cnn,mlp]", "baseline=false"], tmp_path / "cache"
        )
    )
    assert again["test_accuracy"]["teachers"] == summary["test_accuracy"]["teachers"]
    assert again["test_accuracy"]["baseline"] is None


def test_teacher_key_follows_the_teacher_not_the_student(tmp_path):
    base = compose_config(tmp_path, FAST)
    key = teacher_cache.teacher_key("cnn", base)
    assert (
        teacher_cache.teacher_key(
            "cnn", compose_config(tmp_path, [*FAST, "student=cnn", "fusion=vote"])
        )
        == key
    )
    assert (
        teacher_cache.teacher_key("cnn", compose_config(tmp_path, [*FAST, "teacher_epochs=3"]))
        != key
    )
    assert teacher_cache.teacher_key("cnn", compose_config(tmp_path, [*FAST, "data.seed=1"])) != key


def test_teacher_key_ignores_where_the_data_is_stored(tmp_path):
    lm = ["experiment=lm"]
    key = teacher_cache.teacher_key("lm_wide", compose_config(tmp_path, lm))
    moved = compose_config(tmp_path, [*lm, f"data.cache_dir={tmp_path / 'elsewhere'}"])
    assert teacher_cache.teacher_key("lm_wide", moved) == key
    smaller = compose_config(tmp_path, [*lm, "data.max_bytes=1000"])
    assert teacher_cache.teacher_key("lm_wide", smaller) != key


def test_user_checkpoint_is_used_and_a_missing_one_is_named(tmp_path):
    from safetensors.torch import save_file

    from kd_lightning.models import CNN1D

    own = CNN1D()
    save_file(own.state_dict(), str(tmp_path / "mine.safetensors"))
    cfg = compose_config(
        tmp_path, [*FAST, "teachers=[cnn]", f"teachers.cnn.checkpoint={tmp_path}/mine.safetensors"]
    )
    ensemble = teacher_cache.build_teachers(cfg, instantiate(cfg.data))
    torch.testing.assert_close(ensemble.teachers["cnn"].state_dict(), own.state_dict())
    cfg = compose_config(
        tmp_path, [*FAST, "teachers=[cnn]", f"teachers.cnn.checkpoint={tmp_path}/gone.ckpt"]
    )
    with pytest.raises(
        ConfigError, match=rf"teachers.cnn.checkpoint: no such file: {tmp_path}/gone.ckpt"
    ):
        train(cfg)


def test_missing_teacher_without_training_is_a_clear_error(tmp_path):
    cfg = compose_config(tmp_path, [*FAST, "teachers=[cnn,gru]", "train_if_missing=false"])
    with pytest.raises(ConfigError, match=r"kd-teachers teachers=\[cnn,gru\]") as error:
        train(cfg)
    assert "teachers.cnn: " in str(error.value) and str(tmp_path / "cache" / "teachers") in str(
        error.value
    )
    assert not (tmp_path / "cache" / "teachers").exists()


def test_kd_teachers_trains_and_reports(tmp_path, capsys):
    cfg = compose_config(tmp_path, [*FAST, "teachers=[mlp]"])
    report = train_teachers(cfg)
    assert Path(report["mlp"]["checkpoint"]).is_file()
    assert 0.0 <= report["mlp"]["test_acc"] <= 1.0
    assert "mlp" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("fusion=entropyy", MissingConfigException, "Available options"),
        ("trainer.max_epoch=1", ConfigCompositionException, "max_epoch"),
        ("teachers=[cnn,lstm]", MissingConfigException, "lstm"),
    ],
)
def test_typos_fail_at_composition_listing_the_choices(tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        compose_config(tmp_path, [override])
    assert not (tmp_path / "cache").exists()


def test_teacher_training_interrupted_leaves_no_cache_entry(tmp_path, monkeypatch):
    cfg = compose_config(tmp_path, [*FAST, "teachers=[mlp]"])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "save_file", crash)  # the one atomic writer
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert list((tmp_path / "cache" / "teachers").iterdir()) == []


def test_the_baseline_trains_the_distilled_network_from_its_initial_weights(tmp_path, monkeypatch):
    trained: list[torch.nn.Module] = []

    def baseline(cfg, datamodule, network):
        trained.append(network)
        return {"test/acc": 0.5}

    monkeypatch.setattr(train_command, "train_baseline", baseline)
    cfg = compose_config(tmp_path, [*FAST, "method=tfkd", "callbacks=none"])  # no teacher needed
    summary, objects = train(cfg)
    assert summary["test_accuracy"]["baseline"] == 0.5 and summary["gain"] is not None
    L.seed_everything(cfg.seed)
    fresh = instantiate(cfg.student)
    (network,) = trained
    assert network is not objects["module"].student
    torch.testing.assert_close(network.state_dict(), fresh.state_dict())


def test_cli_help_lists_the_groups(tmp_path):
    result = run_command(["-m", "kd_lightning.cli.train", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for group in ("teachers", "fusion", "accelerator", "logger", "method"):
        assert f"{group}:" in result.stdout


def test_a_relaunch_that_changes_what_the_student_learns_from_is_refused(tmp_path):
    overrides = [*FAST, "teachers=[mlp]", "fusion=mean_probs", "baseline=false"]
    train(compose_config(tmp_path, overrides))
    last = tmp_path / "output" / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns
    changed = [*overrides[:-2], "fusion=entropy", "baseline=true"]  # baseline may change
    with pytest.raises(ValueError) as refused:
        train(compose_config(tmp_path, changed))
    message = str(refused.value)
    assert "['fusion=mean_probs'] there, ['fusion=entropy'] now" in message
    assert f"hydra.run.dir={tmp_path / 'output'}" in message
    assert last.stat().st_mtime_ns == written


def test_relaunch_in_the_same_directory_resumes_from_last_checkpoint(tmp_path):
    overrides = [
        *FAST,
        "teachers=[mlp]",
        "baseline=false",
        "callbacks=default",
        "~callbacks.heatmap",
    ]
    _, first = train(compose_config(tmp_path, overrides))
    last = Path(first["cfg"].paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()
    steps = first["trainer"].global_step
    _, again = train(compose_config(tmp_path, [*overrides, "trainer.max_epochs=3"]))
    assert again["trainer"].global_step == steps + steps // 2  # only the third epoch ran


def test_classification_summary_keeps_its_table_and_adds_cross_entropies():
    metrics = {
        "test/acc": 0.7,
        "test/ce": 0.9,
        "test/teacher_acc/cnn": 0.9,
        "test/teacher_ce/cnn": 0.3,
        "test/ensemble/accuracy": 0.9,
        "test/ensemble/ce": 0.3,
        "test/agreement/student_vs_cnn": 0.75,
    }
    scratch = {"val/acc": 0.62, "val/loss": 1.2, "test/acc": 0.6, "test/loss": 1.1}
    choices = {"method": "ensemble", "fusion": "mean_probs", "student": "mlp"}
    summary = build_summary(
        ["cnn"], metrics, scratch, choices, 10.0, val_metrics={"val/teacher_acc/cnn": 0.91}
    )
    assert summary["test_ce"] == {
        "student": 0.9,
        "baseline": 1.1,
        "ensemble": 0.3,
        "teachers": {"cnn": 0.3},
    }
    assert summary["val_accuracy"]["teachers"] == {"cnn": 0.91}
    assert summary["val_accuracy"]["baseline"] == 0.62 and summary["val_ce"]["student"] is None
    assert "test_perplexity" not in summary and not summary["per_token"]
    table = format_summary(summary)
    assert "ppl" not in table and "test acc  agrees with student" in table
    assert table.endswith("distillation gain over scratch: +10.0 points")
