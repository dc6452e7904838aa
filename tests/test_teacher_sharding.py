"""Teachers sharded across gloo ranks give every rank the whole ensemble's logits, and hold less."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kd_lightning import DistillationModule
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.teachers import DrawnTeachers, TeacherEnsemble, TeacherSource
from kd_lightning.teachers.sharded import ShardedTeachers, teacher_shard

from .app_helpers import FAST, compose_config
from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp


def test_teachers_are_dealt_round_robin_and_every_rank_holds_one():
    assert [teacher_shard(5, rank, 3) for rank in range(3)] == [[0, 3], [1, 4], [2]]
    assert teacher_shard(2, 1, 2) == [1]
    with pytest.raises(ValueError, match="cannot shard 2 teachers over 3 ranks"):
        teacher_shard(2, 0, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        teacher_shard(3, 2, 2)


def heterogeneous_teachers() -> TeacherEnsemble:
    """Three teachers, one reading reversed inputs and one with reordered classes."""
    torch.manual_seed(0)
    return TeacherEnsemble(
        {"a": small_mlp(), "b": small_mlp(hidden=8), "c": nn.Linear(NUM_FEATURES, NUM_CLASSES)},
        input_transforms={"b": lambda x: x.flip(-1)},
        class_maps={"c": [3, 2, 1, 0]},
    )


def _exchange_on_rank(rank: int, out: str, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ensemble = heterogeneous_teachers()
        torch.manual_seed(100 + rank)
        inputs = torch.randn(3 + 2 * rank, NUM_FEATURES)  # ranks' batches differ: 3 and 5
        sharded = ShardedTeachers(ensemble, rank=rank, world_size=2)
        logits = sharded(inputs)
        refused = ""
        try:
            sharded(torch.randn(2, NUM_FEATURES + rank))  # the ranks' features differ
        except ValueError as error:
            refused = str(error)
        torch.save(
            {"inputs": inputs, "logits": logits, "held": sharded.local.names, "refused": refused},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_receive_every_teachers_logits_on_their_own_samples(tmp_path):
    mp.spawn(_exchange_on_rank, args=(str(tmp_path), f"file://{tmp_path}/store"), nprocs=2)
    ensemble = heterogeneous_teachers()
    held = []
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        held.append(result["held"])
        assert result["logits"].shape == (3, 3 + 2 * rank, NUM_CLASSES)
        torch.testing.assert_close(result["logits"], ensemble(result["inputs"]))
        assert "differ beyond the batch dimension: [(2, 8), (2, 9)]" in result["refused"]
    assert held == [["a", "c"], ["b"]]


def test_sharded_teachers_refuse_another_group_size_and_non_tensor_inputs(tmp_path):
    sharded = ShardedTeachers(heterogeneous_teachers(), rank=0, world_size=2)
    with pytest.raises(
        RuntimeError, match="sharded over 2 ranks, but this process runs in a group of 1"
    ):
        sharded(torch.randn(2, NUM_FEATURES))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        alone = ShardedTeachers(heterogeneous_teachers(), rank=0, world_size=1)
        with pytest.raises(TypeError, match="need a tensor or a mapping of tensors, got list"):
            alone([torch.randn(2, NUM_FEATURES)])
        x = torch.randn(2, NUM_FEATURES)
        outputs = alone.outputs(x, batch=None, stage="train")
        torch.testing.assert_close(outputs.logits, heterogeneous_teachers()(x))
        assert outputs.ran == (0, 1, 2) and outputs.features == {}
    finally:
        dist.destroy_process_group()


def test_the_ensemble_shards_itself_and_sharded_teachers_refuse_what_they_cannot_do():
    ensemble = heterogeneous_teachers()
    assert ensemble.shard(0, 1) is ensemble  # one rank: nothing to shard
    sharded = ensemble.shard(1, 2)
    assert isinstance(sharded, ShardedTeachers) and isinstance(sharded, TeacherSource)
    assert sharded.local.names == ["b"] and sharded.names == ["a", "b", "c"]
    assert sharded.shard(1, 2) is sharded  # a second setup keeps it
    with pytest.raises(ValueError, match="already sharded for rank 1 of 2, not rank 0 of 3"):
        sharded.shard(0, 3)
    with pytest.raises(ValueError, match="each rank holds only its own teachers"):
        sharded.tap({"a": "0"})
    with pytest.raises(ValueError, match=r"rank 1 holds only \['b'\]"):
        sharded.networks()
    ensemble.tap({"a": "0"})
    with pytest.raises(ValueError, match="cannot serve tapped layers"):
        ensemble.shard(0, 2)


class RecordHeldTeachers(L.Callback):
    """Each rank writes which teachers it holds and how many teacher parameters are on it."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        teachers = pl_module.teachers
        held = teachers.local.names if isinstance(teachers, ShardedTeachers) else teachers.names
        record = {"held": held, "parameters": sum(p.numel() for p in teachers.parameters())}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def fit_two_ranks(tmp_path: Path, datamodule, shard: bool) -> tuple[DistillationModule, dict]:
    torch.manual_seed(0)
    module = DistillationModule(
        small_mlp(), heterogeneous_teachers().teachers, shard_teachers=shard
    )
    record = tmp_path / ("sharded" if shard else "whole")
    record.mkdir()
    trainer = make_trainer(
        record,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[RecordHeldTeachers(record)],
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    held = {rank: json.loads((record / f"rank{rank}.json").read_text()) for rank in range(2)}
    return module, {"metrics": metrics, "held": held}


@pytest.mark.slow
def test_sharded_ddp_trains_the_student_unsharded_ddp_trains(tmp_path, datamodule):
    os.environ["OMP_NUM_THREADS"] = "1"
    whole, whole_run = fit_two_ranks(tmp_path, datamodule, shard=False)
    sharded, sharded_run = fit_two_ranks(tmp_path, datamodule, shard=True)
    for key, value in whole.student.state_dict().items():
        torch.testing.assert_close(sharded.student.state_dict()[key], value, msg=key)
    for key in ("train/loss", "val/loss", "val/acc"):
        assert sharded_run["metrics"][key] == pytest.approx(whole_run["metrics"][key], rel=1e-5)
    assert [sharded_run["held"][rank]["held"] for rank in range(2)] == [["a", "c"], ["b"]]
    every = whole_run["held"][0]["parameters"]
    assert whole_run["held"][1]["parameters"] == every
    assert sharded_run["held"][0]["parameters"] + sharded_run["held"][1]["parameters"] == every


def test_sharding_refuses_what_needs_every_teacher_on_every_rank(teachers):
    with pytest.raises(ValueError, match="feature hints"):
        DistillationModule(
            small_mlp(),
            teachers,
            hints=FeatureHintLoss("0", {n: "0" for n in teachers}),
            shard_teachers=True,
        )
    with pytest.raises(ValueError, match="save_teachers=True"):
        DistillationModule(small_mlp(), teachers, save_teachers=True, shard_teachers=True)
    with pytest.raises(ValueError, match="DrawnTeachers runs a subset of the teachers"):
        DistillationModule(
            small_mlp(), DrawnTeachers(TeacherEnsemble(teachers)), shard_teachers=True
        )


def test_one_process_keeps_every_teacher(tmp_path, teachers, datamodule):
    module = DistillationModule(small_mlp(), teachers, shard_teachers=True)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=datamodule)
    assert isinstance(module.teachers, TeacherEnsemble) and module.teacher_names == ["a", "b", "c"]


def test_config_problems_of_sharding_are_reported_with_their_keys(tmp_path):
    from kd_lightning.cli.validation import sharding_problems

    shard = "teacher_runtime.shard_across_ranks=true"
    cfg = compose_config(
        tmp_path,
        [
            *FAST,
            shard,
            "teachers=[mlp,cnn]",
            "cache=true",
            "trainer.devices=3",
            "teacher_runtime.draw_per_step=1",
        ],
    )
    problems = sharding_problems(cfg)
    expected = [
        "cache=true reads",
        "teacher_runtime.draw_per_step=1 runs",
        "3 ranks (trainer.devices",
    ]
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.split(": ", 1)[1].startswith(start), problem
    assert all(problem.startswith(shard) for problem in problems)
    cfg = compose_config(tmp_path, [*FAST, shard, "method=dml"])
    assert sharding_problems(cfg) == [
        f"{shard}: method=dml does not shard teachers; only method=ensemble does"
    ]
    assert sharding_problems(compose_config(tmp_path, [*FAST, shard])) == []
