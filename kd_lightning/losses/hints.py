"""Feature-level multi-teacher hints: FitNets-style regression of the student's features onto each
teacher's, weighted per sample by the fusion rule, or by CA-MKD's confidence through each teacher's
classifier head (the intermediate term of CA-MKD)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.fusion.confidence import ConfidenceAware


class _HintAdapter(nn.Module):
    """Map a student feature onto one teacher's feature shape.

    * student ``(B, D)``: ``Linear(D, prod(teacher shape))``, reshaped to the teacher's shape;
    * student ``(B, C, L)``, teacher ``(B, C', L')``: adaptive average pooling of the student map
      to length ``L'`` when ``L ≠ L'``, then a 1×1 ``Conv1d(C, C')``;
    * student ``(B, C, L)``, teacher ``(B, D')``: global average pooling over ``L``, then
      ``Linear(C, D')``.

    The teacher's per-sample shape is a persistent buffer, so a fresh :class:`FeatureHintLoss`
    rebuilds its adapters from a state dict.
    """

    teacher_shape: Tensor

    def __init__(self, teacher_shape: tuple[int, ...], proj: nn.Module) -> None:
        super().__init__()
        self.register_buffer("teacher_shape", torch.tensor(teacher_shape, dtype=torch.long))
        self.proj = proj

    @classmethod
    def from_shapes(
        cls, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
    ) -> _HintAdapter:
        """The adapter for per-sample shapes ``student_shape`` → ``teacher_shape``."""
        return cls(teacher_shape, _projection(student_shape, teacher_shape))

    def forward(self, feature: Tensor) -> Tensor:
        shape = [int(size) for size in self.teacher_shape.tolist()]
        if feature.ndim == 2:
            return self.proj(feature).reshape(feature.shape[0], *shape)
        if isinstance(self.proj, nn.Linear):  # (B, C, L) onto a flat teacher feature
            return self.proj(feature.mean(-1))
        if feature.shape[-1] != shape[-1]:
            feature = F.adaptive_avg_pool1d(feature, shape[-1])
        return self.proj(feature)


def _projection(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    if len(student_shape) not in (1, 2):
        raise ValueError(
            f"hint features must be (B, D) or (B, C, L); the student's are "
            f"(B, {', '.join(map(str, student_shape))})"
        )
    if len(student_shape) == 1:
        return nn.Linear(student_shape[0], int(torch.tensor(teacher_shape).prod()))
    if len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    if len(teacher_shape) == 2:
        return nn.Conv1d(student_shape[0], teacher_shape[0], kernel_size=1)
    raise ValueError(
        f"a (B, C, L) student map can be adapted to (B, D) or (B, C', L') teacher features, not "
        f"(B, {', '.join(map(str, teacher_shape))})"
    )


class FeatureHintLoss(nn.Module):
    """Σ_k w_k(x) · MSE(adapter_k(f_s(x)), f_t,k(x)), averaged over the batch.

    ``f_s`` is the output of the student's submodule ``student_layer``, ``f_t,k`` that of teacher
    ``k``'s submodule ``teacher_layers[k]`` (a layer returning a tuple, such as ``nn.GRU``, is read
    at element 0: its per-step outputs). The MSE is the mean over one sample's feature elements;
    ``w`` ``(B, K)`` are the fusion rule's per-sample weights, detached and used as given (rules
    whose weights sum to one give a convex combination). One learnable adapter per teacher maps the
    student feature onto that teacher's shape (see :class:`_HintAdapter`): a linear map for flat
    ``(B, D)`` features, a 1×1 ``Conv1d`` for ``(B, C, L)`` maps, the student map being
    adaptive-average-pooled to the teacher's length when they differ.

    With ``confidence_heads`` (teacher name → name of that teacher's classifier submodule), the
    weights are CA-MKD's instead of the fusion weights: teacher ``k``'s own head maps the adapted
    student feature to logits ``head_k(adapter_k(f_s).flatten(1))``, and ``w`` is
    :class:`~kd_lightning.fusion.ConfidenceAware` on those logits against the labels,
    ``w_k = (1 − softmax_k(CE_k)) / (K − 1)``, detached (the heads run under ``no_grad``), so the
    heads get no gradient; the adapters and the student are trained by the MSE term.

    Adapters are created from the first observed shapes by :meth:`materialize`; they must exist
    before the optimizer is built. :class:`~kd_lightning.DistillationModule` does that in
    ``setup("fit")`` from one training batch (a dry run, under ``no_grad``). Loading a state dict
    into an unmaterialized loss rebuilds the adapters from it.

    Args:
        student_layer: name of the student's submodule (e.g. ``"hidden"`` of
            :class:`~kd_lightning.models.MLP`).
        teacher_layers: teacher name → submodule name inside that teacher.
        weight: factor of this term in the total loss.
        confidence_heads: teacher name → name of the teacher's classifier submodule (e.g.
            ``"head"``); when given, the per-sample weights come through these heads (CA-MKD) and
            :meth:`forward` needs ``labels`` and ``heads`` (see :meth:`heads_for`).

    Examples:
        >>> hint = FeatureHintLoss("hidden", {"a": "conv3", "b": "hidden"})
        >>> student, teachers = torch.randn(4, 8), {"a": torch.randn(4, 3, 5), "b": torch.randn(4, 6)}
        >>> hint.materialize(student, teachers)
        >>> hint(student, teachers, torch.full((4, 2), 0.5)).shape
        torch.Size([])
    """

    def __init__(
        self,
        student_layer: str,
        teacher_layers: Mapping[str, str],
        weight: float = 1.0,
        confidence_heads: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not teacher_layers:
            raise ValueError("FeatureHintLoss needs at least one entry in teacher_layers")
        if weight < 0:
            raise ValueError(f"FeatureHintLoss: weight must be non-negative, got {weight}")
        self.student_layer = str(student_layer)
        self.teacher_layers = {str(name): str(layer) for name, layer in teacher_layers.items()}
        self.weight = float(weight)
        self.confidence_heads = (
            None
            if confidence_heads is None
            else {str(name): str(head) for name, head in confidence_heads.items()}
        )
        self.adapters = nn.ModuleDict()
        self._register_load_state_dict_pre_hook(self._build_adapters_from_state, with_module=True)

    @property
    def materialized(self) -> bool:
        """Whether the adapters exist."""
        return len(self.adapters) > 0

    def layers_for(self, names: list[str]) -> dict[str, str]:
        """The tapped layer of each teacher in ``names``; a teacher without one is an error."""
        missing = [name for name in names if name not in self.teacher_layers]
        if missing:
            raise ValueError(
                f"FeatureHintLoss.teacher_layers names no layer for teachers {missing}; it has "
                f"{sorted(self.teacher_layers)}"
            )
        return {name: self.teacher_layers[name] for name in names}

    def heads_for(self, teachers: Mapping[str, nn.Module]) -> dict[str, nn.Module] | None:
        """Each teacher's classifier submodule named by ``confidence_heads`` (``None`` without
        them); a teacher without an entry, or a name that is no submodule, is an error."""
        if self.confidence_heads is None:
            return None
        missing = [name for name in teachers if name not in self.confidence_heads]
        if missing:
            raise ValueError(
                f"FeatureHintLoss.confidence_heads names no head for teachers {missing}; it has "
                f"{sorted(self.confidence_heads)}"
            )
        heads = {}
        for name, teacher in teachers.items():
            head = self.confidence_heads[name]
            try:
                heads[name] = teacher.get_submodule(head)
            except AttributeError:
                available = [n for n, _ in teacher.named_modules() if n]
                raise ValueError(
                    f"FeatureHintLoss.confidence_heads: teacher {name!r} has no submodule "
                    f"{head!r}; available: {available}"
                ) from None
        return heads

    @torch.no_grad()
    def materialize(self, student_feature: Tensor, teacher_features: Mapping[str, Tensor]) -> None:
        """Create one adapter per teacher from the shapes of one batch's features (no-op if done)."""
        if self.materialized:
            return
        self.layers_for(list(teacher_features))
        student_shape = tuple(student_feature.shape[1:])
        for name, feature in teacher_features.items():
            adapter = _HintAdapter.from_shapes(student_shape, tuple(feature.shape[1:]))
            self.adapters[name] = adapter.to(student_feature.device)

    def forward(
        self,
        student_feature: Tensor,
        teacher_features: Mapping[str, Tensor],
        weights: Tensor,
        labels: Tensor | None = None,
        heads: Mapping[str, nn.Module] | None = None,
    ) -> Tensor:
        """The hint loss from the student feature, the teachers' features (in the order of the
        columns of ``weights``) and the per-sample weights ``(B, K)``. With ``confidence_heads``,
        ``weights`` only fixes the shape: the weights are computed through ``heads`` (teacher
        name → classifier module) against ``labels`` ``(B,)``."""
        if not self.materialized:
            raise RuntimeError(
                "FeatureHintLoss has no adapters yet: call materialize(student_feature, "
                "teacher_features) on one batch before building the optimizer"
            )
        names = list(teacher_features)
        batch = student_feature.shape[0]
        if weights.shape != (batch, len(names)):
            raise ValueError(
                f"FeatureHintLoss needs per-sample weights of shape (B, K) = ({batch}, "
                f"{len(names)}), got {tuple(weights.shape)}"
            )
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise ValueError(f"FeatureHintLoss has no adapter for teachers {unknown}")
        if self.confidence_heads is not None and (labels is None or heads is None):
            raise ValueError(
                "FeatureHintLoss with confidence_heads needs labels and the teachers' heads: "
                "pass labels=... and heads=FeatureHintLoss.heads_for(teachers)"
            )
        weights = weights.detach().float()
        student = student_feature.float()
        per_teacher, head_logits = [], []
        for name in names:
            prediction = self.adapters[name](student)
            target = teacher_features[name].detach().float()
            if prediction.shape != target.shape:
                raise ValueError(
                    f"teacher {name!r}: adapted student feature {tuple(prediction.shape)} does "
                    f"not match the teacher's feature {tuple(target.shape)}"
                )
            squared = (prediction - target).pow(2).reshape(batch, -1)
            per_teacher.append(squared.mean(-1))
            if heads is not None and self.confidence_heads is not None:
                with torch.no_grad():  # detached weights: no gradient reaches the heads
                    head_logits.append(heads[name](prediction.flatten(1)))
        if head_logits:
            assert labels is not None
            weights = ConfidenceAware()(torch.stack(head_logits), labels).weights.detach()
        return (weights * torch.stack(per_teacher, -1)).sum(-1).mean()

    def _build_adapters_from_state(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        if self.materialized:
            return
        start = prefix + "adapters."
        names = {key[len(start) :].split(".")[0] for key in state_dict if key.startswith(start)}
        for name in sorted(names):
            weight = state_dict[f"{start}{name}.proj.weight"]
            teacher_shape = tuple(int(s) for s in state_dict[f"{start}{name}.teacher_shape"])
            out_size, in_size = weight.shape[:2]
            proj = (
                nn.Linear(in_size, out_size)
                if weight.ndim == 2
                else nn.Conv1d(in_size, out_size, kernel_size=1)
            )
            self.adapters[name] = _HintAdapter(teacher_shape, proj)

    def extra_repr(self) -> str:
        return (
            f"student_layer={self.student_layer!r}, teacher_layers={self.teacher_layers}, "
            f"weight={self.weight}, confidence_heads={self.confidence_heads}"
        )
