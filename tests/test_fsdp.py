"""accelerator=fsdp: Lightning's FSDPStrategy over frozen teachers and a trainable student."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import ShardingStrategy

from kd_lightning.cli.train import train
from kd_lightning.cli.validation import ConfigError
from kd_lightning.models.causal_lm import DecoderBlock

from .app_helpers import FAST, compose_config


def test_the_config_builds_a_full_shard_strategy_wrapping_decoder_blocks(tmp_path):
    cfg = compose_config(tmp_path, ["accelerator=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trainable parameters mix
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {DecoderBlock}
    assert cfg.trainer.accelerator == "gpu" and cfg.teacher_runtime.inference_mode


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_it_is_refused_before_any_teacher_trains(tmp_path):
    cfg = compose_config(tmp_path, [*FAST, "accelerator=fsdp"])
    with pytest.raises(ConfigError, match=r"trainer\.accelerator=gpu: no GPU device"):
        train(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning runs FSDP on CUDA only")
def test_distillation_trains_under_fsdp_on_a_gpu(tmp_path):
    overrides = [*FAST, "accelerator=fsdp", "trainer.devices=1", "baseline=false"]
    summary, objects = train(compose_config(tmp_path, overrides))
    assert isinstance(objects["trainer"].strategy, FSDPStrategy)
    assert 0.0 <= summary["test_accuracy"]["student"] <= 1.0
