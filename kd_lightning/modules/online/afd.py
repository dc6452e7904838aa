"""AFD: online mutual learning plus per-network discriminators on the peers' feature maps."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from kd_lightning.functional.online import (
    cyclic_kd_losses,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)
from kd_lightning.modules.online.parts import FeatureDiscriminator, feature_adapter
from kd_lightning.modules.online.peers import OnlinePeersModule, Peers
from kd_lightning.modules.optim import (
    OptimizerFactory,
    SchedulerFactory,
    configure_optimizers,
    step_schedule,
)

ADVERSARIAL_D, ADVERSARIAL_G = "adversarial/discriminator", "adversarial/generator"
#: The paper's optimizer of the networks (the logit loss) and its schedule: divided by 10 at
#: half and at three quarters of training (epochs 150 and 225 of 300).
PAPER_NETWORK_OPTIMIZER: OptimizerFactory = partial(
    torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4
)
PAPER_NETWORK_SCHEDULE: SchedulerFactory = partial(step_schedule, milestones=(0.5, 0.75))
#: The paper's optimizer of the discriminators and of the feature extractors' adversarial step.
PAPER_ADVERSARIAL_OPTIMIZER: OptimizerFactory = partial(torch.optim.Adam, lr=2e-5, weight_decay=0.1)
#: Its schedule: divided by 10 at a quarter and at half of training (epochs 75 and 150 of 300).
PAPER_ADVERSARIAL_SCHEDULE: SchedulerFactory = partial(step_schedule, milestones=(0.25, 0.5))


class AFDModule(OnlinePeersModule):
    """Online Adversarial Feature-map Distillation (Chung, Park, Kim, Kwak, "Feature-map-level
    Online Adversarial Knowledge Distillation", ICML 2020).

    Network ``k`` has a discriminator ``D_k`` that learns to tell network ``k − 1``'s features
    (real) from network ``k``'s own (fake), with least-squares GAN losses; network ``k``'s feature
    extractor learns to fool it. Network 0 learns from network ``K − 1``: the paper's cyclic
    scheme, which for two networks is the symmetric pair. Each training step alternates, with
    manual optimisation and three optimizers:

    1. discriminators on ``Σ_k mean (D_k(f_{k−1}) − 1)² + mean D_k(f_k)²`` (features detached);
    2. feature extractors on ``Σ_k mean (D_k(f_k) − 1)²`` (discriminators frozen; only the layers
       up to the tapped one receive gradients);
    3. whole networks, run again, on the logit loss ``Σ_k CE(y, z_k) + T²·KL(sg p_{k−1} ‖ p_k)``
       (:func:`~kd_lightning.functional.cyclic_kd_losses`).

    Features of different shapes (heterogeneous networks) pass through a learned adapter (a
    linear layer or a 1×1 convolution, trained with the feature extractor) into the shape of the
    features they imitate, like the paper's transfer layer.

    ``student`` (network 0) is reported as the student; the others are its teachers.
    ``{stage}/loss`` is the logit loss; training also logs
    ``train/adversarial/{discriminator,generator}``.

    **Optimizers, as in the paper** (its CIFAR runs, 300 epochs): the networks (phase 3) with
    SGD at 0.1, momentum 0.9, weight decay 10⁻⁴, divided by 10 at half and at three quarters of
    training; the discriminators (phase 1) and the feature extractors' adversarial step (phase 2)
    with Adam at 2·10⁻⁵, weight decay 0.1, divided by 10 at a quarter and at half of training
    (:data:`PAPER_NETWORK_OPTIMIZER` and the other ``PAPER_*`` defaults; the milestones and the
    networks' weight decay as a public reimplementation reads the paper). The adversarial step
    must stay small beside the networks' own: with Adam at 10⁻² in every phase the networks win
    the feature game and underfit (MNIST-1D, MLP pair, augmented, 300 epochs: 59.4 % against
    83.0 % from scratch). ``kd-train method=afd`` keeps these optimizers but gives the networks
    the run's schedule (cosine). On MNIST-1D (MLP pair, augmented, 100 epochs) the student then
    ends 2.2 ± 0.5 points above the benchmark's scratch run (Adam at 10⁻², seeds 0-4) but level
    with a scratch run on the same SGD (+0.1 ± 0.4, seeds 0-1): the gain is the paper's
    optimizer's. With the networks on Adam at 10⁻² it ends 0.5 ± 1.6 points below scratch
    (seeds 0-2).

    Args:
        student: network 0, the one reported.
        peers: the other networks, or a factory of them (see
            :func:`~kd_lightning.modules.online.peers.name_peers`).
        feature_layers: the layer tapped in every network, or one per network.
        num_peers: with a factory, K, the student included.
        temperature: T of the KL terms (3).
        discriminator_hidden: width of the discriminators' hidden layers.
        optimizer: called with the networks' parameters for phase 3 (the paper's SGD).
        discriminator_optimizer: called with the discriminators' parameters (the paper's Adam);
            ``None`` uses ``optimizer``.
        feature_optimizer: called with the networks' and adapters' parameters for phase 2 (the
            paper's Adam); ``None`` uses ``optimizer``.
        scheduler: the networks' schedule (the paper's step decay), called with their optimizer
            (and ``total_steps``), or ``None``.
        discriminator_scheduler: the discriminators' schedule (the paper's step decay); ``None``
            uses ``scheduler``.
        feature_scheduler: phase 2's schedule (the paper's step decay); ``None`` uses
            ``scheduler``.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        batch_adapter: turns a batch into ``(inputs, labels)``.

    Examples:
        >>> net = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> module = AFDModule(net(), net, feature_layers="1")
        >>> module.materialize((torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
        >>> len(module.discriminators), module.automatic_optimization
        (2, False)
    """

    def __init__(
        self,
        student: nn.Module,
        peers: Peers,
        feature_layers: str | Sequence[str],
        num_peers: int = 2,
        temperature: float = 3.0,
        discriminator_hidden: int = 64,
        optimizer: OptimizerFactory = PAPER_NETWORK_OPTIMIZER,
        discriminator_optimizer: OptimizerFactory | None = PAPER_ADVERSARIAL_OPTIMIZER,
        feature_optimizer: OptimizerFactory | None = PAPER_ADVERSARIAL_OPTIMIZER,
        scheduler: SchedulerFactory | None = PAPER_NETWORK_SCHEDULE,
        discriminator_scheduler: SchedulerFactory | None = PAPER_ADVERSARIAL_SCHEDULE,
        feature_scheduler: SchedulerFactory | None = PAPER_ADVERSARIAL_SCHEDULE,
        scheduler_interval: Literal["step", "epoch"] = "step",
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if discriminator_hidden < 1:
            raise ValueError(f"discriminator_hidden must be ≥ 1, got {discriminator_hidden}")
        super().__init__(
            student,
            peers,
            num_peers,
            optimizer,
            scheduler,
            scheduler_interval,
            batch_adapter,
            extra_means=(ADVERSARIAL_D, ADVERSARIAL_G),
        )
        self.save_hyperparameters(
            ignore=[
                "student",
                "peers",
                "optimizer",
                "discriminator_optimizer",
                "feature_optimizer",
                "scheduler",
                "discriminator_scheduler",
                "feature_scheduler",
                "batch_adapter",
            ]
        )
        self.discriminator_factory = discriminator_optimizer
        self.feature_factory = feature_optimizer
        self.discriminator_schedule = discriminator_scheduler
        self.feature_schedule = feature_scheduler
        self.automatic_optimization = False
        self.feature_layers = self.layers_to_tap(feature_layers, self.names)
        self.discriminators: nn.ModuleList | None = None
        self.adapters: nn.ModuleList | None = None

    def needs_parts(self) -> bool:
        return self.discriminators is None

    def build_parts(self, inputs: Any) -> None:
        _, features = self.tapped_forward(inputs, self.feature_layers)
        ordered = [features[name] for name in self.names]
        previous = ordered[-1:] + ordered[:-1]
        self.adapters = nn.ModuleList(
            feature_adapter(own, real) for own, real in zip(ordered, previous, strict=True)
        )
        self.discriminators = nn.ModuleList(
            FeatureDiscriminator(real, self.hparams["discriminator_hidden"]) for real in previous
        )

    def features(self, inputs: Any) -> list[Tensor]:
        """Each network's tapped features, in network order (with their autograd graph)."""
        _, features = self.tapped_forward(inputs, self.feature_layers)
        return [features[name] for name in self.names]

    def discriminator_loss(self, features: Sequence[Tensor]) -> Tensor:
        """Phase 1: ``Σ_k`` LSGAN loss of ``D_k`` with real ``f_{k−1}`` and fake ``f_k``, detached."""
        discriminators, adapters = self._parts()
        total = torch.zeros((), device=features[0].device)
        for k, (discriminator, adapter) in enumerate(zip(discriminators, adapters, strict=True)):
            real = features[k - 1].detach()
            with torch.no_grad():
                fake = adapter(features[k].detach())
            total = total + lsgan_discriminator_loss(discriminator(real), discriminator(fake))
        return total

    def generator_loss(self, features: Sequence[Tensor]) -> Tensor:
        """Phase 2: ``Σ_k mean (D_k(adapter_k(f_k)) − 1)²``."""
        discriminators, adapters = self._parts()
        return torch.stack(
            [
                lsgan_generator_loss(discriminator(adapter(own)))
                for discriminator, adapter, own in zip(
                    discriminators, adapters, features, strict=True
                )
            ]
        ).sum()

    def objective(self, inputs: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Phase 3's logit loss and every network's logits."""
        logits = {name: peer(inputs) for name, peer in self.peers.items()}
        losses = cyclic_kd_losses(
            torch.stack(list(logits.values())), labels, self.hparams["temperature"]
        )
        return losses.sum(), logits

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        inputs, labels = self.batch_adapter(batch)
        discriminator_opt, feature_opt, network_opt = cast(list, self.optimizers())
        features = self.features(inputs)
        d_loss = self._update(discriminator_opt, lambda: self.discriminator_loss(features))
        g_loss = self._update(feature_opt, lambda: self.generator_loss(features))
        logit_loss = self._update(network_opt, lambda: self.objective(inputs, labels))
        self.step_schedulers(end_of_epoch=False)
        loss, logits = logit_loss
        adversarial = {ADVERSARIAL_D: d_loss, ADVERSARIAL_G: g_loss}
        return self.report("train", loss.detach(), logits, labels, extra=adversarial)

    def _update(self, optimizer: Any, closure: Callable[[], Any]) -> Any:
        """Zero every gradient, compute the loss with only ``optimizer``'s parameters trainable,
        back-propagate it and step ``optimizer``. Returns what the closure returned."""
        self.zero_grad(set_to_none=True)
        with self.toggled_optimizer(optimizer):
            result = closure()
            loss = result[0] if isinstance(result, tuple) else result
            self.manual_backward(loss)
        optimizer.step()
        return result if isinstance(result, tuple) else loss.detach()

    def configure_optimizers(self) -> Any:
        discriminators, adapters = self._parts()
        return [
            self._phase_optimizer(
                discriminators.parameters(),
                self.discriminator_factory,
                self.discriminator_schedule,
            ),
            self._phase_optimizer(
                [*self.peers.parameters(), *adapters.parameters()],
                self.feature_factory,
                self.feature_schedule,
            ),
            self.optimizer_config(self.peers.parameters()),
        ]

    def _phase_optimizer(
        self,
        parameters: Iterable[nn.Parameter],
        factory: OptimizerFactory | None,
        schedule: SchedulerFactory | None,
    ) -> dict[str, Any]:
        """One adversarial phase's optimizer and schedule; ``None`` takes the networks' own."""
        built = configure_optimizers(
            parameters,
            factory or self.optimizer_factory,
            schedule or self.scheduler_factory,
            total_steps=int(self.trainer.estimated_stepping_batches),
            interval=self.scheduler_interval,
        )
        return built if isinstance(built, dict) else {"optimizer": built}

    def _parts(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        if self.discriminators is None or self.adapters is None:
            raise RuntimeError(
                "call module.materialize(batch) (or fit) to build the discriminators"
            )
        return self.discriminators, self.adapters
