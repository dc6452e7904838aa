"""A small decoder-only Transformer language model: next-token logits ``(B, L, V)``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.models.checks import check_positive

Positions = Literal["learned", "rotary"]
POSITIONS: tuple[Positions, ...] = ("learned", "rotary")


class CausalLM(nn.Module):
    """Decoder-only Transformer (GPT-2 style, pre-LN) that predicts the next token at every position.

    Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019): token
    embeddings plus positions, ``n_layers`` pre-LN blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))``,
    a final LayerNorm and a linear head, weights initialised from ``N(0, 0.02)`` with the residual
    projections scaled by ``1 / √(2·n_layers)``. Attention is
    :func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True`` (flash or
    memory-efficient kernels where the device has them). Positions are ``"learned"`` (an embedding
    of ``max_len`` rows, as GPT-2) or ``"rotary"`` (RoPE, Su et al., "RoFormer", 2021, rotating
    the queries and keys of every head). ``tie_embeddings`` shares the head's weight with the
    token embedding (Press & Wolf 2017).

    ``attention_mask`` (``(B, L)``, 1 or True at real tokens, 0 at padding, as Hugging Face models
    take it) hides padded keys from every query, and positions count real tokens only
    (``cumsum(mask) − 1``), so a left- or right-padded sequence gives, at its real tokens, the
    logits of the same sequence unpadded; the logits at padded positions are finite but
    meaningless (label them ``-100``). Without a mask, or with one that is all ones, attention
    takes the ``is_causal`` fast path (checking the mask costs one host synchronisation).
    The inputs may also come as one mapping, ``{"input_ids": ..., "attention_mask": ...}``: the
    model inputs of a Hugging Face batch, as :class:`~kd_lightning.BatchAdapter` passes them.

    Submodules, for :class:`~kd_lightning.models.taps.FeatureTaps` (feature hints, a learned
    gate): ``embedding``, ``position`` (learned positions only), ``blocks.{i}`` (each block's
    output, ``(B, L, d_model)``), ``blocks.{i}.attention``, ``blocks.{i}.mlp``, ``final_norm``
    (the features the head reads) and ``head``.

    Args:
        vocab_size: Number of token ids ``V``.
        d_model: Width of the residual stream.
        n_layers: Number of blocks.
        n_heads: Attention heads; must divide ``d_model`` (into an even head width for rotary
            positions).
        max_len: Longest sequence accepted.
        dropout: Dropout on the embeddings, the attention weights and each residual branch.
        mlp_ratio: Width of the feed-forward layer, in multiples of ``d_model``.
        positions: ``"learned"`` or ``"rotary"``.
        tie_embeddings: Share the head's weight with the token embedding.
        rotary_base: The base ``θ`` of the rotary frequencies ``θ^(−2i/d)``.

    Examples:
        >>> model = CausalLM(vocab_size=11, d_model=16, n_layers=2, n_heads=2, max_len=8)
        >>> tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> logits = model(tokens)
        >>> logits.shape
        torch.Size([2, 4, 11])
        >>> edited = tokens.clone()
        >>> edited[:, 2] = 9  # changing token 2 leaves the logits at tokens 0 and 1 as they were
        >>> torch.allclose(model(edited)[:, :2], logits[:, :2], atol=1e-6)
        True
        >>> padded = torch.tensor([[0, 0, 1, 2, 3, 4]])  # left padding, hidden by the mask
        >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
        >>> torch.allclose(model(padded, mask)[:, 2:], logits[:1], atol=1e-5)
        True
        >>> batch_inputs = {"input_ids": padded, "attention_mask": mask}  # as BatchAdapter gives
        >>> torch.equal(model(batch_inputs), model(padded, mask))
        True
    """

    inverse_frequencies: Tensor

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 256,
        dropout: float = 0.0,
        mlp_ratio: int = 4,
        positions: Positions = "learned",
        tie_embeddings: bool = True,
        rotary_base: float = 10000.0,
    ) -> None:
        super().__init__()
        check_positive(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            max_len=max_len,
            mlp_ratio=mlp_ratio,
        )
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if positions == "rotary" and (d_model // n_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head width, got d_model // n_heads = "
                f"{d_model // n_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if not rotary_base > 1.0:
            raise ValueError(f"rotary_base must be > 1, got {rotary_base}")
        self.vocab_size, self.max_len, self.positions = vocab_size, max_len, positions
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model) if positions == "learned" else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, n_heads, dropout, mlp_ratio) for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        head_dim = d_model // n_heads
        inverse_frequencies = rotary_base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inverse_frequencies", inverse_frequencies, persistent=False)
        self.apply(_init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith(("attention.proj.weight", "mlp.2.weight")):  # residual projections
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * n_layers))
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    def forward(
        self, input_ids: Tensor | Mapping[str, Tensor], attention_mask: Tensor | None = None
    ) -> Tensor:
        """Next-token logits ``(B, L, V)`` for token ids ``(B, L)``.

        Args:
            input_ids: Integer token ids ``(B, L)``, ``L ≤ max_len``; or the model inputs of a
                Hugging Face batch as one mapping, ``{"input_ids": ..., "attention_mask": ...}``
                (the mask optional), as :class:`~kd_lightning.BatchAdapter` gives them.
            attention_mask: ``(B, L)``, nonzero at real tokens and zero at padding; ``None``
                treats every token as real.
        """
        if isinstance(input_ids, Mapping):
            input_ids, attention_mask = self._read_inputs(input_ids, attention_mask)
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.ndim != 2
            or input_ids.is_floating_point()
            or input_ids.shape[1] > self.max_len
        ):
            raise ValueError(
                f"CausalLM expects integer input_ids of shape (B, L ≤ {self.max_len}), got "
                f"{_describe(input_ids)}"
            )
        batch, length = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
        if mask is None:
            positions = torch.arange(length, device=input_ids.device).expand(batch, length)
            allowed = None
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
            causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
            # Real keys before the query, and the query itself (so a padded query, which has no
            # real key before it, still attends to something and its row stays finite).
            eye = torch.eye(length, dtype=torch.bool, device=mask.device)
            allowed = ((causal & mask[:, None, :]) | eye).unsqueeze(1)  # (B, 1, L, L)
        hidden = self.embedding(input_ids)
        rotary = None
        if self.position is not None:
            hidden = hidden + self.position(positions)
        else:
            angles = positions.unsqueeze(-1).float() * self.inverse_frequencies
            angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, L, head_dim)
            rotary = (angles.cos().to(hidden.dtype), angles.sin().to(hidden.dtype))
        hidden = self.dropout(hidden)
        for block in self.blocks:
            hidden = block(hidden, rotary, allowed)
        return self.head(self.final_norm(hidden))

    @staticmethod
    def _read_inputs(
        inputs: Mapping[str, Tensor], attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """``input_ids`` and ``attention_mask`` of a mapping of model inputs."""
        if "input_ids" not in inputs:
            raise ValueError(f"CausalLM reads token ids from 'input_ids', got {sorted(inputs)}")
        unknown = sorted(set(inputs) - {"input_ids", "attention_mask"})
        if unknown:
            raise ValueError(
                f"CausalLM reads the inputs 'input_ids' and 'attention_mask' (optional), got "
                f"{sorted(inputs)}: leave {unknown} out, e.g. with "
                f"BatchAdapter(input_key=('input_ids', 'attention_mask'), target_key='labels')"
            )
        if attention_mask is not None and "attention_mask" in inputs:
            raise ValueError(
                "CausalLM got an attention_mask both in its inputs and as an argument: pass one"
            )
        return inputs["input_ids"], inputs.get("attention_mask", attention_mask)


class DecoderBlock(nn.Module):
    """One pre-LN block: ``x + attention(LN(x))``, then ``x + mlp(LN(x))``.

    Examples:
        >>> block = DecoderBlock(d_model=8, n_heads=2)
        >>> block(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hidden: Tensor,
        rotary: tuple[Tensor, Tensor] | None = None,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """``hidden`` ``(B, L, d_model)``; ``rotary`` the ``(cos, sin)`` of rotary positions;
        ``allowed`` a boolean ``(B, 1, L, L)`` attention mask, ``None`` for plain causal."""
        hidden = hidden + self.dropout(self.attention(self.norm1(hidden), rotary, allowed))
        return hidden + self.dropout(self.mlp(self.norm2(hidden)))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``.

    Examples:
        >>> attention = CausalSelfAttention(d_model=8, n_heads=2)
        >>> attention(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attention_dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        hidden: Tensor,
        rotary: tuple[Tensor, Tensor] | None = None,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """Attend each position to itself and the positions before it (those ``allowed``)."""
        batch, length, width = hidden.shape
        query, key, value = (
            part.view(batch, length, self.n_heads, -1).transpose(1, 2)
            for part in self.qkv(hidden).split(width, dim=-1)
        )
        if rotary is not None:
            query, key = _rotate(query, *rotary), _rotate(key, *rotary)
        dropout = self.attention_dropout if self.training else 0.0
        if allowed is None:
            out = F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, is_causal=True
            )
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed, dropout_p=dropout
            )
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the half-split layout (GPT-NeoX): pairs ``(x_i, x_{i + d/2})``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} of dtype {value.dtype}"
    return type(value).__name__


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
