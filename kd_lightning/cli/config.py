"""Where the configs live, the resolvers they use, and what the shell reads off ``cfg.method``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, get_object
from omegaconf import DictConfig, OmegaConf


def config_dir() -> Path:
    """The ``conf`` folder: inside the installed package, or at the root of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"kd_lightning's configs are missing: no train.yaml under {package}")


def partial_node(node: Any) -> DictConfig | None:
    """``${partial:${student}}``: a model config as a factory (``_partial_: true``), so that a
    method builds as many fresh networks as it needs, when it needs them; null stays null.

    Examples:
        >>> cfg = OmegaConf.create({"student": {"_target_": "m.MLP"}, "f": "${partial:${student}}"})
        >>> cfg.f._partial_
        True
    """
    if node is None:
        return None
    container = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(container, Mapping):
        raise ValueError(f"partial: expects a config with a _target_, got {node!r}")
    return OmegaConf.create({**container, "_partial_": True})


def first_teacher(path: str, *, _root_: DictConfig) -> Any:
    """``${first_teacher:model}``: the value at ``path`` under the first entry of ``teachers``
    (``name`` is its name), for methods that train that architecture themselves as a plain
    network (ProKT, Pro-KD, reverse Tf-KD). Null when ``teachers`` is empty or its first entry has
    an ``input_transform`` or a ``class_map``, which such a network cannot take: the method then
    refuses, naming its argument.

    Examples:
        >>> cfg = OmegaConf.create({"teachers": {"cnn": {"fit": {"seed": 3}, "class_map": None}},
        ...                         "seed": "${first_teacher:fit.seed}", "name": "${first_teacher:name}"})
        >>> cfg.seed, cfg.name
        (3, 'cnn')
    """
    teachers = _root_.get("teachers") or {}
    if not teachers:
        return None
    name = next(iter(teachers))
    teacher = teachers[name]
    if teacher.get("input_transform") is not None or teacher.get("class_map") is not None:
        return None
    if path == "name":
        return name
    value = OmegaConf.select(teacher, path)
    if OmegaConf.is_config(value):
        return OmegaConf.create(OmegaConf.to_container(value, resolve=True))
    return value


def sweep_group() -> str | None:
    """``${sweep_group:}``: in a multirun, the name of its sweep directory (one per sweep, e.g.
    ``2026-12-03_12-30-00``), so a logger groups the sweep's runs; ``None`` in a single run.

    Examples:
        >>> sweep_group() is None  # no Hydra run here
        True
    """
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra.sweep.dir).name


def layer_classes(names: Sequence[str]) -> set[type]:
    """The classes at the dotted paths ``names``, e.g. an FSDP ``auto_wrap_policy`` from a config.

    Examples:
        >>> layer_classes(["torch.nn.Linear"])
        {<class 'torch.nn.modules.linear.Linear'>}
    """
    return {get_class(name) for name in names}


def register_resolvers() -> None:
    """``${len:${teachers}}`` (the number of entries of a node), ``${partial:...}``,
    ``${first_teacher:...}`` and ``${sweep_group:}``."""
    resolvers: dict[str, Callable[..., Any]] = {
        "len": lambda node: len(node),
        "partial": partial_node,
        "first_teacher": first_teacher,
        "sweep_group": sweep_group,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
CONFIG_DIR = str(config_dir())


def show_progress(cfg: Mapping[str, Any]) -> bool:
    """The run's ``trainer.enable_progress_bar`` (true when unset)."""
    return bool(cfg["trainer"].get("enable_progress_bar", True))


def method_target(cfg: DictConfig) -> Callable[..., Any]:
    """The class or pipeline function that ``cfg.method`` instantiates (not yet called).

    Examples:
        >>> method_target(OmegaConf.create({"method": {"_target_": "kd_lightning.modules.DMLModule"}}))
        <class 'kd_lightning.modules.online.dml.DMLModule'>
    """
    return get_object(cfg.method._target_)


def method_arguments(cfg: DictConfig) -> set[str]:
    """The arguments of ``cfg.method``'s target, which say what the run passes it (``teachers``,
    ``stages``; see :class:`~kd_lightning.modules.base.MethodModule`).

    Examples:
        >>> sorted(method_arguments(OmegaConf.create({"method": {"_target_": "kd_lightning.modules.takd_pipeline"}})))[:4]
        ['assistants', 'fusion', 'loss', 'optimizer']
    """
    return set(inspect.signature(method_target(cfg)).parameters)


def method_name(cfg: DictConfig) -> str:
    """The ``method=`` option of the run (Hydra's choice); outside a Hydra run, the name of the
    method's target (e.g. ``DMLModule``)."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
        if choice is not None:
            return str(choice)
    return str(cfg.method._target_).rsplit(".", 1)[-1]
