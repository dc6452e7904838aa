"""A named, frozen ensemble of teachers that returns stacked logits in the student's class space."""

from __future__ import annotations

import itertools
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import TeacherOutputError
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.teachers.class_maps import check_class_map, map_classes
from kd_lightning.teachers.loading import load_teacher
from kd_lightning.teachers.offload import TeacherOffload, on_host, peak_weight_bytes, weight_bytes
from kd_lightning.teachers.runtime import (
    CHECK_FINITE,
    CheckFinite,
    StackedForward,
    check_finite_logits,
    teacher_context,
)
from kd_lightning.teachers.runtime import autocast_dtype as _autocast_dtype
from kd_lightning.teachers.source import Stage, TeacherOutputs, TeacherSource

OutputAdapter = Callable[[Any], Tensor]
InputTransform = Callable[[Any], Any]


def attribute_adapter(name: str) -> OutputAdapter:
    """Adapter reading logits from an attribute or mapping key of a model output (e.g. ``"logits"``).

    Examples:
        >>> attribute_adapter("logits")({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """

    def adapt(output: Any) -> Tensor:
        return output[name] if isinstance(output, Mapping) else getattr(output, name)

    adapt.__name__ = f"attribute_adapter({name!r})"
    return adapt


class TeacherEnsemble(nn.Module):
    """Frozen teachers, run together under ``no_grad``, returning logits stacked as ``(K, B, C)``.

    The ensemble stays in eval mode whatever its parent does: ``.train()`` on a parent module (as
    Lightning calls it each epoch) leaves BatchNorm statistics and dropout of the teachers untouched.
    Parameters have ``requires_grad=False``, so no optimizer or DDP gradient reducer ever sees them.
    Outputs are checked: every teacher must give logits of the same shape, and finite ones the
    first time it runs (``check_finite``).

    Teachers get the inputs the student gets: a tensor, or for a language-model batch the mapping
    of its model inputs (``{"input_ids": ..., "attention_mask": ...}``, see
    :class:`~kd_lightning.BatchAdapter`), passed as it is to every teacher, offloaded, stacked or
    not.

    Teachers may differ in preprocessing and in class layout. Each teacher ``k`` computes
    ``class_map_k(adapter_k(teacher_k(transform_k(inputs))))``: logits always come back in the
    student's class space. A teacher whose classes are a permutation of the student's is reordered;
    a teacher covering a subset of them gets, for every class it does not know, the finite logit
    ``row max − MISSING_CLASS_LOGIT_GAP`` (probability ~0 there, divergences stay finite). Nothing is
    guessed: a teacher whose output width differs from ``num_classes`` or from the other teachers
    must declare its class map.

    Args:
        teachers: name → model. Names become log keys (``val/agreement/student_vs_<name>``).
        output_adapters: name → attribute/key name (e.g. ``"logits"``) or a callable turning the
            model's output into logits. Teachers without an adapter must return a tensor.
        input_transforms: name → callable applied to the batch inputs before that teacher only
            (e.g. :class:`~kd_lightning.teachers.Standardize` for a teacher trained on standardised
            inputs); given mapping inputs, it takes and returns the mapping. An ``nn.Module``
            transform is a frozen, eval-locked submodule of the ensemble: it follows
            ``.to(device)``, and its state lives under ``input_transforms.<name>``, so a
            :class:`~kd_lightning.DistillationModule` leaves it out of checkpoints with the teachers.
        class_maps: name → sequence ``m`` with one entry per teacher class: ``m[j]`` is the student
            class of the teacher's class ``j``. Distinct integers in ``[0, num_classes)``.
        num_classes: the student's class count. Needed when a class map covers a subset of the
            classes; when given, every teacher's output is checked against it.
        autocast_dtype: run the teachers under ``torch.autocast`` to ``bfloat16`` or ``float16``
            (on the teachers' device; CPU autocast supports both); logits still come back float32.
        inference_mode: run the teachers under ``torch.inference_mode`` rather than ``no_grad``
            (no version counters or view tracking). The stacked logits and the tapped features
            (:meth:`tap`) are cloned out of it, so they work anywhere (e.g. saved for backward).
        compile_teachers: wrap each teacher in ``torch.compile`` (compiled at the first call;
            the weights and the state dict keys stay those of the plain teacher).
        stacked: run same-architecture teachers as one ``torch.func`` ``vmap`` over their stacked
            weights (:class:`~kd_lightning.teachers.runtime.StackedForward`) instead of a loop.
            Needs teachers of one class and shape without input transforms or output adapters;
            its layers cannot be tapped.
        offload: keep the teachers in host memory (moved there when built) and lend each one to
            the compute device for its own forward only (:mod:`~kd_lightning.teachers.offload`):
            the device holds the largest teacher instead of all of them
            (:meth:`device_weight_bytes`), for one host-to-device copy of every teacher's weights
            per forward. The compute device is where the ensemble is moved (``.to(device)``, as
            Lightning moves its module): the teachers stay on the host, dtype changes still apply
            to them, and the state dict keys do not change. Cannot be ``stacked``; composes with
            autocast, inference mode and ``compile_teachers``. Code calling a teacher network
            itself (:meth:`networks`) runs it on the host.
        check_finite: when to check that the logits are finite, raising
            :class:`~kd_lightning.errors.TeacherOutputError` naming the teacher
            (:func:`~kd_lightning.teachers.runtime.check_finite_logits`: one reduction and one
            device sync per forward). ``"first_step"``: the first time each teacher runs, so a
            broken teacher, checkpoint or class map fails at once; ``"always"``: at every
            forward, also catching a NaN that appears later (e.g. an fp16 overflow on one batch);
            ``"never"``. Every step is opt-in: ``kd-bench --sync-costs`` measured the check at
            1.1 to 2 % of a training step on a 2-core CPU, above the 1 % a step may spend on it.

    As a :class:`~kd_lightning.teachers.source.TeacherSource`, the ensemble runs every teacher at
    every step; :meth:`tap` adds the outputs of named teacher layers (feature hints) and
    :meth:`shard` splits it over data-parallel ranks.

    Examples:
        >>> ensemble = TeacherEnsemble({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        >>> ensemble(torch.randn(5, 4)).shape
        torch.Size([2, 5, 3])
        >>> _ = ensemble.train()
        >>> ensemble.training, ensemble.teachers["a"].training
        (False, False)

        A teacher of classes ``[2, 0]`` of a three-class student, reading reversed inputs:

        >>> ensemble = TeacherEnsemble(
        ...     {"full": nn.Linear(4, 3), "pair": nn.Linear(4, 2)},
        ...     input_transforms={"pair": lambda x: x.flip(-1)},
        ...     class_maps={"pair": [2, 0]},
        ...     num_classes=3,
        ... )
        >>> ensemble(torch.randn(5, 4)).softmax(-1)[1].sum(0)[1].item()  # "pair" never says 1
        0.0
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        output_adapters: Mapping[str, str | OutputAdapter] | None = None,
        input_transforms: Mapping[str, InputTransform | None] | None = None,
        class_maps: Mapping[str, Iterable[int] | None] | None = None,
        num_classes: int | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        inference_mode: bool = False,
        compile_teachers: bool = False,
        stacked: bool = False,
        offload: bool = False,
        check_finite: CheckFinite = "first_step",
    ) -> None:
        super().__init__()
        self._offload = TeacherOffload() if offload else None
        if not teachers:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        for name in teachers:
            if not name or "." in name or "/" in name or hasattr(nn.ModuleDict, name):
                raise ValueError(
                    f"invalid teacher name {name!r}: use a non-empty name without '.' or '/' that is "
                    f"not an nn.Module attribute"
                )
        for label, given in (
            ("output_adapters", output_adapters),
            ("input_transforms", input_transforms),
            ("class_maps", class_maps),
        ):
            unknown = set(given or {}) - set(teachers)
            if unknown:
                raise ValueError(
                    f"{label} name unknown teachers {sorted(unknown)}; teachers are {list(teachers)}"
                )
        if num_classes is not None and (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, numbers.Integral)
            or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if check_finite not in CHECK_FINITE:
            raise ValueError(
                f"check_finite (teacher_runtime.check_finite in kd-train) must be one of "
                f"{list(CHECK_FINITE)}, got {check_finite!r}"
            )
        if offload and stacked:
            raise ValueError(
                "offload=True (teacher_runtime.offload) lends the device one teacher at a time, "
                "but stacked=True (teacher_runtime.stacked) runs every teacher at once from one "
                "stacked copy of all their weights: choose one"
            )
        self.num_classes = None if num_classes is None else int(num_classes)
        self.teachers = nn.ModuleDict(teachers)
        if offload:
            self.teachers.cpu()
        self.output_adapters: dict[str, OutputAdapter] = {
            name: attribute_adapter(adapter) if isinstance(adapter, str) else adapter
            for name, adapter in (output_adapters or {}).items()
        }
        transforms = {
            name: transform
            for name, transform in (input_transforms or {}).items()
            if transform is not None
        }
        for name, transform in transforms.items():
            if not callable(transform):
                raise TypeError(
                    f"input_transforms['{name}'] must be callable (a function or nn.Module), "
                    f"got {type(transform).__name__}"
                )
        # Module transforms are registered (device moves, frozen, eval-locked, state under
        # ``input_transforms.``); plain callables are kept aside.
        self.input_transforms = nn.ModuleDict(
            {name: t for name, t in transforms.items() if isinstance(t, nn.Module)}
        )
        self._callable_transforms: dict[str, InputTransform] = {
            name: t for name, t in transforms.items() if not isinstance(t, nn.Module)
        }
        self.class_maps: dict[str, tuple[int, ...]] = {
            name: check_class_map(name, class_map, self.num_classes)
            for name, class_map in (class_maps or {}).items()
            if class_map is not None
        }
        for name, class_map in self.class_maps.items():
            # Not persistent: rebuilt from the map, never in a state dict, moves with the device.
            self.register_buffer(
                _index_buffer(name), torch.tensor(class_map, dtype=torch.long), persistent=False
            )
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self.inference_mode = bool(inference_mode)
        self._compiled: dict[str, Callable[..., Any]] = (
            {name: torch.compile(model) for name, model in teachers.items()}
            if compile_teachers
            else {}
        )
        self.stacked = bool(stacked)
        self.check_finite: CheckFinite = check_finite
        self._finite: set[str] = set()  # teachers whose logits were found finite
        self._stacked: StackedForward | None = None
        if stacked:
            if transforms or self.output_adapters:
                raise ValueError(
                    "stacked=True runs the teachers as one vectorised call on the same inputs: it "
                    "cannot take input_transforms or output_adapters"
                )
            self._stacked = StackedForward(teachers)
        self._all = tuple(range(len(self.teachers)))
        self._tapped: dict[str, str] = {}
        self.requires_grad_(False)
        self.train(False)
        self._register_load_state_dict_pre_hook(
            self._keep_missing_teacher_weights, with_module=True
        )

    @classmethod
    def from_checkpoints(
        cls,
        teachers: Mapping[str, nn.Module],
        checkpoints: Mapping[str, str | os.PathLike[str]],
        output_adapters: Mapping[str, str | OutputAdapter] | None = None,
        **options: Any,
    ) -> TeacherEnsemble:
        """Build the ensemble after loading each teacher's weights safely from its file.

        Every teacher needs a checkpoint; files are read with :func:`load_teacher`. ``options``
        (``input_transforms``, ``class_maps``, ``num_classes``) go to the constructor.
        """
        missing = set(teachers) - set(checkpoints)
        if missing:
            raise ValueError(f"no checkpoint given for teachers {sorted(missing)}")
        for name, model in teachers.items():
            load_teacher(model, checkpoints[name], name=name)
        return cls(teachers, output_adapters, **options)

    @property
    def names(self) -> list[str]:
        """Teacher names, in the order of the stacked outputs."""
        return list(self.teachers.keys())

    @property
    def offload(self) -> bool:
        """Whether the teachers stay on the host, lent to the device one at a time."""
        return self._offload is not None

    @property
    def device(self) -> torch.device:
        """Where the teachers run: their weights' device, or with ``offload=True`` where the
        ensemble was last moved (the weights stay on the host)."""
        if self._offload is not None:
            return self._offload.device
        # The first tensor found; listing them all cost 0.1 ms a step for three small teachers.
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def device_weight_bytes(self) -> int:
        """Bytes of weights on the compute device at the peak of a forward: the input transform
        modules' and every teacher's, or with ``offload=True`` only the largest teacher's.

        Examples:
            >>> teachers = {"a": nn.Linear(4, 3), "b": nn.Linear(40, 3)}  # 60 and 492 bytes
            >>> TeacherEnsemble(teachers).device_weight_bytes()
            552
            >>> TeacherEnsemble(teachers, offload=True).device_weight_bytes()
            492
        """
        teachers = peak_weight_bytes(self.teachers.values(), self.offload)
        return teachers + weight_bytes(self.input_transforms)

    def __len__(self) -> int:
        return len(self.teachers)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.teachers.values())

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Teachers are locked in eval mode: ``mode`` is ignored."""
        return super().train(False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TeacherEnsemble:
        # With offload, a move sets the compute device and leaves the teachers on the host (a
        # dtype change still applies to them); transforms and class indices follow the move.
        if self._offload is None:
            return super()._apply(fn, recurse)
        self._offload.moved(fn)
        if recurse:
            for child in self.children():
                child._apply(on_host(fn) if child is self.teachers else fn)
        return super()._apply(fn, recurse=False)

    def input_transform(self, name: str) -> InputTransform | None:
        """The transform applied to the inputs of teacher ``name``, or ``None``."""
        if name in self.input_transforms:
            return self.input_transforms[name]
        return self._callable_transforms.get(name)

    def view(self, name: str) -> nn.Module:
        """Teacher ``name`` alone, as a module from raw inputs to logits in the student's classes.

        Its transform, output adapter and class map are applied, as in the ensemble (e.g. to
        evaluate one teacher with a plain classifier loop).
        """
        if name not in self.teachers:
            raise KeyError(f"no teacher {name!r}; teachers are {self.names}")
        return _TeacherView(self, name)

    def select(self, names: Sequence[str]) -> TeacherEnsemble:
        """A new ensemble of the teachers ``names`` (the same modules, not copies), in that order,
        with their transforms, adapters, class maps and this ensemble's runtime options.

        Examples:
            >>> ensemble = TeacherEnsemble({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
            >>> ensemble.select(["b"]).names
            ['b']
        """
        unknown = [name for name in names if name not in self.teachers]
        if unknown:
            raise KeyError(f"no teachers {unknown}; teachers are {self.names}")
        return TeacherEnsemble(
            {name: self.teachers[name] for name in names},
            {name: self.output_adapters[name] for name in names if name in self.output_adapters},
            {name: self.input_transform(name) for name in names},
            {name: self.class_maps[name] for name in names if name in self.class_maps},
            num_classes=self.num_classes,
            autocast_dtype=self.autocast_dtype,
            inference_mode=self.inference_mode,
            compile_teachers=bool(self._compiled),
            stacked=self.stacked,
            offload=self.offload,
            check_finite=self.check_finite,
        )

    def outputs(self, inputs: Any, batch: Any = None, stage: Stage = "train") -> TeacherOutputs:
        """Every teacher's logits on ``inputs``, with the tapped layers' outputs (:meth:`tap`).

        ``batch`` and ``stage`` do not matter: live teachers run alike in every stage.

        Examples:
            >>> b = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            >>> ensemble = TeacherEnsemble({"a": nn.Linear(4, 3), "b": b})
            >>> ensemble.tap({"b": "0"})
            >>> outputs = ensemble.outputs(torch.randn(5, 4))
            >>> outputs.logits.shape, outputs.ran, outputs.features["b"].shape
            (torch.Size([2, 5, 3]), (0, 1), torch.Size([5, 6]))
        """
        if not self._tapped:
            return TeacherOutputs(self(inputs), self._all)
        taps = {
            name: FeatureTaps(self.teachers[name], [layer]) for name, layer in self._tapped.items()
        }
        try:
            logits = self(inputs)
        finally:
            for tapped in taps.values():
                tapped.remove()
        features = {name: taps[name][layer] for name, layer in self._tapped.items()}
        if self.inference_mode:  # a clone is an ordinary tensor, which backward may save
            features = {name: feature.clone() for name, feature in features.items()}
        return TeacherOutputs(logits, self._all, features)

    def tap(self, layers: Mapping[str, str]) -> None:
        """Return the output of submodule ``layers[name]`` of teacher ``name`` from :meth:`outputs`
        (a layer returning a tuple, such as ``nn.GRU``, at element 0); ``{}`` stops tapping.

        Raises:
            ValueError: for an unknown teacher or submodule, or a stacked ensemble (its ``vmap``
                forward runs no teacher's own layers).
        """
        if layers and self.stacked:
            raise ValueError(
                "tapped teacher layers (e.g. feature hints) are read from each teacher's own "
                "forward, which a stacked (vmap) forward does not run: build the TeacherEnsemble "
                "with stacked=False"
            )
        unknown = sorted(set(layers) - set(self.teachers))
        if unknown:
            raise ValueError(f"cannot tap unknown teachers {unknown}; teachers are {self.names}")
        for name, layer in layers.items():
            FeatureTaps(self.teachers[name], [layer]).remove()  # refuses a missing submodule
        self._tapped = dict(layers)

    def networks(self) -> Mapping[str, nn.Module]:
        """Teacher name → teacher network (without its transform, adapter or class map); with
        ``offload=True`` they are in host memory, lent to the device only inside a forward."""
        return dict(self.teachers.items())

    def shard(self, rank: int, world_size: int) -> TeacherSource:
        """This rank's :class:`~kd_lightning.teachers.sharded.ShardedTeachers`; the ensemble
        itself on one rank.

        Raises:
            ValueError: when layers are tapped: every rank would need every teacher.
        """
        if self._tapped:
            raise ValueError(
                "sharded teachers cannot serve tapped layers (e.g. feature hints): every rank "
                "would need every teacher's features at every step"
            )
        if world_size == 1:
            return self
        from kd_lightning.teachers.sharded import ShardedTeachers  # sharded builds on this module

        return ShardedTeachers(self, rank, world_size)

    def forward(self, inputs: Any, only: Sequence[int] | None = None) -> Tensor:
        """Run the teachers on ``inputs`` and return float32 logits of shape ``(K, B, C)``.

        Args:
            inputs: the batch inputs.
            only: indices of the teachers to run (e.g. those drawn by
                :class:`~kd_lightning.teachers.DrawnTeachers`); the others do not run and the
                result has ``len(only)`` rows, in that order. ``None`` runs them all.
        """
        names = self.names if only is None else [self._name_at(index) for index in only]
        with teacher_context(self.device, self.autocast_dtype, self.inference_mode):
            if self._stacked is not None and only is None:
                stacked = self._stacked(inputs).float()
                logits = [
                    self._to_student_classes(n, z) for n, z in zip(names, stacked, strict=True)
                ]
            else:
                logits = [self._teacher_logits(name, inputs, check=False) for name in names]
            result = self._stack_checked(names, logits)
        # Out of inference mode, so that the logits can be used anywhere (e.g. saved for backward).
        return result.clone() if self.inference_mode else result

    def _name_at(self, index: int) -> str:
        if not 0 <= index < len(self.teachers):
            raise IndexError(f"no teacher at index {index}: the ensemble has {len(self)} teachers")
        return self.names[index]

    def _stack_checked(self, names: Sequence[str], logits: Sequence[Tensor]) -> Tensor:
        """Stack per-teacher logits after checking their shapes, then their finiteness at once."""
        first_name, first = names[0], logits[0]
        for name, output in zip(names, logits, strict=True):
            if output.shape != first.shape:
                raise TeacherOutputError(
                    f"teachers disagree on output shape: '{first_name}' gives {tuple(first.shape)}, "
                    f"'{name}' gives {tuple(output.shape)} (the last dimension is the number of classes)"
                    + self._width_hint(first_name, name, first.shape[-1], output.shape[-1])
                    + _vocabulary_hint(first, output)
                )
        stacked = torch.stack(list(logits))
        self._check_finite(names, stacked)
        return stacked

    def _check_finite(self, names: Sequence[str], logits: Tensor) -> None:
        """Check the logits ``(K', ...)`` of teachers ``names`` when ``check_finite`` says so."""
        if self.check_finite == "always" or (
            self.check_finite == "first_step" and not self._finite.issuperset(names)
        ):
            check_finite_logits(names, logits)
            self._finite.update(names)

    def _teacher_logits(self, name: str, inputs: Any, check: bool) -> Tensor:
        # check: apply check_finite here (one teacher alone) rather than to the stacked logits.
        transform = self.input_transform(name)
        if transform is not None:
            inputs = self._transformed(name, transform, inputs)
        model = self._compiled.get(name, self.teachers[name])
        if self._offload is None:
            output = model(inputs)
        else:
            with self._offload.lent(self.teachers[name]):
                output = model(inputs)
        adapter = self.output_adapters.get(name)
        if adapter is not None:
            output = adapter(output)
        if not isinstance(output, Tensor):
            raise TeacherOutputError(
                f"teacher '{name}' returned {type(output).__name__}, not a tensor: "
                f"give it an output adapter, e.g. output_adapters={{'{name}': 'logits'}}"
            )
        output = output.float()
        if check:
            self._check_finite([name], output.unsqueeze(0))
        return self._to_student_classes(name, output)

    @staticmethod
    def _transformed(name: str, transform: InputTransform, inputs: Any) -> Any:
        """``transform(inputs)``; a transform of tensors given a mapping is named."""
        if not isinstance(inputs, Mapping):
            return transform(inputs)
        try:
            return transform(inputs)
        except (TypeError, AttributeError) as error:
            raise TypeError(
                f"input_transforms['{name}'] failed on mapping inputs (keys {sorted(inputs)}, "
                f"from a Hugging Face style batch): a transform of such batches takes and returns "
                f"the mapping ({type(error).__name__}: {error})"
            ) from error

    def _to_student_classes(self, name: str, output: Tensor) -> Tensor:
        width = output.shape[-1] if output.dim() else 0
        class_map = self.class_maps.get(name)
        if class_map is None:
            if self.num_classes is not None and width != self.num_classes:
                raise TeacherOutputError(
                    f"teacher '{name}' outputs {width} classes but the student has "
                    f"num_classes={self.num_classes}: declare class_maps={{'{name}': [...]}} giving "
                    f"the student class of each of its {width} classes"
                )
            return output
        if width != len(class_map):
            raise TeacherOutputError(
                f"teacher '{name}': class_maps['{name}'] has length {len(class_map)} but the "
                f"teacher's output width is {width} (output shape {tuple(output.shape)}); the map "
                f"needs one student class index per teacher class"
            )
        index: Tensor = getattr(self, _index_buffer(name))
        classes = len(class_map) if self.num_classes is None else self.num_classes
        return map_classes(output, index, classes)

    def _width_hint(self, first_name: str, name: str, first_width: int, width: int) -> str:
        if first_width == width:
            return ""
        unmapped = [n for n in (name, first_name) if n not in self.class_maps]
        if not unmapped:
            return (
                f"; pass num_classes=<the student's class count> so that the class maps of "
                f"'{first_name}' and '{name}' land in the same space"
            )
        return (
            f"; if '{unmapped[0]}' covers other classes, declare class_maps={{'{unmapped[0]}': "
            f"[...]}} giving the student class of each of its classes (and num_classes=<the "
            f"student's class count> when it covers a subset)"
        )

    def _keep_missing_teacher_weights(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any
    ) -> None:
        # Student checkpoints leave the teachers out; loading one keeps the teachers' weights.
        for key, value in module.state_dict(prefix=prefix).items():
            state_dict.setdefault(key, value)


class _TeacherView(nn.Module):
    """One teacher of an ensemble, in the student's class space (see :meth:`TeacherEnsemble.view`)."""

    def __init__(self, ensemble: TeacherEnsemble, name: str) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.name = name

    def forward(self, inputs: Any) -> Tensor:
        ensemble = self.ensemble
        with teacher_context(ensemble.device, ensemble.autocast_dtype, ensemble.inference_mode):
            logits = ensemble._teacher_logits(self.name, inputs, check=True)
        return logits.clone() if ensemble.inference_mode else logits


def _vocabulary_hint(first: Tensor, output: Tensor) -> str:
    """For token-level logits ``(B, L, V)`` of other widths: teachers of other tokenizers."""
    if first.ndim < 3 or first.shape[-1] == output.shape[-1]:
        return ""
    return (
        "; for language models, the widths are vocabularies: cross-tokenizer distillation is "
        "not supported yet, so every teacher and the student must share one tokenizer"
    )


def _index_buffer(name: str) -> str:
    return f"_class_index_{name}"
