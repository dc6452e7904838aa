"""Builders of the online methods (``method=dml|codistillation|okddip|ffl|afd``).

Peers come from ``method.peers`` (a list of model configs; the first one is reported as the
student) or, when that is null, from ``method.num_peers`` independently initialised copies of
``cfg.student`` (the first being ``context.student``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kd_lightning.modules import (
    AFDModule,
    CodistillationModule,
    DMLModule,
    FFLModule,
    OKDDipModule,
)

if TYPE_CHECKING:
    from kd_lightning.cli.methods import MethodContext


def build_peers(context: MethodContext, minimum: int = 2) -> list[nn.Module]:
    """The peer networks named by ``method.peers`` or ``method.num_peers``."""
    method = context.cfg.method
    listed = method.get("peers")
    if listed is not None:
        if not isinstance(listed, ListConfig) or len(listed) < minimum:
            raise ValueError(
                f"method.peers must list at least {minimum} model configs, got "
                f"{OmegaConf.to_container(listed) if isinstance(listed, DictConfig | ListConfig) else listed!r}"
            )
        return [instantiate(entry) for entry in listed]
    count = method.get("num_peers", minimum)
    if not isinstance(count, int) or count < minimum:
        raise ValueError(f"method.num_peers must be an integer ≥ {minimum}, got {count!r}")
    return [context.student, *(instantiate(context.cfg.student) for _ in range(count - 1))]


def feature_layers(method: DictConfig) -> str | list[str]:
    """``method.feature_layers``: one layer name for every peer, or a list, one per peer."""
    layers = method.get("feature_layers")
    if isinstance(layers, str):
        return layers
    if isinstance(layers, ListConfig) and all(isinstance(layer, str) for layer in layers):
        return list(layers)
    raise ValueError(
        f"method.feature_layers must name a layer of the peers (e.g. hidden) or list one per "
        f"peer, got {layers!r}"
    )


def training_options(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer and schedule every online module takes."""
    return {
        "optimizer": instantiate(cfg.optimizer),
        "scheduler": instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    }


def build_dml(context: MethodContext) -> LightningModule:
    """``method=dml``: :class:`~kd_lightning.modules.DMLModule`."""
    method = context.cfg.method
    return DMLModule(
        build_peers(context),
        temperature=method.temperature,
        peer_reduction=method.peer_reduction,
        update=method["update"],  # method.update is the mapping method
        **training_options(context.cfg),
    )


def build_codistillation(context: MethodContext) -> LightningModule:
    """``method=codistillation``: :class:`~kd_lightning.modules.CodistillationModule`."""
    method = context.cfg.method
    return CodistillationModule(
        build_peers(context),
        refresh_every=method.refresh_every,
        burn_in=method.burn_in,
        distill_weight=method.distill_weight,
        sharded=method.sharded,
        **training_options(context.cfg),
    )


def build_okddip(context: MethodContext) -> LightningModule:
    """``method=okddip``: :class:`~kd_lightning.modules.OKDDipModule`; network 0 is the leader."""
    method = context.cfg.method
    leader, *peers = build_peers(context, minimum=3)
    return OKDDipModule(
        leader,
        peers,
        feature_layers=feature_layers(method),
        temperature=method.temperature,
        alpha=method.alpha,
        ramp_epochs=method.ramp_epochs,
        attention_dim=method.attention_dim,
        shared_projections=method.shared_projections,
        **training_options(context.cfg),
    )


def build_ffl(context: MethodContext) -> LightningModule:
    """``method=ffl``: :class:`~kd_lightning.modules.FFLModule`."""
    method = context.cfg.method
    return FFLModule(
        build_peers(context),
        feature_layers=feature_layers(method),
        temperature=method.temperature,
        ramp_epochs=method.ramp_epochs,
        **training_options(context.cfg),
    )


def build_afd(context: MethodContext) -> LightningModule:
    """``method=afd``: :class:`~kd_lightning.modules.AFDModule`."""
    method = context.cfg.method
    discriminator_optimizer = method.get("discriminator_optimizer")
    feature_optimizer = method.get("feature_optimizer")
    return AFDModule(
        build_peers(context),
        feature_layers=feature_layers(method),
        temperature=method.temperature,
        discriminator_hidden=method.discriminator_hidden,
        discriminator_optimizer=(
            instantiate(discriminator_optimizer) if discriminator_optimizer else None
        ),
        feature_optimizer=instantiate(feature_optimizer) if feature_optimizer else None,
        **training_options(context.cfg),
    )
