"""A tiny Transformer encoder that classifies every token: logits ``(B, L, num_classes)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.models.checks import check_positive


class TinyTransformerTagger(nn.Module):
    """Token-level classifier: embedding + learned positions, a Transformer encoder, a linear head.

    Tokens equal to ``pad_id`` are hidden from attention (the encoder's key padding mask), so the
    logits at real tokens do not depend on what the padded positions hold; the logits at padded
    positions are computed but meaningless (give them label ``-100`` for
    :class:`~kd_lightning.DistillationLoss`). The encoder is ``torch.nn.TransformerEncoder`` with
    post-norm layers, GELU, a feed-forward width of ``2 * d_model`` and no dropout. Submodules, for
    feature hooks: ``embedding``, ``position``, ``encoder`` and ``head``.

    Args:
        vocab_size: Number of token ids, ``pad_id`` included.
        num_classes: Number of logits per token.
        d_model: Width of the embeddings and of the encoder.
        nhead: Attention heads; must divide ``d_model``.
        num_layers: Encoder layers.
        max_len: Longest sequence accepted.
        pad_id: The padding token.

    Examples:
        >>> model = TinyTransformerTagger(vocab_size=10, num_classes=5)
        >>> tokens = torch.tensor([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])  # 0 pads the first sequence
        >>> model(tokens).shape
        torch.Size([2, 5, 5])
        >>> garbage = torch.tensor([[3, 4, 5, 7, 9]])  # the same real tokens, padding overwritten
        >>> mask = torch.tensor([[False, False, False, True, True]])
        >>> torch.allclose(model(tokens[:1])[:, :3], model(garbage, padding_mask=mask)[:, :3])
        True
    """

    def __init__(
        self,
        vocab_size: int = 32,
        num_classes: int = 32,
        d_model: int = 32,
        nhead: int = 4,
        num_layers: int = 1,
        max_len: int = 64,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        check_positive(
            vocab_size=vocab_size,
            num_classes=num_classes,
            d_model=d_model,
            nhead=nhead,
            num_layers=num_layers,
            max_len=max_len,
        )
        if d_model % nhead:
            raise ValueError(f"nhead={nhead} must divide d_model={d_model}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must lie in [0, {vocab_size}), got {pad_id}")
        self.vocab_size, self.max_len, self.pad_id = vocab_size, max_len, pad_id
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward=2 * d_model,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Map token ids ``(B, L)`` to logits ``(B, L, num_classes)``.

        Args:
            tokens: Integer token ids ``(B, L)``, ``L ≤ max_len``.
            padding_mask: Boolean ``(B, L)``, true at padding; defaults to ``tokens == pad_id``.
        """
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[1] > self.max_len:
            raise ValueError(
                f"TinyTransformerTagger expects integer tokens of shape (B, L ≤ {self.max_len}), "
                f"got {tuple(tokens.shape)} of dtype {tokens.dtype}"
            )
        if padding_mask is None:
            padding_mask = tokens == self.pad_id
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.embedding(tokens) + self.position(positions)
        hidden = self.encoder(hidden, src_key_padding_mask=padding_mask.bool())
        return self.head(hidden)
