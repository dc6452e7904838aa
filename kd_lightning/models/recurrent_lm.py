"""A recurrent language model: a GRU over token embeddings, next-token logits ``(B, L, V)``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kd_lightning.models.checks import check_positive


class RecurrentLM(nn.Module):
    """GRU language model that predicts the next token at every position.

    Token embeddings, ``n_layers`` stacked GRU layers of width ``d_model`` (Cho et al. 2014), a
    LayerNorm and a linear head tied to the embedding (Press & Wolf 2017). Being recurrent, it
    has no position embedding and no longest sequence; as a teacher beside
    :class:`~kd_lightning.models.CausalLM` students it brings another inductive bias to an
    ensemble. It takes the same inputs: token ids ``(B, L)`` with an optional ``attention_mask``,
    or both as one mapping (the model inputs of a Hugging Face batch, as
    :class:`~kd_lightning.BatchAdapter` passes them). Padded positions are moved after the real
    tokens of their row before the GRU reads it, so a left- or right-padded sequence gives, at
    its real tokens, the logits of the same sequence unpadded (those at padded positions are
    finite but meaningless: label them ``-100``).

    Submodules, for :class:`~kd_lightning.models.taps.FeatureTaps`: ``embedding``, ``gru`` (a
    tuple output), ``final_norm`` (the features the head reads) and ``head``.

    Args:
        vocab_size: Number of token ids ``V``.
        d_model: Width of the embeddings and of the GRU's state.
        n_layers: Stacked GRU layers.
        dropout: Dropout on the embeddings, between GRU layers and before the head.

    Examples:
        >>> model = RecurrentLM(vocab_size=11, d_model=16)
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> logits = model(tokens)
        >>> logits.shape
        torch.Size([1, 4, 11])
        >>> padded = torch.tensor([[0, 0, 1, 2, 3, 4]])  # left padding, hidden by the mask
        >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
        >>> torch.allclose(model({"input_ids": padded, "attention_mask": mask})[:, 2:], logits, atol=1e-6)
        True
    """

    def __init__(
        self, vocab_size: int, d_model: int = 256, n_layers: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_positive(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(
            d_model, d_model, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0
        )
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.head.weight = self.embedding.weight

    def forward(
        self, input_ids: Tensor | Mapping[str, Tensor], attention_mask: Tensor | None = None
    ) -> Tensor:
        """Next-token logits ``(B, L, V)`` for token ids ``(B, L)`` (or a mapping holding
        ``input_ids`` and optionally ``attention_mask``, nonzero at real tokens)."""
        if isinstance(input_ids, Mapping):
            inputs = input_ids
            unknown = sorted(set(inputs) - {"input_ids", "attention_mask"})
            if "input_ids" not in inputs or unknown:
                raise ValueError(
                    f"RecurrentLM reads the inputs 'input_ids' and 'attention_mask' (optional), "
                    f"got {sorted(inputs)}"
                )
            input_ids = inputs["input_ids"]
            attention_mask = inputs.get("attention_mask", attention_mask)
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.ndim != 2
            or input_ids.is_floating_point()
        ):
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"RecurrentLM expects integer input_ids of shape (B, L), got {shape}")
        order = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # Real tokens first, in their order: each then follows only the real tokens before it.
            order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)
            input_ids = input_ids.gather(1, order)
        hidden, _ = self.gru(self.dropout(self.embedding(input_ids)))
        logits = self.head(self.dropout(self.final_norm(hidden)))
        if order is None:
            return logits
        return torch.empty_like(logits).scatter_(1, order.unsqueeze(-1).expand_as(logits), logits)
