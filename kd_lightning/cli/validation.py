"""Check a composed config before any work, reporting every problem at once with its config key.

``kd-train`` and ``kd-teachers`` call :func:`validate_config` first: nothing is trained, cached or
written before it passes. It builds what is cheap to build (the datamodule, the student, the
teachers' architectures, the fusion rule and the loss), loads the teacher files that exist, runs
one real batch through the student, every teacher and the loss, and builds the method's module
from ``cfg.method`` as the run will, stopping where a pipeline would start training a stage. So a
teacher and a student that disagree on the classes, a missing or unsafe checkpoint, an unavailable
accelerator, an out-of-range hyper-parameter or an argument a method refuses (reported as
``method.<argument>``) all surface together in one :class:`~kd_lightning.errors.ConfigError`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException
from torch import Tensor, nn
from torch.utils.data import Dataset

from kd_lightning.batch import BatchAdapter
from kd_lightning.callbacks.nonfinite import ON_NONFINITE
from kd_lightning.cli.config import method_arguments, method_name
from kd_lightning.cli.teacher_checkpoints import (
    cached_teacher_path,
    check_teacher_name,
    input_transform,
    teacher_class_map,
    teacher_source,
)
from kd_lightning.errors import ConfigError, TeacherLoadError
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.modules.stages import StageRunner
from kd_lightning.teachers import (
    CachedTeachers,
    TeacherEnsemble,
    TeacherSource,
    build_output_cache,
    load_teacher,
)

T = TypeVar("T")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


class _Problems(list[str]):
    """The problems found so far; :meth:`guard` turns an exception into one, keyed."""

    def guard(self, key: str, action: Callable[[], T], context: str = "") -> T | None:
        try:
            return action()
        except Exception as error:  # every failure becomes a reported problem
            self.append(f"{key}: {context}{describe(error)}")
            return None


def validate_config(cfg: DictConfig, needs_teachers: bool | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``; return quietly when none.

    Args:
        cfg: the composed ``kd-train`` config.
        needs_teachers: check the teachers; by default when the configured method takes them
            (``kd-teachers`` passes ``True``).

    Examples:
        >>> target = "kd_lightning.modules.DistillationModule"
        >>> cfg = OmegaConf.create(
        ...     {"method": {"_target_": target, "loss": {"alpha": 2}}, "trainer": {"devices": 0}}
        ... )
        >>> try:
        ...     validate_config(cfg)
        ... except ConfigError as error:
        ...     print(*error.problems, sep="\\n")
        method.loss.alpha=2: the weight of the KD term must lie in [0, 1]
        trainer.devices=0: must be a positive count, -1 (all) or 'auto'
    """
    problems = _Problems()
    missing, dangling = unresolved_problems(cfg)
    if dangling:  # every later check reads the config, and would only repeat these less clearly
        _raise_if_any(missing + dangling)
    problems += missing
    arguments = _method_arguments(cfg, problems)
    if needs_teachers is None:
        needs_teachers = arguments is not None and "teachers" in arguments
    problems += problems.guard("method", lambda: hyperparameter_problems(cfg)) or []
    problems += hardware_problems(cfg.get("trainer") or OmegaConf.create({}))
    problems += sharding_problems(cfg)
    problems += directory_problems(cfg)
    problems += nonfinite_problems(cfg)
    problems += topk_tail_problems(cfg)
    if "data" not in cfg or "student" not in cfg:
        _raise_if_any(problems)
        return

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        datamodule = problems.guard("data", lambda: instantiate(cfg.data))
        vocabulary = vocabulary_problems(cfg, datamodule, needs_teachers)
        if vocabulary:  # a batch through these models would only repeat them, less clearly
            _raise_if_any(problems + vocabulary)
        batch = (
            None if datamodule is None else problems.guard("data", lambda: first_batch(datamodule))
        )
        unpacked = None if batch is None else problems.guard("data", partial(BatchAdapter(), batch))
        inputs, labels = (None, None) if unpacked is None else unpacked
        student = problems.guard("student", lambda: instantiate(cfg.student))
        student_logits = _student_logits(cfg, student, inputs, labels, problems)
        ensemble = None
        if needs_teachers:
            models: dict[str, nn.Module] = {}
            teacher_logits, ensemble = _teacher_logits(
                cfg, inputs, student_logits, problems, models
            )
            if teacher_logits is not None and student is not None and student_logits is not None:
                _check_loss(cfg, student, batch, inputs, teacher_logits, labels, problems)
            if cfg.method.get("hints") and student is not None:
                _check_hints(cfg.method.hints, student, models, problems)
        if arguments is not None and student is not None and datamodule is not None:
            _check_method(cfg, arguments, student, ensemble, datamodule, batch, problems)
    _raise_if_any(problems)


def unresolved_problems(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """Keys with no value (``???``), and interpolations that resolve to nothing (a key that does
    not exist, an unset environment variable), outside ``hydra``; an interpolation of a key with
    no value is that key's problem alone.

    Examples:
        >>> unresolved_problems(OmegaConf.create({"a": "???", "b": "${a}", "c": ["${nowhere}"]}))
        (['a: is required and has no value (??? in the config)'], ["c[0]=${nowhere}: Interpolation key 'nowhere' not found"])
    """
    missing: list[str] = []
    dangling: list[str] = []

    def walk(node: DictConfig | ListConfig, prefix: str) -> None:
        written: Any = OmegaConf.to_container(node, resolve=False)  # interpolations as written
        keys = list(written) if isinstance(node, DictConfig) else range(len(written))
        for key in keys:
            path = (
                f"{prefix}.{key}".lstrip(".")
                if isinstance(node, DictConfig)
                else f"{prefix}[{key}]"
            )
            if path == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                missing.append(f"{path}: is required and has no value (??? in the config)")
            elif OmegaConf.is_interpolation(node, key):
                try:
                    node[key]
                except InterpolationToMissingValueError:
                    pass  # the key it reads is reported as missing
                except OmegaConfBaseException as error:
                    dangling.append(f"{path}={written[key]}: {str(error).splitlines()[0]}")
            elif isinstance(node[key], DictConfig | ListConfig):
                walk(node[key], path)

    walk(cfg, "")
    return missing, dangling


def vocabulary_problems(cfg: DictConfig, datamodule: Any, needs_teachers: bool) -> list[str]:
    """Language-model mistakes readable from the config and the data module's ``vocab_size``
    (the token ids its tokenizer gives, known before any tokenising): a classifier (a student
    with ``num_classes``) on token data, a ``vocab_size`` on data without tokens, a student
    whose ``vocab_size`` is not the data's, teachers whose ``vocab_size`` is not the student's,
    and a method or feature hints that take one label per sample (:func:`token_method_problems`).

    Examples:
        >>> from kd_lightning.data import TextDataModule
        >>> cfg = OmegaConf.create({"data": {"tokenizer": "byte"},
        ...                         "student": {"_target_": "kd_lightning.models.MLP", "num_classes": 10}})
        >>> vocabulary_problems(cfg, TextDataModule(tokenizer="byte"), needs_teachers=False)
        ['student.num_classes=10: the data gives language-model batches (token ids, 258 of them, and next-token labels) but the student kd_lightning.models.MLP is a classifier; pick a language model such as student=lm']
    """
    data_vocabulary = getattr(datamodule, "vocab_size", None)
    student = cfg.student
    student_vocabulary = student.get("vocab_size")
    problems = []
    if data_vocabulary is not None and "num_classes" in student:
        problems.append(
            f"student.num_classes={student.num_classes}: the data gives language-model batches "
            f"(token ids, {data_vocabulary} of them, and next-token labels) but the student "
            f"{student.get('_target_')} is a classifier; pick a language model such as student=lm"
        )
    if datamodule is not None and data_vocabulary is None and student_vocabulary is not None:
        problems.append(
            f"student.vocab_size={student_vocabulary}: the student is a language model but the "
            f"data ({cfg.data.get('_target_')}) gives no token ids; pick text data such as "
            f"data=stdlib"
        )
    if data_vocabulary is not None and student_vocabulary not in (None, data_vocabulary):
        problems.append(
            f"student.vocab_size={student_vocabulary}: the data's tokenizer "
            f"(data.tokenizer={cfg.data.get('tokenizer')}) gives {data_vocabulary} token ids; "
            f"set the student's vocab_size to the data's"
        )
    if data_vocabulary is not None and "method" in cfg:
        problems += token_method_problems(cfg)
    for name, teacher in (cfg.get("teachers") or {}).items() if needs_teachers else ():
        vocabulary = (teacher.get("model") or {}).get("vocab_size")
        if None not in (vocabulary, student_vocabulary) and vocabulary != student_vocabulary:
            problems.append(
                f"teachers.{name}.model.vocab_size={vocabulary}: the student's is "
                f"{student_vocabulary} (student.vocab_size); a teacher must predict the same "
                f"tokens as the student"
            )
    return problems


def token_method_problems(cfg: DictConfig) -> list[str]:
    """On language-model data, a method whose module is not ``token_level`` (every pipeline, and
    the online methods but DML and codistillation: they take one label per sample), or feature
    hints (one feature vector per sample).

    Examples:
        >>> cfg = OmegaConf.create({"method": {"_target_": "kd_lightning.modules.FFLModule"}})
        >>> [problem] = token_method_problems(cfg)
        >>> problem.split(": ")[1].split(";")[0]
        'on language-model data a method trains per token'
    """
    name = method_name(cfg)
    try:
        target = get_object(cfg.method._target_)
    except Exception:  # reported as method._target_ by _method_arguments
        return []
    if not getattr(target, "token_level", False):
        return [
            f"method={name}: on language-model data a method trains per token; {name} takes "
            f"one label per sample (method=ensemble, dml and codistillation train language models)"
        ]
    if cfg.method.get("hints"):
        return [
            "method.hints: feature hints take one feature vector per sample; on language-model "
            "data distil without them (method=ensemble, or method.hints=null)"
        ]
    return []


def directory_problems(cfg: DictConfig) -> list[str]:
    """The directories the run writes to (``paths.cache_dir``, ``paths.output_dir``) that it could
    not write: under a file, or whose nearest existing directory is not writable. Nothing is
    created to find out.

    Examples:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as file:
        ...     [problem] = directory_problems(OmegaConf.create({"paths": {"cache_dir": f"{file.name}/c"}}))
        >>> problem.startswith("paths.cache_dir="), problem.endswith("no directory can be made there")
        (True, True)
    """
    problems = []
    for key in ("paths.cache_dir", "paths.output_dir"):
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except (OmegaConfBaseException, ValueError):  # ${hydra:...} outside a Hydra run
            continue
        if value is None:
            continue
        path = Path(str(value)).expanduser().absolute()
        existing = next(parent for parent in (path, *path.parents) if parent.exists())
        if not existing.is_dir():
            problems.append(
                f"{key}={value}: {existing} is a file, so no directory can be made there"
            )
        elif not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{key}={value}: {existing} is not writable")
    return problems


def _method_arguments(cfg: DictConfig, problems: _Problems) -> set[str] | None:
    """The arguments of ``cfg.method``'s target; ``None`` (and a problem) when it has none."""
    if "method" not in cfg or "_target_" not in cfg.method:
        problems.append(
            "method: has no _target_; a method's config names its LightningModule or pipeline "
            "there (see conf/method/)"
        )
        return None
    return problems.guard(f"method._target_={cfg.method._target_}", lambda: method_arguments(cfg))


def _raise_if_any(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def hyperparameter_problems(cfg: DictConfig) -> list[str]:
    """Temperatures of the method that are not positive, a loss weight α outside [0, 1]."""
    problems = []
    for key, value in leaves(cfg.get("method"), "method"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.endswith("temperature") and value <= 0:
            problems.append(f"{key}={value}: a temperature must be > 0")
        if key.endswith("loss.alpha") and not 0 <= value <= 1:
            problems.append(f"{key}={value}: the weight of the KD term must lie in [0, 1]")
    return problems


def topk_tail_problems(cfg: DictConfig) -> list[str]:
    """A loss told to shape the tails of top-k teacher outputs (``method.loss.topk_tail=student``)
    that would get none: only a cache of top-k outputs hands the loss top-k outputs, live teachers
    and full caches give it dense logits.

    Examples:
        >>> topk_tail_problems(OmegaConf.create({"method": {"loss": {"topk_tail": "student"}}}))[0]
        'method.loss.topk_tail=student: shapes the tails of top-k teacher outputs, which only a cache of them (cache=true cache_top_k=<k>) gives the loss; these teachers give it dense logits, so it would change nothing'
    """
    if OmegaConf.select(cfg, "method.loss.topk_tail", default="uniform") != "student":
        return []
    if cfg.get("cache") and cfg.get("cache_top_k") is not None:
        return []
    return [
        "method.loss.topk_tail=student: shapes the tails of top-k teacher outputs, which only a "
        "cache of them (cache=true cache_top_k=<k>) gives the loss; these teachers give it dense "
        "logits, so it would change nothing"
    ]


def hardware_problems(trainer: DictConfig) -> list[str]:
    """An accelerator this machine lacks, or a device count it cannot give."""
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
    if accelerator not in ACCELERATORS:
        return [f"trainer.accelerator={accelerator}: unknown; choose one of {list(ACCELERATORS)}"]
    available = {
        "gpu": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": 1 if torch.backends.mps.is_available() else 0,
        "tpu": 1 if importlib.util.find_spec("torch_xla") else 0,
    }
    available["cuda"] = available["gpu"]
    problems = []
    if available.get(accelerator) == 0:
        problems.append(
            f"trainer.accelerator={accelerator}: no {accelerator.upper()} device is available on "
            f"this machine; use accelerator=cpu (or accelerator=ddp_cpu for two processes)"
        )
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1 and devices != -1):
        problems.append(f"trainer.devices={devices}: must be a positive count, -1 (all) or 'auto'")
    elif isinstance(devices, int) and 0 < available.get(accelerator, 0) < devices:
        problems.append(
            f"trainer.devices={devices}: only {available[accelerator]} {accelerator.upper()} "
            f"device(s) on this machine"
        )
    return problems


def sharding_problems(cfg: DictConfig) -> list[str]:
    """``teacher_runtime.shard_across_ranks`` with what cannot shard: another method, the cache,
    teachers drawn per step, or more ranks than teachers."""
    runtime = cfg.get("teacher_runtime") or {}
    if not runtime.get("shard_across_ranks"):
        return []
    key = "teacher_runtime.shard_across_ranks=true"
    problems = []
    method = method_name(cfg)
    if "shard_teachers" not in cfg.method:
        problems.append(
            f"{key}: method={method} does not shard teachers; only method=ensemble does"
        )
    if cfg.get("cache"):
        problems.append(f"{key}: cache=true reads the teachers' outputs, no teacher runs to shard")
    per_step = runtime.get("draw_per_step")
    if per_step is not None:
        problems.append(
            f"{key}: teacher_runtime.draw_per_step={per_step} runs teachers drawn per step, but "
            "sharded ranks exchange every teacher's logits at every step; pick one"
        )
    trainer = cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    teachers = cfg.get("teachers") or {}
    if isinstance(devices, int) and devices > 0 and devices * nodes > len(teachers):
        problems.append(
            f"{key}: {devices * nodes} ranks (trainer.devices × trainer.num_nodes) but "
            f"{len(teachers)} teachers: every rank must hold one; use fewer ranks"
        )
    return problems


def first_batch(datamodule: Any) -> Any:
    """One training batch of ``datamodule``, through its own ``prepare_data`` and ``setup``."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def _student_logits(
    cfg: DictConfig,
    student: nn.Module | None,
    inputs: Any,
    labels: Tensor | None,
    problems: _Problems,
) -> Tensor | None:
    """The student's logits on ``inputs``, after checking it has a class for every label."""
    if student is None or inputs is None or labels is None:
        return None
    logits = problems.guard("student", lambda: student.eval()(inputs), "fails on a data batch: ")
    if not isinstance(logits, Tensor):
        return None
    key = "student.num_classes" if "num_classes" in cfg.student else "student"
    real = labels[labels >= 0]
    if real.numel() and int(real.max()) >= logits.shape[-1]:
        problems.append(
            f"{key}: the student outputs {logits.shape[-1]} classes but the data has label "
            f"{int(real.max())}"
        )
        return None
    return logits


def _teacher_logits(
    cfg: DictConfig,
    inputs: Any,
    student_logits: Tensor | None,
    problems: _Problems,
    models: dict[str, nn.Module],
) -> tuple[Tensor | None, TeacherEnsemble | None]:
    """Build and load each teacher into ``models``; return their stacked logits on ``inputs``
    and their ensemble."""
    teachers = cfg.get("teachers") or {}
    if not teachers:
        problems.append(f"teachers: method {method_name(cfg)} needs teachers and none are set")
        return None, None
    count = len(problems)
    adapters, transforms, class_maps = {}, {}, {}
    untrained: list[str] = []
    for name, teacher in teachers.items():
        try:
            check_teacher_name(name)
        except ValueError as error:
            problems.append(str(error))
            continue
        model = problems.guard(f"teachers.{name}.model", partial(instantiate, teacher.model))
        transform = problems.guard(
            f"teachers.{name}.input_transform", partial(input_transform, teacher)
        )
        class_map = problems.guard(
            f"teachers.{name}.class_map", partial(teacher_class_map, teacher)
        )
        if model is None:
            continue
        if not _load_weights(cfg, name, model, problems):
            untrained.append(name)
        models[name] = model
        if teacher.get("output_adapter"):
            adapters[name] = teacher.output_adapter
        if transform is not None:
            transforms[name] = transform
        if class_map is not None:
            class_maps[name] = class_map
    problems += _untrained_problems(cfg, untrained)
    if len(problems) > count or inputs is None or student_logits is None:
        return None, None
    ensemble = problems.guard(
        "teachers",
        lambda: TeacherEnsemble(models, adapters, transforms, class_maps, student_logits.shape[-1]),
    )
    if ensemble is None:
        return None, None
    logits = [
        problems.guard(f"teachers.{name}", partial(ensemble.view(name), inputs))
        for name in ensemble.names
    ]
    if len(problems) > count:
        return None, None
    return torch.stack([output for output in logits if output is not None]), ensemble


def _load_weights(cfg: DictConfig, name: str, model: nn.Module, problems: _Problems) -> bool:
    """Load teacher ``name``'s file into ``model``; ``False`` when it has none yet."""
    checkpoint = cfg.teachers[name].get("checkpoint")
    if checkpoint:
        key = f"teachers.{name}.checkpoint"
        if not Path(checkpoint).is_file():
            problems.append(f"{key}: no such file: {checkpoint}")
        else:
            problems.guard(key, lambda: load_teacher(model, checkpoint, name=name))
        return True
    cached = cached_teacher_path(name, cfg)
    if cached.is_file():
        problems.guard(f"teachers.{name}", lambda: load_teacher(model, cached, name=name))
    return cached.is_file()


def _untrained_problems(cfg: DictConfig, names: list[str]) -> list[str]:
    """With ``train_if_missing=false``, one problem per teacher that has no weights yet."""
    if not names or cfg.get("train_if_missing", True):
        return []
    command = f"kd-teachers teachers=[{','.join(names)}]"
    return [
        f"teachers.{name}: no checkpoint, no cached weights at {cached_teacher_path(name, cfg)} "
        f"and train_if_missing=false; train the missing teachers with `{command}` (same overrides "
        f"as this run), or point teachers.{name}.checkpoint at your own file"
        for name in names
    ]


def _check_loss(
    cfg: DictConfig,
    student: nn.Module,
    batch: Any,
    inputs: Any,
    teacher_logits: Tensor,
    labels: Tensor | None,
    problems: _Problems,
) -> None:
    """Build the fusion rule and the method's loss, and run them on the batch's outputs as the
    module would."""
    if "loss" not in cfg.method or any(p.startswith("method.loss.") for p in problems):
        return
    count = len(problems)
    fusion = problems.guard("fusion", lambda: instantiate(cfg.fusion))
    if len(problems) > count:
        return
    loss = problems.guard(
        "method.loss", lambda: _built(instantiate(cfg.method.loss, fusion=fusion))
    )
    if loss is not None and labels is not None:
        problems.guard(
            "fusion",
            lambda: _run_loss(loss, student, batch, inputs, teacher_logits, labels),
            "fails on the teachers' outputs: ",
        )


def _run_loss(
    loss: Any, student: nn.Module, batch: Any, inputs: Any, teachers: Tensor, labels: Tensor
) -> Any:
    """``loss`` on one batch, with what its fusion rule reads, as the module gives it: the student
    layers it names, tapped, and the batch fields it names."""
    with FeatureTaps(student, list(loss.student_layers)) as taps:
        student_logits = student(inputs)
    held = batch if isinstance(batch, Mapping) else {}
    missing = [name for name in loss.batch_fields if name not in held]
    if missing:
        raise ValueError(
            f"{type(loss.fusion).__name__} reads the batch fields {missing}, which the data's "
            f"batches do not hold (pick data whose dict batches carry them)"
        )
    fields = {name: held[name] for name in loss.batch_fields}
    return loss(
        student_logits,
        teachers,
        labels,
        student_features=dict(taps.features),
        batch_fields=fields,
    )


def _check_hints(
    hints: DictConfig, student: nn.Module, models: dict[str, nn.Module], problems: _Problems
) -> None:
    """The feature-hint layers named in ``method.hints`` exist in the student and teachers."""
    student_layers = dict(student.named_modules())
    if hints.get("student_layer") not in student_layers:
        problems.append(
            f"method.hints.student_layer={hints.get('student_layer')}: the student has no such "
            f"layer; it has {sorted(name for name in student_layers if name)}"
        )
    for name, layer in (hints.get("teacher_layers") or {}).items():
        if name in models and layer not in dict(models[name].named_modules()):
            problems.append(
                f"method.hints.teacher_layers.{name}={layer}: teacher {name} has no such layer; "
                f"it has {sorted(n for n, _ in models[name].named_modules() if n)}"
            )


def _built(loss: Any) -> Any:
    """The loss itself, also when its config is a factory (``_partial_: true``, as TAKD's)."""
    return loss() if isinstance(loss, partial) else loss


class _StageReached(Exception):
    """Where a real run would start training a stage or loading a pretrained teacher."""


class _DryStages(StageRunner):
    """Validation's stage runner: a pipeline's checks run and each stage's module is built, but
    nothing trains and no pretrained teacher is loaded (or trained)."""

    def train(
        self, name: str, module: LightningModule, epochs: int, callbacks: list[Callback]
    ) -> None:
        raise _StageReached

    def pretrained_weights(self, teacher: str) -> Path:
        raise _StageReached


def _check_method(
    cfg: DictConfig,
    arguments: set[str],
    student: nn.Module,
    ensemble: TeacherEnsemble | None,
    datamodule: LightningDataModule,
    batch: Any,
    problems: _Problems,
) -> None:
    """Build the method's module as :func:`~kd_lightning.cli.train.build_module` will (with
    ``cache=true``, from a teacher-output cache of one batch), stopping at its first stage; an
    argument it refuses becomes a problem keyed ``method.<argument>``, a teacher-output cache it
    refuses one saying ``cache=true with method=<name>``. (A method that takes no teachers at all
    is refused a cache by :func:`~kd_lightning.cli.logit_cache.check_cacheable`.)

    Skipped when an earlier problem concerns what it is built from (which it would only repeat).
    """
    if any(not problem.startswith(("trainer.", "teacher_runtime.")) for problem in problems):
        return
    cached = bool(cfg.get("cache")) and "teachers" in arguments
    with tempfile.TemporaryDirectory() as scratch:
        provided: dict[str, Any] = {"student": student}
        if "teachers" in arguments:
            source = _source(cfg, ensemble, batch, scratch, problems)
            if source is None:
                return
            provided["teachers"] = source
        if "stages" in arguments:
            provided["stages"] = _DryStages(datamodule, Path(scratch) / "stages", {}, cfg.seed)
        try:
            module = instantiate(cfg.method, _convert_="all")(**provided)
        except _StageReached:
            pass
        except Exception as error:  # every refusal becomes a reported problem
            if cached:
                problems.append(f"cache=true with method={method_name(cfg)}: {describe(error)}")
            else:
                problems.append(f"{_method_key(cfg, error)}: {describe(error)}")
        else:
            problems += partial_backward_problems(cfg, module)


def partial_backward_problems(cfg: DictConfig, module: Any) -> list[str]:
    """A DDP strategy told not to expect the backward passes through part of the parameters that
    ``module`` makes (:attr:`~kd_lightning.modules.MethodModule.partial_backward`).

    Examples:
        >>> from kd_lightning.modules import DMLModule
        >>> cfg = OmegaConf.create({"method": {"_target_": "kd_lightning.modules.DMLModule"},
        ...                         "trainer": {"strategy": "ddp_spawn"}})
        >>> [problem] = partial_backward_problems(cfg, DMLModule(nn.Linear(2, 2), nn.Linear(2, 2)))
        >>> problem.split(":")[0], problem.rsplit("; ", 1)[-1]
        ('trainer.strategy=ddp_spawn', 'use trainer.strategy=ddp_spawn_find_unused_parameters_true')
    """
    if not getattr(module, "partial_backward", False):
        return []
    strategy = (cfg.get("trainer") or {}).get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        if strategy.get("find_unused_parameters") is not False:
            return []
        key, fix = (
            "trainer.strategy.find_unused_parameters=false",
            "set it to true, or null (as the method needs)",
        )
    else:
        name = str(strategy)
        if not name.startswith("ddp") or name.endswith("find_unused_parameters_true"):
            return []
        key, fix = (
            f"trainer.strategy={name}",
            f"use trainer.strategy={name}_find_unused_parameters_true",
        )
    return [
        f"{key}: method={method_name(cfg)} back-propagates losses that reach only part of its "
        "parameters (one network or phase at a time), which DDP refuses unless it looks for "
        f"unused parameters; {fix}"
    ]


def nonfinite_problems(cfg: DictConfig) -> list[str]:
    """An ``on_nonfinite`` that :class:`~kd_lightning.callbacks.NonFiniteLossGuard` does not know.

    Examples:
        >>> nonfinite_problems(OmegaConf.create({"on_nonfinite": "ignore"}))
        ["on_nonfinite=ignore: choose one of ['stop', 'skip']"]
    """
    value = cfg.get("on_nonfinite", "stop")
    if value in ON_NONFINITE:
        return []
    return [f"on_nonfinite={value}: choose one of {list(ON_NONFINITE)}"]


def _source(
    cfg: DictConfig,
    ensemble: TeacherEnsemble | None,
    batch: Any,
    directory: str,
    problems: _Problems,
) -> TeacherSource | None:
    """The teachers as the run will give them to the method: a teacher-output cache (of
    ``batch``) with ``cache=true``, else the source of ``teacher_runtime``; ``None`` when the
    teachers could not be built."""
    if ensemble is None:
        return None
    if cfg.get("cache"):
        return _one_batch_cache(ensemble, batch, directory)
    try:
        return teacher_source(cfg, ensemble)
    except ValueError as error:  # names its key already
        problems.append(str(error))
        return None


def _method_key(cfg: DictConfig, error: BaseException) -> str:
    """The config key an error of the method's construction names: the node Hydra was building,
    else ``method.<argument>`` for a message that starts with an argument, else ``method``.

    Examples:
        >>> cfg = OmegaConf.create({"method": {"num_peers": 1}})
        >>> _method_key(cfg, ValueError("num_peers must be ≥ 2"))
        'method.num_peers'
    """
    if isinstance(error, InstantiationException):
        found = re.search(r"full_key: (\S+)", str(error))
        if found:
            key = found.group(1)
            stem = key.rstrip("0123456789")  # Hydra names item i of a list `<list>i`
            if stem != key and OmegaConf.is_list(OmegaConf.select(cfg, stem)):
                return f"{stem}.{key[len(stem) :]}"
            return key
    text = describe(error)
    named = [str(key) for key in cfg.method if re.match(rf"{re.escape(str(key))}\b", text)]
    return f"method.{named[0]}" if named else "method"


class _Rows(Dataset[Any]):
    """The samples of one collated batch, one by one."""

    def __init__(self, batch: Any, size: int) -> None:
        self.batch, self.size = batch, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        return _row(self.batch, index)


def _row(batch: Any, index: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[index]
    if isinstance(batch, Mapping):
        return {key: _row(value, index) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_row(value, index) for value in batch)
    return batch


def _one_batch_cache(ensemble: TeacherEnsemble, batch: Any, directory: str) -> CachedTeachers:
    """A teacher-output cache of ``batch`` in ``directory``: what a method is built from under
    ``cache=true``."""
    _, labels = BatchAdapter()(batch)
    return build_output_cache(ensemble, {"train": _Rows(batch, len(labels))}, directory)


def leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf under ``node``, interpolations resolved.

    Examples:
        >>> list(leaves(OmegaConf.create({"loss": {"alpha": 0.5}, "tau": "${loss.alpha}"}), "method"))
        [('method.loss.alpha', 0.5), ('method.tau', 0.5)]
    """
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, f"{prefix}.{index}")
    else:
        yield prefix, node


def describe(error: BaseException) -> str:
    """One line for ``error``: the message of what Hydra's instantiation wrapped, with its type
    unless it is a value, type, missing-file or teacher-loading error."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, TypeError, FileNotFoundError, TeacherLoadError)) and text:
        return text
    return f"{type(error).__name__}: {text}"
