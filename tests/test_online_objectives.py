"""The online objectives against NumPy: values, T² factors, 1/(K−1) vs sum, and the detach rules
(checked through analytic gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.functional import (
    attention_targets,
    codistillation_loss,
    cyclic_kd_losses,
    dml_losses,
    dml_peer_loss,
    ffl_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    okddip_loss,
    pool_features,
)


def softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = x / t - (x / t).max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(softmax(z)[np.arange(len(y)), y]).mean())


def kl(target_logits: np.ndarray, z: np.ndarray, t: float) -> float:
    """T² · KL(softmax(target/T) ‖ softmax(z/T)), batch mean."""
    p, q = softmax(target_logits, t), softmax(z, t)
    return float(t * t * (p * (np.log(p) - np.log(q))).sum(-1).mean())


def onehot(y: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c)[y]


@pytest.fixture
def peers():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 5, 4)) * 2, rng.integers(0, 4, size=5)


@pytest.mark.parametrize("reduction,factor", [("mean", 0.5), ("sum", 1.0)])
def test_dml_losses_match_numpy_with_mean_or_sum_over_peers(peers, reduction, factor):
    z, y = peers
    got = dml_losses(torch.tensor(z), torch.tensor(y), temperature=2.0, peer_reduction=reduction)
    for k in range(3):
        others = [kl(z[j], z[k], 2.0) for j in range(3) if j != k]
        assert got[k].item() == pytest.approx(ce(z[k], y) + factor * sum(others), rel=1e-5)


@pytest.mark.parametrize("reduction,factor", [("mean", 0.5), ("sum", 1.0)])
def test_dml_gradient_of_the_sum_is_each_peers_own_gradient(peers, reduction, factor):
    z, y = peers
    logits = torch.tensor(z, requires_grad=True)
    dml_losses(logits, torch.tensor(y), peer_reduction=reduction).sum().backward()
    for k in range(3):  # T = 1: d/dz_k = [softmax(z_k) − y + c Σ_l (softmax(z_k) − p_l)] / B
        others = sum(softmax(z[k]) - softmax(z[j]) for j in range(3) if j != k)
        expected = (softmax(z[k]) - onehot(y, 4) + factor * others) / len(y)
        np.testing.assert_allclose(logits.grad[k].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_dml_peer_loss_detaches_the_other_peers(peers):
    z, y = peers
    own, others = torch.tensor(z[0], requires_grad=True), torch.tensor(z[1:], requires_grad=True)
    dml_peer_loss(own, others, torch.tensor(y)).backward()
    assert others.grad is None and own.grad.abs().sum() > 0


def test_dml_rejects_an_unknown_reduction(peers):
    z, y = peers
    with pytest.raises(ValueError, match="peer_reduction"):
        dml_losses(torch.tensor(z), torch.tensor(y), peer_reduction="average")


def test_codistillation_is_cross_entropy_toward_the_mean_stale_prediction(peers):
    z, y = peers
    stale = torch.tensor(z[1:], requires_grad=True)
    own = torch.tensor(z[0], requires_grad=True)
    got = codistillation_loss(own, stale, torch.tensor(y), distill_weight=0.5)
    mean_p = (softmax(z[1]) + softmax(z[2])) / 2
    soft = float(-(mean_p * np.log(softmax(z[0]))).sum(-1).mean())
    assert got.item() == pytest.approx(ce(z[0], y) + 0.5 * soft, rel=1e-5)
    got.backward()
    assert stale.grad is None and own.grad.abs().sum() > 0
    burn_in = codistillation_loss(torch.tensor(z[0]), None, torch.tensor(y))
    assert burn_in.item() == pytest.approx(ce(z[0], y), rel=1e-6)


def test_attention_targets_match_numpy(peers):
    z, _ = peers
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5, 2))
    got = attention_targets(torch.tensor(z), torch.tensor(q), torch.tensor(k)).numpy()
    for b in range(5):
        energy = q[:, b] @ k[:, b].T  # (a, c)
        alpha = softmax(energy)
        np.testing.assert_allclose(got[:, b], alpha @ z[:, b], rtol=1e-5)


def test_okddip_loss_matches_numpy_and_passes_gradients_into_the_targets(peers):
    z, y = peers
    peer_z, leader_z = z[:2], z[2]
    targets = torch.tensor(z[::-1][:2].copy(), requires_grad=True)
    peer_logits = torch.tensor(peer_z, requires_grad=True)
    got = okddip_loss(
        peer_logits, torch.tensor(leader_z), targets, torch.tensor(y), temperature=3.0, weight=0.7
    )
    t = z[::-1][:2]
    expected = ce(peer_z[0], y) + ce(peer_z[1], y) + ce(leader_z, y)
    expected += 0.7 * (
        kl(t[0], peer_z[0], 3.0) + kl(t[1], peer_z[1], 3.0) + kl(peer_z.mean(0), leader_z, 3.0)
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert targets.grad.abs().sum() > 0  # not detached: W_q, W_k learn through them
    # the leader's target (mean of peers) is not detached either: the peers' gradient carries a
    # term from the leader's KL, so it differs from CE + own KL alone
    own_only = peer_logits.detach().clone().requires_grad_(True)
    (
        sum(torch.nn.functional.cross_entropy(own_only[i], torch.tensor(y)) for i in range(2))
        + 0.7
        * sum(
            9
            * torch.nn.functional.kl_div(
                torch.log_softmax(own_only[i] / 3, -1),
                torch.softmax(targets[i].detach() / 3, -1),
                reduction="batchmean",
            )
            for i in range(2)
        )
    ).backward()
    assert not torch.allclose(peer_logits.grad, own_only.grad)


def test_ffl_loss_matches_numpy_with_detached_targets(peers):
    z, y = peers
    subs, fused = z[:2], z[2]
    sub_logits = torch.tensor(subs, requires_grad=True)
    fused_logits = torch.tensor(fused, requires_grad=True)
    got = ffl_loss(sub_logits, fused_logits, torch.tensor(y), temperature=3.0, weight=0.4)
    mean_z = subs.mean(0)
    expected = ce(subs[0], y) + ce(subs[1], y) + ce(fused, y)
    expected += 0.4 * (kl(fused, subs[0], 3.0) + kl(fused, subs[1], 3.0) + kl(mean_z, fused, 3.0))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    b, target = len(y), onehot(y, 4)
    # d/dz of T²KL(p ‖ softmax(z/T)) is T·(softmax(z/T) − p)/B; detached targets add nothing
    fused_grad = (softmax(fused) - target + 0.4 * 3 * (softmax(fused, 3) - softmax(mean_z, 3))) / b
    np.testing.assert_allclose(fused_logits.grad.numpy(), fused_grad, rtol=1e-5, atol=1e-7)
    for i in range(2):
        sub_grad = (
            softmax(subs[i]) - target + 0.4 * 3 * (softmax(subs[i], 3) - softmax(fused, 3))
        ) / b
        np.testing.assert_allclose(sub_logits.grad[i].numpy(), sub_grad, rtol=1e-5, atol=1e-7)


def test_cyclic_kd_losses_learn_from_the_previous_network(peers):
    z, y = peers
    logits = torch.tensor(z, requires_grad=True)
    got = cyclic_kd_losses(logits, torch.tensor(y), temperature=3.0)
    for k in range(3):
        assert got[k].item() == pytest.approx(ce(z[k], y) + kl(z[k - 1], z[k], 3.0), rel=1e-5)
    got[1].backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[2].abs().sum() == 0


def test_lsgan_losses_match_numpy():
    real, fake = np.array([[0.2], [1.5]]), np.array([[0.3], [-0.4]])
    d = lsgan_discriminator_loss(torch.tensor(real), torch.tensor(fake)).item()
    assert d == pytest.approx(((real - 1) ** 2).mean() + (fake**2).mean())
    assert lsgan_generator_loss(torch.tensor(fake)).item() == pytest.approx(
        ((fake - 1) ** 2).mean()
    )


def test_pool_features_averages_maps_and_keeps_vectors():
    maps = torch.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_allclose(pool_features(maps).numpy(), maps.numpy().mean(-1))
    vectors = maps[:, :, 0]
    assert torch.equal(pool_features(vectors), vectors)
