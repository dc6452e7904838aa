"""The decoder-only CausalLM: shapes, causality, padding masks, taps and training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.models.causal_lm import CausalLM, Positions
from kd_lightning.models.taps import FeatureTaps

VOCAB = 37


def model(positions: Positions = "learned", **overrides: Any) -> CausalLM:
    options: dict[str, Any] = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=24)
    options.update(overrides)
    return CausalLM(positions=positions, **options).eval()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_shapes_and_dtypes(positions):
    lm = model(positions)
    logits = lm(torch.randint(0, VOCAB, (3, 17)))
    assert logits.shape == (3, 17, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_changing_token_t_changes_no_logit_before_t(positions):
    lm = model(positions)
    tokens = torch.randint(0, VOCAB, (2, 20))
    logits = lm(tokens)
    for t in (0, 7, 19):
        edited = tokens.clone()
        edited[:, t] = (edited[:, t] + 1) % VOCAB
        changed = lm(edited)
        torch.testing.assert_close(changed[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert (changed[:, t] - logits[:, t]).abs().amax() > 1e-4


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_gradients_do_not_flow_backwards_in_time(positions):
    lm = model(positions)
    tokens = torch.randint(0, VOCAB, (1, 12))
    embedded = lm.embedding(tokens).detach().requires_grad_(True)
    hook = lm.embedding.register_forward_hook(lambda *_: embedded)
    try:
        lm(tokens)[0, 5].sum().backward()
    finally:
        hook.remove()
    assert embedded.grad is not None
    assert embedded.grad[0, 6:].abs().amax() == 0
    assert embedded.grad[0, :6].abs().amax(-1).gt(0).all()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_sequences_give_the_logits_of_the_unpadded_ones(positions, side):
    lm = model(positions)
    real = torch.randint(0, VOCAB, (1, 9))
    alone = lm(real)
    pads = torch.randint(0, VOCAB, (1, 5))  # arbitrary garbage at the padded positions
    ones, zeros = torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    if side == "left":
        tokens, mask, where = torch.cat([pads, real], 1), torch.cat([zeros, ones], 1), slice(5, 14)
    else:
        tokens, mask, where = torch.cat([real, pads], 1), torch.cat([ones, zeros], 1), slice(0, 9)
    padded = lm(tokens, attention_mask=mask)
    torch.testing.assert_close(padded[:, where], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()
    garbage = tokens.clone()
    garbage[mask == 0] = (garbage[mask == 0] + 3) % VOCAB
    torch.testing.assert_close(lm(garbage, mask)[:, where], padded[:, where], rtol=0, atol=1e-6)


def test_a_batch_with_mixed_padding_matches_each_sequence_alone():
    lm = model("rotary")
    first, second = torch.randint(0, VOCAB, (1, 6)), torch.randint(0, VOCAB, (1, 10))
    tokens = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), first[0]]), second[0]])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    logits = lm(tokens, mask)
    torch.testing.assert_close(logits[:1, 4:], lm(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1:], lm(second), rtol=1e-5, atol=1e-5)


def test_an_all_ones_mask_is_the_unmasked_model():
    lm = model()
    tokens = torch.randint(0, VOCAB, (2, 11))
    torch.testing.assert_close(lm(tokens, torch.ones_like(tokens)), lm(tokens), rtol=0, atol=0)


def test_tied_and_untied_embeddings():
    tied, untied = model(tie_embeddings=True), model(tie_embeddings=False)
    assert tied.head.weight is tied.embedding.weight
    assert untied.head.weight is not untied.embedding.weight
    assert (
        sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
        == VOCAB * 32
    )


def test_named_layers_can_be_tapped():
    lm = model(n_layers=3)
    layers = ["blocks.0", "blocks.2", "blocks.1.attention", "final_norm"]
    with FeatureTaps(lm, layers) as taps:
        logits = lm(torch.randint(0, VOCAB, (2, 7)))
    assert all(taps[name].shape == (2, 7, 32) for name in layers)
    torch.testing.assert_close(lm.head(taps["final_norm"]), logits)


def test_a_few_steps_learn_a_repeating_sequence():
    torch.manual_seed(0)
    lm = CausalLM(vocab_size=8, d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.1)
    tokens = torch.arange(16).remainder(8).unsqueeze(0).repeat(2, 1)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = lm(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 8), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    lm.eval()
    torch.testing.assert_close(lm(tokens), lm(tokens), rtol=0, atol=0)  # no dropout in eval


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_heads=5), "n_heads=5 must divide d_model=32"),
        (dict(positions="alibi"), "positions must be one of"),
        (dict(positions="rotary", d_model=12, n_heads=4), "even head width"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_arguments_are_named(overrides, message):
    options: dict[str, Any] = dict(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, max_len=8)
    options.update(overrides)
    with pytest.raises(ValueError, match=message):
        CausalLM(**options)


def test_bad_inputs_are_refused():
    lm = model()
    with pytest.raises(ValueError, match="L ≤ 24"):
        lm(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="integer input_ids"):
        lm(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask of shape"):
        lm(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5))
