"""`kd-train experiment=lm`: its config, its refusals, its summary, and a shrunk run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from kd_lightning.cli import teacher_checkpoints
from kd_lightning.cli.summary import build_summary, format_summary, format_sweep
from kd_lightning.cli.teachers import train_teachers
from kd_lightning.cli.train import train
from kd_lightning.cli.validation import validate_config
from kd_lightning.errors import ConfigError
from kd_lightning.models import RecurrentLM

from .app_helpers import compose_config

TEACHERS = ["lm_wide", "lm_deep", "lm_gru"]
# The experiment shrunk: a 20 kB slice of the standard library, a BPE of 300 tokens, blocks of
# 32, one teacher epoch and three student batches.
TINY = [
    "experiment=lm",
    "data.max_bytes=20000",
    "data.vocab_size=300",
    "data.block_size=32",
    "data.batch_size=8",
    "teacher_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def test_experiment_lm_picks_its_pieces_and_passes_the_data_vocabulary_to_every_model(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=lm"])
    assert cfg.data._target_ == "kd_lightning.data.TextDataModule"
    assert cfg.data.tokenizer == "bpe" and cfg.data.paths is None  # the standard library
    assert cfg.student._target_ == "kd_lightning.models.CausalLM"
    assert list(cfg.teachers) == TEACHERS
    assert cfg.teachers.lm_gru.model._target_ == "kd_lightning.models.RecurrentLM"
    assert cfg.fusion._target_ == "kd_lightning.fusion.MeanProbabilities"
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.scheduler.warmup_steps > 0
    assert cfg.callbacks.agreement.stages == ["val", "test"]
    models = [cfg.student, *(cfg.teachers[name].model for name in TEACHERS)]
    assert {model.vocab_size for model in models} == {cfg.data.vocab_size}

    resized = compose_config(tmp_path, ["experiment=lm", "data.vocab_size=1024"])
    models = [resized.student, *(resized.teachers[name].model for name in TEACHERS)]
    assert {model.vocab_size for model in models} == {1024}
    assert resized.student.max_len == resized.data.block_size
    assert instantiate(resized.data).vocab_size == 1024  # what the data gives: the BPE's size


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["student=mlp"], "student.num_classes=10"),
        (["data.tokenizer=byte"], "student.vocab_size=2048"),  # the byte tokenizer has 258
        (["teachers.lm_deep.model.vocab_size=4096"], "teachers.lm_deep.model.vocab_size=4096"),
        (["data=synthetic"], "student.vocab_size=258"),
        (["method=ffl"], "method=ffl"),  # an online method of one label per sample
        # a classifier assistant on token data: its width reads the student's, which has none
        (["method=takd"], "method.assistants[0].in_features=${student.in_features}"),
        (["method=ensemble_hints"], "method.hints"),
    ],
)
def test_language_model_mistakes_are_refused_naming_the_key(tmp_path, overrides, key):
    cfg = compose_config(tmp_path, ["experiment=lm", *overrides])
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
    assert any(problem.startswith(f"{key}:") for problem in refused.value.problems), (
        refused.value.problems
    )
    assert not (tmp_path / "cache" / "text").exists()  # refused before any tokenising


def lm_summary(baseline_ce: float | None = 2.5) -> dict:
    names = ["wide", "gru"]
    metrics = {"test/acc": 0.4, "test/ce": 2.0, "test/ensemble/accuracy": 0.5}
    metrics |= {"test/ensemble/ce": 1.5, "test/agreement/wide_vs_gru": 0.6}
    for name, ce in zip(names, (1.6, 1.8), strict=True):
        metrics |= {f"test/teacher_acc/{name}": 0.45, f"test/teacher_ce/{name}": ce}
        metrics[f"test/agreement/student_vs_{name}"] = 0.7
    scratch = None if baseline_ce is None else {"test/acc": 0.35, "test/loss": baseline_ce}
    choices = {"method": "ensemble", "fusion": "mean_probs", "student": "lm"}
    val = {"val/acc": 0.41, "val/ce": 1.9, "val/teacher_ce/wide": 1.5}
    return build_summary(names, metrics, scratch, choices, 60.0, val_metrics=val, per_token=True)


def test_language_model_summary_reports_perplexities_and_the_change_over_scratch():
    summary = lm_summary()
    assert summary["test_perplexity"]["student"] == pytest.approx(math.exp(2.0))
    assert summary["test_perplexity"]["baseline"] == pytest.approx(math.exp(2.5))
    assert summary["test_perplexity"]["ensemble"] == pytest.approx(math.exp(1.5))
    assert summary["test_perplexity"]["teachers"]["gru"] == pytest.approx(math.exp(1.8))
    assert summary["val_perplexity"]["teachers"] == {
        "wide": pytest.approx(math.exp(1.5)),
        "gru": None,
    }
    assert summary["perplexity_change"] == pytest.approx(math.exp(-0.5) - 1, abs=1e-6)
    table = format_summary(summary)
    header = table.splitlines()[1]
    assert header.split()[:5] == ["model", "val", "ppl", "val", "acc"] and "test ppl" in header
    student = next(line for line in table.splitlines() if line.startswith("student (distilled)"))
    assert "6.69" in student and "40.0 %" in student  # val ppl e^1.9, test acc
    assert table.splitlines()[-1] == "perplexity vs scratch: 7.39 vs 12.18 (-39.3 %)"
    assert "perplexity vs scratch" not in format_summary(lm_summary(baseline_ce=None))


def test_sweep_table_gets_perplexity_columns_for_language_models():
    job = {"job": "0", "overrides": "- method.loss.alpha=0.9", **lm_summary()}
    table = format_sweep([job]).splitlines()
    assert "student ppl" in table[0] and table[0].count("|") == table[1].count("|")
    assert table[2].split(" | ")[6:10] == ["7.39", "12.18", "-39.3%", "4.48"]


def test_recurrent_lm_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = RecurrentLM(vocab_size=13, d_model=8, n_layers=2)
    tokens = torch.randint(0, 13, (2, 6))
    logits = model(tokens)
    assert logits.shape == (2, 6, 13)
    edited = tokens.clone()
    edited[:, 4] = (edited[:, 4] + 1) % 13
    torch.testing.assert_close(model(edited)[:, :4], logits[:, :4])
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), tokens], 1)  # left padding
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 6)], 1).long()
    torch.testing.assert_close(model(padded, mask)[:, 3:], logits, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="'input_ids' and 'attention_mask'"):
        model({"input_ids": tokens, "labels": tokens})


@pytest.mark.slow
def test_kd_train_experiment_lm_end_to_end_then_from_cached_teachers(tmp_path, monkeypatch):
    cfg = compose_config(tmp_path, TINY)
    summary, _ = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert written == summary and summary["per_token"]
    for stage in ("val", "test"):
        perplexity = summary[f"{stage}_perplexity"]
        values = [
            perplexity["student"],
            perplexity["baseline"],
            perplexity["ensemble"],
            *(perplexity["teachers"][name] for name in TEACHERS),
        ]
        assert all(1.0 < value < 300 for value in values), perplexity  # below uniform's 300
    assert summary["perplexity_change"] is not None
    cached = sorted((tmp_path / "cache" / "teachers").glob("*.safetensors"))
    assert len(cached) == 3
    written_at = {path: path.stat().st_mtime_ns for path in cached}

    def refuse(*args, **kwargs):
        raise AssertionError("a cached teacher was trained again")

    monkeypatch.setattr(teacher_checkpoints, "train_teacher", refuse)
    second = compose_config(tmp_path, TINY)
    with open_dict(second):
        second.paths.output_dir = str(tmp_path / "second")  # a new run, not a resumed one
    again, _ = train(second)
    assert again["test_perplexity"]["teachers"] == pytest.approx(
        summary["test_perplexity"]["teachers"]
    )
    report = train_teachers(compose_config(tmp_path, TINY))  # kd-teachers experiment=lm
    assert set(report) == set(TEACHERS)
    for name in TEACHERS:
        assert float(report[name]["test_loss"]) == pytest.approx(
            math.log(summary["test_perplexity"]["teachers"][name]), rel=1e-4
        )
    assert {path: path.stat().st_mtime_ns for path in cached} == written_at


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dml", "codistillation"])
def test_kd_train_experiment_lm_trains_language_model_peers_online(tmp_path, method):
    cfg = compose_config(tmp_path, [*TINY, f"method={method}"])
    summary, _ = train(cfg)
    assert summary["per_token"] and summary["method"] == method
    assert list(summary["test_perplexity"]["teachers"]) == ["peer1"]
    for stage in ("val", "test"):
        perplexity = summary[f"{stage}_perplexity"]
        values = [perplexity["student"], perplexity["baseline"], perplexity["teachers"]["peer1"]]
        assert all(1.0 < value < 300 for value in values), perplexity  # below uniform's 300
    assert not (tmp_path / "cache" / "teachers").exists()  # an online method trains no teacher
