"""Builders of the sequential, progressive and teacher-free methods: ``method=takd``, ``prokt``,
``prokd`` and ``tfkd``.

Earlier stages (assistants, a teacher's trajectory, a pretrained student) run inside the builder,
each with its own Trainer and progress bar, and keep their weights under ``context.stage_dir``;
a relaunch in the same run directory loads finished stages instead of training them again.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.cli.teacher_checkpoints import teacher_checkpoint, train_teacher
from kd_lightning.modules import (
    ClassifierModule,
    DistillationModule,
    ProKDModule,
    ProKTModule,
    VirtualTeacherModule,
)
from kd_lightning.modules.stages import run_stage, run_trajectory_stage
from kd_lightning.teachers import TeacherEnsemble, load_teacher

if TYPE_CHECKING:
    from kd_lightning.cli.methods import MethodContext

TFKD_VARIANTS = ("self", "virtual", "reverse")
PROKT_TEACHER_INITS = ("pretrained", "scratch")
# Loss of a hop from one network: a fusion rule over one teacher is plain Hinton KD.
SINGLE_TEACHER_FUSION = "mean_probs"


def build_takd(context: MethodContext) -> LightningModule:
    """``method=takd`` (Mirzadeh et al., "Improved Knowledge Distillation via Teacher
    Assistant", AAAI 2020): teachers → ``method.assistants`` in order → student.

    Every hop is ordinary KD, ``(1 − λ)·CE + λ·τ²·KL`` (``method.loss``), from the frozen
    predecessor: the first assistant learns from the whole configured ensemble through the
    configured fusion rule, each later network from the one before it. Assistant hops run here for
    ``method.stage_epochs`` epochs (``trainer.max_epochs`` when null) and are kept as
    ``stages/takd-assistant<i>.safetensors``; the returned module is the last hop, assistant →
    student, which the caller fits.
    """
    cfg, method = context.cfg, context.cfg.method
    assistants = method.get("assistants")
    if not assistants or not OmegaConf.is_list(assistants):
        raise ValueError(
            "method.assistants must be a non-empty list of model configs (the teacher assistants, "
            f"largest first), got {assistants!r}"
        )
    assert context.teachers is not None
    epochs = stage_epochs(cfg)
    predecessor = context.teachers
    loss = instantiate(method.loss, fusion=instantiate(cfg.fusion))
    for index, node in enumerate(assistants, start=1):
        name = f"assistant{index}"
        L.seed_everything(cfg.seed + index, workers=True, verbose=False)
        assistant: nn.Module = instantiate(node)
        run_stage(
            f"takd-{name}",
            assistant,
            partial(DistillationModule, assistant, predecessor, loss, **optimisation(cfg)),
            context.datamodule,
            context.stage_dir,
            cfg.trainer,
            epochs,
        )
        predecessor = TeacherEnsemble({name: assistant})
        loss = instantiate(method.loss, fusion=SINGLE_TEACHER_FUSION)
    return DistillationModule(context.student, predecessor, loss, **optimisation(cfg))


def build_prokt(context: MethodContext) -> LightningModule:
    """``method=prokt``: :class:`~kd_lightning.modules.ProKTModule` with the first configured
    teacher's architecture as the teacher trained alongside, starting from its cached (or given)
    weights with ``method.teacher_init=pretrained`` or from scratch with ``scratch``."""
    cfg, method = context.cfg, context.cfg.method
    init = method.teacher_init
    if init not in PROKT_TEACHER_INITS:
        raise ValueError(f"method.teacher_init={init!r} is not one of {list(PROKT_TEACHER_INITS)}")
    name, teacher = first_teacher(context, pretrained=init == "pretrained")
    return ProKTModule(
        context.student,
        teacher,
        teacher_name=name,
        constraint=method.constraint,
        temperature=method.temperature,
        **optimisation(cfg),
    )


def build_prokd(context: MethodContext) -> LightningModule:
    """``method=prokd``: train the first configured teacher's architecture from scratch for
    ``method.teacher_epochs``, keeping ``method.num_checkpoints`` states along the way
    (``stages/prokd-<name>-<i>.safetensors``), then :class:`~kd_lightning.modules.ProKDModule`."""
    cfg, method = context.cfg, context.cfg.method
    name, teacher_cfg = first_teacher_config(cfg)
    try:
        ProKDModule.check_settings(
            method.alpha,
            method.max_temperature,
            method.min_temperature,
            method.temperature_schedule,
        )
    except ValueError as error:
        raise ValueError(f"method=prokd: {error} (keys under method.)") from error
    L.seed_everything(teacher_cfg.fit.seed, workers=True, verbose=False)
    teacher: nn.Module = instantiate(teacher_cfg.model)
    checkpoints = run_trajectory_stage(
        f"prokd-{name}",
        teacher,
        lambda: ClassifierModule(
            teacher,
            optimizer=instantiate(teacher_cfg.fit.optimizer),
            scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        ),
        context.datamodule,
        context.stage_dir,
        cfg.trainer,
        method.teacher_epochs,
        method.num_checkpoints,
    )
    return ProKDModule(
        context.student,
        instantiate(teacher_cfg.model),
        checkpoints,
        teacher_name=name,
        alpha=method.alpha,
        max_temperature=method.max_temperature,
        min_temperature=method.min_temperature,
        temperature_schedule=method.temperature_schedule,
        **optimisation(cfg),
    )


def build_tfkd(context: MethodContext) -> LightningModule:
    """``method=tfkd`` (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing
    Regularization", CVPR 2020), by ``method.variant``:

    * ``virtual``: :class:`~kd_lightning.modules.VirtualTeacherModule`, no teacher network;
    * ``self``: a copy of the student architecture is trained from scratch on labels (stage
      ``tfkd-student``, ``method.stage_epochs``), then teaches the student, frozen, by
      ``method.loss`` (reported as teacher ``self``);
    * ``reverse``: the same pretrained student-architecture network teaches a fresh network of
      the first configured teacher's architecture, which is the network trained and reported
      (the teacher reported is ``pretrained_student``).
    """
    cfg, method = context.cfg, context.cfg.method
    variant = method.variant
    if variant not in TFKD_VARIANTS:
        raise ValueError(f"method.variant={variant!r} is not one of {list(TFKD_VARIANTS)}")
    if variant == "virtual":
        num_classes = cfg.get("num_classes")
        if num_classes is None:
            raise ValueError("method=tfkd variant=virtual needs num_classes (set num_classes=C)")
        return VirtualTeacherModule(
            context.student,
            num_classes=num_classes,
            correct_prob=method.correct_prob,
            alpha=method.loss.alpha,
            temperature=method.loss.temperature,
            **optimisation(cfg),
        )
    loss = instantiate(method.loss, fusion=SINGLE_TEACHER_FUSION)  # checked before the stage
    trained_model = tfkd_trained_model(cfg)  # checked before the stage
    L.seed_everything(cfg.seed + 1, workers=True, verbose=False)
    pretrained: nn.Module = instantiate(cfg.student)
    run_stage(
        "tfkd-student",
        pretrained,
        lambda: ClassifierModule(pretrained, **optimisation(cfg)),
        context.datamodule,
        context.stage_dir,
        cfg.trainer,
        stage_epochs(cfg),
    )
    if variant == "self":
        return DistillationModule(context.student, {"self": pretrained}, loss, **optimisation(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return DistillationModule(
        instantiate(trained_model),
        {"pretrained_student": pretrained},
        loss,
        **optimisation(cfg),
    )


def tfkd_trained_model(cfg: DictConfig) -> DictConfig:
    """The network ``method=tfkd`` trains: the first teacher's architecture for
    ``variant=reverse``, else the student."""
    if cfg.method.get("variant") == "reverse":
        return first_teacher_config(cfg)[1].model
    return cfg.student


def optimisation(cfg: DictConfig) -> dict[str, Any]:
    """The run's ``optimizer`` and ``scheduler`` factories as module keyword arguments."""
    return {
        "optimizer": instantiate(cfg.optimizer),
        "scheduler": instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    }


def stage_epochs(cfg: DictConfig) -> int:
    """``method.stage_epochs``, or ``trainer.max_epochs`` when null."""
    epochs = cfg.method.get("stage_epochs")
    return int(cfg.trainer.max_epochs if epochs is None else epochs)


def first_teacher_config(cfg: DictConfig) -> tuple[str, DictConfig]:
    """The first configured teacher's name and config; refused when it needs an input transform
    or a class map, which a teacher trained alongside the student cannot take here."""
    if not cfg.get("teachers"):
        raise ValueError(
            f"method={cfg.method.name} takes its teacher's architecture from the "
            "first entry of `teachers`, but none is configured"
        )
    name = next(iter(cfg.teachers))
    teacher_cfg = cfg.teachers[name]
    for option in ("input_transform", "class_map"):
        if teacher_cfg.get(option) is not None:
            raise ValueError(
                f"method={cfg.method.name} trains teachers.{name} as a plain network of the "
                f"student's classes and inputs: teachers.{name}.{option} must be null"
            )
    return name, teacher_cfg


def first_teacher(context: MethodContext, pretrained: bool) -> tuple[str, nn.Module]:
    """The first configured teacher, fresh or with its weights (cached, trained once if missing)."""
    cfg = context.cfg
    name, teacher_cfg = first_teacher_config(cfg)
    L.seed_everything(teacher_cfg.fit.seed, workers=True, verbose=False)
    model: nn.Module = instantiate(teacher_cfg.model)
    if not pretrained:
        return name, model
    path = teacher_checkpoint(name, cfg)
    if not path.is_file():
        if teacher_cfg.checkpoint:
            raise FileNotFoundError(f"teachers.{name}.checkpoint: no such file: {path}")
        if not cfg.train_if_missing:
            raise FileNotFoundError(
                f"teachers.{name} has no checkpoint ({path}) and train_if_missing=false: train it "
                f"with `kd-teachers teachers=[{name}]`, or use method.teacher_init=scratch"
            )
        train_teacher(name, cfg, context.datamodule)
    return name, load_teacher(model, path, name=name)
