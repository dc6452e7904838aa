"""Feature taps and multi-teacher feature hints (FitNets-style, weighted per sample by fusion)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.data import SyntheticDataModule
from kd_lightning.fusion import StaticWeights
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.models import CNN1D, MLP, GRUClassifier
from kd_lightning.models.taps import FeatureTaps

from .app_helpers import FAST, compose_config
from .conftest import make_trainer, small_mlp

LAYERS = {"cnn": "conv3", "gru": "gru", "mlp": "hidden"}


def mnist1d_teachers() -> dict[str, nn.Module]:
    return {"cnn": CNN1D(), "gru": GRUClassifier(), "mlp": MLP(hidden=32)}


def hinted_module(teachers=None, lr: float = 1e-2) -> DistillationModule:
    return DistillationModule(
        MLP(hidden=16),
        teachers if teachers is not None else mnist1d_teachers(),
        optimizer=partial(torch.optim.Adam, lr=lr),
        hints=FeatureHintLoss("hidden", LAYERS, weight=0.5),
    )


class AdapterSnapshot(Callback):
    """The hint adapters' state when training starts."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.hints.state_dict().items()}


def synthetic_data() -> SyntheticDataModule:
    return SyntheticDataModule(num_samples=256, in_features=40, num_classes=10, batch_size=32)


# --- FeatureTaps -----------------------------------------------------------------------------------


def test_taps_capture_the_named_layers_outputs():
    model = MLP(hidden=16)
    x = torch.randn(5, 40)
    with FeatureTaps(model, ["input", "hidden"]) as taps:
        logits = model(x)
    first = model.input(x)
    assert torch.equal(taps["input"], first)
    assert torch.equal(taps["hidden"], model.hidden(first))
    assert torch.equal(model.head(taps["hidden"]), logits)
    taps.clear()
    with pytest.raises(KeyError):
        taps["input"]


def test_taps_take_element_zero_of_tuple_outputs_and_remove_their_hooks():
    model = GRUClassifier()
    taps = FeatureTaps(model, ["gru"])
    x = torch.randn(3, 40)
    model(x)
    outputs, _ = model.gru(x.unsqueeze(-1))
    assert torch.equal(taps["gru"], outputs)
    taps.remove()
    taps.clear()
    model(x)
    assert not taps.features


def test_unknown_layer_lists_available_names():
    with pytest.raises(ValueError, match=r"no submodule 'nope'.*'hidden'"):
        FeatureTaps(MLP(), ["nope"])


# --- FeatureHintLoss -------------------------------------------------------------------------------


def test_adapters_follow_the_first_shapes():
    hint = FeatureHintLoss("s", {"flat": "x", "map": "y", "long": "z"})
    assert not hint.materialized
    hint.materialize(
        torch.randn(2, 8),
        {"flat": torch.randn(2, 6), "map": torch.randn(2, 3, 5), "long": torch.randn(2, 4, 7)},
    )
    assert isinstance(hint.adapters["flat"].proj, nn.Linear)
    assert hint.adapters["flat"].proj.weight.shape == (6, 8)
    assert hint.adapters["map"].proj.weight.shape == (15, 8)  # flat → flattened map, reshaped
    assert hint.adapters["map"](torch.randn(2, 8)).shape == (2, 3, 5)

    conv = FeatureHintLoss("s", {"same": "x", "shorter": "y", "flat": "z"})
    conv.materialize(
        torch.randn(2, 6, 10),
        {"same": torch.randn(2, 4, 10), "shorter": torch.randn(2, 3, 5), "flat": torch.randn(2, 9)},
    )
    for name in ("same", "shorter"):
        assert isinstance(conv.adapters[name].proj, nn.Conv1d)
        assert conv.adapters[name].proj.kernel_size == (1,)
    student = torch.randn(2, 6, 10)
    assert conv.adapters["same"](student).shape == (2, 4, 10)
    shorter = conv.adapters["shorter"]
    pooled = nn.functional.adaptive_avg_pool1d(student, 5)
    assert torch.allclose(shorter(student), shorter.proj(pooled))
    flat = conv.adapters["flat"]
    assert torch.allclose(flat(student), flat.proj(student.mean(-1)))


def test_loss_matches_a_hand_computation():
    hint = FeatureHintLoss("s", {"a": "x", "b": "y"})
    student = torch.randn(3, 4)
    teachers = {"a": torch.randn(3, 2), "b": torch.randn(3, 2, 3)}
    hint.materialize(student, teachers)
    with torch.no_grad():
        hint.adapters["a"].proj.weight.copy_(torch.eye(2, 4))
        hint.adapters["a"].proj.bias.zero_()
        hint.adapters["b"].proj.weight.zero_()
        hint.adapters["b"].proj.bias.fill_(1.0)
    weights = torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    mse_a = (student[:, :2] - teachers["a"]).pow(2).mean(-1)
    mse_b = (1.0 - teachers["b"]).pow(2).mean((-1, -2))
    expected = (weights[:, 0] * mse_a + weights[:, 1] * mse_b).mean()
    assert torch.allclose(hint(student, teachers, weights), expected)


def test_loss_refuses_bad_weights_and_missing_adapters():
    hint = FeatureHintLoss("s", {"a": "x"})
    with pytest.raises(RuntimeError, match="materialize"):
        hint(torch.randn(2, 3), {"a": torch.randn(2, 3)}, torch.ones(2, 1))
    hint.materialize(torch.randn(2, 3), {"a": torch.randn(2, 3)})
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        hint(torch.randn(2, 3), {"a": torch.randn(2, 3)}, torch.ones(2, 2))


def test_state_dict_rebuilds_adapters_in_a_fresh_loss():
    hint = FeatureHintLoss("s", {"a": "x", "b": "y"})
    hint.materialize(torch.randn(2, 6, 10), {"a": torch.randn(2, 3, 5), "b": torch.randn(2, 4)})
    fresh = FeatureHintLoss("s", {"a": "x", "b": "y"})
    fresh.load_state_dict(hint.state_dict())
    student = torch.randn(2, 6, 10)
    for name in ("a", "b"):
        assert torch.equal(fresh.adapters[name](student), hint.adapters[name](student))


# --- DistillationModule with hints -----------------------------------------------------------------


def test_teachers_missing_from_teacher_layers_are_named():
    with pytest.raises(ValueError, match=r"teachers \['gru'\]"):
        DistillationModule(
            MLP(hidden=16),
            mnist1d_teachers(),
            hints=FeatureHintLoss("hidden", {"cnn": "conv3", "mlp": "hidden"}),
        )
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        DistillationModule(
            MLP(hidden=16), mnist1d_teachers(), hints=FeatureHintLoss("nope", LAYERS)
        )


def test_fit_runs_teachers_once_per_step_and_trains_the_adapters(tmp_path):
    module = hinted_module()
    calls = {name: 0 for name in LAYERS}
    for name, teacher in module.teachers.teachers.items():
        teacher.register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    snapshot = AdapterSnapshot()
    trainer = make_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[snapshot],
    )
    trainer.fit(module, datamodule=synthetic_data())
    # One dry run in setup("fit") creates the adapters, then one call per train/val step.
    assert calls == {name: 1 + 3 + 2 for name in LAYERS}
    assert module.hints.materialized and set(module.hints.adapters) == set(LAYERS)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    expected = {*map(id, module.student.parameters()), *map(id, module.hints.parameters())}
    assert optimized == expected
    assert snapshot.state  # taken after setup, before the first step
    for key, value in module.hints.state_dict().items():
        if key.endswith(("weight", "bias")):
            assert not torch.equal(value, snapshot.state[key]), f"adapter {key} did not train"
    for key in ("train/hint", "val/hint", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[key])

    trainer.save_checkpoint(tmp_path / "hinted.ckpt")
    state = torch.load(tmp_path / "hinted.ckpt", weights_only=True)["state_dict"]
    assert any(key.startswith("hints.adapters.gru.") for key in state)
    assert not any(key.startswith("teachers.") for key in state)
    restored = DistillationModule.load_from_checkpoint(
        tmp_path / "hinted.ckpt",
        student=MLP(hidden=16),
        teachers=mnist1d_teachers(),
        hints=FeatureHintLoss("hidden", LAYERS),
    )
    for key, value in module.hints.state_dict().items():
        assert torch.equal(restored.hints.state_dict()[key], value)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_hint_loss_is_weighted_by_the_fusion_rule(tmp_path, teachers, datamodule):
    # Weight on teacher "c" only: the adapters of "a" and "b" get zero gradient.
    loss = DistillationLoss(StaticWeights([0.0, 0.0, 1.0]))
    layers = {"a": "1", "b": "1", "c": "0"}
    module = DistillationModule(
        small_mlp(), teachers, loss, hints=FeatureHintLoss("1", layers, weight=2.0)
    )
    batch = next(iter(_loader(datamodule)))
    module.materialize(batch)
    assert module.hints.adapters["c"].proj.weight.shape == (4, 16)
    total = module.training_step(batch, 0)["loss"]
    total.backward()
    assert module.hints.adapters["a"].proj.weight.grad.abs().sum() == 0
    assert module.hints.adapters["c"].proj.weight.grad.abs().sum() > 0
    assert torch.isfinite(total)
    make_trainer(tmp_path, max_epochs=1).fit(module, datamodule=datamodule)


def _loader(datamodule):
    datamodule.setup("fit")
    return datamodule.train_dataloader()


def test_fit_without_datamodule_asks_for_materialize(tmp_path, datamodule):
    module = DistillationModule(
        small_mlp(), {"a": small_mlp()}, hints=FeatureHintLoss("1", {"a": "1"})
    )
    with pytest.raises(RuntimeError, match="materialize"):
        make_trainer(tmp_path, max_epochs=1).fit(module, train_dataloaders=_loader(datamodule))
    module.materialize(next(iter(_loader(datamodule))))
    make_trainer(tmp_path, max_epochs=1).fit(module, train_dataloaders=_loader(datamodule))
    assert module.hints.materialized


@pytest.mark.slow
def test_hydra_method_ensemble_hints_trains(tmp_path):
    from kd_lightning.cli.config import method_name
    from kd_lightning.cli.train import train

    cfg = compose_config(
        tmp_path,
        [
            "experiment=smoke",
            "data=synthetic",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "baseline=false",
            "method=ensemble_hints",
            "trainer.max_epochs=1",
        ],
    )
    assert method_name(cfg) == "ensemble_hints"
    assert cfg.method.hints.teacher_layers.gru == "gru"
    _, objects = train(cfg)
    module = objects["module"]
    assert isinstance(module.hints, FeatureHintLoss)
    assert set(module.hints.adapters) == {"cnn", "gru", "mlp"}
    assert "test/hint" in objects["trainer"].callback_metrics


def test_hydra_default_method_has_no_hints(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", "data=synthetic"])
    assert cfg.method.hints is None


# --- CA-MKD weights through the teachers' heads ----------------------------------------------------

HEADS = {"cnn": "head", "gru": "head", "mlp": "head"}


def _confidence_hint():
    torch.manual_seed(0)
    hint = FeatureHintLoss("s", {"a": "x", "b": "y"}, confidence_heads={"a": "h", "b": "h"})
    student = torch.randn(5, 4, requires_grad=True)
    teachers = {"a": torch.randn(5, 3), "b": torch.randn(5, 2, 3)}
    hint.materialize(student, teachers)
    heads = {"a": nn.Linear(3, 4), "b": nn.Linear(6, 4)}
    return hint, student, teachers, heads, torch.tensor([0, 1, 2, 3, 1])


def test_confidence_heads_weights_match_a_hand_computation():
    from kd_lightning.fusion import ConfidenceAware

    hint, student, teachers, heads, labels = _confidence_hint()
    with torch.no_grad():
        adapted = {name: hint.adapters[name](student) for name in ("a", "b")}
        logits = {name: heads[name](adapted[name].flatten(1)) for name in ("a", "b")}
        ce = torch.stack(
            [nn.functional.cross_entropy(logits[n], labels, reduction="none") for n in "ab"], -1
        )
        weights = 1 - torch.softmax(ce, -1)  # (K - 1) = 1
        rule = ConfidenceAware()(torch.stack([logits["a"], logits["b"]]), labels).weights
        assert torch.allclose(weights, rule)
        mse = torch.stack(
            [(adapted[n] - teachers[n]).pow(2).reshape(5, -1).mean(-1) for n in "ab"], -1
        )
        expected = (weights * mse).sum(-1).mean()
    # The fusion weights passed in are ignored (only their shape is checked).
    got = hint(student, teachers, torch.zeros(5, 2), labels=labels, heads=heads)
    assert torch.allclose(got, expected)

    single = FeatureHintLoss("s", {"a": "x"}, confidence_heads={"a": "h"})
    single.materialize(student, {"a": teachers["a"]})
    with torch.no_grad():
        mse_a = (single.adapters["a"](student) - teachers["a"]).pow(2).mean(-1).mean()
    got = single(student, {"a": teachers["a"]}, torch.zeros(5, 1), labels=labels, heads=heads)
    assert torch.allclose(got, mse_a)  # K = 1: weight 1


def test_confidence_heads_get_no_gradient_and_the_adapters_do():
    hint, student, teachers, heads, labels = _confidence_hint()
    before = {n: {k: v.clone() for k, v in h.state_dict().items()} for n, h in heads.items()}
    hint(student, teachers, torch.zeros(5, 2), labels=labels, heads=heads).backward()
    for name, head in heads.items():
        assert all(p.grad is None for p in head.parameters())
        for key, value in head.state_dict().items():
            assert torch.equal(value, before[name][key])
        assert hint.adapters[name].proj.weight.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs labels and the teachers' heads"):
        hint(student, teachers, torch.zeros(5, 2))


def test_confidence_heads_are_resolved_at_module_construction():
    module = DistillationModule(
        MLP(hidden=16),
        mnist1d_teachers(),
        hints=FeatureHintLoss("hidden", LAYERS, confidence_heads=HEADS),
    )
    for name in LAYERS:
        assert module._hint_heads[name] is module.teachers.teachers[name].head
    with pytest.raises(ValueError, match=r"names no head for teachers \['gru'\]"):
        DistillationModule(
            MLP(hidden=16),
            mnist1d_teachers(),
            hints=FeatureHintLoss(
                "hidden", LAYERS, confidence_heads={"cnn": "head", "mlp": "head"}
            ),
        )
    with pytest.raises(ValueError, match=r"teacher 'mlp' has no submodule 'nope'"):
        DistillationModule(
            MLP(hidden=16),
            mnist1d_teachers(),
            hints=FeatureHintLoss("hidden", LAYERS, confidence_heads={**HEADS, "mlp": "nope"}),
        )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_camkd_step_weights_come_through_the_heads():
    module = DistillationModule(
        MLP(hidden=16),
        mnist1d_teachers(),
        hints=FeatureHintLoss("hidden", LAYERS, confidence_heads=HEADS),
    )
    data = synthetic_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.materialize(batch)
    heads = {name: module.teachers.teachers[name].head for name in LAYERS}
    snapshot = {n: [p.clone() for p in h.parameters()] for n, h in heads.items()}
    total = module.training_step(batch, 0)["loss"]
    total.backward()
    for name, head in heads.items():
        assert all(p.grad is None for p in head.parameters())
        assert all(
            torch.equal(p, q) for p, q in zip(head.parameters(), snapshot[name], strict=True)
        )
        assert module.hints.adapters[name].proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_hydra_experiment_camkd_composes_and_trains(tmp_path):
    from kd_lightning.cli.train import train

    cfg = compose_config(tmp_path, ["experiment=camkd"])
    assert dict(cfg.method.hints.confidence_heads) == HEADS
    assert cfg.method.hints.weight == 50.0
    cfg = compose_config(
        tmp_path,
        [
            *FAST,
            "baseline=false",
            "fusion=confidence",
            "method=ensemble_hints",
            "method.loss.aggregation=loss",
            "method.hints.weight=50",
            "+method.hints.confidence_heads={cnn:head,gru:head,mlp:head}",
            "trainer.max_epochs=1",
        ],
    )
    _, objects = train(cfg)
    module = objects["module"]
    assert module.hints.confidence_heads == HEADS
    assert set(module._hint_heads) == set(HEADS)
    assert torch.isfinite(objects["trainer"].callback_metrics["test/hint"])
