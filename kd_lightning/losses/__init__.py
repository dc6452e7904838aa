"""Losses: the multi-teacher distillation objective (also chunked over tokens, for large
vocabularies), feature hints and loss-weight schedules."""

from kd_lightning.losses.chunked import ChunkedDistillationLoss
from kd_lightning.losses.distillation import DistillationLoss, DistillationOutput
from kd_lightning.losses.hints import FeatureHintLoss

__all__ = ["ChunkedDistillationLoss", "DistillationLoss", "DistillationOutput", "FeatureHintLoss"]
