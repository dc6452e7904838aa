"""Earlier stages of multi-stage methods: each trained once, its weights kept in the run's
``stages/`` directory, and skipped when a relaunch in the same run directory finds them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from kd_lightning.teachers import load_teacher
from kd_lightning.teachers.loading import read_state_dict

if TYPE_CHECKING:
    from kd_lightning.callbacks.nonfinite import OnNonFinite

log = logging.getLogger(__name__)

# Trainer settings of the main run that also shape a stage's run (e.g. experiment=smoke's limits).
SHARED_TRAINER_KEYS = ("accelerator", "precision", "limit_train_batches", "limit_val_batches")
#: A network, or a factory that builds one (a model class, a Hydra partial of a model config).
NetworkSpec = nn.Module | Callable[[], nn.Module]


def build_network(network: NetworkSpec, seed: int) -> nn.Module:
    """Seed every generator with ``seed``, then ``network`` itself, or what the factory builds.

    Pipelines build the networks of their stages this way, so that their initialisation depends
    on the seed alone.

    Examples:
        >>> a, b = build_network(lambda: nn.Linear(2, 2), 0), build_network(lambda: nn.Linear(2, 2), 0)
        >>> bool((a.weight == b.weight).all())
        True
    """
    L.seed_everything(seed, workers=True, verbose=False)
    return network if isinstance(network, nn.Module) else network()


def stage_path(stage_dir: Path, name: str) -> Path:
    """Where stage ``name`` keeps its weights: ``<stage_dir>/<name>.safetensors``."""
    return Path(stage_dir) / f"{name}.safetensors"


def save_weights(state: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write a state dict as safetensors atomically: the file appears only once complete, and a
    write that fails (a full disk) leaves no file and raises an ``OSError`` naming ``path``.

    Tensors that share memory (tied weights, e.g. a language model's embedding and head) are
    written each as its own copy, which loading ties again through the model's own parameters.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "sub" / "linear.safetensors"
        >>> save_weights(nn.Linear(2, 1).state_dict(), path, {"stage": "demo"})
        >>> sorted(p.name for p in path.parent.iterdir())
        ['linear.safetensors']
        >>> tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
        >>> tied[1].weight = tied[0].weight
        >>> save_weights(tied.state_dict(), path, {"stage": "tied"})  # both keys written
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    try:
        save_file(tensors, str(partial), metadata=dict(metadata))
        os.replace(partial, path)
    except (OSError, SafetensorError) as error:
        raise OSError(f"could not write {path}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)


def stage_trainer(
    trainer_cfg: Mapping[str, Any],
    label: str,
    max_epochs: int,
    callbacks: list[Callback] | None = None,
    on_nonfinite: OnNonFinite = "stop",
) -> Trainer:
    """A quiet one-device Trainer for one stage: no logger, no checkpoints, a progress bar named
    ``label``, and a :class:`~kd_lightning.callbacks.NonFiniteLossGuard` that stops (or with
    ``on_nonfinite="skip"`` skips) a step whose loss is NaN or inf, naming ``label``.

    ``trainer_cfg`` holds the run's trainer settings; its accelerator, precision, batch limits
    and ``enable_progress_bar`` carry over (the others, e.g. ``devices``, do not).

    Examples:
        >>> trainer = stage_trainer({"accelerator": "cpu", "enable_progress_bar": False}, "demo", 3)
        >>> trainer.max_epochs, trainer.logger, type(trainer.callbacks[0]).__name__
        (3, None, 'NonFiniteLossGuard')
    """
    # Imported here: the guard reads kd_lightning.modules, which imports this module.
    from kd_lightning.callbacks.nonfinite import training_callbacks

    shared = {key: trainer_cfg[key] for key in SHARED_TRAINER_KEYS if key in trainer_cfg}
    show_progress = bool(trainer_cfg.get("enable_progress_bar", True))
    return L.Trainer(
        **shared,
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_progress_bar=show_progress,
        callbacks=[*(callbacks or []), *training_callbacks(label, on_nonfinite, show_progress)],
    )


class StageRunner:
    """What a run gives a multi-stage method: trains each earlier stage once and keeps its weights.

    :meth:`run` trains a network through its own quiet Trainer (:func:`stage_trainer`) and keeps
    it as ``<directory>/<name>.safetensors``; a relaunch with the same directory loads it and
    trains nothing. :meth:`trajectory` keeps states along one training. :meth:`pretrained_weights`
    is the one stage a run may provide ready-made: a configured teacher's weights (``kd-train``
    loads them from the teacher cache, training the teacher first when missing).

    Args:
        datamodule: the data every stage trains on.
        directory: where the stages' weights go (``kd-train``: ``<run dir>/stages``).
        trainer: the run's trainer settings (see :func:`stage_trainer`).
        seed: the run's seed; pipelines seed each stage's network from it.
        pretrained: teacher name → the file of its pretrained weights; ``None`` when the run
            has none to give.
        on_nonfinite: a stage step whose loss is NaN or inf stops the run (``"stop"``) or is
            skipped (``"skip"``; see :func:`stage_trainer`).

    Examples:
        >>> import tempfile, torch
        >>> from torch.utils.data import TensorDataset
        >>> from kd_lightning.modules import ClassifierModule
        >>> data = L.LightningDataModule.from_datasets(
        ...     TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4
        ... )
        >>> stages = StageRunner(data, tempfile.mkdtemp(), {"enable_progress_bar": False})
        >>> model = nn.Linear(3, 2)
        >>> stages.run("demo", model, lambda: ClassifierModule(model), epochs=1)
        True
        >>> stages.run("demo", nn.Linear(3, 2), lambda: ClassifierModule(model), epochs=1)
        False
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        directory: str | os.PathLike[str],
        trainer: Mapping[str, Any],
        seed: int = 0,
        pretrained: Callable[[str], Path] | None = None,
        on_nonfinite: OnNonFinite = "stop",
    ) -> None:
        self.datamodule = datamodule
        self.directory = Path(directory)
        self.trainer = dict(trainer)
        self.seed = seed
        self.pretrained = pretrained
        self.on_nonfinite = on_nonfinite

    def run(
        self,
        name: str,
        model: nn.Module,
        make_module: Callable[[], LightningModule],
        epochs: int,
    ) -> bool:
        """Train ``model`` through ``make_module()`` for ``epochs``, or load it when done before.

        The weights go to :func:`stage_path` once training ends; a later call with the same
        directory loads them into ``model`` and trains nothing. Returns whether it trained.
        """
        path = stage_path(self.directory, name)
        if path.is_file():
            log.info("stage %s: finished earlier, loading %s", name, path)
            load_teacher(model, path, name=name)
            return False
        self.fit(name, make_module, epochs)
        save_weights(model.state_dict(), path, {"stage": name, "epochs": str(epochs)})
        return True

    def trajectory(
        self,
        name: str,
        model: nn.Module,
        make_module: Callable[[], LightningModule],
        epochs: int,
        num_checkpoints: int,
    ) -> list[dict[str, Tensor]]:
        """Train ``model`` keeping ``num_checkpoints`` states along the way (see
        :class:`TrajectoryCheckpoints`); returns them, earliest first.

        When every file is there from an earlier launch they are read and nothing trains;
        otherwise the whole trajectory is trained again (the stage is the unit of resumption).
        """
        paths = trajectory_paths(self.directory, name, num_checkpoints)
        if all(path.is_file() for path in paths):
            log.info("stage %s: finished earlier, loading %d checkpoints", name, num_checkpoints)
        else:
            keeper = TrajectoryCheckpoints(model, self.directory, name, num_checkpoints)
            self.fit(name, make_module, epochs, [keeper])
        return [read_state_dict(path) for path in paths]

    def pretrained_weights(self, teacher: str) -> Path:
        """The file of configured teacher ``teacher``'s pretrained weights."""
        if self.pretrained is None:
            raise ValueError(
                f"teacher {teacher!r}: this run provides no pretrained teacher weights"
            )
        return self.pretrained(teacher)

    def fit(
        self,
        name: str,
        make_module: Callable[[], LightningModule],
        epochs: int,
        callbacks: list[Callback] | None = None,
    ) -> None:
        """Fit ``make_module()`` on the run's data in a :func:`stage_trainer` labelled ``name``."""
        if epochs < 1:
            raise ValueError(f"stage {name}: needs at least one epoch, got {epochs}")
        self.train(name, make_module(), epochs, callbacks or [])

    def train(
        self, name: str, module: LightningModule, epochs: int, callbacks: list[Callback]
    ) -> None:
        """Train ``module``, built and checked by :meth:`fit`: the step a dry run leaves out."""
        label = f"stage {name}"
        trainer = stage_trainer(
            self.trainer, label, epochs, callbacks, on_nonfinite=self.on_nonfinite
        )
        trainer.fit(module, datamodule=self.datamodule)


class TrajectoryCheckpoints(Callback):
    """Keep ``model``'s weights at ``num_checkpoints`` evenly spaced optimizer steps, the last at
    the end of training, each as ``<stage_dir>/<name>-<i>.safetensors``.

    With the trainer's total steps ``N``, checkpoint ``i`` (0-based) is taken after step
    ``ceil((i + 1)·N / n)``; when ``n`` divides the epochs these are ends of epochs.

    Examples:
        >>> TrajectoryCheckpoints.steps(total_steps=10, num_checkpoints=4)
        [3, 5, 8, 10]
    """

    def __init__(self, model: nn.Module, stage_dir: Path, name: str, num_checkpoints: int) -> None:
        self.model = model
        self.paths = trajectory_paths(stage_dir, name, num_checkpoints)
        self.name = name
        self.save_at: dict[int, Path] = {}

    @staticmethod
    def steps(total_steps: int, num_checkpoints: int) -> list[int]:
        """The optimizer steps after which the checkpoints are taken."""
        if num_checkpoints > total_steps:
            raise ValueError(
                f"num_checkpoints: cannot keep {num_checkpoints} checkpoints of a training of "
                f"{total_steps} optimizer steps: lower it or train longer"
            )
        return [-(-(i + 1) * total_steps // num_checkpoints) for i in range(num_checkpoints)]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps = self.steps(int(trainer.estimated_stepping_batches), len(self.paths))
        self.save_at = dict(zip(steps, self.paths, strict=True))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        path = self.save_at.pop(trainer.global_step, None)
        if path is not None:
            self._save(path, trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for path in self.save_at.values():  # a training shorter than estimated
            self._save(path, trainer.global_step)
        self.save_at = {}

    def _save(self, path: Path, step: int) -> None:
        save_weights(self.model.state_dict(), path, {"stage": self.name, "step": str(step)})


def trajectory_paths(stage_dir: Path, name: str, num_checkpoints: int) -> list[Path]:
    """The files of a trajectory stage: ``<stage_dir>/<name>-<i>.safetensors``, ``i < n``."""
    if num_checkpoints < 1:
        raise ValueError(f"num_checkpoints must be positive, got {num_checkpoints}")
    return [stage_path(stage_dir, f"{name}-{index}") for index in range(num_checkpoints)]
