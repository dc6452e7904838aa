"""Optimizer plumbing: the step schedule of AFD's adversarial optimizers and the joint optimizer
that gives a fusion rule its own optimizer under Lightning's automatic optimisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.modules.optim import (
    JointOptimizer,
    JointSchedule,
    cosine_schedule,
    step_schedule,
)


def rates(schedule, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(schedule.optimizer.param_groups[0]["lr"])
        schedule.optimizer.step()
        schedule.step()
    return values


def test_step_schedule_divides_at_fractions_of_training():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=2e-5)
    schedule = step_schedule(optimizer, total_steps=8, milestones=(0.25, 0.5))
    assert rates(schedule, 8) == pytest.approx([2e-5] * 2 + [2e-6] * 2 + [2e-7] * 4)
    for bad in ({"milestones": (1.5,)}, {"gamma": -1.0}, {"total_steps": 0}):
        options = {"total_steps": 8, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            step_schedule(optimizer, **options)


def two_parameters() -> tuple[nn.Parameter, nn.Parameter]:
    return nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))


def test_joint_optimizer_steps_each_inner_optimizer_with_its_own_rule():
    a, b = two_parameters()
    reference_a, reference_b = (nn.Parameter(p.detach().clone()) for p in (a, b))
    joint = JointOptimizer(
        [torch.optim.Adam([a], lr=0.1), torch.optim.SGD([b], lr=0.5, momentum=0.9)]
    )
    separate = [
        torch.optim.Adam([reference_a], lr=0.1),
        torch.optim.SGD([reference_b], lr=0.5, momentum=0.9),
    ]
    for _ in range(3):
        joint.zero_grad()
        loss = joint.step(lambda: ((a**2).sum() + (b**3).sum()).backward() or torch.tensor(0.0))
        assert loss is not None
        for optimizer in separate:
            optimizer.zero_grad()
        ((reference_a**2).sum() + (reference_b**3).sum()).backward()
        for optimizer in separate:
            optimizer.step()
    torch.testing.assert_close(a, reference_a)
    torch.testing.assert_close(b, reference_b)
    assert [g["params"] for g in joint.param_groups] == [[a], [b]]
    assert set(joint.state) == {a, b} and "momentum_buffer" in joint.state[b]
    joint.zero_grad()
    assert a.grad is None and b.grad is None


def test_joint_optimizer_state_round_trips_and_looks_up_without_adding():
    a, b = two_parameters()
    joint = JointOptimizer(
        [torch.optim.Adam([a], lr=0.1), torch.optim.SGD([b], lr=0.5, momentum=0.9)]
    )
    ((a**2).sum() + b.sum()).backward()
    joint.step()
    with pytest.raises(KeyError):
        joint.state[nn.Parameter(torch.zeros(1))]
    assert len(joint.state) == 2
    saved = joint.state_dict()

    c, d = two_parameters()
    fresh = JointOptimizer(
        [torch.optim.Adam([c], lr=0.1), torch.optim.SGD([d], lr=0.5, momentum=0.9)]
    )
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.state[d]["momentum_buffer"], joint.state[b]["momentum_buffer"])
    torch.testing.assert_close(fresh.state[c]["exp_avg"], joint.state[a]["exp_avg"])
    assert fresh.param_groups[1] is fresh.optimizers[1].param_groups[0]  # live after loading
    with pytest.raises(ValueError, match="holds 2 optimizers"):
        fresh.load_state_dict({"optimizers": saved["optimizers"][:1]})


def test_joint_optimizer_refuses_shared_parameters_and_late_groups():
    a, b = two_parameters()
    with pytest.raises(ValueError, match="held by two"):
        JointOptimizer([torch.optim.SGD([a], lr=0.1), torch.optim.SGD([a, b], lr=0.1)])
    joint = JointOptimizer([torch.optim.SGD([a], lr=0.1)])
    with pytest.raises(TypeError, match="inner optimizers"):
        joint.add_param_group({"params": [b]})


def test_joint_schedule_moves_only_its_own_optimizers_rate():
    a, b = two_parameters()
    student, rule = torch.optim.SGD([a], lr=1.0), torch.optim.SGD([b], lr=0.1)
    joint = JointOptimizer([student, rule])
    schedule = JointSchedule(joint, cosine_schedule(student, total_steps=4))
    assert schedule.optimizer is joint
    seen = rates(schedule, 4)
    assert seen == pytest.approx([1.0, 0.8536, 0.5, 0.1464], abs=1e-4)
    assert rule.param_groups[0]["lr"] == 0.1 and schedule.get_last_lr() == pytest.approx([0.0])
    restored = cosine_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 4)
    restored_joint = JointSchedule(JointOptimizer([restored.optimizer]), restored)
    restored_joint.load_state_dict(schedule.state_dict())
    assert restored.last_epoch == 4
    with pytest.raises(ValueError, match="not in the joint optimizer"):
        JointSchedule(joint, cosine_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))]), 4))
