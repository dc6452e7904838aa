"""Online methods as LightningModules: who updates what and when, against hand-run updates."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader

from kd_lightning.models import CNN1D
from kd_lightning.modules import AFDModule, CodistillationModule, DMLModule, FFLModule, OKDDipModule
from kd_lightning.modules.online.codistillation import shard_weights

from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp


class FirstBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = [t.clone() for t in batch]


def one_step(tmp_path, module, datamodule, **options):
    recorder = FirstBatch()
    trainer = make_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[recorder],
        **options,
    )
    trainer.fit(module, datamodule=datamodule)
    return recorder.batch, trainer


def sgd_step(net: nn.Module, loss: torch.Tensor, lr: float) -> None:
    grads = torch.autograd.grad(loss, list(net.parameters()))
    with torch.no_grad():
        for parameter, grad in zip(net.parameters(), grads, strict=True):
            parameter -= lr * grad


def kl_to(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(logits, -1), F.softmax(target_logits.detach(), -1), reduction="batchmean"
    )


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_dml_step_matches_the_papers_update_by_hand(tmp_path, datamodule, update):
    peers = [small_mlp(), small_mlp()]
    first, second = copy.deepcopy(peers)
    module = DMLModule(*peers, update=update, optimizer=partial(torch.optim.SGD, lr=0.5))
    (x, y), _ = one_step(tmp_path, module, datamodule)
    z_first, z_second = first(x), second(x)
    sgd_step(first, F.cross_entropy(z_first, y) + kl_to(z_second, z_first), lr=0.5)
    # sequential: the second peer learns from the first peer's updated predictions
    target = first(x) if update == "sequential" else z_first
    sgd_step(second, F.cross_entropy(z_second, y) + kl_to(target, z_second), lr=0.5)
    assert_same_parameters(module.peers["peer0"], first)
    assert_same_parameters(module.peers["peer1"], second)


def test_dml_sequential_has_one_optimizer_per_peer(tmp_path, datamodule):
    module = DMLModule(small_mlp(), [small_mlp(hidden=8), small_mlp()], update="sequential")
    _, trainer = one_step(tmp_path, module, datamodule)
    stepped = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers]
    assert stepped == [{id(p) for p in peer.parameters()} for peer in module.peers.values()]
    assert module.teacher_names == ["peer1", "peer2"]


def test_codistillation_refreshes_stale_snapshots_after_burn_in(tmp_path, datamodule):
    class Record(Callback):
        def __init__(self) -> None:
            self.steps, self.params = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append(pl_module._snapshot_step)
            self.params.append(copy.deepcopy(pl_module.peers["peer1"].state_dict()))

    module = CodistillationModule(small_mlp(), small_mlp, refresh_every=3, burn_in=2)
    record = Record()
    trainer = make_trainer(
        tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[record]
    )
    trainer.fit(module, datamodule=datamodule)
    assert record.steps == [-1, -1, 2, 2, 2, 5, 5, 5]
    snapshot = module._snapshots["peer1"]
    for key, value in snapshot.state_dict().items():  # taken at the start of step 5
        torch.testing.assert_close(value, record.params[4][key])
    assert not any(p.requires_grad for p in snapshot.parameters())
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.peers.parameters()}

    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    restored = CodistillationModule(small_mlp(), small_mlp, refresh_every=3, burn_in=2)
    restored.on_load_checkpoint(checkpoint)
    assert restored._snapshot_step == 5
    assert_same_parameters(restored._snapshots["peer1"], snapshot)


def test_codistillation_distils_toward_the_snapshots_not_the_live_peers(datamodule):
    module = CodistillationModule(small_mlp(), [small_mlp()], burn_in=0, distill_weight=1.0)
    x, y = torch.randn(6, NUM_FEATURES), torch.tensor([0, 1, 2, 3, 0, 1])
    before, _ = module.objective(x, y)
    module.refresh_snapshots()
    with torch.no_grad():
        for p in module.peers.parameters():
            p.add_(0.5)
    loss, logits = module.objective(x, y)
    stale = {name: snap(x) for name, snap in module._snapshots.items()}
    expected = sum(
        F.cross_entropy(logits[a], y)
        - (F.softmax(stale[b], -1) * F.log_softmax(logits[a], -1)).sum(-1).mean()
        for a, b in (("peer0", "peer1"), ("peer1", "peer0"))
    )
    torch.testing.assert_close(loss, expected)
    assert before.item() == pytest.approx(
        sum(F.cross_entropy(small(x), y) for small in module._snapshots.values()).item(),
        rel=1e-5,
    )  # no snapshots yet: plain cross-entropy of each peer


def test_sharded_codistillation_weights_each_peer_on_its_own_ranks(tmp_path, datamodule):
    assert shard_weights(2, 2, 0) == [2.0, 0.0] and shard_weights(2, 2, 1) == [0.0, 2.0]
    assert shard_weights(3, 6, 4) == [0.0, 3.0, 0.0]  # ranks 1 and 4 train peer 1
    module = CodistillationModule(small_mlp(), small_mlp(), sharded=True)
    with pytest.raises(ValueError, match=r"method\.sharded=true"):  # one process, two peers
        make_trainer(tmp_path, max_epochs=1).fit(module, datamodule=datamodule)


def test_okddip_projections_learn_through_the_attention_targets(tmp_path, datamodule):
    leader, peers = small_mlp(), [small_mlp(), small_mlp(), small_mlp()]
    module = OKDDipModule(leader, peers, feature_layers="1", ramp_epochs=2)
    _, trainer = one_step(tmp_path, module, datamodule)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.query_projections.parameters()} <= optimized
    assert len(module.query_projections) == 1  # shared W_q, W_k
    assert module.consistency_weight() == pytest.approx(math.exp(-5 * 0.5**2))  # epoch 1 of 2

    module.zero_grad()
    loss, _ = module.objective(torch.randn(6, NUM_FEATURES), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    for projection in (*module.query_projections, *module.key_projections):
        assert projection.weight.grad.abs().sum() > 0
    for name, network in module.peers.items():
        assert all(p.grad is not None for p in network.parameters()), name


def test_okddip_heterogeneous_peers_need_own_projections():
    peers = [small_mlp(hidden=16), small_mlp(hidden=8)]
    batch = (torch.randn(4, NUM_FEATURES), torch.zeros(4, dtype=torch.long))
    shared = OKDDipModule(small_mlp(), peers, feature_layers="1")
    with pytest.raises(ValueError, match="shared_projections=false"):
        shared.materialize(batch)
    own = OKDDipModule(small_mlp(), peers, feature_layers="1", shared_projections=False)
    own.materialize(batch)
    assert [p.in_features for p in own.query_projections] == [16, 8]


def test_ffl_fuses_feature_maps_and_trains_the_fusion_module(tmp_path, datamodule):
    module = FFLModule(
        CNN1D(NUM_FEATURES, NUM_CLASSES, channels=4),
        [CNN1D(NUM_FEATURES, NUM_CLASSES, channels=3)],
        feature_layers="conv3",
    )
    _, trainer = one_step(tmp_path, module, datamodule)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.fusion.parameters()} <= optimized
    depthwise = module.fusion.fuse[0]
    assert depthwise.groups == depthwise.in_channels == 7  # 4 + 3 concatenated channels
    module.zero_grad()
    loss, logits = module.objective(torch.randn(6, NUM_FEATURES), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in module.fusion.parameters())
    assert module.teacher_names == ["peer1", "fused"] and logits["fused"].shape == (6, NUM_CLASSES)


def test_afd_phases_update_only_their_own_parameters(tmp_path, datamodule, monkeypatch):
    # different widths: learned adapters
    module = AFDModule(small_mlp(hidden=16), [small_mlp(hidden=8)], feature_layers="1")
    phases: list[dict[str, bool]] = []

    def has_grad(parameters) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)

    original = module.manual_backward

    def record(loss, *args, **kwargs):
        original(loss, *args, **kwargs)
        phases.append(
            {
                "discriminators": has_grad(module.discriminators.parameters()),
                "adapters": has_grad(module.adapters.parameters()),
                "extractors": all(has_grad(net[0].parameters()) for net in module.peers.values()),
                "heads": any(has_grad(net[2].parameters()) for net in module.peers.values()),
            }
        )

    monkeypatch.setattr(module, "manual_backward", record)
    _, trainer = one_step(tmp_path, module, datamodule)
    assert phases == [
        {"discriminators": True, "adapters": False, "extractors": False, "heads": False},
        {"discriminators": False, "adapters": True, "extractors": True, "heads": False},
        {"discriminators": False, "adapters": False, "extractors": True, "heads": True},
    ]
    groups = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers]
    peers_ids = {id(p) for p in module.peers.parameters()}
    assert groups[0] == {id(p) for p in module.discriminators.parameters()}
    assert groups[1] == peers_ids | {id(p) for p in module.adapters.parameters()}
    assert groups[2] == peers_ids


def test_afd_cycles_through_three_networks():
    module = AFDModule(small_mlp(), small_mlp, feature_layers="1", num_peers=3)
    module.materialize((torch.randn(4, NUM_FEATURES), torch.zeros(4, dtype=torch.long)))
    features = module.features(torch.randn(4, NUM_FEATURES))
    # D_0 judges network 0 against network 2 (real): its loss uses f_2 as real
    with torch.no_grad():
        expected = sum(
            (module.discriminators[k](features[k - 1]) - 1).pow(2).mean()
            + module.discriminators[k](features[k]).pow(2).mean()
            for k in range(3)
        )
    torch.testing.assert_close(module.discriminator_loss(features), expected)


@pytest.mark.parametrize(
    "build",
    [
        lambda: DMLModule(small_mlp(), []),
        lambda: DMLModule(small_mlp(), small_mlp, num_peers=1),
        lambda: DMLModule(small_mlp(), small_mlp(), update="parallel"),
        lambda: FFLModule(small_mlp(), small_mlp(), feature_layers="nope"),
        lambda: AFDModule(small_mlp(), small_mlp(), feature_layers=["1"]),
        lambda: OKDDipModule(small_mlp(), [small_mlp()], feature_layers="1"),
        lambda: OKDDipModule(small_mlp(), small_mlp, feature_layers="1", num_peers=2),
        lambda: DMLModule(small_mlp(), {"peer0": small_mlp()}),
    ],
    ids=[
        "one-peer",
        "one-copy",
        "bad-update",
        "bad-layer",
        "layers-per-peer",
        "one-okddip-peer",
        "two-okddip-networks",
        "name-of-the-student",
    ],
)
def test_bad_arguments_fail_at_construction(build):
    with pytest.raises(ValueError):
        build()


def test_a_peer_factory_builds_independent_copies_in_order():
    torch.manual_seed(0)
    expected = [small_mlp() for _ in range(3)]
    torch.manual_seed(0)
    module = DMLModule(small_mlp(), small_mlp, num_peers=3)
    assert module.names == ["peer0", "peer1", "peer2"] and module.student is module.peers["peer0"]
    for peer, reference in zip(module.peers.values(), expected, strict=True):
        assert_same_parameters(peer, reference)
    named = OKDDipModule(
        small_mlp(),
        {"wide": small_mlp(hidden=32), "slim": small_mlp(hidden=4)},
        "1",
        shared_projections=False,
    )
    assert named.names == ["leader", "wide", "slim"] and named.teacher_names == ["wide", "slim"]


def test_afd_feature_optimizer_drives_only_the_adversarial_phase(tmp_path, datamodule):
    module = AFDModule(
        small_mlp(),
        small_mlp(),
        feature_layers="1",
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        feature_optimizer=partial(torch.optim.SGD, lr=1e-4),
    )
    _, trainer = one_step(tmp_path, module, datamodule)
    discriminators, features, networks = trainer.optimizers
    assert isinstance(features, torch.optim.SGD) and features.defaults["lr"] == 1e-4
    assert isinstance(discriminators, torch.optim.Adam) and isinstance(networks, torch.optim.Adam)


def _adversarial_rates(trainer, index: int) -> list[float]:
    """The learning rate of optimizer ``index`` at 0, 1/4 and 1/2 of the run's steps."""
    schedule = trainer.lr_scheduler_configs[index].scheduler
    total = int(trainer.estimated_stepping_batches)
    base = schedule.base_lrs[0]
    return [base * schedule.lr_lambdas[0](step) for step in (0, total // 4, total // 2)]


def assert_paper_adversarial_optimizers(trainer) -> None:
    """Phases 1 and 2: Adam at 2e-5, weight decay 0.1, divided by 10 at 1/4 and 1/2 of training."""
    discriminators, features, _ = trainer.optimizers
    for index, optimizer in ((0, discriminators), (1, features)):
        assert type(optimizer).__name__ == "Adam"
        assert optimizer.defaults["lr"] == 2e-5 and optimizer.defaults["weight_decay"] == 0.1
        assert _adversarial_rates(trainer, index) == pytest.approx([2e-5, 2e-6, 2e-7])


def test_afd_adversarial_optimizers_default_to_the_papers(tmp_path, datamodule):
    module = AFDModule(
        small_mlp(),
        small_mlp(),
        feature_layers="1",
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        scheduler=partial(torch.optim.lr_scheduler.ConstantLR, factor=1.0),
    )
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert_paper_adversarial_optimizers(trainer)
    networks = trainer.optimizers[2]
    assert isinstance(networks, torch.optim.Adam) and networks.defaults["lr"] == 1e-2
    assert isinstance(
        trainer.lr_scheduler_configs[2].scheduler, torch.optim.lr_scheduler.ConstantLR
    )


def test_afd_adversarial_optimizers_default_to_the_papers_in_kd_train(tmp_path):
    from kd_lightning.cli.train import train

    from .app_helpers import FAST, compose_config

    overrides = [*FAST, "method=afd", "baseline=false", "callbacks=none", "trainer.max_epochs=1"]
    _, objects = train(compose_config(tmp_path, overrides))
    assert_paper_adversarial_optimizers(objects["trainer"])
    networks = objects["trainer"].optimizers[2]  # the paper's SGD, as the module's default
    assert type(networks).__name__ == "SGD"
    expected = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    assert {key: networks.defaults[key] for key in expected} == expected
    default = AFDModule(small_mlp(), small_mlp(), feature_layers="1").optimizer_factory
    built = default([nn.Parameter(torch.zeros(1))])
    assert isinstance(built, torch.optim.SGD)
    assert {key: built.defaults[key] for key in expected} == expected


def test_afd_null_adversarial_optimizers_take_the_networks_own(tmp_path, datamodule):
    module = AFDModule(
        small_mlp(),
        small_mlp(),
        feature_layers="1",
        optimizer=partial(torch.optim.SGD, lr=0.1),
        discriminator_optimizer=None,
        feature_optimizer=None,
        discriminator_scheduler=None,
        feature_scheduler=None,
        scheduler=partial(torch.optim.lr_scheduler.ConstantLR, factor=0.5),
    )
    _, trainer = one_step(tmp_path, module, datamodule)
    for optimizer, config in zip(trainer.optimizers, trainer.lr_scheduler_configs, strict=True):
        assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.1
        assert isinstance(config.scheduler, torch.optim.lr_scheduler.ConstantLR)


class TinyLM(nn.Module):
    """Next-token logits (B, L, V) from a Hugging Face style batch's input ids."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 5)
        self.head = nn.Linear(5, vocab)

    def forward(self, inputs):
        return self.head(self.embedding(inputs["input_ids"]))


def token_batch() -> dict[str, torch.Tensor]:
    """Two sequences of 5 tokens, the second padded after 3 (its last labels -100)."""
    ids = torch.tensor([[1, 4, 2, 6, 3], [5, 2, 2, 0, 0]])
    labels = torch.tensor([[4, 2, 6, 3, 1], [2, 2, 3, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("method", ["dml", "codistillation"])
def test_token_objectives_are_the_per_sample_ones_over_real_tokens(method):
    torch.manual_seed(0)
    peers = [TinyLM(), TinyLM()]
    if method == "dml":
        module = DMLModule(*peers, temperature=2.0, update="simultaneous")
    else:
        module = CodistillationModule(*peers, burn_in=0)
        module.refresh_snapshots()
        with torch.no_grad():  # the live peers move away from their snapshots
            for peer in peers:
                peer.head.bias += torch.randn(7)
    batch = token_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["labels"] != -100
    loss, logits = module.objective(inputs, batch["labels"])
    rows = {name: peer(inputs)[real] for name, peer in module.peers.items()}
    assert {name: z.shape for name, z in logits.items()} == {n: (8, 7) for n in rows}
    if method == "dml":
        kl = [
            4.0
            * F.kl_div(
                F.log_softmax(rows[a] / 2, -1), F.softmax(rows[b] / 2, -1), reduction="batchmean"
            )
            for a, b in (("peer0", "peer1"), ("peer1", "peer0"))
        ]
        expected = sum(F.cross_entropy(z, batch["labels"][real]) for z in rows.values()) + sum(kl)
    else:
        stale = {name: snap(inputs)[real] for name, snap in module._snapshots.items()}
        expected = sum(
            F.cross_entropy(rows[a], batch["labels"][real])
            - (F.softmax(stale[b], -1) * F.log_softmax(rows[a], -1)).sum(-1).mean()
            for a, b in (("peer0", "peer1"), ("peer1", "peer0"))
        )
    torch.testing.assert_close(loss, expected)


def test_a_sequential_dml_step_on_tokens_matches_the_papers_update_by_hand(tmp_path):
    torch.manual_seed(0)
    peers = [TinyLM(), TinyLM()]
    first, second = copy.deepcopy(peers)
    module = DMLModule(*peers, optimizer=partial(torch.optim.SGD, lr=0.5))
    batch = token_batch()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    real = batch["labels"] != -100
    y = batch["labels"][real]
    z_first, z_second = first(inputs)[real], second(inputs)[real]
    sgd_step(first, F.cross_entropy(z_first, y) + kl_to(z_second, z_first), lr=0.5)
    sgd_step(second, F.cross_entropy(z_second, y) + kl_to(first(inputs)[real], z_second), lr=0.5)
    assert_same_parameters(module.peers["peer0"], first)
    assert_same_parameters(module.peers["peer1"], second)
    # the logged means are per real token: the student's cross-entropy before its update
    torch.testing.assert_close(
        trainer.callback_metrics["train/ce"], F.cross_entropy(z_first, y).detach()
    )


def test_token_steps_hand_callbacks_the_real_tokens_rows():
    torch.manual_seed(0)
    module = DMLModule(TinyLM(), TinyLM(), update="simultaneous")
    outputs = module.validation_step(token_batch(), 0)
    assert outputs["student_logits"].shape == (8, 7)
    assert outputs["teacher_logits"].shape == (1, 8, 7)
    assert outputs["labels"].tolist() == [4, 2, 6, 3, 1, 2, 2, 3]
