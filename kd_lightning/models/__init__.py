"""MNIST-1D models of Greydanus 2020 ("Scaling down deep learning"), their registry, a tiny
token-level Transformer tagger for sequence outputs, a small decoder-only causal LM, and Hugging
Face causal LMs (``transformers``, the ``hf`` extra, imported only when one is built)."""

from __future__ import annotations

from torch import nn

from kd_lightning.models.causal_lm import CausalLM
from kd_lightning.models.cnn import CNN1D
from kd_lightning.models.gru import GRUClassifier
from kd_lightning.models.hf import HuggingFaceLM
from kd_lightning.models.mlp import MLP
from kd_lightning.models.recurrent_lm import RecurrentLM
from kd_lightning.models.transformer import TinyTransformerTagger

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN1D, "gru": GRUClassifier}

__all__ = [
    "CNN1D",
    "MLP",
    "MODELS",
    "CausalLM",
    "GRUClassifier",
    "HuggingFaceLM",
    "RecurrentLM",
    "TinyTransformerTagger",
]
