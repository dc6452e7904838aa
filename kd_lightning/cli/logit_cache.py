"""The teacher-output cache of a config: ``cache=true`` of ``kd-train`` and the ``kd-cache`` command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig
from torch import Tensor

from kd_lightning.cli.config import method_arguments, method_name
from kd_lightning.data import augment_mnist1d
from kd_lightning.data.augmented_views import AugmentedViewsDataModule
from kd_lightning.data.indexed import IndexedDataModule
from kd_lightning.data.text import TextDataModule
from kd_lightning.teachers import TeacherEnsemble
from kd_lightning.teachers.cache.build import (
    CachedTeachers,
    build_output_cache,
    remove_partial_builds,
)
from kd_lightning.teachers.cache.fingerprint import NondeterministicDataError
from kd_lightning.teachers.cache.parts import CacheWriteError
from kd_lightning.teachers.cache.sequence_build import build_sequence_cache
from kd_lightning.teachers.cache.sequence_store import SequenceCachedTeachers

OutputCache = CachedTeachers | SequenceCachedTeachers


def output_cache_root(cfg: DictConfig) -> Path:
    """``${paths.cache_dir}/outputs``: every teacher-output cache of the config lives below it."""
    return Path(cfg.paths.cache_dir) / "outputs"


def check_cacheable(cfg: DictConfig) -> None:
    """Refuse a cache for a method that takes no teachers, with teachers drawn per step, or of
    randomly augmented data, before any work. (Whether a method that takes teachers can read a
    cache, its constructor says: :func:`~kd_lightning.cli.validation.validate_config` builds it on
    one cached batch.)"""
    if "teachers" not in method_arguments(cfg):
        raise ValueError(
            f"cache=true with method={method_name(cfg)}: this method trains no pretrained "
            "teachers and cannot read a teacher-output cache; set cache=false (method=ensemble "
            "reads one)"
        )
    per_step = (cfg.get("teacher_runtime") or {}).get("draw_per_step")
    if per_step is not None:
        raise ValueError(
            f"cache=true with teacher_runtime.draw_per_step={per_step}: the cache stores every "
            "teacher's logits and training reads them without running a teacher, so there is "
            "nothing to draw; set teacher_runtime.draw_per_step=null or cache=false"
        )
    views = cfg.get("cache_augmented_views")
    if cfg.data.get("augment") and views is None:
        raise ValueError(
            "cache=true with data.augment=true: random augmentation gives the teachers new "
            "inputs every epoch, so their outputs cannot be cached; set data.augment=false, "
            "cache_augmented_views=<N> to cache N seeded augmented views of each training sample, "
            "or cache=false to run the teachers live"
        )
    if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
        raise ValueError(f"cache_augmented_views must be a positive integer or null, got {views!r}")
    top_k = cfg.get("cache_top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"cache_top_k must be a positive integer or null, got {top_k!r}")
    if is_text(cfg) and top_k is None:
        raise ValueError(
            f"cache=true with data={cfg.data._target_}: a language-model cache stores each "
            "token's top-k logits (all of them would take 4·V bytes per token and teacher); set "
            "cache_top_k, e.g. cache_top_k=32"
        )
    bits = cfg.get("cache_value_bits")
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16
    ):
        raise ValueError(f"cache_value_bits must be an integer from 1 to 16 or null, got {bits!r}")


def is_text(cfg: DictConfig) -> bool:
    """Whether ``cfg.data`` is token sequences (:class:`~kd_lightning.data.TextDataModule`), whose
    teachers' outputs go to a sequence cache.

    Examples:
        >>> from omegaconf import OmegaConf
        >>> is_text(OmegaConf.create({"data": {"_target_": "kd_lightning.data.TextDataModule"}}))
        True
    """
    target = str(cfg.data.get("_target_", ""))
    return target.rsplit(".", 1)[-1] == TextDataModule.__name__


def mnist1d_view(inputs: Tensor, generator: torch.Generator) -> Tensor:
    """One seeded MNIST-1D augmentation (:func:`~kd_lightning.data.augment_mnist1d`) of one sample."""
    return augment_mnist1d(inputs[None], generator=generator)[0]


def cache_datamodule(cfg: DictConfig, datamodule: LightningDataModule) -> LightningDataModule:
    """The data the cache covers: ``datamodule``, or with ``data.augment=true`` and
    ``cache_augmented_views=N``, N seeded augmented views of each training sample."""
    if cfg.data.get("augment") and cfg.get("cache_augmented_views") is not None:
        return AugmentedViewsDataModule(
            datamodule, mnist1d_view, int(cfg.cache_augmented_views), seed=int(cfg.seed)
        )
    return datamodule


def build_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process in the cache build.

    Under ``torchrun`` (TorchElastic) every rank runs ``kd-train`` from the start, so the ranks
    share the build, each running the teachers over its part of the rows. Anywhere else this is
    one builder: under Lightning's own ``ddp`` launcher rank 0 builds the cache before ``fit``
    starts the other ranks, which then find it complete.
    """
    if TorchElasticEnvironment.detect():
        environment = TorchElasticEnvironment()
        return environment.global_rank(), environment.world_size(), environment.local_rank()
    return 0, 1, 0


def gpu_of(local_rank: int, devices: Any) -> int:
    """The GPU index of local rank ``local_rank``: ``devices[local_rank]`` when ``trainer.devices``
    lists GPUs, as Lightning maps them; else ``local_rank`` (modulo the GPUs present).

    Examples:
        >>> gpu_of(1, [2, 3])  # trainer.devices=[2,3]: local rank 1 runs on GPU 3
        3
    """
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return int(devices[local_rank])
    return local_rank % max(1, torch.cuda.device_count())


def open_output_cache(
    cfg: DictConfig, teachers: TeacherEnsemble, datamodule: LightningDataModule
) -> OutputCache:
    """The cache of ``teachers`` over the train/val/test splits of ``datamodule``: a
    :class:`~kd_lightning.teachers.CachedTeachers`, or for text a
    :class:`~kd_lightning.teachers.cache.sequence_store.SequenceCachedTeachers` (each token's
    top ``cache_top_k`` logits at ``cache_value_bits`` bits; :func:`open_sequence_cache`).

    Built when missing (a changed teacher or dataset has a new fingerprint, hence no cache yet)
    unless ``cache_build=false``, which makes that an error naming what changed. A write that
    fails (a full disk) raises a :class:`~kd_lightning.teachers.cache.parts.CacheWriteError`
    naming ``paths.cache_dir`` and the file, and keeps no cache. Teachers run on
    the GPU when ``trainer.accelerator`` asks for one and one is present (under ``torchrun``, the
    GPU of the rank's ``LOCAL_RANK``); ``torchrun`` ranks share the build (:func:`build_ranks`).
    """
    check_cacheable(cfg)
    if isinstance(datamodule, TextDataModule):
        return open_sequence_cache(cfg, teachers, datamodule)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loaders = {
        "train": datamodule.train_dataloader(),
        "val": datamodule.val_dataloader(),
        "test": datamodule.test_dataloader(),
    }
    root = output_cache_root(cfg)
    remove_partial_builds(root)
    wants_gpu = str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto")
    rank, world_size, local_rank = build_ranks()
    device = torch.device("cpu")
    if wants_gpu and torch.cuda.is_available():
        device = torch.device("cuda", gpu_of(local_rank, cfg.trainer.get("devices")))
    train_loader = loaders["train"]
    try:
        cache = build_output_cache(
            teachers,
            {split: loader.dataset for split, loader in loaders.items()},
            root,
            top_k=cfg.get("cache_top_k"),
            batch_size=train_loader.batch_size or 1,
            collate_fn=train_loader.collate_fn,
            device=device,
            missing="build" if cfg.get("cache_build", True) else "error",
            rank=rank,
            world_size=world_size,
            wait_s=float(cfg.get("cache_wait_s", 3600)),
        )
    except NondeterministicDataError as error:
        raise ValueError(f"cache=true: data={cfg.data._target_}: {error}") from error
    except CacheWriteError as error:
        error.args = (f"paths.cache_dir={cfg.paths.cache_dir}: {error}",)
        raise
    if cache.path.resolve().parent != root.resolve():
        raise RuntimeError(f"teacher-output cache {cache.path} lies outside {root}")
    return cache


def open_sequence_cache(
    cfg: DictConfig, teachers: TeacherEnsemble, datamodule: TextDataModule
) -> SequenceCachedTeachers:
    """The sequence cache of ``teachers`` over the blocks of ``datamodule``, under
    ``${paths.cache_dir}/outputs`` (its fingerprint names the teachers, tokenizer, block length,
    ``cache_top_k`` and ``cache_value_bits``), built where missing; a killed build resumes from
    its finished chunks (also one that stopped on a full disk: the error names ``paths.cache_dir``
    and the file). With ``cache_build=false`` a missing cache is an error."""
    root = output_cache_root(cfg)
    device = torch.device("cpu")
    if str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodule.prepare_data()
    try:
        return build_sequence_cache(
            teachers,
            datamodule,
            root,
            top_k=int(cfg.cache_top_k),
            value_bits=cfg.get("cache_value_bits", 8),
            batch_size=datamodule.batch_size,
            device=device,
            missing="build" if cfg.get("cache_build", True) else "error",
        )
    except CacheWriteError as error:
        error.args = (f"paths.cache_dir={cfg.paths.cache_dir}: {error}",)
        raise


def cached_teachers(
    cfg: DictConfig, teachers: TeacherEnsemble, datamodule: LightningDataModule
) -> tuple[OutputCache, IndexedDataModule]:
    """For ``cache=true``: the cached teachers, and the datamodule whose batches carry indices.

    The live teachers are moved back to the CPU: training never runs them.
    """
    data = cache_datamodule(cfg, datamodule)
    cache = open_output_cache(cfg, teachers, data)
    teachers.to("cpu")
    return cache, IndexedDataModule(data)


def describe(cache: OutputCache) -> str:
    """Where the cache is, what it holds and how big it is."""
    if isinstance(cache, SequenceCachedTeachers):
        blocks = ", ".join(f"{stage} {cache.num_blocks(stage)}" for stage in cache.stages)
        bits = "float32" if cache.value_bits is None else f"{cache.value_bits}-bit"
        return (
            f"teacher-output cache: {cache.path}\n"
            f"  teachers {', '.join(cache.names)}; blocks of {cache.block_size} tokens: {blocks}; "
            f"top {cache.top_k} of {cache.vocab_size} logits ({bits}) + tail mass; "
            f"{cache.nbytes / 2**20:.2f} MiB, {cache.bytes_per_token:.0f} bytes per token per teacher"
        )
    splits = ", ".join(
        f"{stage} {cache.manifest['splits'][stage]['num_samples']}" for stage in cache.stages
    )
    stored = "all logits" if cache.top_k is None else f"top {cache.top_k} logits + tail mass"
    return (
        f"teacher-output cache: {cache.path}\n"
        f"  teachers {', '.join(cache.names)}; samples {splits}; {stored}; "
        f"{cache.nbytes / 2**20:.2f} MiB"
    )
