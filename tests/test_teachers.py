"""TeacherEnsemble: frozen, eval-locked, checked outputs; safe loading of teacher weights."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kd_lightning.errors import TeacherLoadError, TeacherOutputError
from kd_lightning.teachers import (
    TeacherEnsemble,
    TeacherOutputs,
    TeacherSource,
    load_teacher,
    read_state_dict,
)

from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp


def bn_teacher() -> nn.Module:
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, NUM_CLASSES)
    )


def test_stacked_float32_logits_and_names(teachers):
    ensemble = TeacherEnsemble(teachers)
    x = torch.randn(5, NUM_FEATURES)
    logits = ensemble(x)
    assert logits.shape == (3, 5, NUM_CLASSES) and logits.dtype == torch.float32
    assert ensemble.names == ["a", "b", "c"] and len(ensemble) == 3
    torch.testing.assert_close(logits[1], teachers["b"](x).detach())


def test_outputs_equal_each_teacher_in_eval_mode():
    teacher = bn_teacher()
    ensemble = TeacherEnsemble({"bn": teacher})
    x = torch.randn(6, NUM_FEATURES)
    expected = teacher.eval()(x)
    torch.testing.assert_close(ensemble(x)[0], expected)


def test_low_precision_teacher_outputs_are_returned_as_float32():
    ensemble = TeacherEnsemble({"bf16": small_mlp().to(torch.bfloat16)})
    assert ensemble(torch.randn(3, NUM_FEATURES, dtype=torch.bfloat16)).dtype == torch.float32


def test_locked_in_eval_mode_when_parent_trains():
    parent = nn.Module()
    parent.teachers = TeacherEnsemble({"bn": bn_teacher()})
    parent.student = small_mlp()
    parent.train()
    assert parent.student.training
    assert not any(module.training for module in parent.teachers.modules())
    stats_before = parent.teachers.teachers["bn"][1].running_mean.clone()
    x = torch.randn(16, NUM_FEATURES)
    first, second = parent.teachers(x), parent.teachers(x)
    torch.testing.assert_close(first, second)  # dropout off
    torch.testing.assert_close(parent.teachers.teachers["bn"][1].running_mean, stats_before)


def test_frozen_no_grad_even_when_input_requires_grad(teachers):
    ensemble = TeacherEnsemble(teachers)
    assert all(not p.requires_grad for p in ensemble.parameters())
    logits = ensemble(torch.randn(4, NUM_FEATURES, requires_grad=True))
    assert not logits.requires_grad


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, x):
        return {"logits": self.linear(x), "hidden": x}


class ObjectOutput(DictOutput):
    def forward(self, x):
        return SimpleNamespace(logits=self.linear(x))


def test_output_adapters_by_name_and_callable():
    ensemble = TeacherEnsemble(
        {"dict": DictOutput(), "object": ObjectOutput(), "fn": DictOutput()},
        output_adapters={"dict": "logits", "object": "logits", "fn": lambda out: out["logits"] * 2},
    )
    x = torch.randn(3, NUM_FEATURES)
    logits = ensemble(x)
    torch.testing.assert_close(logits[0], ensemble.teachers["dict"](x)["logits"])
    torch.testing.assert_close(logits[1], ensemble.teachers["object"](x).logits)
    torch.testing.assert_close(logits[2], 2 * ensemble.teachers["fn"](x)["logits"])


def test_non_tensor_output_without_adapter_names_the_teacher():
    ensemble = TeacherEnsemble({"hf_model": DictOutput()})
    with pytest.raises(
        TeacherOutputError, match=r"teacher 'hf_model' returned dict.*output_adapters"
    ):
        ensemble(torch.randn(2, NUM_FEATURES))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_output_names_the_teacher(bad):
    broken = nn.Linear(NUM_FEATURES, NUM_CLASSES)
    with torch.no_grad():
        broken.bias[0] = bad
    ensemble = TeacherEnsemble({"good": small_mlp(), "broken": broken})
    with pytest.raises(TeacherOutputError, match="teacher 'broken' produced NaN or inf"):
        ensemble(torch.randn(2, NUM_FEATURES))


def test_class_count_mismatch_between_teachers_names_both():
    ensemble = TeacherEnsemble({"four": small_mlp(4), "five": small_mlp(5)})
    with pytest.raises(TeacherOutputError, match=r"'four' gives \(2, 4\), 'five' gives \(2, 5\)"):
        ensemble(torch.randn(2, NUM_FEATURES))


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "train"])
def test_invalid_teacher_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid teacher name"):
        TeacherEnsemble({name: small_mlp()})


def test_empty_ensemble_and_unknown_adapter_are_refused():
    with pytest.raises(ValueError, match="at least one teacher"):
        TeacherEnsemble({})
    with pytest.raises(ValueError, match=r"output_adapters name unknown teachers \['x'\]"):
        TeacherEnsemble({"a": small_mlp()}, output_adapters={"x": "logits"})


# --- loading -------------------------------------------------------------------------------


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = small_mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_loads_a_real_lightning_checkpoint(tmp_path, datamodule):
    classifier = Classifier()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(classifier, datamodule=datamodule)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    teacher = load_teacher(small_mlp(), path, name="mlp")
    assert same_weights(teacher, classifier.model)


def test_loads_state_dict_and_safetensors_files(tmp_path):
    source = small_mlp()
    torch.save(source.state_dict(), tmp_path / "teacher.pt")
    save_file(source.state_dict(), str(tmp_path / "teacher.safetensors"))
    for name in ("teacher.pt", "teacher.safetensors"):
        assert same_weights(load_teacher(small_mlp(), tmp_path / name), source)


def test_from_checkpoints_builds_a_loaded_ensemble(tmp_path):
    sources = {"a": small_mlp(), "b": small_mlp()}
    for name, model in sources.items():
        torch.save(
            {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
            tmp_path / f"{name}.ckpt",
        )
    ensemble = TeacherEnsemble.from_checkpoints(
        {"a": small_mlp(), "b": small_mlp()}, {"a": tmp_path / "a.ckpt", "b": tmp_path / "b.ckpt"}
    )
    x = torch.randn(3, NUM_FEATURES)
    torch.testing.assert_close(
        ensemble(x), torch.stack([sources["a"](x), sources["b"](x)]).detach()
    )
    with pytest.raises(ValueError, match=r"no checkpoint given for teachers \['b'\]"):
        TeacherEnsemble.from_checkpoints(
            {"a": small_mlp(), "b": small_mlp()}, {"a": tmp_path / "a.ckpt"}
        )


def test_missing_file_names_teacher_and_path(tmp_path):
    path = tmp_path / "nowhere.ckpt"
    with pytest.raises(
        TeacherLoadError, match=rf"teacher 'cnn': checkpoint file not found: {path}"
    ):
        load_teacher(small_mlp(), path, name="cnn")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_corrupt_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(os.urandom(256))
    with pytest.raises(TeacherLoadError, match=rf"teacher 'gru'.*{path.name}"):
        load_teacher(small_mlp(), path, name="gru")


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"weight": Exploit(str(marker))}}, handle)
    with pytest.raises(TeacherLoadError, match="refused to load"):
        read_state_dict(path)
    assert not marker.exists()


def test_keys_that_do_not_fit_are_listed(tmp_path):
    torch.save(small_mlp(hidden=16).state_dict(), tmp_path / "t.pt")
    with pytest.raises(TeacherLoadError, match=r"teacher 'x'.*does not fit the model"):
        load_teacher(nn.Linear(NUM_FEATURES, NUM_CLASSES), tmp_path / "t.pt", name="x")
    with pytest.raises(TeacherLoadError, match="size mismatch"):
        load_teacher(small_mlp(hidden=32), tmp_path / "t.pt", name="x")


def test_explicit_prefix(tmp_path):
    source = small_mlp()
    torch.save({f"net.{k}": v for k, v in source.state_dict().items()}, tmp_path / "t.pt")
    assert same_weights(load_teacher(small_mlp(), tmp_path / "t.pt", prefix="net."), source)
    with pytest.raises(TeacherLoadError, match="missing"):
        load_teacher(small_mlp(), tmp_path / "t.pt", prefix="other.")


def test_non_state_dict_content_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(TeacherLoadError, match="is not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_the_ensemble_as_a_teacher_source_runs_every_teacher_and_taps_named_layers(teachers):
    ensemble = TeacherEnsemble(teachers)
    assert isinstance(ensemble, TeacherSource)
    x = torch.randn(5, NUM_FEATURES)
    for stage in ("train", "val", "test"):
        outputs = ensemble.outputs(x, batch=None, stage=stage)
        torch.testing.assert_close(outputs.logits, ensemble(x))
        assert outputs.ran == (0, 1, 2) and outputs.features == {}
    ensemble.tap({"a": "1", "c": "0"})
    outputs = ensemble.outputs(x, batch=None, stage="train")
    assert list(outputs.features) == ["a", "c"]
    torch.testing.assert_close(outputs.features["a"], torch.relu(teachers["a"][0](x)))
    torch.testing.assert_close(outputs.features["c"], teachers["c"][0](x))
    assert not any(model._forward_hooks for model in ensemble.modules())  # hooks only while running
    assert ensemble.networks() == dict(teachers)
    with pytest.raises(ValueError, match=r"cannot tap unknown teachers \['z'\]"):
        ensemble.tap({"z": "0"})
    with pytest.raises(ValueError, match="has no submodule 'nope'"):
        ensemble.tap({"a": "nope"})
    ensemble.tap({})
    assert ensemble.outputs(x, batch=None, stage="val").features == {}


def test_tapped_features_leave_inference_mode_and_stacked_ensembles_refuse_taps(teachers):
    ensemble = TeacherEnsemble(teachers, inference_mode=True)
    ensemble.tap({"b": "0"})
    outputs = ensemble.outputs(torch.randn(3, NUM_FEATURES), batch=None, stage="train")
    assert not outputs.features["b"].is_inference() and not outputs.logits.is_inference()
    same = {f"t{k}": small_mlp() for k in range(2)}
    with pytest.raises(ValueError, match="build the TeacherEnsemble with stacked=False"):
        TeacherEnsemble(same, stacked=True).tap({"t0": "0"})


def test_teacher_outputs_need_one_index_per_row():
    with pytest.raises(ValueError, match="2 indices in `ran` for 1 rows"):
        TeacherOutputs(torch.zeros(1, 2, 3), ran=(0, 1))
