"""``kd-train cache=true`` and ``kd-cache``: the teacher-output cache from a Hydra config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_lightning.cli import train as train_module
from kd_lightning.cli.cache import cache_teachers
from kd_lightning.cli.logit_cache import check_cacheable
from kd_lightning.cli.train import train
from kd_lightning.models import CNN1D
from kd_lightning.teachers.cache.build import MANIFEST, StaleCacheError

from .app_helpers import FAST, compose_config, run_command

OVERRIDES = [*FAST, "teachers=[cnn,mlp]", "baseline=false", "callbacks=none"]


def break_teachers_once_cached(monkeypatch) -> list:
    """From the moment ``train`` has its cache, every CNN1D forward fails; returns the caches."""
    built = []
    original = train_module.cached_teachers

    def no_teacher(self, inputs):
        raise AssertionError("a teacher ran while training from the cache")

    def build_then_break_the_teacher(*args):
        result = original(*args)
        built.append(result[0])
        monkeypatch.setattr(CNN1D, "forward", no_teacher)
        return result

    monkeypatch.setattr(train_module, "cached_teachers", build_then_break_the_teacher)
    return built


@pytest.mark.slow  # trains a teacher, builds the cache, distils and tests
def test_cache_true_builds_the_cache_then_trains_without_teachers(tmp_path, monkeypatch):
    built = break_teachers_once_cached(monkeypatch)
    cfg = compose_config(tmp_path, [*FAST, "teachers=[cnn]", "baseline=false", "cache=true"])
    summary, objects = train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text()) == summary
    (cache,) = built
    assert cache.path.parent == tmp_path / "cache" / "outputs"
    _, labels = objects["datamodule"].test_set.tensors
    cached_test = cache.logits("test", range(len(labels)))[0]
    accuracy = (cached_test.argmax(-1) == labels).float().mean().item()
    assert summary["test_accuracy"]["teachers"]["cnn"] == pytest.approx(accuracy)


@pytest.mark.slow  # two runs and a kd-cache, each training
def test_training_from_the_cache_matches_live_teachers(tmp_path, monkeypatch, capsys):
    live, _ = train(compose_config(tmp_path, OVERRIDES))  # trains and stores the teachers

    cache = cache_teachers(compose_config(tmp_path, [*OVERRIDES, "cache=true"]))
    root = tmp_path / "cache" / "outputs"
    assert cache.path.parent == root and cache.names == ["cnn", "mlp"]
    assert f"teacher-output cache: {cache.path}" in capsys.readouterr().out
    manifest = json.loads((cache.path / MANIFEST).read_text())
    assert {split: entry["num_samples"] for split, entry in manifest["splits"].items()} == {
        "train": 1000,
        "val": 500,
        "test": 500,
    }
    assert all(path.parent == cache.path for path in root.rglob("*") if path.is_file())

    built = break_teachers_once_cached(monkeypatch)
    cfg = compose_config(tmp_path / "cached", [*OVERRIDES, "cache=true"], tmp_path / "cache")
    summary, _ = train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text()) == summary
    assert [found.path for found in built] == [cache.path]  # found again, not rebuilt
    assert [path.name for path in root.iterdir()] == [cache.path.name]
    # The same teacher logits: the teachers' test accuracies are those of the live run.
    assert summary["test_accuracy"]["teachers"] == live["test_accuracy"]["teachers"]
    assert summary["test_accuracy"]["student"] == pytest.approx(
        live["test_accuracy"]["student"], abs=0.01
    )

    monkeypatch.undo()  # config validation runs each teacher once on a dummy batch
    with pytest.raises(StaleCacheError, match=r"changed top_k \(None → 3\)"):
        overrides = [*OVERRIDES, "cache=true", "cache_top_k=3", "cache_build=false"]
        train(compose_config(tmp_path / "top3", overrides, tmp_path / "cache"))


def test_random_augmentation_is_refused_before_any_teacher_is_trained(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            *FAST,
            "data=mnist1d",
            "data.augment=true",
            "cache=true",
            "data.num_samples=100",
            "data.val_size=10",
        ],
    )
    with pytest.raises(ValueError, match=r"data\.augment=true.*cache_augmented_views=<N>"):
        train(cfg)
    with pytest.raises(ValueError, match=r"data\.augment=true"):
        cache_teachers(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()
    assert not (tmp_path / "cache" / "outputs").exists()


@pytest.mark.parametrize("top_k", ["0", "true", "2.5"])
def test_bad_top_k_is_named(tmp_path, top_k):
    cfg = compose_config(tmp_path, [*FAST, "cache=true", f"cache_top_k={top_k}"])
    with pytest.raises(ValueError, match="cache_top_k must be a positive integer or null"):
        check_cacheable(cfg)


@pytest.mark.slow  # a real subprocess that trains a teacher
def test_kd_cache_command_builds_and_reports(tmp_path):
    result = run_command(
        ["-m", "kd_lightning.cli.cache", *FAST, "teachers=[mlp]", "cache_top_k=4"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    (cache_dir,) = (tmp_path / "cache" / "outputs").iterdir()
    assert f"teacher-output cache: {cache_dir}" in result.stdout
    assert "top 4 logits + tail mass" in result.stdout and " MiB" in result.stdout


@pytest.mark.slow  # real processes: one live, then DDP over gloo from the cache
def test_ddp_reads_the_cache_with_the_single_process_teacher_metrics(tmp_path):
    quick = ["experiment=smoke", "data=synthetic", "logger=none", "baseline=false"]
    quick += ["trainer.enable_progress_bar=false", "teachers=[mlp]"]
    (tmp_path / "one").mkdir()
    single = run_command(["-m", "kd_lightning.cli.train", *quick], tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "cache").rename(tmp_path / "two" / "cache")  # the same teacher
    ddp = run_command(
        ["-m", "kd_lightning.cli.train", *quick, "accelerator=ddp_cpu", "cache=true"],
        tmp_path / "two",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (cache_dir,) = (tmp_path / "two" / "cache" / "outputs").iterdir()  # built once, by rank 0
    assert (cache_dir / MANIFEST).is_file()
    summaries = [
        json.loads(next(tmp_path.glob(f"{run}/logs/train/runs/*/summary.json")).read_text())
        for run in ("one", "two")
    ]
    one, two = (summary["test_accuracy"] for summary in summaries)
    assert two["teachers"] == one["teachers"] and two["ensemble"] == one["ensemble"]


@pytest.mark.parametrize("method", ["ensemble_hints", "dml"])
def test_methods_that_cannot_read_a_cache_are_refused(tmp_path, method):
    cfg = compose_config(tmp_path, [*FAST, f"method={method}", "cache=true"])
    with pytest.raises(ValueError, match=f"cache=true with method={method}"):
        train(cfg)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # trains a teacher, caches its views and distils
def test_augmented_views_opt_in_caches_seeded_views(tmp_path):
    overrides = [*FAST, "data=mnist1d", "data.augment=true", "data.num_samples=400"]
    overrides += ["data.val_size=40", "teachers=[mlp]", "baseline=false", "cache=true"]
    cfg = compose_config(tmp_path, [*overrides, "cache_augmented_views=2"])
    train(cfg)
    assert (Path(cfg.paths.output_dir) / "summary.json").is_file()
    (cache_dir,) = (tmp_path / "cache" / "outputs").iterdir()
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["splits"]["train"]["num_samples"] == 2 * (320 - 40)
    assert manifest["splits"]["val"]["num_samples"] == 40
