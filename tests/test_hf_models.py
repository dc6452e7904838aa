"""Hugging Face causal LMs (GPT-2, Llama), built from configs, as teachers and students."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kd_lightning import DistillationModule
from kd_lightning.data import TextDataModule
from kd_lightning.models import CausalLM, HuggingFaceLM
from kd_lightning.models.taps import FeatureTaps

from .conftest import make_trainer

transformers = pytest.importorskip("transformers")

VOCAB = 258  # the byte tokenizer's


def gpt2(seed: int = 0, vocab_size: int = VOCAB) -> HuggingFaceLM:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        bos_token_id=256,
        eos_token_id=256,
    )
    return HuggingFaceLM(transformers.GPT2LMHeadModel(config))


def llama(seed: int = 0, vocab_size: int = VOCAB) -> HuggingFaceLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return HuggingFaceLM(transformers.LlamaForCausalLM(config))


BUILDERS = {"gpt2": gpt2, "llama": llama}


def text_data(tmp_path: Path) -> TextDataModule:
    """A tiny corpus written to ``tmp_path``, byte tokens, blocks of 16."""
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for i in range(12):
        body = "".join(f"def f{j}(x):\n    return x * {i + j}\n" for j in range(i % 4 + 2))
        (root / f"module_{i}.py").write_text(body)
    return TextDataModule(
        paths=root,
        block_size=16,
        batch_size=4,
        val_fraction=0.25,
        test_fraction=0.0,
        cache_dir=tmp_path / "tokens",
    )


@pytest.mark.parametrize("kind", BUILDERS)
def test_the_wrapper_gives_the_models_own_logits(kind):
    lm = BUILDERS[kind]().eval()
    tokens = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(tokens)
    expected = lm.model(input_ids=tokens).logits
    assert lm.vocab_size == VOCAB
    assert torch.equal(lm(tokens), expected)
    torch.testing.assert_close(lm({"input_ids": tokens, "attention_mask": mask}), expected)
    positions = torch.arange(7).expand(2, 7)
    given = lm({"input_ids": tokens, "position_ids": positions})
    torch.testing.assert_close(given, lm.model(input_ids=tokens, position_ids=positions).logits)


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_gives_the_unpadded_logits_at_real_tokens(kind, side):
    lm = BUILDERS[kind]().eval()
    short, long = torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 7))
    pad = torch.full((1, 3), 257)
    padded_short = torch.cat([pad, short] if side == "left" else [short, pad], dim=1)
    batch = {
        "input_ids": torch.cat([padded_short, long]),
        "attention_mask": torch.cat([padded_short != 257, torch.ones_like(long)]).long(),
    }
    logits = lm(batch)
    assert torch.isfinite(logits).all()
    real = slice(3, None) if side == "left" else slice(0, 4)
    torch.testing.assert_close(logits[0, real], lm(short)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1], lm(long)[0], atol=1e-5, rtol=1e-4)


def test_bad_inputs_and_outputs_are_named():
    lm = gpt2()
    with pytest.raises(ValueError, match=r"holding 'input_ids'; got \['tokens'\]"):
        lm({"tokens": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"GPT2Model returned .* without logits"):
        HuggingFaceLM(lm.model.transformer)(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="wraps a torch module, got str"):
        HuggingFaceLM("gpt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'gpt-5' is not a transformers model type"):
        HuggingFaceLM.from_config("gpt-5")


def test_layers_are_tapped_under_model():
    lm = gpt2()
    with FeatureTaps(lm, ["model.transformer.h.0", "model.transformer"]) as taps:
        lm(torch.zeros(2, 5, dtype=torch.long))
    assert taps["model.transformer.h.0"].shape == (2, 5, 16)
    assert taps["model.transformer"].shape == (2, 5, 16)  # a ModelOutput: its last_hidden_state


def test_hydra_builds_models_from_config_keywords():
    lm = instantiate(
        {
            "_target_": "kd_lightning.models.HuggingFaceLM.from_config",
            "model_type": "gpt2",
            "vocab_size": VOCAB,
            "n_embd": 16,
            "n_layer": 1,
            "n_head": 2,
        }
    )
    assert isinstance(lm.model, transformers.GPT2LMHeadModel) and lm.vocab_size == VOCAB
    assert lm.model.config.bos_token_id is None  # GPT-2's 50256 lies outside the vocabulary
    nested = instantiate(
        {
            "_target_": "kd_lightning.models.HuggingFaceLM",
            "model": {
                "_target_": "transformers.LlamaForCausalLM",
                "config": {
                    "_target_": "transformers.LlamaConfig",
                    "vocab_size": VOCAB,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                },
            },
        }
    )
    assert isinstance(nested.model, transformers.LlamaForCausalLM)


def test_the_core_imports_without_transformers_and_from_config_names_the_extra():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None
        import kd_lightning, kd_lightning.models, kd_lightning.teachers
        from kd_lightning.models import HuggingFaceLM
        try:
            HuggingFaceLM.from_config("gpt2")
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "pip install 'kd-lightning[hf]'" in result.stdout


@pytest.mark.parametrize("student_kind", BUILDERS)
def test_hf_teachers_and_student_distil_on_text_batches(tmp_path, student_kind):
    dm = text_data(tmp_path)
    student = BUILDERS[student_kind](seed=5)
    before = [parameter.clone() for parameter in student.parameters()]
    module = DistillationModule(student, {"gpt2": gpt2(1), "llama": llama(2)})
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["train/loss_epoch"]) and math.isfinite(metrics["val/kd"])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_a_teacher_of_another_vocabulary_is_named_with_both_sizes():
    tokens = torch.randint(0, 256, (2, 6))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    student = CausalLM(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_len=8)
    module = DistillationModule(student, {"gpt2": gpt2(vocab_size=300)})
    with pytest.raises(
        ValueError,
        match=r"teacher 'gpt2' has a vocabulary of 300 tokens but the student \(CausalLM\) has "
        r"258: cross-tokenizer distillation is not supported yet",
    ):
        module.validation_step(batch, 0)
