"""Language-model batches as Hugging Face users have them: dict batches unpacked by default, the
attention mask carried to every model, LM training with ClassifierModule, and the mistakes
(unshifted labels, unmasked padding) refused before they train."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning import BatchAdapter, DistillationModule
from kd_lightning.batch import MODEL_INPUT_KEYS, not_shifted, unmasked_padding
from kd_lightning.data import TextDataModule
from kd_lightning.errors import BatchFormatError
from kd_lightning.models import CausalLM
from kd_lightning.modules import ClassifierModule
from kd_lightning.teachers import DrawnTeachers, TeacherEnsemble
from kd_lightning.teachers.sharded import ShardedTeachers

from .conftest import make_trainer

VOCAB = 258  # the byte tokenizer's 256 bytes and its two special tokens


def lm(seed: int = 0, vocab_size: int = VOCAB, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    options = dict(d_model=16, n_layers=1, n_heads=2, max_len=32)
    options.update(overrides)
    return CausalLM(vocab_size=vocab_size, **options)


def text_data(tmp_path: Path, **overrides) -> TextDataModule:
    """A tiny corpus of Python-like files, byte tokens, blocks of 16."""
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for i in range(12):
        body = "".join(f"def f{j}(x):\n    return x * {i + j}\n" for j in range(i % 4 + 2))
        (root / f"module_{i}.py").write_text(body)
    options = dict(
        paths=root,
        block_size=16,
        batch_size=4,
        val_fraction=0.25,
        test_fraction=0.0,
        cache_dir=tmp_path / "tokens",
    )
    options.update(overrides)
    return TextDataModule(**options)


def padded_batch() -> dict[str, Tensor]:
    """Two right-padded rows (pad token 0), labels shifted, -100 where no real token follows."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    attention_mask = (torch.arange(6) < torch.tensor([[6], [3]])).long()
    labels = torch.tensor([[6, 7, 8, 9, 10, -100], [12, 13, -100, -100, -100, -100]])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# The default batch adapter --------------------------------------------------------------------


def test_a_hugging_face_batch_gives_its_model_inputs_as_one_dict_and_its_labels():
    batch = {**padded_batch(), "index": torch.tensor([3, 4])}
    inputs, labels = BatchAdapter()(batch)
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert inputs["input_ids"] is batch["input_ids"]
    assert inputs["attention_mask"] is batch["attention_mask"]
    assert labels is batch["labels"]
    unmasked = {key: batch[key] for key in ("input_ids", "labels")}
    unmasked["labels"] = unmasked["labels"][:1]
    unmasked["input_ids"] = unmasked["input_ids"][:1]
    inputs, _ = BatchAdapter()(unmasked)
    assert list(inputs) == ["input_ids"]  # the mask only when the batch has one


def test_every_hugging_face_model_input_is_passed_and_nothing_else():
    batch = {key: torch.zeros(1, 3, dtype=torch.long) for key in MODEL_INPUT_KEYS}
    batch.update(labels=torch.tensor([[1, 2, -100]]), special_tokens_mask=batch["input_ids"])
    inputs, _ = BatchAdapter()(batch)
    assert list(inputs) == list(MODEL_INPUT_KEYS)


def test_tuples_input_target_dicts_and_explicit_keys_are_read_as_before():
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    assert BatchAdapter()((x, y, "index")) == (x, y)
    assert BatchAdapter()({"input": x, "target": y, "index": 0}) == (x, y)
    batch = padded_batch()
    inputs, labels = BatchAdapter("input_ids", "labels")(batch)
    assert inputs is batch["input_ids"] and labels is batch["labels"]
    inputs, _ = BatchAdapter(("input_ids", "attention_mask"), "labels")(
        {**batch, "position_ids": batch["input_ids"]}
    )
    assert list(inputs) == ["input_ids", "attention_mask"]


def test_a_batch_following_no_convention_is_refused_naming_its_keys():
    with pytest.raises(BatchFormatError, match=r"has keys \['input_ids'\] but no \['labels'\]"):
        BatchAdapter()({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(BatchFormatError, match=r"but no \['input', 'target'\]"):
        BatchAdapter()({"x": 1, "y": 2})
    with pytest.raises(BatchFormatError, match="'input_ids' and 'labels'"):
        BatchAdapter()(torch.zeros(3))
    with pytest.raises(ValueError, match="input_key must be a key or a non-empty sequence"):
        BatchAdapter(input_key=())


# Mistakes refused before they train ----------------------------------------------------------


def test_labels_equal_to_input_ids_are_refused_with_how_to_shift_them():
    batch = padded_batch()
    unshifted = {
        **batch,
        "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100),
    }
    with pytest.raises(BatchFormatError) as error:
        BatchAdapter()(unshifted)
    assert str(error.value) == (
        "batch['labels'] equals batch['input_ids'] at every real position: the labels are not "
        "shifted. Hugging Face models shift labels inside; here labels[:, t] must be the next "
        "token, labels[:, t] = input_ids[:, t + 1], and the last position -100"
    )
    with pytest.raises(BatchFormatError, match="not shifted"):  # explicit keys are checked too
        BatchAdapter("input_ids", "labels")(unshifted)
    with pytest.raises(BatchFormatError, match="not shifted"):  # so is every CPU batch
        adapter = BatchAdapter()
        adapter(batch)
        adapter(unshifted)


def test_runs_of_one_token_and_shifted_labels_are_not_taken_for_unshifted_ones():
    run = torch.full((2, 6), 32)  # a run of spaces: shifted labels equal the tokens
    assert not not_shifted(run, torch.cat([run[:, 1:], torch.full((2, 1), -100)], 1))
    batch = padded_batch()
    assert not not_shifted(batch["input_ids"], batch["labels"])
    BatchAdapter()(batch)


def test_padding_without_an_attention_mask_is_refused_naming_the_key():
    batch = padded_batch()
    unmasked = {key: batch[key] for key in ("input_ids", "labels")}
    with pytest.raises(BatchFormatError) as error:
        BatchAdapter()(unmasked)
    assert str(error.value) == (
        "the batch is padded (rows whose batch['labels'] start or end in -100 over one repeated "
        "token) but has no 'attention_mask': every token would attend to the padding. Add "
        "batch['attention_mask'] (1 at real tokens, 0 at padding), as Hugging Face tokenizers "
        "and collators give it"
    )
    left = {  # left padding, the last pad labelled with the first real token
        "input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13]]),
        "labels": torch.tensor([[6, 7, 8, 9, 10, -100], [-100, -100, 11, 12, 13, -100]]),
    }
    with pytest.raises(BatchFormatError, match="has no 'attention_mask'"):
        BatchAdapter()(left)
    BatchAdapter()({**left, "attention_mask": (left["input_ids"] != 0).long()})


@pytest.mark.parametrize(
    ("input_ids", "labels"),
    [
        # a packed block: every position labelled
        ([[1, 2, 3, 4, 5, 6]], [[2, 3, 4, 5, 6, 7]]),
        # a masked prompt of real text at the start, then the answer
        ([[9, 9, 4, 9, 5, 6]], [[-100, -100, -100, 5, 6, 7]]),
        # a prompt masked at the end of a packed block, over repeated tokens also labelled
        ([[4, 32, 5, 32, 32, 32]], [[32, 5, 32, -100, -100, -100]]),
        # one padded position only
        ([[4, 5, 6, 0]], [[5, 6, -100, -100]]),
    ],
)
def test_packed_blocks_and_masked_prompts_are_not_taken_for_padding(input_ids, labels):
    batch = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
    assert not unmasked_padding(batch["input_ids"], batch["labels"])
    BatchAdapter()(batch)


def test_teachers_of_another_vocabulary_are_refused_naming_them_and_both_sizes():
    batch = padded_batch()
    module = DistillationModule(lm(0), {"a": lm(1, vocab_size=300), "b": lm(2, vocab_size=300)})
    with pytest.raises(
        ValueError,
        match=r"teachers \['a', 'b'\] have a vocabulary of 300 tokens but the student "
        r"\(CausalLM\) has 258: cross-tokenizer distillation is not supported yet",
    ):
        module.validation_step(batch, 0)
    mixed = DistillationModule(lm(0), {"a": lm(1), "b": lm(2, vocab_size=300)})
    with pytest.raises(ValueError, match=r"'a' gives .* 'b' gives .* cross-tokenizer distillation"):
        mixed.validation_step(batch, 0)


# The models take the mapping ------------------------------------------------------------------


def test_causal_lm_takes_the_mapping_as_its_tensors():
    model = lm().eval()
    batch = padded_batch()
    inputs, _ = BatchAdapter()(batch)
    assert torch.equal(model(inputs), model(batch["input_ids"], batch["attention_mask"]))
    assert torch.equal(model({"input_ids": batch["input_ids"]}), model(batch["input_ids"]))
    with pytest.raises(ValueError, match=r"leave \['position_ids'\] out"):
        model({"input_ids": batch["input_ids"], "position_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="both in its inputs and as an argument"):
        model(inputs, batch["attention_mask"])
    with pytest.raises(ValueError, match="integer input_ids of shape"):
        model({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"token ids from 'input_ids', got \['tokens'\]"):
        model({"tokens": batch["input_ids"]})


class Recorder(nn.Module):
    """A causal LM that keeps the inputs it was given."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.inner = lm(seed)
        self.seen: list[object] = []

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        self.seen.append(inputs)
        return self.inner(inputs)


def test_the_attention_mask_reaches_student_and_teachers_in_a_distillation_step():
    student, teacher = Recorder(0), Recorder(1)
    module = DistillationModule(student, {"a": teacher})
    batch = padded_batch()
    step = module.validation_step(batch, 0)
    for model in (student, teacher):
        (seen,) = model.seen
        assert isinstance(seen, dict) and seen["attention_mask"] is batch["attention_mask"]
    assert step["teacher_logits"].shape == (1, 2, 6, VOCAB)
    assert step["mask"].tolist() == (batch["labels"] != -100).tolist()


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of SDPA on a CPU
def test_ensemble_options_run_teachers_on_mapping_inputs():
    batch = padded_batch()
    inputs, _ = BatchAdapter()(batch)
    teachers = {"a": lm(1), "b": lm(2)}
    expected = torch.stack([model.eval()(inputs) for model in teachers.values()])
    for options in ({}, {"offload": True}, {"stacked": True}, {"inference_mode": True}):
        ensemble = TeacherEnsemble(teachers, **options)
        torch.testing.assert_close(ensemble(inputs), expected, msg=str(options))
    drawn = DrawnTeachers(TeacherEnsemble(teachers), per_step=1)
    outputs = drawn.outputs(inputs, batch, "train")
    torch.testing.assert_close(outputs.logits[0], expected[outputs.ran[0]])


def test_an_input_transform_that_cannot_take_the_mapping_is_named():
    ensemble = TeacherEnsemble({"a": lm(1)}, input_transforms={"a": lambda x: x.flip(-1)})
    inputs, _ = BatchAdapter()(padded_batch())
    with pytest.raises(TypeError, match=r"input_transforms\['a'\] failed on mapping inputs"):
        ensemble(inputs)


# ClassifierModule trains language models ------------------------------------------------------


def test_classifier_loss_and_accuracy_count_real_tokens_only():
    model = lm().eval()
    module = ClassifierModule(model)
    batch = padded_batch()
    loss = module.validation_step(batch, 0)
    logits = model(batch["input_ids"], batch["attention_mask"])
    real = batch["labels"] != -100
    expected = F.cross_entropy(logits[real], batch["labels"][real])
    torch.testing.assert_close(loss, expected)
    hits = (logits.argmax(-1) == batch["labels"])[real].float()
    means = module.epoch_means("val")
    torch.testing.assert_close(means["acc"], hits.mean())
    # A second batch of one real token: accuracy is weighted by real tokens, loss by batch size.
    single = {key: value[1:].clone() for key, value in batch.items()}
    single["labels"][0, 1:] = -100
    second = module.validation_step(single, 0)
    single_logits = model(single["input_ids"], single["attention_mask"])
    hit = float(single_logits[0, 0].argmax() == single["labels"][0, 0])
    means = module.epoch_means("val")
    torch.testing.assert_close(means["acc"], (hits.sum() + hit) / (real.sum() + 1))
    torch.testing.assert_close(means["loss"], (2 * loss + second) / 3)


def test_classifier_a_batch_without_labelled_tokens_has_zero_loss_not_nan():
    batch = padded_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = ClassifierModule(lm()).validation_step(batch, 0)
    assert loss.item() == 0.0


def test_classifier_refuses_logits_that_do_not_pair_with_the_labels():
    module = ClassifierModule(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\) for labels of shape \(2, 5\)"):
        module.validation_step((torch.randn(2, 4), torch.zeros(2, 5, dtype=torch.long)), 0)


def test_classifier_fits_a_causal_lm_on_text_batches(tmp_path):
    dm = text_data(tmp_path)
    model = lm(vocab_size=dm.vocab_size)
    before = [parameter.clone() for parameter in model.parameters()]
    module = ClassifierModule(model, optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["train/loss_epoch"]) and math.isfinite(metrics["val/loss"])
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_distillation_fits_causal_lms_on_text_batches_without_a_batch_adapter(tmp_path):
    dm = text_data(tmp_path)
    student = lm(0, dm.vocab_size)
    before = [parameter.clone() for parameter in student.parameters()]
    module = DistillationModule(student, {"a": lm(1, dm.vocab_size), "b": lm(2, dm.vocab_size)})
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    assert all(math.isfinite(value) for value in trainer.callback_metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


# Sharded teachers gather mapping inputs -------------------------------------------------------


def _shard_mapping_on_rank(rank: int, out: str, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ensemble = TeacherEnsemble({name: lm(seed) for seed, name in enumerate("abc")})
        batch = padded_batch() if rank == 0 else {k: v[1:] for k, v in padded_batch().items()}
        inputs, _ = BatchAdapter()(batch)  # ranks' batches differ: 2 rows and 1
        logits = ShardedTeachers(ensemble, rank=rank, world_size=2)(inputs)
        refused = ""
        try:  # the ranks' keys differ
            ShardedTeachers(ensemble, rank=rank, world_size=2)(
                inputs if rank == 0 else {"input_ids": inputs["input_ids"]}
            )
        except ValueError as error:
            refused = str(error)
        torch.save({"logits": logits, "refused": refused}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gather_mapping_inputs_and_refuse_mappings_that_differ(tmp_path):
    mp.spawn(_shard_mapping_on_rank, args=(str(tmp_path), f"file://{tmp_path}/store"), nprocs=2)
    ensemble = TeacherEnsemble({name: lm(seed) for seed, name in enumerate("abc")})
    inputs, _ = BatchAdapter()(padded_batch())
    expected = ensemble(inputs)
    for rank, rows in ((0, slice(0, 2)), (1, slice(1, 2))):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["logits"], expected[:, rows])
        assert "input mappings differ in their keys" in result["refused"]


def test_one_rank_runs_sharded_teachers_on_mapping_inputs(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ensemble = TeacherEnsemble({"a": lm(1), "b": lm(2)})
        sharded = ShardedTeachers(ensemble, rank=0, world_size=1)
        inputs, _ = BatchAdapter()(padded_batch())
        torch.testing.assert_close(sharded(inputs), ensemble(inputs))
        ragged = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"][:1]}
        with pytest.raises(ValueError, match="differ in batch size"):
            sharded(ragged)
    finally:
        dist.destroy_process_group()
