"""Every refused input is reported before any work, naming its config key, all problems at once."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from kd_lightning.cli import teacher_checkpoints as teacher_cache
from kd_lightning.cli.config import CONFIG_DIR
from kd_lightning.cli.teachers import train_teachers
from kd_lightning.cli.train import train
from kd_lightning.cli.validation import validate_config
from kd_lightning.errors import ConfigError

from .app_helpers import FAST, compose_config

ONE_TEACHER = [*FAST, "teachers=[mlp]", "baseline=false"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

# (overrides, the config key the message must name). README's table of refused inputs lists these.
REFUSED = [
    pytest.param(
        ["accelerator=gpu"], "trainer.accelerator=gpu", marks=NO_GPU, id="gpu-without-cuda"
    ),
    pytest.param(["trainer.accelerator=quantum"], "trainer.accelerator=quantum", id="accelerator"),
    pytest.param(["trainer.devices=0"], "trainer.devices=0", id="devices"),
    pytest.param(
        ["method._target_=kd_lightning.modules.Nope"],
        "method._target_=kd_lightning.modules.Nope:",
        id="method",
    ),
    pytest.param(["method.loss.alpha=1.5"], "method.loss.alpha=1.5", id="alpha"),
    pytest.param(["method.loss.temperature=0"], "method.loss.temperature=0", id="temperature"),
    pytest.param(["method=dml", "method.temperature=-1"], "method.temperature=-1", id="dml-temp"),
    pytest.param(["method.loss.divergence=kll"], "method.loss:", id="divergence"),
    pytest.param(
        ["method.loss.topk_tail=student"], "method.loss.topk_tail=student: ", id="tail-not-top-k"
    ),
    pytest.param(["fusion._target_=kd_lightning.fusion.Nope"], "fusion:", id="fusion-target"),
    pytest.param(["fusion=static", "fusion.weights=[1,2]"], "fusion:", id="fusion-weights"),
    pytest.param(["fusion=learned_gate", "fusion.student_layer=nope"], "fusion:", id="gate-layer"),
    pytest.param(["data.batch_size=0"], "data:", id="batch-size"),
    pytest.param(["student.num_classes=5"], "student.num_classes:", id="student-classes"),
    pytest.param(["teachers.mlp.model.num_classes=5"], "teachers.mlp:", id="teacher-classes"),
    pytest.param(["teachers.mlp.model.in_features=30"], "teachers.mlp:", id="teacher-input"),
    pytest.param(
        ["teachers.mlp.checkpoint=/no/such/teacher.ckpt"],
        "teachers.mlp.checkpoint:",
        id="missing-checkpoint",
    ),
    pytest.param(["train_if_missing=false"], "teachers.mlp:", id="not-trained"),
    pytest.param(["+teachers={../../evil:${teachers.mlp}}"], "teachers.../../evil:", id="path"),
    pytest.param(["+teachers={a.b:${teachers.mlp}}"], "teachers.a.b:", id="dotted-name"),
    pytest.param(
        ["method=ensemble_hints", "method.hints.student_layer=nope"],
        "method.hints.student_layer=nope",
        id="hint-layer",
    ),
    # refused by the method's constructor or pipeline, named by its argument
    pytest.param(["method=ffl", "method.num_peers=1"], "method.num_peers: ", id="num-peers"),
    pytest.param(["method=okddip", "method.peers=[]"], "method.peers: ", id="no-peers"),
    pytest.param(["method=dml", "method.update=parallel"], "method.update: ", id="dml-update"),
    pytest.param(["method=takd", "method.assistants=[]"], "method.assistants: ", id="assistants"),
    pytest.param(
        ["method=takd", "method.stage_epochs=0"], "method: stage takd-", id="stage-epochs"
    ),
    pytest.param(["method=tfkd", "method.variant=mirror"], "method.variant: ", id="tfkd-variant"),
    pytest.param(["method=prokt", "method.constraint=2"], "method.constraint: ", id="prokt-lambda"),
    pytest.param(
        ["method=prokd", "method.num_checkpoints=0"], "method.num_checkpoints: ", id="checkpoints"
    ),
    pytest.param(["method=dml", "+method.nope=1"], "method: ", id="unknown-argument"),
    pytest.param(
        ["method.loss.alpha=${nowhere}"],
        "method.loss.alpha=${nowhere}: Interpolation key 'nowhere' not found",
        id="dangling-interpolation",
    ),
    pytest.param(
        ["+teachers.mlp.fit.note=${oc.env:KD_NO_SUCH_VARIABLE}"],
        "teachers.mlp.fit.note=${oc.env:KD_NO_SUCH_VARIABLE}: ",
        id="unset-environment-variable",
    ),
    pytest.param(
        ["method=dml", "method.peers=[{_target_:nope.Nope}]"], "method.peers.0: ", id="peer-target"
    ),
    pytest.param(
        ["method=ensemble_hints", "cache=true"],
        "cache=true with method=ensemble_hints: ",
        id="hints-cache",
    ),
]


@pytest.mark.parametrize("overrides,key", REFUSED)
def test_refused_before_any_work_naming_the_key(tmp_path, overrides, key):
    cfg = compose_config(tmp_path, [*ONE_TEACHER, *overrides])
    with pytest.raises(ConfigError) as caught:
        train(cfg)
    assert key in str(caught.value)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert not (tmp_path / "cache" / "teachers").exists()  # no teacher trained or cached
    assert not any((tmp_path / "output").iterdir())  # no checkpoint, log or summary


def test_a_run_directory_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = compose_config(tmp_path, [*ONE_TEACHER])
    with open_dict(cfg):
        cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(ConfigError, match=r"paths\.output_dir=.*a_file is a file"):
        train(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()  # no teacher trained


def test_every_problem_is_reported_at_once(tmp_path):
    overrides = ["trainer.devices=0", "method.loss.alpha=2", "student.num_classes=3"]
    cfg = compose_config(tmp_path, [*ONE_TEACHER, *overrides, "train_if_missing=false"])
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
    keys = [problem.split(":")[0].split("=")[0] for problem in caught.value.problems]
    assert keys == [
        "method.loss.alpha",
        "trainer.devices",
        "student.num_classes",
        "teachers.mlp",
    ]
    assert str(caught.value).startswith("the config has 4 problems, found before any work:")


def test_a_crafted_teacher_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "teacher.ckpt"
    crafted.write_bytes(pickle.dumps({"state_dict": Payload()}))
    cfg = compose_config(tmp_path, [*ONE_TEACHER, f"teachers.mlp.checkpoint={crafted}"])
    with pytest.raises(ConfigError, match=r"teachers\.mlp\.checkpoint: teacher 'mlp'"):
        train(cfg)
    assert not marker.exists()


def test_kd_teachers_validates_first(tmp_path):
    cfg = compose_config(tmp_path, [*ONE_TEACHER, "teachers.mlp.model.num_classes=4"])
    with pytest.raises(ConfigError, match=r"teachers\.mlp: teacher 'mlp' outputs 4 classes"):
        train_teachers(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


METHODS = sorted(path.stem for path in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_builds_its_module(tmp_path, method):
    """Validation builds each method from its config as the run will, up to its first stage."""
    validate_config(compose_config(tmp_path, [*ONE_TEACHER, f"method={method}"]))
    assert not any((tmp_path / "output").iterdir())  # no stage trained, no teacher loaded


@pytest.mark.parametrize("name", ["../../evil", "sub/teacher", "..", "/abs"])
def test_the_teacher_cache_never_leaves_its_directory(tmp_path, name):
    cfg = compose_config(tmp_path / "run", ONE_TEACHER)
    with open_dict(cfg):
        cfg.teachers[name] = cfg.teachers.mlp
    with pytest.raises(ValueError, match="a teacher name may hold only"):
        teacher_cache.build_teachers(cfg, instantiate(cfg.data))  # validation bypassed
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == []


def test_a_cache_directory_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = compose_config(tmp_path, [*ONE_TEACHER])
    with open_dict(cfg):
        cfg.paths.cache_dir = str(blocker / "cache")
    with pytest.raises(ConfigError, match=r"paths\.cache_dir=.*a_file is a file") as caught:
        train(cfg)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert blocker.read_text() == "not a directory"
    assert not any((tmp_path / "output").iterdir())  # no checkpoint, log or summary
