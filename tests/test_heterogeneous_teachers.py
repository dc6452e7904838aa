"""Heterogeneous teachers: per-teacher input transforms and class maps into the student's classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from safetensors.torch import save_file
from torch import nn

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.callbacks import TeacherAgreementCallback
from kd_lightning.cli import teacher_checkpoints as teacher_cache
from kd_lightning.data import SyntheticDataModule
from kd_lightning.errors import TeacherOutputError
from kd_lightning.functional import (
    js_divergence,
    kl_divergence,
    logit_mse,
    reverse_kl_divergence,
    soft_cross_entropy,
)
from kd_lightning.models import CNN1D, MLP, GRUClassifier
from kd_lightning.teachers import (
    MISSING_CLASS_LOGIT_GAP,
    ReverseSequence,
    Standardize,
    TeacherEnsemble,
)

from .app_helpers import FAST, compose_config
from .conftest import make_trainer


class Constant(nn.Module):
    """A teacher giving the same logits for every sample."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def linear(classes: int, features: int = 6) -> nn.Module:
    return nn.Linear(features, classes)


# --- class maps ------------------------------------------------------------------------------


def test_permutation_reorders_exactly():
    ensemble = TeacherEnsemble(
        {"plain": Constant([1.0, 2.0, 3.0]), "permuted": Constant([1.0, 2.0, 3.0])},
        class_maps={"permuted": [2, 0, 1]},  # teacher class j is student class m[j]
    )
    logits = ensemble(torch.zeros(2, 6))
    assert logits.tolist() == [[[1.0, 2.0, 3.0]] * 2, [[2.0, 3.0, 1.0]] * 2]
    assert ensemble.class_maps == {"permuted": (2, 0, 1)}


def test_subset_teacher_puts_about_zero_probability_on_missing_classes():
    ensemble = TeacherEnsemble(
        {"full": Constant([0.0, 1.0, 2.0, 3.0]), "pair": Constant([5.0, 4.0])},
        class_maps={"pair": [3, 1]},
        num_classes=4,
    )
    pair = ensemble(torch.zeros(3, 6))[1]
    assert pair[0].tolist() == [
        5.0 - MISSING_CLASS_LOGIT_GAP,
        4.0,
        5.0 - MISSING_CLASS_LOGIT_GAP,
        5.0,
    ]
    for temperature in (1.0, 4.0, 20.0):
        probs = (pair / temperature).softmax(-1)
        assert probs[:, [0, 2]].max().item() < 1e-30
        own = torch.tensor([5.0, 4.0]).div(temperature).softmax(-1)
        torch.testing.assert_close(probs[:, [3, 1]], own.expand(3, -1))


def test_divergences_entropy_and_losses_stay_finite_with_a_subset_teacher():
    ensemble = TeacherEnsemble(
        {"full": linear(5), "subset": linear(2)}, class_maps={"subset": [4, 0]}, num_classes=5
    )
    x = torch.randn(8, 6)
    teacher_logits = ensemble(x)
    student = torch.randn(8, 5, requires_grad=True)
    labels = torch.arange(8) % 5  # includes classes the subset teacher does not know
    for temperature in (1.0, 4.0):
        target = (teacher_logits[1] / temperature).softmax(-1)
        for divergence in (kl_divergence, reverse_kl_divergence, js_divergence, soft_cross_entropy):
            assert torch.isfinite(divergence(student, target, temperature)), divergence.__name__
        log_target = (teacher_logits[1] / temperature).log_softmax(-1)
        entropy = -(target * log_target).sum(-1)
        assert torch.isfinite(entropy).all() and entropy.max() < math.log(2) + 1e-4
    assert torch.isfinite(logit_mse(student, teacher_logits[1]))
    assert torch.isfinite(F.cross_entropy(teacher_logits[1], labels))
    for fusion in ("mean_probs", "mean_logits", "entropy", "confidence", "correct_only", "vote"):
        for divergence, aggregation in (("kl", "target"), ("reverse_kl", "loss"), ("js", "loss")):
            out = DistillationLoss(fusion, divergence=divergence, aggregation=aggregation)(
                student, teacher_logits, labels
            )
            (grad,) = torch.autograd.grad(out.loss, student)
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), (fusion, divergence)
            assert torch.isfinite(out.weights).all()


def test_one_permuted_teacher_gives_the_kd_loss_of_the_plain_teacher_on_permuted_labels():
    torch.manual_seed(1)
    teacher = linear(4)
    x, student, labels = torch.randn(10, 6), torch.randn(10, 4), torch.randint(0, 4, (10,))
    perm = [2, 0, 3, 1]
    plain = TeacherEnsemble({"t": teacher})
    permuted = TeacherEnsemble({"t": teacher}, class_maps={"t": perm})
    moved_student = torch.empty_like(student)
    moved_student[:, perm] = student  # the same student, its classes renamed like the teacher's
    moved_labels = torch.tensor(perm)[labels]
    loss = DistillationLoss("mean_probs", alpha=0.7, temperature=3.0)
    expected = loss(student, plain(x), labels)
    got = loss(moved_student, permuted(x), moved_labels)
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.soft, expected.soft)


def test_class_maps_and_transforms_accept_tensors_lists_and_none():
    ensemble = TeacherEnsemble(
        {"a": linear(3), "b": linear(3)},
        input_transforms={"a": None},
        class_maps={"a": torch.tensor([1, 2, 0]), "b": None},
    )
    assert ensemble.class_maps == {"a": (1, 2, 0)} and ensemble.input_transform("a") is None


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            {"input_transforms": {"x": ReverseSequence()}},
            ValueError,
            r"input_transforms name unknown teachers \['x'\]",
        ),
        ({"class_maps": {"x": [0, 1, 2]}}, ValueError, r"class_maps name unknown teachers \['x'\]"),
        ({"input_transforms": {"a": 3}}, TypeError, r"input_transforms\['a'\] must be callable"),
        (
            {"class_maps": {"a": [0, 1, 1]}},
            ValueError,
            r"class_maps\['a'\] maps several teacher classes to the same student class: duplicates \[1\]",
        ),
        (
            {"class_maps": {"a": [0, 1, 4]}, "num_classes": 4},
            ValueError,
            r"class_maps\['a'\] has indices outside \[0, num_classes\) = \[0, 4\): \[4\]",
        ),
        (
            {"class_maps": {"a": [0, -1, 2]}, "num_classes": 4},
            ValueError,
            r"class_maps\['a'\] has indices outside .*\[-1\]",
        ),
        (
            {"class_maps": {"a": [0, -1, 1]}},
            ValueError,
            r"class_maps\['a'\] has negative indices: \[-1\]",
        ),
        (
            {"class_maps": {"a": [0, 1, 5]}},
            ValueError,
            r"class_maps\['a'\] = \[0, 1, 5\] covers a subset .*pass num_classes=",
        ),
        ({"class_maps": {"a": []}}, ValueError, r"class_maps\['a'\] is empty"),
        (
            {"class_maps": {"a": [0, 1.5, 2]}},
            TypeError,
            r"class_maps\['a'\] must hold integer class indices, got 1.5",
        ),
        ({"class_maps": {"a": "012"}}, TypeError, r"class_maps\['a'\] must be a sequence"),
        ({"num_classes": 0}, ValueError, "num_classes must be a positive integer"),
    ],
)
def test_bad_settings_are_refused_up_front(kwargs, error, message):
    with pytest.raises(error, match=message):
        TeacherEnsemble({"a": linear(3), "b": linear(3)}, **kwargs)


def test_class_map_length_must_match_the_output_width():
    ensemble = TeacherEnsemble(
        {"a": linear(4), "b": linear(3)}, class_maps={"b": [0, 1, 2, 3]}, num_classes=4
    )
    with pytest.raises(
        TeacherOutputError,
        match=r"teacher 'b': class_maps\['b'\] has length 4 but the teacher's output width is 3",
    ):
        ensemble(torch.randn(2, 6))


def test_width_other_than_num_classes_without_a_class_map_is_refused():
    ensemble = TeacherEnsemble(
        {"a": linear(4), "b": linear(3)}, class_maps={"a": [3, 2, 1, 0]}, num_classes=4
    )
    with pytest.raises(
        TeacherOutputError,
        match=r"teacher 'b' outputs 3 classes but the student has num_classes=4: declare class_maps=\{'b': \[\.\.\.\]\}",
    ):
        ensemble(torch.randn(2, 6))
    with pytest.raises(TeacherOutputError, match=r"teacher 'a' outputs 3 classes.*num_classes=4"):
        TeacherEnsemble({"a": linear(3)}, num_classes=4)(torch.randn(2, 6))


def test_width_other_than_the_other_teachers_asks_for_a_class_map():
    ensemble = TeacherEnsemble({"ten": linear(10), "eight": linear(8)})
    with pytest.raises(
        TeacherOutputError,
        match=r"'ten' gives \(2, 10\), 'eight' gives \(2, 8\).*declare class_maps=\{'eight': \[\.\.\.\]\}",
    ):
        ensemble(torch.randn(2, 6))
    two_maps = TeacherEnsemble(
        {"ten": linear(10), "eight": linear(8)},
        class_maps={"ten": list(range(10)), "eight": list(range(8))},
    )
    with pytest.raises(TeacherOutputError, match=r"pass num_classes=<the student's class count>"):
        two_maps(torch.randn(2, 6))


# --- input transforms ------------------------------------------------------------------------


class Reversed(nn.Module):
    """A teacher trained on reversed sequences: it reads ``x`` as its original reads ``x[::-1]``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def forward(self, x):
        return self.original(x.flip(-1))


def test_transform_applies_to_its_teacher_only():
    original = linear(3)
    ensemble = TeacherEnsemble(
        {"plain": original, "reversed": Reversed(original), "scaled": Constant([0.0, 0.0, 0.0])},
        input_transforms={"reversed": ReverseSequence(), "scaled": lambda x: x * 0},
    )
    x = torch.randn(5, 6)
    logits = ensemble(x)
    torch.testing.assert_close(logits[1], logits[0])  # agrees with itself through the transform
    torch.testing.assert_close(logits[0], original(x).detach())
    torch.testing.assert_close(ensemble.view("reversed")(x), logits[1])
    with pytest.raises(KeyError, match="no teacher 'gru'"):
        ensemble.view("gru")


def test_standardising_teacher_sees_standardised_inputs():
    torch.manual_seed(0)
    data = torch.randn(64, 6) * 3 + 2
    standardize = Standardize.from_data(data)
    raw = linear(3)
    standardised = nn.Sequential(
        Standardize(-standardize.mean / standardize.std, 1 / standardize.std), raw
    )
    ensemble = TeacherEnsemble(
        {"raw": raw, "std": standardised}, input_transforms={"std": standardize}
    )
    logits = ensemble(data)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_module_transforms_are_frozen_eval_locked_and_left_out_of_checkpoints(tmp_path):
    transform = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5))
    ensemble = TeacherEnsemble(
        {"a": linear(3), "b": linear(3)},
        input_transforms={"a": transform, "b": Standardize(1.0, 2.0)},
    )
    module = DistillationModule(linear(3), ensemble)
    module.train()
    assert not transform.training and not any(p.requires_grad for p in transform.parameters())
    x = torch.randn(4, 6)
    torch.testing.assert_close(ensemble(x), ensemble(x))  # dropout off
    assert any(key.startswith("teachers.input_transforms.") for key in module.state_dict())
    module = module.to(torch.float64)  # buffers and transforms follow the module
    assert ensemble.input_transforms["b"].mean.dtype == torch.float64
    module = module.to(torch.float32)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not [
        key for key in checkpoint["state_dict"] if "input_transforms" in key or "teachers" in key
    ]
    module.load_state_dict(checkpoint["state_dict"])  # student-only checkpoints load back
    assert ensemble.input_transforms["b"].std.item() == 2.0


# --- three heterogeneous teachers, a real Trainer --------------------------------------------

PERMUTATION = [3, 7, 0, 9, 1, 5, 2, 8, 6, 4]  # CNN class j is student class PERMUTATION[j]
SUBSET = [0, 1, 2, 3, 5, 6, 8, 9]  # the MLP knows 8 of the 10 classes


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 40) -> nn.Module:
    """Quick full-batch Adam on (x, y), ignoring labels equal to -100.

    One thread: these tensors are tiny, and two threads on a busy two-core machine crawl.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y, ignore_index=-100).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def teacher_labels(labels: torch.Tensor, class_map: list[int]) -> torch.Tensor:
    """Student labels → teacher class indices (-100 where the teacher lacks the class)."""
    lookup = torch.full((10,), -100)
    lookup[torch.tensor(class_map)] = torch.arange(len(class_map))
    return lookup[labels]


def test_cnn_gru_mlp_with_their_own_preprocessing_and_classes_distil_a_student(tmp_path):
    datamodule = SyntheticDataModule(
        num_samples=400, in_features=40, num_classes=10, batch_size=50, noise=0.5
    )
    datamodule.setup()
    x, y = datamodule.train_set.tensors
    standardize = Standardize.from_data(x)
    reverse = ReverseSequence()
    # The CNN learnt its classes in another order, the GRU read reversed sequences, the MLP
    # standardised ones and only 8 of the 10 classes.
    cnn = fit(CNN1D(channels=8), x, teacher_labels(y, PERMUTATION))
    gru = fit(GRUClassifier(hidden=2), reverse(x), y, steps=25)
    mlp = fit(MLP(num_classes=8, hidden=64), standardize(x), teacher_labels(y, SUBSET))
    ensemble = TeacherEnsemble(
        {"cnn": cnn, "gru": gru, "mlp": mlp},
        input_transforms={"gru": reverse, "mlp": standardize},
        class_maps={"cnn": PERMUTATION, "mlp": SUBSET},
        num_classes=10,
    )
    x_val, y_val = datamodule.val_set.tensors
    logits = ensemble(x_val)
    assert logits.shape == (3, len(x_val), 10)
    accuracy = (logits.argmax(-1) == y_val).float().mean(-1)
    assert accuracy.min() > 0.5, accuracy  # each teacher is right in the student's classes
    unmapped = (cnn(x_val).argmax(-1) == y_val).float().mean()
    assert unmapped < accuracy[0] - 0.3  # without its class map the CNN would be wrong
    assert set(logits[2].argmax(-1).tolist()) <= set(SUBSET)

    module = DistillationModule(
        MLP(hidden=32),
        ensemble,
        DistillationLoss("confidence", alpha=0.9, temperature=4.0),
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    )
    trainer = make_trainer(
        tmp_path, max_epochs=2, limit_train_batches=4, callbacks=[TeacherAgreementCallback()]
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    for name in ("cnn", "gru", "mlp"):
        assert 0.0 <= float(metrics[f"val/agreement/student_vs_{name}"]) <= 1.0
        assert math.isfinite(float(metrics[f"val/kl/{name}_to_student"]))
        assert float(metrics[f"val/teacher_acc/{name}"]) > 0.5
    assert math.isfinite(float(metrics["train/loss_epoch"]))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=True)["state_dict"]
    assert not [key for key in saved if key.startswith("teachers.")]


# --- the Hydra app ---------------------------------------------------------------------------


def test_config_class_map_and_input_transform_reach_the_ensemble(tmp_path):
    own = CNN1D()
    save_file(own.state_dict(), str(tmp_path / "cnn.safetensors"))
    overrides = [*FAST, "teachers=[cnn,gru]", "teachers.gru.model.hidden=2"]
    plain_gru_key = teacher_cache.teacher_key("gru", compose_config(tmp_path, overrides))
    cfg = compose_config(
        tmp_path,
        [
            *overrides,
            f"teachers.cnn.checkpoint={tmp_path}/cnn.safetensors",
            f"teachers.cnn.class_map=[{','.join(map(str, PERMUTATION))}]",
            "teachers.gru.input_transform={_target_: kd_lightning.teachers.ReverseSequence}",
            "data.num_samples=400",
        ],
    )
    assert cfg.num_classes == 10  # from the student
    assert teacher_cache.teacher_key("gru", cfg) != plain_gru_key
    ensemble = teacher_cache.build_teachers(cfg, instantiate(cfg.data))
    assert ensemble.class_maps == {"cnn": tuple(PERMUTATION)} and ensemble.num_classes == 10
    assert isinstance(ensemble.input_transform("gru"), ReverseSequence)
    x = torch.randn(4, 40)
    logits = ensemble(x)
    raw = own(x).detach()
    torch.testing.assert_close(logits[0][:, PERMUTATION], raw)
    gru = ensemble.teachers["gru"]
    torch.testing.assert_close(logits[1], gru(x.flip(-1)))
    assert teacher_cache.cached_teacher_path("gru", cfg).is_file()


def test_config_subset_teacher_is_trained_on_its_own_classes(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            *FAST,
            "teachers=[mlp]",
            "+data.noise=0.5",
            "data.num_samples=1000",
            "teacher_epochs=5",
            "teachers.mlp.model.num_classes=8",
            "teachers.mlp.model.hidden=64",
            f"teachers.mlp.class_map=[{','.join(map(str, SUBSET))}]",
            "teachers.mlp.input_transform={_target_: torch.nn.Sequential, _args_: ["
            "{_target_: kd_lightning.teachers.ReverseSequence}, "
            "{_target_: kd_lightning.teachers.Standardize, mean: 0.5, std: 2.0}]}",
        ],
    )
    datamodule = instantiate(cfg.data)
    ensemble = teacher_cache.build_teachers(cfg, datamodule)
    transform = ensemble.input_transform("mlp")
    assert isinstance(transform, nn.Sequential) and isinstance(transform[1], Standardize)
    x, y = datamodule.val_set.tensors
    predicted = ensemble(x)[0].argmax(-1)
    covered = torch.isin(y, torch.tensor(SUBSET))
    assert set(predicted.tolist()) <= set(SUBSET)
    # Trained on its own class indices and through its transform: right on the classes it knows.
    assert (predicted[covered] == y[covered]).float().mean() > 0.7
    mlp = ensemble.teachers["mlp"]
    untransformed = torch.tensor(SUBSET)[mlp(x).argmax(-1)]
    assert (untransformed[covered] == y[covered]).float().mean() < 0.4


def test_config_class_map_of_the_wrong_length_fails_before_training(tmp_path):
    cfg = compose_config(tmp_path, [*FAST, "teachers=[mlp]", "teachers.mlp.class_map=[0,1,2]"])
    with pytest.raises(
        ValueError,
        match=r"teachers.mlp.class_map has 3 entries but teachers.mlp.model.num_classes=10",
    ):
        teacher_cache.build_teachers(cfg, instantiate(cfg.data))
    cfg = compose_config(
        tmp_path,
        [
            *FAST,
            "teachers=[mlp]",
            "teachers.mlp.model.num_classes=3",
            "teachers.mlp.class_map=[0,1,1]",
        ],
    )
    with pytest.raises(ValueError, match=r"class_maps\['mlp'\] maps several teacher classes"):
        teacher_cache.build_teachers(cfg, instantiate(cfg.data))
    assert not (tmp_path / "cache" / "teachers").exists()
