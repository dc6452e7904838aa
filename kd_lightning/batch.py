"""Turn a DataModule's batches into ``(inputs, targets)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kd_lightning.errors import BatchFormatError

#: The fields of a Hugging Face language-model batch that are model inputs, in this order: what
#: a default :class:`BatchAdapter` passes, those present, to the model as one mapping.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")

#: The label of positions that no loss reads (padding, masked prompts), as in
#: :func:`torch.nn.functional.cross_entropy`.
IGNORE_INDEX = -100


class BatchAdapter:
    """Unpack ``(inputs, targets, ...)`` tuples and dict batches into ``(inputs, targets)``.

    Extra tuple items (e.g. sample indices) and extra dict keys are ignored, so an existing
    project's DataModule can feed a distillation module unchanged. Without keys, a dict batch is
    read by the first convention it follows:

    * ``{"input": ..., "target": ...}``: those two fields;
    * a Hugging Face language-model batch, ``{"input_ids": ..., "labels": ..., ...}``: the
      targets are ``labels`` and the inputs the model-input fields present
      (:data:`MODEL_INPUT_KEYS`: ``input_ids``, ``attention_mask``, ``position_ids``,
      ``token_type_ids``) as one dict, e.g. ``{"input_ids": ..., "attention_mask": ...}``, which
      the library's language models take as their single input
      (:class:`~kd_lightning.models.CausalLM`, :class:`~kd_lightning.models.HuggingFaceLM`).

    ``labels`` must already be the next tokens (``labels[:, t] = input_ids[:, t + 1]``, ``-100``
    where no token follows), unlike a Hugging Face model's own loss, which shifts them inside.
    Every dict batch holding ``input_ids`` and labels of their shape is checked for the two
    mistakes that would train silently on the wrong target (one comparison and one read of its
    result; batches in host memory every time, batches on an accelerator the first time only, to
    spare a device synchronisation per step):

    * labels equal to ``input_ids`` at every real position, while the tokens change from one
      position to the next (:func:`not_shifted`): labels not shifted;
    * without an ``attention_mask``, a row whose labels start or end in a run of ``-100`` over
      one repeated token (at least twice) that its labelled positions do not hold
      (:func:`unmasked_padding`): padding that every token would attend to. Packed blocks and
      masked prompts (real text under the ``-100``) do not look like this.

    Args:
        input_key: the dict key holding the model inputs, or a sequence of keys whose fields
            become the inputs as one dict (e.g. ``("input_ids", "attention_mask")``); ``None``:
            by the conventions above.
        target_key: the dict key holding the labels; ``None``: ``"target"`` or ``"labels"``, by
            the conventions above.

    Raises:
        BatchFormatError: a batch follows no convention, lacks a key, or fails a check above.

    Examples:
        >>> adapter = BatchAdapter(input_key="x", target_key="label")
        >>> adapter({"x": 1, "label": 2, "id": 3})
        (1, 2)
        >>> adapter((1, 2))
        (1, 2)
        >>> tokens = torch.tensor([[5, 6, 7, 8]])
        >>> batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens),
        ...          "labels": torch.tensor([[6, 7, 8, -100]]), "index": torch.tensor([0])}
        >>> inputs, labels = BatchAdapter()(batch)
        >>> sorted(inputs), labels.tolist()
        (['attention_mask', 'input_ids'], [[6, 7, 8, -100]])
        >>> BatchAdapter()({"input_ids": tokens, "labels": tokens})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        kd_lightning.errors.BatchFormatError: batch['labels'] equals batch['input_ids'] ...
    """

    def __init__(
        self, input_key: str | Sequence[str] | None = None, target_key: str | None = None
    ) -> None:
        if input_key is not None and not isinstance(input_key, str):
            input_key = tuple(input_key)
            if not input_key or not all(isinstance(key, str) for key in input_key):
                raise ValueError(
                    f"input_key must be a key or a non-empty sequence of keys, got {input_key!r}"
                )
        self.input_key = input_key
        self.target_key = target_key
        self._checked_on_device = False

    def __call__(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, Mapping):
            inputs, target_key = self._unpack_mapping(batch)
            targets = batch[target_key]
            self._check_language_batch(batch, target_key)
            return inputs, targets
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
            return batch[0], batch[1]
        raise BatchFormatError(
            f"cannot unpack a batch of type {type(batch).__name__}: expected an (inputs, targets) "
            f"tuple or a dict with keys {self._expected()}"
        )

    def _unpack_mapping(self, batch: Mapping[str, Any]) -> tuple[Any, str]:
        """The inputs of a dict batch and the key of its targets."""
        language = "input_ids" in batch and "input" not in batch and "target" not in batch
        target_key = self.target_key or ("labels" if language else "target")
        input_key = self.input_key
        if input_key is None and language:
            required = ["input_ids"]
        else:
            input_key = input_key or "input"
            required = [input_key] if isinstance(input_key, str) else list(input_key)
        missing = [key for key in (*required, target_key) if key not in batch]
        if missing:
            raise BatchFormatError(
                f"batch dict has keys {sorted(map(str, batch))} but no {missing}: set "
                f"BatchAdapter(input_key=..., target_key=...) to the keys of your DataModule"
            )
        if isinstance(input_key, str):
            return batch[input_key], target_key
        keys = MODEL_INPUT_KEYS if input_key is None else input_key
        return {key: batch[key] for key in keys if key in batch}, target_key

    def _check_language_batch(self, batch: Mapping[str, Any], target_key: str) -> None:
        """Refuse unshifted labels and unmasked padding (see the class docstring)."""
        tokens, labels = batch.get("input_ids"), batch[target_key]
        if not (
            isinstance(tokens, Tensor)
            and isinstance(labels, Tensor)
            and tokens.ndim == 2
            and labels.shape == tokens.shape
            and not tokens.is_floating_point()
            and not labels.is_floating_point()
            and tokens.shape[1] > 1
        ):
            return
        on_host = tokens.device.type == "cpu"
        if not on_host and self._checked_on_device:
            return
        checks = [not_shifted(tokens, labels)]
        if "attention_mask" not in batch:
            checks.append(unmasked_padding(tokens, labels))
        unshifted, *padded = torch.stack(checks).tolist()  # one read of the device
        self._checked_on_device = self._checked_on_device or not on_host
        if unshifted:
            raise BatchFormatError(
                f"batch[{target_key!r}] equals batch['input_ids'] at every real position: the "
                f"labels are not shifted. Hugging Face models shift labels inside; here labels[:, t] "
                f"must be the next token, labels[:, t] = input_ids[:, t + 1], and the last "
                f"position -100"
            )
        if any(padded):
            raise BatchFormatError(
                f"the batch is padded (rows whose batch[{target_key!r}] start or end in -100 over "
                f"one repeated token) but has no 'attention_mask': every token would attend to "
                f"the padding. Add batch['attention_mask'] (1 at real tokens, 0 at padding), as "
                f"Hugging Face tokenizers and collators give it"
            )

    def _expected(self) -> str:
        if self.input_key is None and self.target_key is None:
            return "'input' and 'target', or 'input_ids' and 'labels'"
        return f"{self.input_key!r} and {self.target_key!r}"

    def __repr__(self) -> str:
        return f"BatchAdapter(input_key={self.input_key!r}, target_key={self.target_key!r})"


def not_shifted(input_ids: Tensor, labels: Tensor) -> Tensor:
    """Whether ``labels`` ``(B, L)`` equal ``input_ids`` at every real position (not ``-100``)
    while some real position's next token differs from its own: labels that were not shifted.

    Shifted labels equal to the tokens at every real position would mean ``input_ids[:, t] =
    input_ids[:, t + 1]`` there, so the second condition keeps runs of one token from counting.

    Examples:
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> bool(not_shifted(tokens, tokens)), bool(not_shifted(tokens, torch.tensor([[2, 3, 4, -100]])))
        (True, False)
        >>> bool(not_shifted(torch.tensor([[7, 7, 7]]), torch.tensor([[7, 7, -100]])))  # one token
        False
    """
    real = labels != IGNORE_INDEX
    equal = ((labels == input_ids) | ~real).all()
    changes = ((input_ids[:, :-1] != input_ids[:, 1:]) & real[:, :-1]).any()
    return equal & changes


def unmasked_padding(input_ids: Tensor, labels: Tensor) -> Tensor:
    """Whether a row of ``labels`` ``(B, L)`` starts or ends in a run of ``-100`` over at least
    two positions of one repeated token of ``input_ids`` that the row's labelled positions do
    not hold.

    With shifted labels, the position next to the padding may belong to it or not: the last
    real token before right padding is labelled ``-100`` (no token follows it), and the last pad
    before left padding may be labelled with the first real token. A trailing run's first
    position and the labelled position after a leading run are therefore left out.

    Examples:
        >>> tokens = torch.tensor([[4, 5, 6, 0, 0]])  # right-padded with token 0
        >>> bool(unmasked_padding(tokens, torch.tensor([[5, 6, -100, -100, -100]])))
        True
        >>> tokens = torch.tensor([[0, 0, 0, 4, 5]])  # left-padded
        >>> bool(unmasked_padding(tokens, torch.tensor([[-100, -100, 4, 5, 6]])))
        True
        >>> prompt = torch.tensor([[3, 3, 4, 3, 5]])  # a masked prompt of real text
        >>> bool(unmasked_padding(prompt, torch.tensor([[-100, -100, 3, 5, 9]])))
        False
    """
    ignored = labels == IGNORE_INDEX
    start = torch.zeros_like(ignored[:, :1])
    leading = ignored.long().cumprod(-1).bool()
    after_leading = torch.cat([start, leading[:, :-1] & ~leading[:, 1:]], 1)
    trailing = ignored.flip(-1).long().cumprod(-1).flip(-1).bool()
    trailing = torch.cat([start, trailing[:, 1:] & trailing[:, :-1]], 1)
    found = torch.zeros((), dtype=torch.bool, device=labels.device)
    for run, token, left_out in (
        (leading, input_ids[:, :1], after_leading),
        (trailing, input_ids[:, -1:], start),
    ):
        same = input_ids == token
        one_token = (same | ~run).all(-1)
        long_enough = run.sum(-1) >= 2
        unlabelled = ~(same & ~ignored & ~left_out).any(-1)
        found = found | (one_token & long_enough & unlabelled).any()
    return found
