"""Objectives of online distillation, where peers train together and teach each other.

Peer logits are stacked as ``(K, B, C)``. Every KL term is ``T² · KL(softmax(t / T) ‖ softmax(z / T))``
with ``batchmean`` reduction (:func:`~kd_lightning.functional.kd_loss`), computed in float32.
Which targets are detached is part of each method and is stated per function: a target that is
not detached passes gradients into whatever produced it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.functional.divergences import kd_loss, soft_cross_entropy

PeerReduction = Literal["mean", "sum"]


def _check_peers(logits: Tensor, minimum: int = 2) -> None:
    if logits.ndim != 3 or logits.shape[0] < minimum:
        raise ValueError(
            f"expected peer logits shaped (K ≥ {minimum}, B, C), got {tuple(logits.shape)}"
        )


def _group_cross_entropy(members: Tensor, head_logits: Tensor, labels: Tensor) -> Tensor:
    """``Σ_i CE(y, z_i) + CE(y, z_head)`` over a group's ``(K, B, C)`` logits and its head's."""
    ce = sum(F.cross_entropy(z.float(), labels) for z in members)
    return ce + F.cross_entropy(head_logits.float(), labels)


def dml_peer_loss(
    logits: Tensor,
    other_logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    peer_reduction: PeerReduction = "mean",
) -> Tensor:
    """Deep mutual learning loss of one peer (Zhang et al., "Deep Mutual Learning", CVPR 2018).

    ``CE(y, z_k) + c · Σ_l T²·KL(sg p_l ‖ p_k)`` over the other peers' logits ``other_logits``
    ``(K − 1, B, C)``, which are detached. ``c = 1/(K − 1)`` with ``peer_reduction="mean"`` (the
    paper's Eq. 10) or ``c = 1`` with ``"sum"`` (the official code).

    Examples:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> round(dml_peer_loss(z, z[None], torch.tensor([0])).item(), 4)  # KL = 0, CE only
        0.1269
    """
    if peer_reduction not in ("mean", "sum"):
        raise ValueError(f"peer_reduction must be 'mean' or 'sum', got {peer_reduction!r}")
    _check_peers(other_logits, minimum=1)
    kl = torch.stack([kd_loss(logits, other.detach(), temperature) for other in other_logits])
    factor = 1.0 / len(other_logits) if peer_reduction == "mean" else 1.0
    return F.cross_entropy(logits.float(), labels) + factor * kl.sum()


def dml_losses(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    peer_reduction: PeerReduction = "mean",
) -> Tensor:
    """:func:`dml_peer_loss` of every peer at once, shape ``(K,)``, from logits ``(K, B, C)``.

    All targets are detached, so ``losses.sum()`` has, for each peer, the gradient of its own loss:
    the simultaneous update of the official DML code.

    Examples:
        >>> logits = torch.zeros(3, 2, 4)
        >>> dml_losses(logits, torch.tensor([0, 1])).shape
        torch.Size([3])
    """
    _check_peers(logits)
    return torch.stack(
        [
            dml_peer_loss(
                logits[k],
                torch.cat([logits[:k], logits[k + 1 :]]),
                labels,
                temperature,
                peer_reduction,
            )
            for k in range(len(logits))
        ]
    )


def codistillation_loss(
    logits: Tensor, stale_logits: Tensor | None, labels: Tensor, distill_weight: float = 1.0
) -> Tensor:
    """Codistillation loss of one peer (Anil et al., "Large scale distributed neural network
    training through online distillation", ICLR 2018).

    ``CE(y, z_i) + w · CE(mean_j softmax(z̃_j), z_i)`` where ``stale_logits`` ``(N − 1, B, C)``
    come from stale snapshots of the other peers (detached here); the paper's distillation loss
    is a cross-entropy toward the mean of the peers' predicted distributions. ``None`` (during
    burn-in) leaves plain cross-entropy.

    Examples:
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> round(codistillation_loss(z, None, torch.tensor([0])).item(), 4)
        0.6931
    """
    ce = F.cross_entropy(logits.float(), labels)
    if stale_logits is None:
        return ce
    _check_peers(stale_logits, minimum=1)
    target = F.softmax(stale_logits.detach().float(), dim=-1).mean(0)
    return ce + distill_weight * soft_cross_entropy(logits, target)


def attention_targets(peer_logits: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
    """OKDDip's peer targets ``t_a = Σ_b α_ab z_b`` with ``α_ab = softmax_b(q_aᵀ k_b)``.

    ``queries`` and ``keys`` ``(m, B, d)`` are the projected branch features ``W_q h_a``, ``W_k h_b``
    (Chen et al., "Online Knowledge Distillation with Diverse Peers", AAAI 2020, Eq. 4 and 5). The
    sum over ``b`` includes ``a`` itself, as in the official code. Nothing is detached: the
    projections learn through the targets. Returns ``(m, B, C)``.

    Examples:
        >>> logits = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> attention_targets(logits, torch.zeros(2, 1, 3), torch.zeros(2, 1, 3))[0]  # uniform α
        tensor([[0.5000, 0.5000]])
    """
    _check_peers(peer_logits)
    energy = torch.einsum("abd,cbd->bac", queries.float(), keys.float())  # (B, m, m)
    weights = energy.softmax(dim=-1)
    return torch.einsum("bac,cbk->abk", weights, peer_logits.float())


def okddip_loss(
    peer_logits: Tensor,
    leader_logits: Tensor,
    peer_targets: Tensor,
    labels: Tensor,
    temperature: float = 3.0,
    weight: float = 1.0,
) -> Tensor:
    """OKDDip objective (Chen et al., AAAI 2020, Eq. 7), summed over the group.

    ``Σ_a CE(z_a) + CE(z_leader) + w · [Σ_a T²·KL(t_a ‖ z_a) + T²·KL(mean_a z_a ‖ z_leader)]``
    with ``w = α · ramp-up(epoch)``. Neither the attention targets ``peer_targets`` nor the
    leader's target (the mean of the peers' logits) is detached, as in the official code.

    Examples:
        >>> z = torch.zeros(2, 1, 3)
        >>> round(okddip_loss(z, z[0], z, torch.tensor([0])).item(), 4)  # 3 · log 3
        3.2958
    """
    _check_peers(peer_logits)
    ce = _group_cross_entropy(peer_logits, leader_logits, labels)
    peers_kl = sum(
        kd_loss(z, t, temperature) for z, t in zip(peer_logits, peer_targets, strict=True)
    )
    leader_kl = kd_loss(leader_logits, peer_logits.mean(0), temperature)
    return ce + weight * (peers_kl + leader_kl)


def ffl_loss(
    logits: Tensor,
    fused_logits: Tensor,
    labels: Tensor,
    temperature: float = 3.0,
    weight: float = 1.0,
) -> Tensor:
    """Feature Fusion Learning objective (Kim et al., "Feature Fusion for Online Mutual Knowledge
    Distillation", ICPR 2020).

    ``Σ_i CE(z_i) + CE(z_f) + w · [Σ_i T²·KL(sg p_f ‖ p_i) + T²·KL(sg softmax(mean_i z_i / T) ‖ p_f)]``:
    the fused classifier teaches every sub-network and the sub-networks' ensemble (mean of
    logits) teaches the fused classifier; both targets are detached.

    Examples:
        >>> z = torch.zeros(2, 1, 3)
        >>> round(ffl_loss(z, z[0], torch.tensor([0])).item(), 4)  # 3 · log 3
        3.2958
    """
    _check_peers(logits, minimum=1)
    fused_target = fused_logits.detach()
    ce = _group_cross_entropy(logits, fused_logits, labels)
    to_subnetworks = sum(kd_loss(z, fused_target, temperature) for z in logits)
    to_fused = kd_loss(fused_logits, logits.detach().mean(0), temperature)
    return ce + weight * (to_subnetworks + to_fused)


def cyclic_kd_losses(logits: Tensor, labels: Tensor, temperature: float = 3.0) -> Tensor:
    """AFD's logit losses (Chung et al., "Feature-map-level Online Adversarial Knowledge
    Distillation", ICML 2020): ``L_k = CE(y, z_k) + T²·KL(sg p_{k−1} ‖ p_k)``, shape ``(K,)``.

    Network ``k`` learns from network ``k − 1`` (network 0 from network ``K − 1``): the paper's
    cyclic scheme, which for two networks is mutual learning with a temperature.

    Examples:
        >>> logits = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> cyclic_kd_losses(logits, torch.tensor([0]), temperature=1.0).shape
        torch.Size([2])
    """
    _check_peers(logits)
    previous = torch.roll(logits, shifts=1, dims=0)
    return torch.stack(
        [
            F.cross_entropy(z.float(), labels) + kd_loss(z, target.detach(), temperature)
            for z, target in zip(logits, previous, strict=True)
        ]
    )


def lsgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Least-squares GAN discriminator loss ``mean (D(real) − 1)² + mean D(fake)²`` (Mao et al. 2017),
    AFD's discriminator objective.

    Examples:
        >>> lsgan_discriminator_loss(torch.ones(4, 1), torch.zeros(4, 1))
        tensor(0.)
    """
    return (real_scores.float() - 1).pow(2).mean() + fake_scores.float().pow(2).mean()


def lsgan_generator_loss(fake_scores: Tensor) -> Tensor:
    """Least-squares GAN generator loss ``mean (D(fake) − 1)²``: AFD's adversarial loss of a
    network's feature extractor.

    Examples:
        >>> lsgan_generator_loss(torch.zeros(4, 1))
        tensor(1.)
    """
    return (fake_scores.float() - 1).pow(2).mean()


def pool_features(features: Tensor) -> Tensor:
    """Vectors ``(B, D)`` as they are; maps ``(B, C, *spatial)`` averaged over the spatial dims.

    Examples:
        >>> pool_features(torch.ones(2, 3, 5)).shape
        torch.Size([2, 3])
    """
    if features.ndim < 2:
        raise ValueError(f"features must be at least (B, D), got {tuple(features.shape)}")
    return features if features.ndim == 2 else features.flatten(2).mean(-1)
