"""Sequential and progressive methods: TAKD's chain and its resumable stages, ProKT's two steps,
Pro-KD's trajectory, and every staged method= value through `train(cfg)`."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.cli.teacher_checkpoints import build_teachers
from kd_lightning.cli.train import build_module, train
from kd_lightning.cli.validation import validate_config
from kd_lightning.errors import ConfigError
from kd_lightning.functional import prokt_student_loss, prokt_teacher_loss
from kd_lightning.modules import (
    ClassifierModule,
    DistillationModule,
    ProKDModule,
    ProKTModule,
    prokt_pipeline,
    stages,
)

from .app_helpers import FAST, compose_config


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


def quiet_trainer(**options) -> L.Trainer:
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **options,
    )


# ---------------------------------------------------------------- ProKT objectives


def test_prokt_losses_match_numpy_and_detach_the_other_network():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    student = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, 2])
    lam, T = 0.3, 2.0
    zt, zs = teacher.detach().numpy(), student.detach().numpy()

    expected_teacher = (1 - lam) * -np.log(softmax(zt)[np.arange(5), labels.numpy()]).mean() + (
        lam * T**2 * kl_rows(softmax(zs / T), softmax(zt / T)).mean()
    )
    teacher_loss = prokt_teacher_loss(teacher, student, labels, lam, T)
    assert teacher_loss.item() == pytest.approx(expected_teacher, rel=1e-5)
    teacher_loss.backward()
    assert student.grad is None  # the student's prediction is a fixed target here

    expected_student = T**2 * kl_rows(softmax(zt / T), softmax(zs / T)).mean()
    teacher.grad = None
    student_loss = prokt_student_loss(student, teacher, T)
    assert student_loss.item() == pytest.approx(expected_student, rel=1e-5)
    student_loss.backward()
    assert teacher.grad is None


def test_prokt_constraint_out_of_range_is_refused():
    with pytest.raises(ValueError, match="constraint"):
        ProKTModule(nn.Linear(2, 2), nn.Linear(2, 2), constraint=1.5)


def test_prokt_step_moves_each_network_by_its_own_objective():
    """One real Trainer step with plain SGD, against the update computed by hand in NumPy:
    the teacher by (1 − λ)CE + λT²KL(sg p_S ‖ p_T), then the student by T²KL(p_T' ‖ p_S) towards
    the updated teacher (which also proves neither loss leaks into the other network)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    student, teacher = nn.Linear(3, 4), nn.Linear(3, 4)
    ws, bs = (p.detach().double().numpy().copy() for p in (student.weight, student.bias))
    wt, bt = (p.detach().double().numpy().copy() for p in (teacher.weight, teacher.bias))
    lam, T, lr = 0.4, 2.0, 0.5
    sgd = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    module = ProKTModule(student, teacher, "lin", constraint=lam, temperature=T, optimizer=sgd)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=6))

    student_optimizer, teacher_optimizer = trainer.optimizers
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(student_optimizer.param_groups[0]["params"]) == ids(student.parameters())
    assert ids(teacher_optimizer.param_groups[0]["params"]) == ids(teacher.parameters())

    xs, onehot, n = x.double().numpy(), np.eye(4)[y.numpy()], len(y)
    zs, zt = xs @ ws.T + bs, xs @ wt.T + bt
    grad_t = (1 - lam) * (softmax(zt) - onehot) / n + lam * T * (
        softmax(zt / T) - softmax(zs / T)
    ) / n
    wt2, bt2 = wt - lr * grad_t.T @ xs, bt - lr * grad_t.sum(0)
    zt2 = xs @ wt2.T + bt2
    grad_s = T * (softmax(zs / T) - softmax(zt2 / T)) / n
    ws2, bs2 = ws - lr * grad_s.T @ xs, bs - lr * grad_s.sum(0)
    for got, want in (
        (teacher.weight, wt2),
        (teacher.bias, bt2),
        (student.weight, ws2),
        (student.bias, bs2),
    ):
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- Pro-KD


def test_prokd_follows_the_trajectory_with_falling_temperature():
    torch.manual_seed(0)
    teacher = nn.Linear(3, 4)
    trajectory = [
        {"weight": torch.full((4, 3), float(i)), "bias": torch.full((4,), float(i))}
        for i in range(3)
    ]
    module = ProKDModule(
        nn.Linear(3, 4), teacher, trajectory, "lin", max_temperature=5.0, min_temperature=1.0
    )
    seen: list[tuple[int, float, float]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            bias = pl_module.teachers.teachers["lin"].bias[0].item()
            seen.append((trainer.current_epoch, bias, pl_module.loss.temperature))

    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 4, (8,))), batch_size=4)
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, data)
    # the Record callback runs before the module's hook: the temperature lags by one step
    assert [(epoch, bias) for epoch, bias, _ in seen] == [
        (e, float(e)) for e in range(3) for _ in "ab"
    ]
    temperatures = [module.temperature_at(step / 5) for step in range(6)]
    assert temperatures[0] == 5.0 and temperatures[-1] == 1.0
    np.testing.assert_allclose(temperatures, np.linspace(5.0, 1.0, 6))
    # logged once per epoch: the last epoch's steps 4 and 5 ran at 1.8 and 1.0
    assert trainer.callback_metrics["train/temperature"].item() == pytest.approx(1.4)
    assert trainer.callback_metrics["train/teacher_checkpoint"].item() == 2.0
    trainer.test(module, data, verbose=False)
    assert module.current_checkpoint == 2 and module.loss.temperature == 1.0


def test_trajectory_stage_keeps_evenly_spaced_checkpoints_and_resumes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    data = L.LightningDataModule.from_datasets(
        TensorDataset(torch.randn(16, 3), torch.randint(0, 4, (16,))), batch_size=4
    )
    weights_at: dict[int, torch.Tensor] = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights_at[trainer.global_step] = model.weight.detach().clone()

    real_trainer = stages.stage_trainer
    monkeypatch.setattr(
        stages,
        "stage_trainer",
        lambda cfg, label, epochs, callbacks=None, **options: real_trainer(
            cfg, label, epochs, [*(callbacks or []), Record()], **options
        ),
    )
    runner = stages.StageRunner(
        data, tmp_path, {"enable_progress_bar": False, "limit_val_batches": 0}
    )
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    make = lambda: ClassifierModule(model, optimizer=sgd)  # noqa: E731
    states = runner.trajectory("traj", model, make, epochs=2, num_checkpoints=4)
    assert len(states) == 4 and sorted(weights_at) == list(range(1, 9))
    for state, step in zip(states, [2, 4, 6, 8], strict=True):
        torch.testing.assert_close(state["weight"], weights_at[step])

    weights_at.clear()
    again = runner.trajectory("traj", model, make, epochs=2, num_checkpoints=4)
    assert not weights_at  # nothing trained the second time
    torch.testing.assert_close(again[0]["weight"], states[0]["weight"])


# ---------------------------------------------------------------- TAKD


def test_run_stage_trains_once_then_loads_the_kept_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = L.LightningDataModule.from_datasets(
        TensorDataset(torch.randn(8, 3), torch.randint(0, 4, (8,))), batch_size=4
    )
    fits: list[nn.Module] = []

    def make(model: nn.Module):
        def module() -> ClassifierModule:
            fits.append(model)
            return ClassifierModule(model)

        return module

    runner = stages.StageRunner(
        data, tmp_path, {"enable_progress_bar": False, "limit_val_batches": 0}
    )
    trained = nn.Linear(3, 4)
    assert runner.run("hop", trained, make(trained), epochs=1)
    path = stages.stage_path(tmp_path, "hop")
    mtime = path.stat().st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == ["hop.safetensors"]  # no partial file left

    relaunched = nn.Linear(3, 4)
    assert not runner.run("hop", relaunched, make(relaunched), epochs=1)
    assert fits == [trained] and path.stat().st_mtime_ns == mtime
    torch.testing.assert_close(relaunched.weight, trained.weight)


@pytest.mark.slow
def test_takd_chains_hops_and_a_relaunch_trains_no_finished_stage(tmp_path, monkeypatch):
    assistants = (
        "method.assistants=[{_target_:kd_lightning.models.MLP,hidden:64},"
        "{_target_:kd_lightning.models.MLP,hidden:32}]"
    )
    cfg = compose_config(tmp_path, [*FAST, "method=takd", "teachers=[cnn,mlp]", assistants])
    datamodule = instantiate(cfg.data)
    teachers = build_teachers(cfg, datamodule)
    fitted: list[list[str]] = []
    real_trainer = stages.stage_trainer

    def counting_trainer(*args, **kwargs):
        trainer = real_trainer(*args, **kwargs)
        real_fit = trainer.fit

        def fit(module, **fit_kwargs):
            fitted.append(module.teacher_names)
            return real_fit(module, **fit_kwargs)

        trainer.fit = fit
        return trainer

    monkeypatch.setattr(stages, "stage_trainer", counting_trainer)
    stage_dir = Path(cfg.paths.output_dir) / "stages"

    def build() -> DistillationModule:
        module = build_module(cfg, datamodule, teachers)
        assert isinstance(module, DistillationModule)
        return module

    first = build()
    assert fitted == [["cnn", "mlp"], ["assistant1"]]  # the ensemble teaches the first assistant
    assert first.teacher_names == ["assistant2"]
    files = sorted(stage_dir.glob("*.safetensors"))
    assert [f.name for f in files] == ["takd-assistant1.safetensors", "takd-assistant2.safetensors"]
    mtimes = [f.stat().st_mtime_ns for f in files]

    fitted.clear()
    second = build()
    assert fitted == []
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for a, b in zip(first.teachers.parameters(), second.teachers.parameters(), strict=True):
        torch.testing.assert_close(a, b)

    files[1].unlink()  # as if the run stopped during the second stage
    fitted.clear()
    build()
    assert fitted == [["assistant1"]]


def refused_before_any_work(tmp_path, overrides: list[str]) -> str:
    """The one problem `validate_config` reports for ``overrides``; nothing was trained."""
    cfg = compose_config(tmp_path, [*FAST, *overrides])
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
    assert not list(tmp_path.rglob("*.safetensors"))
    (problem,) = caught.value.problems
    return problem


def test_takd_without_assistants_is_refused_before_training(tmp_path):
    overrides = ["method=takd", "teachers=[mlp]", "method.assistants=[]"]
    assert refused_before_any_work(tmp_path, overrides).startswith("method.assistants: ")


def test_prokt_unknown_teacher_init_is_refused(tmp_path):
    overrides = ["method=prokt", "method.teacher_init=random"]
    assert refused_before_any_work(tmp_path, overrides).startswith("method.teacher_init: ")


@pytest.mark.parametrize("method", ["prokt", "prokd"])
def test_a_first_teacher_with_a_class_map_is_refused_naming_the_argument(tmp_path, method):
    overrides = [
        f"method={method}",
        "teachers=[mlp]",
        "teachers.mlp.class_map=[1,0,2,3,4,5,6,7,8,9]",
    ]
    problem = refused_before_any_work(tmp_path, overrides)
    assert problem.startswith("method.teacher: teacher is None") and "class_map" in problem


def test_prokt_pretrained_teacher_is_loaded_only_when_asked(tmp_path):
    """Validation stops where the run would load (or train) the pretrained teacher."""
    calls: list[str] = []
    datamodule = L.LightningDataModule.from_datasets(
        TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4
    )
    teacher = nn.Linear(4, 3)
    path = tmp_path / "teacher.safetensors"
    stages.save_weights(teacher.state_dict(), path, {})
    runner = stages.StageRunner(
        datamodule, tmp_path, {}, pretrained=lambda name: calls.append(name) or path
    )
    for init, expected in (("scratch", []), ("pretrained", ["lin"])):
        module = prokt_pipeline(nn.Linear(4, 3), runner, nn.Linear(4, 3), "lin", teacher_init=init)
        assert calls == expected
    torch.testing.assert_close(module.teacher.weight, teacher.weight)


# ---------------------------------------------------------------- end to end

END_TO_END = {
    "takd": (["method=takd", "teachers=[cnn,mlp]"], ["assistant1"]),
    "prokt": (["method=prokt", "teachers=[mlp]"], ["mlp"]),
    "prokt_scratch": (["method=prokt", "teachers=[cnn]", "method.teacher_init=scratch"], ["cnn"]),
    "prokd": (["method=prokd", "teachers=[cnn]"], ["cnn"]),
}
FAST_CASES = {"prokd"}  # the others train teachers or several stages: a few seconds more each


@pytest.mark.parametrize(
    "case",
    [
        case if case in FAST_CASES else pytest.param(case, marks=pytest.mark.slow)
        for case in sorted(END_TO_END)
    ],
)
def test_staged_method_runs_end_to_end(tmp_path, case):
    overrides, names = END_TO_END[case]
    cfg = compose_config(tmp_path, [*FAST, "baseline=false", *overrides])
    summary, objects = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert written == summary and summary["method"] == case.split("_")[0]
    assert summary["teachers"] == names
    assert 0.0 <= summary["test_accuracy"]["student"] <= 1.0
    assert set(summary["agreement"]["student_vs"]) == set(names)
    if case == "prokt_scratch":  # no cached teacher was needed
        assert not (tmp_path / "cache" / "teachers").exists()
    if case == "prokd":
        assert isinstance(objects["module"], ProKDModule)
        assert len(list((Path(cfg.paths.output_dir) / "stages").glob("prokd-cnn-*"))) == 4


def test_prokd_bad_schedule_is_refused_before_the_teacher_trains(tmp_path):
    overrides = ["method=prokd", "method.temperature_schedule=steps"]
    assert refused_before_any_work(tmp_path, overrides).startswith("method.temperature_schedule: ")
