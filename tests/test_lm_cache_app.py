"""`kd-cache` and `cache=true` on text: one sequence cache of every teacher's top-k logits per token."""

from __future__ import annotations

import math

import pytest

from kd_lightning.cli.cache import cache_teachers
from kd_lightning.cli.train import train
from kd_lightning.teachers.cache.build import StaleCacheError
from kd_lightning.teachers.cache.sequence_store import SequenceCachedTeachers

from .app_helpers import compose_config

VOCAB = 300
TINY_LM = [
    "experiment=lm",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "baseline=false",
    "data.max_bytes=20000",
    f"data.vocab_size={VOCAB}",
    "data.block_size=32",
    "data.batch_size=8",
    "teachers=[lm_wide,lm_deep]",
    "teachers.lm_wide.model.d_model=32",
    "teachers.lm_deep.model.d_model=32",
    "student.d_model=16",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
]


def test_a_text_cache_needs_its_top_k_before_any_teacher_trains(tmp_path):
    cfg = compose_config(tmp_path, [*TINY_LM, "cache=true"])
    with pytest.raises(ValueError, match=r"set cache_top_k, e\.g\. cache_top_k=32"):
        train(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


@pytest.mark.slow
def test_kd_cache_builds_one_sequence_cache_of_every_teacher_and_reuses_it(tmp_path, capsys):
    cfg = compose_config(tmp_path, [*TINY_LM, "cache=true", "cache_top_k=16"])
    cache = cache_teachers(cfg)
    assert isinstance(cache, SequenceCachedTeachers)
    assert cache.names == ["lm_wide", "lm_deep"]
    assert (cache.top_k, cache.value_bits, cache.block_size) == (16, 8, 32)
    assert cache.path.parent == tmp_path / "cache" / "outputs"
    printed = capsys.readouterr().out
    assert "bytes per token per teacher" in printed and "top 16 of 300 logits" in printed
    chunks = sorted(cache.path.glob("*.npy"))
    stamps = [chunk.stat().st_mtime_ns for chunk in chunks]
    again = cache_teachers(compose_config(tmp_path, [*TINY_LM, "cache=true", "cache_top_k=16"]))
    assert again.path == cache.path
    assert [chunk.stat().st_mtime_ns for chunk in chunks] == stamps  # read, not rebuilt


@pytest.mark.slow
def test_without_building_a_cache_for_another_tokenizer_or_block_is_named(tmp_path):
    cache_teachers(compose_config(tmp_path, [*TINY_LM, "cache=true", "cache_top_k=16"]))
    longer = [*TINY_LM, "data.block_size=24", "cache=true", "cache_top_k=16", "cache_build=false"]
    with pytest.raises(StaleCacheError) as caught:
        train(compose_config(tmp_path, longer))
    assert "block_size (32 → 24)" in str(caught.value)
    assert "kd-cache" in str(caught.value)


@pytest.mark.slow
def test_training_from_a_full_float_cache_matches_live_teachers(tmp_path):
    live, _ = train(compose_config(tmp_path / "live", TINY_LM))
    exact = [*TINY_LM, "cache=true", f"cache_top_k={VOCAB}", "cache_value_bits=null"]
    cached, objects = train(compose_config(tmp_path / "cached", exact))
    assert isinstance(objects["teachers"], SequenceCachedTeachers)
    assert cached["test_ce"]["student"] == pytest.approx(live["test_ce"]["student"], abs=1e-4)
    assert cached["test_ce"]["teachers"] == pytest.approx(live["test_ce"]["teachers"], abs=1e-4)


@pytest.mark.slow
def test_a_student_shaped_tail_trains_from_the_same_cache(tmp_path):
    cached = [*TINY_LM, "cache=true", "cache_top_k=16"]
    uniform, first = train(compose_config(tmp_path, cached))
    shaped_run = [*cached, "method.loss.topk_tail=student"]
    shaped, second = train(compose_config(tmp_path / "shaped", shaped_run, tmp_path / "cache"))
    assert second["teachers"].path == first["teachers"].path  # the tail is read, not stored
    assert (first["module"].loss.topk_tail, second["module"].loss.topk_tail) == (
        "uniform",
        "student",
    )
    assert shaped["test_ce"]["teachers"] == uniform["test_ce"]["teachers"]
    assert shaped["test_ce"]["student"] != uniform["test_ce"]["student"]
    assert math.isfinite(shaped["test_ce"]["student"])
