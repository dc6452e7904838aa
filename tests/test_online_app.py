"""Every online ``method=`` runs through ``train(cfg)`` on synthetic data and writes summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_lightning.cli.train import train
from kd_lightning.errors import ConfigError
from kd_lightning.modules import DMLModule

from .app_helpers import FAST, compose_config, run_command

EXPECTED_TEACHERS = {
    "dml": ["peer1"],
    "codistillation": ["peer1"],
    "okddip": ["peer1", "peer2"],  # with method.num_peers=3: the leader and two peers
    "ffl": ["peer1", "fused"],
    "afd": ["peer1"],
}


@pytest.mark.parametrize("method", sorted(EXPECTED_TEACHERS))
def test_online_method_trains_and_writes_summary(tmp_path, method):
    # one method with the default callbacks (checkpoints, agreement in every stage), the others lean
    callbacks = "~callbacks.heatmap" if method == "dml" else "callbacks=none"
    overrides = [*FAST, f"method={method}", "baseline=false", "trainer.max_epochs=1", callbacks]
    if method == "okddip":
        overrides.append("method.num_peers=3")
    cfg = compose_config(tmp_path, overrides)
    summary, objects = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert written == summary and summary["method"] == method
    assert summary["fusion"] is None  # peers, no fusion rule
    assert summary["teachers"] == EXPECTED_TEACHERS[method]
    assert objects["teachers"] is None  # no pretrained teacher was built
    metrics = objects["trainer"].callback_metrics
    assert summary["test_accuracy"]["student"] == pytest.approx(
        float(metrics[f"test/peer_acc/{objects['module'].names[0]}"])
    )


def test_heterogeneous_peers_from_model_configs(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            *FAST,
            "method=dml",
            "method.update=simultaneous",
            "method.peers=[{_target_:kd_lightning.models.CNN1D,channels:4}]",
            "baseline=false",
            "callbacks=none",
            "trainer.max_epochs=1",
        ],
    )
    summary, objects = train(cfg)
    module = objects["module"]
    assert isinstance(module, DMLModule) and module.hparams["update"] == "simultaneous"
    assert [type(peer).__name__ for peer in module.peers.values()] == ["MLP", "CNN1D"]
    assert set(summary["test_accuracy"]["teachers"]) == {"peer1"}


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.num_peers=1", "method.num_peers"),
        ("method.feature_layers=nope", "no submodule 'nope'"),
        ("method.feature_layers=[hidden]", "feature_layers"),
    ],
)
def test_bad_online_settings_fail_before_training(tmp_path, override, message):
    cfg = compose_config(tmp_path, [*FAST, "method=ffl", override])
    with pytest.raises(ConfigError, match=message) as caught:
        train(cfg)
    assert len(caught.value.problems) == 1
    assert not any((tmp_path / "output").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["method=afd", "method=dml", "method=codistillation method.sharded=true"]
)
def test_online_methods_run_under_ddp(tmp_path, method):
    """AFD's phases and sequential DML back-propagate through part of the model at a time;
    sharded codistillation trains each peer on one rank's shard."""
    result = run_command(
        [
            "-m",
            "kd_lightning.cli.train",
            *method.split(),
            "accelerator=ddp_cpu",
            "logger=none",
            "baseline=false",
            *FAST[:2],
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = (tmp_path / "logs").rglob("summary.json")
    assert json.loads(summary.read_text())["teachers"] == ["peer1"]


def test_afd_feature_optimizer_from_the_config(tmp_path):
    overrides = [
        *FAST,
        "method=afd",
        "method.feature_optimizer={_target_: torch.optim.SGD, _partial_: true, lr: 0.001}",
        "baseline=false",
        "callbacks=none",
        "trainer.max_epochs=1",
    ]
    _, objects = train(compose_config(tmp_path, overrides))
    discriminators, features, networks = objects["trainer"].optimizers
    assert type(features).__name__ == "SGD" and features.defaults["lr"] == 0.001
    assert type(networks).__name__ == "SGD" and type(discriminators).__name__ == "Adam"
