"""RoutedTeachers: each sample or token goes to the teachers its batch field names, pinned to a
hand computation, chunked and unchunked, and through a DistillationModule fit on dict batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning import DistillationModule
from kd_lightning.batch import BatchAdapter
from kd_lightning.fusion import EntropyWeighted, RoutedTeachers
from kd_lightning.losses import ChunkedDistillationLoss, DistillationLoss

from .conftest import make_trainer


def test_hand_computed_routes_with_a_within_rule():
    # K = 3, B = 3, C = 2; teacher 1 is confident, teacher 2 uncertain.
    z = torch.tensor([[[0.0, 0.0]] * 3, [[4.0, 0.0]] * 3, [[0.5, 0.0]] * 3])
    rule = RoutedTeachers(routes={0: [0], 1: [1, 2]}, within=EntropyWeighted(tau=1.0))
    out = rule(z, batch_fields={"teacher_id": torch.tensor([0, 1, -1])})
    h = -(torch.softmax(z[:, 0], -1) * torch.log_softmax(z[:, 0], -1)).sum(-1)  # (K,)
    scores = torch.softmax(-h, 0)  # EntropyWeighted(tau=1): softmax of -H over the teachers
    served_12 = scores[1:] / scores[1:].sum()
    expected = torch.stack(
        [torch.tensor([1.0, 0.0, 0.0]), torch.cat([torch.zeros(1), served_12]), scores]
    )
    torch.testing.assert_close(out.weights, expected)
    probs = torch.softmax(z[:, 0], -1)  # (K, C); every sample sees the same teachers' outputs
    torch.testing.assert_close(out.target, expected @ probs)


def test_without_routes_id_r_is_teacher_r_and_sequences_route_every_token():
    teachers = torch.randn(2, 2, 4, 5)  # K = 2, B = 2, L = 4
    out = RoutedTeachers()(teachers, batch_fields={"teacher_id": torch.tensor([1, 0])})
    torch.testing.assert_close(out.target[0], torch.softmax(teachers[1, 0], -1))
    torch.testing.assert_close(out.target[1], torch.softmax(teachers[0, 1], -1))
    per_token = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    out = RoutedTeachers()(teachers, batch_fields={"teacher_id": per_token})
    np.testing.assert_array_equal(out.weights[..., 1].numpy(), per_token.numpy())


def test_routes_no_teacher_serves_and_missing_fields_are_refused():
    teachers = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"route id 5 .* served by none"):
        RoutedTeachers()(teachers, batch_fields={"teacher_id": torch.tensor([0, 5, 1])})
    with pytest.raises(ValueError, match=r"reads the batch fields \['domain'\]"):
        RoutedTeachers(field="domain")(teachers)
    with pytest.raises(ValueError, match="route 0 must name at least one teacher"):
        RoutedTeachers(routes={0: []})


def test_a_drawn_subset_is_routed_by_teacher_index():
    teachers = torch.randn(1, 2, 4)  # only teacher 2 of three ran
    out = RoutedTeachers(routes={0: [2], 1: [0, 2]})(
        teachers, batch_fields={"teacher_id": torch.tensor([0, 1])}, teacher_indices=(2,)
    )
    torch.testing.assert_close(out.weights, torch.ones(2, 1))
    with pytest.raises(ValueError, match="served by none of the teachers that ran"):
        RoutedTeachers()(
            teachers, batch_fields={"teacher_id": torch.tensor([0, 1])}, teacher_indices=(2,)
        )


def test_chunked_and_plain_losses_agree():
    torch.manual_seed(0)
    student = torch.randn(2, 6, 30, requires_grad=True)
    teachers, labels = torch.randn(3, 2, 6, 30), torch.randint(0, 30, (2, 6))
    fields = {"teacher_id": torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, -1]])}
    rule = RoutedTeachers(routes={0: [0], 1: [1, 2], 2: [2]}, within="entropy")
    plain = DistillationLoss(rule)(student, teachers, labels, batch_fields=fields)
    chunked = ChunkedDistillationLoss(rule, chunk_tokens=5)(
        student, teachers, labels, batch_fields=fields
    )
    torch.testing.assert_close(chunked.loss, plain.loss)
    grads = [torch.autograd.grad(out.loss, student)[0] for out in (plain, chunked)]
    torch.testing.assert_close(grads[0], grads[1])


class RoutedData(torch.utils.data.Dataset):
    """Two domains: the label is the sign of feature 0 (domain 0) or of feature 1 (domain 1)."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(size)
        self.x = torch.randn(size, 4, generator=generator)
        self.domain = torch.randint(0, 2, (size,), generator=generator)
        self.y = (self.x.gather(1, self.domain[:, None])[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index], "teacher_id": self.domain[index]}


def test_a_module_reads_the_route_from_dict_batches(tmp_path):
    teachers = {"first": torch.nn.Linear(4, 2), "second": torch.nn.Linear(4, 2)}
    module = DistillationModule(
        torch.nn.Linear(4, 2),
        teachers,
        DistillationLoss(RoutedTeachers(), alpha=0.5),
        batch_adapter=BatchAdapter("x", "y"),
    )
    loader = DataLoader(RoutedData(64), batch_size=16)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    batch = next(iter(loader))
    step = module.validation_step(batch, 0)
    np.testing.assert_array_equal(step["fusion_weights"][:, 1].numpy(), batch["teacher_id"].numpy())
    with pytest.raises(ValueError, match="batches must be mappings"):
        module.validation_step((batch["x"], batch["y"]), 0)
