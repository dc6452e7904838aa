"""Tests for the MNIST-1D models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from kd_lightning.data import SyntheticDataModule
from kd_lightning.models import CNN1D, MLP, MODELS, GRUClassifier

# Parameter counts of the paper's models (Greydanus 2020).
REFERENCE_PARAMS = [
    (MLP, {}, 15_000),
    (MLP, {"hidden": 512, "dropout": 0.2}, 289_000),
    (CNN1D, {}, 5_200),
    (GRUClassifier, {}, 5_100),
]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one thread: these models are too small to gain from more, and lose under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names_every_model() -> None:
    assert list(MODELS.items()) == [("mlp", MLP), ("cnn", CNN1D), ("gru", GRUClassifier)]


@pytest.mark.parametrize(("model_cls", "kwargs", "expected"), REFERENCE_PARAMS)
def test_parameter_counts_match_reference(
    model_cls: type[nn.Module], kwargs: dict, expected: int
) -> None:
    assert abs(count_parameters(model_cls(**kwargs)) - expected) <= 0.1 * expected


@pytest.mark.parametrize("model_cls", [MLP, CNN1D, GRUClassifier])
def test_output_shape(model_cls: type[nn.Module]) -> None:
    model = model_cls(in_features=24, num_classes=7)
    assert model(torch.randn(5, 24)).shape == (5, 7)


def test_cnn_accepts_channel_dimension() -> None:
    model = CNN1D()
    x = torch.randn(3, 40)
    torch.testing.assert_close(model(x), model(x.unsqueeze(1)))


def test_cnn_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="CNN1D expects"):
        CNN1D()(torch.randn(3, 2, 40))


def test_cnn_rejects_too_short_input() -> None:
    with pytest.raises(ValueError, match="in_features"):
        CNN1D(in_features=1)


@pytest.mark.parametrize(
    ("kwargs", "culprit"), [({"hidden": 0}, "hidden"), ({"dropout": 1.0}, "dropout")]
)
def test_mlp_rejects_invalid_arguments(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        MLP(**kwargs)


def test_mlp_dropout_only_in_training_mode() -> None:
    model = MLP(hidden=64, dropout=0.5)
    x = torch.randn(4, 40)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_mlp_layer_names_are_stable() -> None:
    names = {name for name, _ in MLP().named_children()}
    assert names == {"input", "hidden", "head"}


@pytest.mark.parametrize("model_cls", [MLP, CNN1D, GRUClassifier])
def test_gradients_reach_every_parameter(model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = model_cls()
    nn.functional.cross_entropy(model(torch.randn(6, 40)), torch.arange(6)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# Fewer steps for the slower recurrent model keep each case well under a second.
@pytest.mark.parametrize(("model_cls", "steps"), [(MLP, 300), (CNN1D, 100), (GRUClassifier, 20)])
def test_adam_reduces_loss_on_synthetic_data(model_cls: type[nn.Module], steps: int) -> None:
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_samples=128, in_features=40, num_classes=4, seed=0)
    dm.setup()
    x, y = dm.train_set.tensors
    model = model_cls(in_features=40, num_classes=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        initial_loss = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * initial_loss
