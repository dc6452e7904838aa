"""Hugging Face causal language models as teachers and students: model inputs → logits ``(B, L, V)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

#: The config entries of special token ids that :meth:`HuggingFaceLM.from_config` keeps inside
#: the vocabulary.
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class HuggingFaceLM(nn.Module):
    """A Hugging Face causal LM that takes what the library's language models take and returns
    its next-token logits ``(B, L, V)``.

    The input is token ids ``(B, L)`` or the model inputs of a batch as one mapping
    (``{"input_ids": ..., "attention_mask": ...}``, with ``position_ids`` or ``token_type_ids``
    when the batch has them), as :class:`~kd_lightning.BatchAdapter` gives them; the output is
    the model's ``.logits``, computed without a key-value cache (``use_cache=False``). Given an
    ``attention_mask`` and no ``position_ids``, positions count real tokens only
    (``cumsum(mask) − 1``, as :class:`~kd_lightning.models.CausalLM` numbers them), so that a
    left-padded sequence gives, at its real tokens, the logits of the same sequence unpadded (a
    Hugging Face model numbers positions ``0 … L − 1`` whatever the mask, which moves GPT-2's
    learned positions under left padding). Labels stay outside: the library's losses read
    labels already shifted.

    Its layers are the model's, under ``model.``: e.g. ``model.transformer.h.0`` (GPT-2) or
    ``model.model.layers.0`` (Llama) for :class:`~kd_lightning.models.taps.FeatureTaps`.

    Args:
        model: a ``transformers`` causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, any
            ``…ForCausalLM``) or anything called with keyword model inputs that returns an
            output with ``.logits``.

    Attributes:
        vocab_size: the model's ``config.vocab_size``, its output width (``None`` without a
            config).

    Examples:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> config = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=8,
        ...                     bos_token_id=0, eos_token_id=0)
        >>> lm = HuggingFaceLM(GPT2LMHeadModel(config)).eval()
        >>> tokens = torch.tensor([[5, 6, 7]])
        >>> lm(tokens).shape, lm.vocab_size
        (torch.Size([1, 3, 40]), 40)
        >>> left_padded = {"input_ids": torch.tensor([[0, 5, 6, 7]]),
        ...                "attention_mask": torch.tensor([[0, 1, 1, 1]])}
        >>> torch.allclose(lm(left_padded)[:, 1:], lm(tokens), atol=1e-5)
        True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"HuggingFaceLM wraps a torch module, got {type(model).__name__}")
        self.model = model
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.vocab_size = None if vocab_size is None else int(vocab_size)

    @classmethod
    def from_config(cls, model_type: str, **config: Any) -> HuggingFaceLM:
        """A freshly initialised causal LM of ``model_type`` (``"gpt2"``, ``"llama"``,
        ``"qwen2"``, …) built from config keywords: ``transformers.AutoConfig.for_model`` and
        ``AutoModelForCausalLM.from_config``, so nothing is downloaded. A Hydra node builds one
        with ``_target_: kd_lightning.models.HuggingFaceLM.from_config``.

        The model type's default special token ids (``bos_token_id``, ``eos_token_id``,
        ``pad_token_id``) that fall outside a given ``vocab_size``, such as GPT-2's 50256, are
        cleared unless given: the library's losses read no special token, and the data bring
        their own.

        Examples:
            >>> lm = HuggingFaceLM.from_config(
            ...     "llama", vocab_size=40, hidden_size=16, intermediate_size=32,
            ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            ...     max_position_embeddings=8,
            ... )
            >>> type(lm.model).__name__, lm.vocab_size
            ('LlamaForCausalLM', 40)
        """
        try:
            from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
        except ImportError as error:
            raise ImportError(
                "HuggingFaceLM.from_config needs transformers: pip install 'kd-lightning[hf]'"
            ) from error
        if model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"model_type {model_type!r} is not a transformers model type (e.g. 'gpt2', "
                f"'llama', 'qwen2', 'mistral')"
            )
        vocab_size = config.get("vocab_size")
        if vocab_size is not None:
            defaults = CONFIG_MAPPING[model_type]()
            for key in SPECIAL_TOKEN_IDS:
                value = getattr(defaults, key, None)
                if key not in config and isinstance(value, int) and value >= vocab_size:
                    config[key] = None
        return cls(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)))

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The logits ``(B, L, V)`` for token ids or a mapping of model inputs."""
        if isinstance(inputs, Tensor):
            fields = {"input_ids": inputs}
        elif isinstance(inputs, Mapping) and "input_ids" in inputs:
            fields = dict(inputs)
        else:
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(
                f"HuggingFaceLM reads token ids, or a mapping of model inputs holding "
                f"'input_ids'; got {got}"
            )
        mask = fields.get("attention_mask")
        if mask is not None and "position_ids" not in fields:
            fields["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        output = self.model(**fields, use_cache=False)
        logits = getattr(output, "logits", None)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"{type(self.model).__name__} returned {type(output).__name__} without logits: "
                f"wrap a causal LM with its head (GPT2LMHeadModel, LlamaForCausalLM, …ForCausalLM)"
            )
        return logits

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}"
