"""``kd-train``: distil a student from the configured teachers, with a from-scratch baseline.

Run ``kd-train --help`` for the config groups, e.g.
``kd-train teachers=[cnn,gru] fusion=confidence accelerator=ddp_cpu logger=wandb``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.callbacks import (
    AtomicCheckpointIO,
    NonFiniteLossGuard,
    TeacherAgreementCallback,
)
from kd_lightning.callbacks.nonfinite import training_callbacks
from kd_lightning.callbacks.progress import progress_bar
from kd_lightning.cli.config import CONFIG_DIR, method_arguments, method_name, show_progress
from kd_lightning.cli.logit_cache import cached_teachers, check_cacheable
from kd_lightning.cli.summary import build_summary, format_summary, per_token, write_json
from kd_lightning.cli.teacher_checkpoints import (
    build_teachers,
    teacher_checkpoint,
    teacher_source,
    train_teacher,
)
from kd_lightning.cli.validation import validate_config
from kd_lightning.modules import ClassifierModule, StageRunner
from kd_lightning.teachers import TeacherSource
from kd_lightning.teachers.cache.parts import NO_ROOM

log = logging.getLogger(__name__)
#: Where a run or a multirun job keeps the overrides it was launched with (see :func:`record_job`).
JOB_RECORD = "job.json"
#: The config keys whose overrides a run relaunched into its directory may change: how, where and
#: how long it runs and what it logs, never what the student learns from.
RELAUNCH_MAY_CHANGE = (
    "trainer",
    "accelerator",
    "logger",
    "callbacks",
    "paths",
    "baseline",
    "train_if_missing",
    "cache_build",
    "cache_wait_s",
    "on_nonfinite",
    "optimized_metric",
)
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the experiment ``cfg`` and return ``(summary, objects)``.

    The method's module is built (:func:`build_module`; teachers loaded, trained and cached first
    where missing, earlier stages run), the student is distilled and tested, then, when
    ``cfg.baseline``, a copy of the network it trains, as it was before training, is trained
    from scratch on labels and tested. Relaunched in the same output directory
    (``hydra.run.dir=...``), distillation resumes from the ``last.ckpt`` the checkpoint callback
    left there. ``summary`` is also written to ``summary.json`` in the run's output directory.

    A job of a multirun whose directory holds the ``summary.json`` of an earlier launch of the
    same sweep is not run again: its summary is returned, with no objects
    (:func:`finished_sweep_job`). A training step whose loss is NaN or inf stops the run, or
    with ``on_nonfinite=skip`` is skipped and counted (:class:`~kd_lightning.callbacks.NonFiniteLossGuard`).
    """
    started = time.perf_counter()
    check_relaunch(cfg)
    finished = finished_sweep_job(cfg)
    if finished is not None:
        return finished, {}
    refuse_ddp_in_multirun(cfg)
    check_optimized_metric(cfg)
    validate_config(cfg)  # every problem at once, before anything is trained or written
    record_job(cfg)
    if cfg.get("cache"):
        check_cacheable(cfg)  # before any teacher is trained
    datamodule: LightningDataModule = instantiate(cfg.data)
    teachers: TeacherSource | None = None
    distill_data: LightningDataModule = datamodule
    if "teachers" in method_arguments(cfg):
        ensemble = build_teachers(cfg, datamodule)
        if cfg.get("cache"):  # read by sample index, the teachers idle
            teachers, distill_data = cached_teachers(cfg, ensemble, datamodule)
        else:
            teachers = teacher_source(cfg, ensemble)

    module = build_module(cfg, distill_data, teachers)
    untrained = copy.deepcopy(cast(nn.Module, module.student)) if cfg.baseline else None
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [
            callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)
        ]
    if not any(isinstance(callback, TeacherAgreementCallback) for callback in callbacks):
        callbacks.insert(0, TeacherAgreementCallback(stages=("val", "test")))
    guard = NonFiniteLossGuard(cfg.get("on_nonfinite", "stop"))
    trainer: Trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[*callbacks, guard, *progress_bar("student", show_progress(cfg))],
        **strategy_for(cfg, module),
        **checkpoint_writer(cfg),
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=distill_data, ckpt_path=last_checkpoint(trainer))
    except OSError as error:
        raise_no_room(error, trainer)
        raise
    optimized = optimized_value(cfg, trainer)  # before trainer.test replaces the metrics
    val_metrics = metric_values(trainer, "val/")  # those of the last validation
    trainer.test(module, datamodule=distill_data)
    test_metrics = metric_values(trainer)

    baseline_metrics = None
    if untrained is not None:
        baseline_metrics = train_baseline(cfg, datamodule, untrained)

    summary = build_summary(
        cast(list[str], module.teacher_names),  # every method's module names its teachers
        test_metrics,
        baseline_metrics,
        choices(cfg),
        time.perf_counter() - started,
        val_metrics=val_metrics,
        per_token=per_token(datamodule),
        skipped_steps=guard.skipped_steps,
    )
    if optimized is not None:
        summary["optimized_metric"] = {"name": cfg.optimized_metric, "value": optimized}
    report(summary, cfg.paths.output_dir)
    finish_wandb_runs(loggers, summary)
    return summary, {
        "cfg": cfg,
        "datamodule": datamodule,
        "module": module,
        "trainer": trainer,
        "teachers": teachers,
    }


def build_module(
    cfg: DictConfig,
    datamodule: LightningDataModule,
    teachers: TeacherSource | None = None,
) -> LightningModule:
    """The module of ``cfg.method``: its node instantiated (a partial of a LightningModule or of a
    pipeline) and called with a fresh ``cfg.student``, plus ``teachers`` and a
    :class:`~kd_lightning.modules.StageRunner` over ``datamodule`` (stages in
    ``<output dir>/stages``) when its target takes them (see
    :class:`~kd_lightning.modules.MethodModule`). Seeded with ``cfg.seed`` first."""
    arguments = method_arguments(cfg)
    L.seed_everything(cfg.seed, workers=True)
    provided: dict[str, Any] = {"student": instantiate(cfg.student)}
    if "teachers" in arguments:
        provided["teachers"] = teachers
    if "stages" in arguments:
        provided["stages"] = StageRunner(
            datamodule,
            Path(cfg.paths.output_dir) / "stages",
            OmegaConf.to_container(cfg.trainer, resolve=True),  # type: ignore[arg-type]
            seed=cfg.seed,
            pretrained=lambda name: pretrained_teacher(cfg, datamodule, name),
            on_nonfinite=cfg.get("on_nonfinite", "stop"),
        )
    return instantiate(cfg.method, _convert_="all")(**provided)


def pretrained_teacher(cfg: DictConfig, datamodule: LightningDataModule, name: str) -> Path:
    """The weights file of configured teacher ``name``: its ``checkpoint``, or the cached one,
    trained (and cached) first when missing and ``train_if_missing``."""
    path = teacher_checkpoint(name, cfg)
    if path.is_file():
        return path
    if cfg.teachers[name].checkpoint:
        raise FileNotFoundError(f"teachers.{name}.checkpoint: no such file: {path}")
    if not cfg.train_if_missing:
        raise FileNotFoundError(
            f"teachers.{name} has no checkpoint ({path}) and train_if_missing=false: train it "
            f"with `kd-teachers teachers=[{name}]`, or use method.teacher_init=scratch"
        )
    return train_teacher(name, cfg, datamodule)


def train_baseline(
    cfg: DictConfig, datamodule: LightningDataModule, network: nn.Module
) -> dict[str, float]:
    """Train ``network`` (the method's trained network as it was before training: the student, or
    for ``tfkd variant=reverse`` the teacher's architecture) on labels alone; return its metrics
    at the last validation and in the test: ``val/loss``, ``val/acc`` (when it validated),
    ``test/loss`` (cross-entropy) and ``test/acc``. A step whose loss is NaN or inf stops it, or
    with ``on_nonfinite=skip`` is skipped, as in distillation. Its curves go to
    ``<output_dir>/csv_baseline/version_0/metrics.csv``, beside the distilled student's."""
    L.seed_everything(cfg.seed, workers=True)
    module = ClassifierModule(
        network,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    trainer: Trainer = instantiate(
        cfg.trainer,
        logger=CSVLogger(cfg.paths.output_dir, name="csv_baseline", version=0),
        enable_checkpointing=False,
        callbacks=training_callbacks(
            "scratch baseline", cfg.get("on_nonfinite", "stop"), show_progress(cfg)
        ),
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    validated = metric_values(trainer, "val/")
    trainer.test(module, datamodule=datamodule, verbose=False)
    return {**validated, **metric_values(trainer, "test/")}


def metric_values(trainer: Trainer, prefix: str = "") -> dict[str, float]:
    """The trainer's latest logged metrics whose keys start with ``prefix``, as floats."""
    return {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith(prefix)
    }


def last_checkpoint(trainer: Trainer) -> str | None:
    """``last.ckpt`` of an earlier, interrupted launch in the same output directory, if any."""
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or not callback.dirpath or not callback.save_last:
        return None
    path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    if not path.is_file():
        return None
    log.info("resuming from %s", path)
    return str(path)


def raise_no_room(error: OSError, trainer: Trainer) -> None:
    """Raise ``error``, a write that found no room (a full disk, a file-size limit) while the
    student trained, as an ``OSError`` saying so and where checkpoints go; other errors pass.

    Lightning writes a checkpoint aside and renames it, so a failed write leaves none: the
    ``last.ckpt`` of the last epoch written whole is what a relaunch resumes from.
    """
    if error.errno not in NO_ROOM:
        return
    callback = trainer.checkpoint_callback
    where = getattr(callback, "dirpath", None) or trainer.default_root_dir
    raise OSError(
        error.errno,
        f"{error.strerror} while training the student (checkpoints go to {where}): the disk is "
        "full or a file-size limit was hit; no partial checkpoint was kept, so a relaunch in the "
        "same hydra.run.dir resumes from the last one written whole",
    ) from error


def check_relaunch(cfg: DictConfig) -> None:
    """Refuse a launch into the output directory of a run launched with other overrides, whose
    ``last.ckpt`` it would resume (and, for a multirun job, whose summary it would return).

    :func:`record_job` kept the overrides the run was first launched with. A multirun job must
    get exactly those (a changed sweep renumbers its jobs); a single run relaunched with the same
    ``hydra.run.dir`` may change only the keys in :data:`RELAUNCH_MAY_CHANGE` (e.g.
    ``trainer.max_epochs`` to train on), not the teachers, the fusion rule or anything else the
    student learns from.
    """
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    output_dir = Path(cfg.paths.output_dir)
    record = output_dir / JOB_RECORD
    if not record.is_file():
        return
    launched = json.loads(record.read_text())["overrides"]
    overrides = sorted(str(override) for override in hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        if launched != overrides:
            raise ValueError(
                f"hydra.sweep.dir={hydra_cfg.sweep.dir}: job {hydra_cfg.job.num} ({output_dir}) "
                f"was launched with the overrides {launched}, this launch gives it {overrides}; "
                "relaunch the same sweep to finish it, or use a new hydra.sweep.dir"
            )
        return
    then, now = (
        sorted(set(ours) - set(theirs) - set(may_change(ours)))
        for ours, theirs in ((launched, overrides), (overrides, launched))
    )
    if then or now:
        raise ValueError(
            f"hydra.run.dir={output_dir} holds a run launched with other overrides: "
            f"{then or 'none'} there, {now or 'none'} now; relaunch it with its overrides to "
            f"resume it (only {', '.join(RELAUNCH_MAY_CHANGE)} may change), or use another "
            "hydra.run.dir"
        )


def may_change(overrides: list[str]) -> list[str]:
    """The overrides among ``overrides`` of the keys in :data:`RELAUNCH_MAY_CHANGE`.

    Examples:
        >>> may_change(["trainer.max_epochs=3", "fusion=entropy", "~callbacks.heatmap"])
        ['trainer.max_epochs=3', '~callbacks.heatmap']
    """
    return [
        override
        for override in overrides
        if override.lstrip("+~").split("=")[0].split(".")[0] in RELAUNCH_MAY_CHANGE
    ]


def finished_sweep_job(cfg: DictConfig) -> dict[str, Any] | None:
    """For a job of a multirun relaunched with the same ``hydra.sweep.dir``: the summary that an
    earlier launch wrote when it finished this job, else ``None`` (the job runs, resuming from its
    ``last.ckpt`` when it has one). :func:`check_relaunch` has made sure that they are its own.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = output_dir / "summary.json"
    if not summary.is_file():  # written whole or not at all (write_json)
        return None
    log.info(
        "job %s: skipped, an earlier launch finished it (%s)", HydraConfig.get().job.num, summary
    )
    return cast(dict[str, Any], json.loads(summary.read_text()))


def record_job(cfg: DictConfig) -> None:
    """Keep the overrides a run or a multirun job is launched with in its directory
    (``job.json``, once), for :func:`check_relaunch` to compare on a relaunch."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    record = Path(cfg.paths.output_dir) / JOB_RECORD
    if not record.is_file():
        overrides = sorted(str(override) for override in hydra_cfg.overrides.task)
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, {"overrides": overrides})


def strategy_for(cfg: DictConfig, module: LightningModule) -> dict[str, Any]:
    """Trainer arguments completing ``cfg.trainer.strategy`` for ``module``: a strategy node
    (``accelerator=ddp``, ``ddp_cpu``) whose ``find_unused_parameters`` is null gets the module's
    :attr:`~kd_lightning.modules.MethodModule.partial_backward`.

    Example:
        >>> cfg = OmegaConf.create({"trainer": {"strategy": {"find_unused_parameters": None}}})
        >>> strategy_for(cfg, ClassifierModule(nn.Linear(2, 2)))
        {'strategy': {'find_unused_parameters': False}}
    """
    strategy = cfg.trainer.get("strategy")
    if not isinstance(strategy, DictConfig) or "find_unused_parameters" not in strategy:
        return {}
    if strategy.find_unused_parameters is not None:
        return {}
    partial = bool(getattr(module, "partial_backward", False))
    return {"strategy": {"find_unused_parameters": partial}}


def checkpoint_writer(cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments that write the student's checkpoints with
    :class:`~kd_lightning.callbacks.AtomicCheckpointIO`: none under FSDP (which writes its own
    sharded checkpoints) or when ``trainer.plugins`` names the user's own.

    Examples:
        >>> cfg = OmegaConf.create({"trainer": {"strategy": "auto"}})
        >>> [type(plugin).__name__ for plugin in checkpoint_writer(cfg)["plugins"]]
        ['AtomicCheckpointIO']
    """
    strategy = str(cfg.trainer.get("strategy", ""))
    if cfg.trainer.get("plugins") or "FSDP" in strategy or "fsdp" in strategy:
        return {}
    return {"plugins": [AtomicCheckpointIO()]}


def strategy_name(strategy: Any) -> str:
    """Lightning's name for ``trainer.strategy``, given as a name or as a ``DDPStrategy`` node.

    Example:
        >>> strategy_name(OmegaConf.create({"_target_": "lightning.pytorch.strategies.DDPStrategy"}))
        'ddp'
    """
    if not isinstance(strategy, DictConfig):
        return str(strategy)
    if str(strategy.get("_target_", "")).rsplit(".", 1)[-1] != DDPStrategy.__name__:
        return str(strategy.get("_target_"))
    launcher = strategy.get("start_method", "popen")
    return "ddp" if launcher == "popen" else f"ddp_{launcher}"


@rank_zero_only
def finish_wandb_runs(loggers: list[Any], summary: dict[str, Any]) -> None:
    """Put the run's summary (flattened: ``summary/test_accuracy/student``, ...) into each W&B
    run's summary, then close the runs, so a next ``train`` call in this process starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(flatten(summary, "summary"))
            logger.experiment.finish()


def flatten(node: Any, prefix: str) -> dict[str, Any]:
    """Nested mappings as one ``{"a/b/c": leaf}`` mapping (lists stay leaves).

    Examples:
        >>> flatten({"test_accuracy": {"student": 0.9, "teachers": {"cnn": 0.95}}}, "summary")
        {'summary/test_accuracy/student': 0.9, 'summary/test_accuracy/teachers/cnn': 0.95}
    """
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}/{key}"))
    return flat


def instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``name → {_target_: ...}`` group (loggers, callbacks)."""
    if not node:
        return []
    return [instantiate(entry) for entry in node.values() if entry is not None]


def choices(cfg: DictConfig) -> dict[str, str]:
    """The options picked in each config group (``fusion=entropy`` → ``{"fusion": "entropy"}``);
    no fusion for methods that take no teachers, which never use it."""
    if HydraConfig.initialized():
        picked = {key: str(value) for key, value in HydraConfig.get().runtime.choices.items()}
    else:
        picked = {"method": method_name(cfg), "fusion": cfg.fusion._target_.rsplit(".", 1)[-1]}
    if "teachers" not in method_arguments(cfg):
        picked.pop("fusion", None)
    return picked


def refuse_ddp_in_multirun(cfg: DictConfig) -> None:
    """DDP re-executes the command in each rank, which a local multirun cannot do safely: refuse
    early. Under SLURM (``hydra/launcher=submitit_slurm`` with ``tasks_per_node`` = devices) every
    rank is a task the scheduler started, each job is one trial and Lightning launches nothing."""
    strategy = strategy_name(cfg.trainer.get("strategy", "auto"))
    in_multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    relaunches = strategy.startswith("ddp") and strategy != "ddp_spawn"
    if in_multirun and relaunches and not SLURMEnvironment.detect():
        raise ValueError(
            f"trainer.strategy={strategy} re-launches the command in every process and cannot run "
            f"inside a local multirun (-m): run the sweep's jobs one by one, use "
            f"trainer.strategy=ddp_spawn, or launch the sweep on SLURM (hydra/launcher=submitit_slurm)"
        )


def check_optimized_metric(cfg: DictConfig) -> None:
    """Refuse an ``optimized_metric`` a sweeper must not select on: a test metric, or not a metric.

    Example:
        >>> check_optimized_metric(OmegaConf.create({"optimized_metric": "val/acc"}))
        >>> check_optimized_metric(OmegaConf.create({"optimized_metric": "test/acc"}))
        Traceback (most recent call last):
        ...
        ValueError: optimized_metric=test/acc: a sweep selects on what the student logs while it trains (train/... or val/..., e.g. val/acc); choosing by test metrics would leak the test set into the choice
    """
    name = cfg.get("optimized_metric")
    if name is not None and not str(name).startswith(("train/", "val/")):
        raise ValueError(
            f"optimized_metric={name}: a sweep selects on what the student logs while it trains "
            "(train/... or val/..., e.g. val/acc); choosing by test metrics would leak the test "
            "set into the choice"
        )


def optimized_value(cfg: DictConfig, trainer: Trainer) -> float | None:
    """The value of ``cfg.optimized_metric`` when training ended (``None`` when unset)."""
    name = cfg.get("optimized_metric")
    if name is None:
        return None
    if name not in trainer.callback_metrics:
        logged = sorted(
            key for key in trainer.callback_metrics if key.startswith(("train/", "val/"))
        )
        raise ValueError(
            f"optimized_metric={name}: the student logged no such metric; it logged {logged}"
        )
    return float(trainer.callback_metrics[name])


@rank_zero_only
def report(summary: dict[str, Any], output_dir: str) -> None:
    """Write ``summary.json`` and print the summary table."""
    path = Path(output_dir) / "summary.json"
    write_json(path, summary)
    print(f"\n{format_summary(summary)}\n\nsummary written to {path}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """The ``kd-train`` command; returns ``optimized_metric`` (for Hydra sweepers, e.g.
    ``hparams_search=mnist1d_optuna``), or when unset the student's test accuracy."""
    summary, _ = train(cfg)
    if "optimized_metric" in summary:
        return summary["optimized_metric"]["value"]
    return summary["test_accuracy"]["student"]


if __name__ == "__main__":
    main()
