"""TextDataModule and its tokenizers: hashed file splits, packed blocks, caches, the stdlib."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kd_lightning.data import text as text_module
from kd_lightning.data.text import (
    STDLIB_SKIPPED_DIRS,
    PackedBlocks,
    TextDataModule,
    default_cache_dir,
    split_of,
)
from kd_lightning.data.tokenizers import BPETokenizer, ByteTokenizer, corpus_fingerprint
from kd_lightning.losses import DistillationLoss
from kd_lightning.models.causal_lm import CausalLM

SPLITS = ("train", "val", "test")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """40 small Python-like files in nested folders, plus a file of another kind."""
    root = tmp_path / "corpus"
    for i in range(40):
        path = root / f"pkg{i % 3}" / f"module_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x * {i + j}  # é\n" for j in range(i % 7 + 3))
        path.write_text(f'"""Module {i}."""\n' + body)
    (root / "notes.md").write_text("not python\n")
    return root


def module(corpus: Path, tmp_path: Path, **overrides: Any) -> TextDataModule:
    options: dict[str, Any] = dict(
        paths=corpus,
        block_size=32,
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=tmp_path / "cache",
    )
    options.update(overrides)
    return TextDataModule(**options)


def check_blocks(blocks: PackedBlocks, stream: np.ndarray) -> None:
    """The block layout: windows of b + 1 tokens, b apart, labels shifted by one."""
    size = blocks.block_size
    assert len(blocks) == (len(stream) - 1) // size > 0
    rebuilt = [blocks[0]["input_ids"][:1]]
    for index in range(len(blocks)):
        block = blocks[index]
        assert all(value.dtype == torch.int64 for value in block.values())
        assert torch.equal(block["input_ids"][1:], block["labels"][:-1])
        assert torch.equal(block["attention_mask"], torch.ones(size, dtype=torch.long))
        rebuilt.append(block["labels"])
    covered = torch.cat(rebuilt).numpy()
    np.testing.assert_array_equal(covered, stream[: len(covered)])
    assert len(stream) - len(covered) < size


def test_files_are_split_by_a_hash_of_their_relative_path(corpus, tmp_path):
    dm = module(corpus, tmp_path)
    names = [file.name for file in dm.files]
    assert sorted(names) == sorted(f"pkg{i % 3}/module_{i}.py" for i in range(40))
    for file in dm.files:
        assert file.split == split_of(file.name, 0.2, 0.2) and file.limit is None
    counts = {split: sum(file.split == split for file in dm.files) for split in SPLITS}
    assert all(counts[split] > 0 for split in SPLITS) and sum(counts.values()) == 40


def test_the_split_does_not_depend_on_the_order_or_number_of_files(corpus, tmp_path):
    every = {file.name: file.split for file in module(corpus, tmp_path).files}
    some_paths = sorted(corpus.rglob("*.py"), reverse=True)[::3]  # a third, in reverse order
    some = module(corpus, tmp_path, paths=some_paths, root=corpus).files
    assert len(some) == len(some_paths)
    assert all(every[file.name] == file.split for file in some)
    (corpus / "pkg0" / "added.py").write_text("x = 1\n")
    grown = {file.name: file.split for file in module(corpus, tmp_path).files}
    assert {name: grown[name] for name in every} == every


def test_each_split_is_its_documents_bytes_each_followed_by_the_end_token(corpus, tmp_path):
    dm = module(corpus, tmp_path)
    dm.setup()
    eos = ByteTokenizer.eos_id
    for split, blocks in zip(SPLITS, (dm.train_set, dm.val_set, dm.test_set), strict=True):
        files = sorted((file for file in dm.files if file.split == split), key=lambda f: f.name)
        expected = np.concatenate(
            [np.append(np.frombuffer(f.path.read_bytes(), np.uint8), eos) for f in files]
        )
        stream = dm.tokens(split)
        np.testing.assert_array_equal(stream, expected)
        assert blocks is not None
        check_blocks(blocks, stream)


def test_batches_are_hugging_face_style_dicts(corpus, tmp_path):
    dm = module(corpus, tmp_path)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(value.shape == (4, 32) and value.dtype == torch.int64 for value in batch.values())
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert dm.vocab_size == 258 and int(batch["labels"].max()) < 258


def test_route_ids_give_each_block_a_round_robin_teacher_id(corpus, tmp_path):
    dm = module(corpus, tmp_path, route_ids=3)
    dm.setup()
    ids = [int(dm.val_set[index]["teacher_id"]) for index in range(len(dm.val_set))]
    assert ids == [index % 3 for index in range(len(dm.val_set))]
    batch = next(iter(dm.val_dataloader()))
    assert batch["teacher_id"].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="route_ids must be a positive integer, got 0"):
        module(corpus, tmp_path, route_ids=0).setup()


def test_paths_as_globs_lists_and_patterns(corpus, tmp_path):
    by_glob = module(corpus, tmp_path, paths=str(corpus / "pkg1" / "*.py"), root=corpus).files
    assert {file.name.split("/")[0] for file in by_glob} == {"pkg1"}
    listed = module(
        corpus, tmp_path, paths=[corpus / "pkg0", corpus / "notes.md", corpus / "notes.md"]
    )
    names = [file.name for file in listed.files]
    assert "notes.md" in names and len(names) == len(set(names)) == 14 + 1
    markdown = module(corpus, tmp_path, pattern="*.md").files
    assert [file.name for file in markdown] == ["notes.md"]


def test_bad_paths_and_arguments_are_named(corpus, tmp_path):
    with pytest.raises(ValueError, match="is no file, directory or matching glob"):
        _ = module(corpus, tmp_path, paths=[corpus / "missing"]).files
    with pytest.raises(ValueError, match="matches no file"):
        _ = module(corpus, tmp_path, paths=str(corpus / "*.txt")).files
    with pytest.raises(ValueError, match="is not under root"):
        _ = module(corpus, tmp_path, root=corpus / "pkg0").files
    for overrides, message in [
        (dict(block_size=0), "block_size"),
        (dict(max_bytes=0), "max_bytes"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(val_fraction=0.5, test_fraction=0.5), "leave no training files"),
        (dict(tokenizer="words"), "tokenizer must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            module(corpus, tmp_path, **overrides)


def test_a_split_without_blocks_is_refused_unless_its_fraction_is_zero(corpus, tmp_path):
    one_file = [corpus / "pkg0" / "module_0.py"]
    split = split_of("module_0.py", 0.2, 0.2)
    assert split == "train"  # the others are empty
    with pytest.raises(ValueError, match="the val split got no block"):
        module(corpus, tmp_path, paths=one_file).setup()
    dm = module(corpus, tmp_path, paths=one_file, val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    assert dm.val_set is not None and len(dm.val_set) == 0


def test_max_files_and_max_bytes_take_each_splits_share(corpus, tmp_path):
    full = {file.name: file for file in module(corpus, tmp_path).files}
    few = module(corpus, tmp_path, max_files=10).files
    counts = {split: sum(file.split == split for file in few) for split in SPLITS}
    assert counts == {"train": 6, "val": 2, "test": 2}
    assert all(full[file.name].split == file.split for file in few)
    sliced = module(corpus, tmp_path, max_bytes=2000)
    for split, share in (("train", 1200), ("val", 400), ("test", 400)):
        files = [file for file in sliced.files if file.split == split]
        read = sum(file.limit or file.path.stat().st_size for file in files)
        assert read == share
        assert sum(file.limit is not None for file in files) <= 1
    assert sum(len(sliced.tokens(split)) for split in SPLITS) <= 2000 + len(sliced.files)


def test_token_streams_are_cached_and_rebuilt_when_a_file_changes(corpus, tmp_path, monkeypatch):
    dm = module(corpus, tmp_path)
    dm.setup()
    cache = tmp_path / "cache"
    assert sorted(path.name.split("-")[1] for path in cache.glob("tokens-*.npy")) == sorted(SPLITS)
    assert not list(cache.glob("*.tmp"))

    def refuse(*args):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(text_module, "_token_stream", refuse)
    again = module(corpus, tmp_path)
    again.setup()
    assert isinstance(again.tokens("train"), np.memmap)
    np.testing.assert_array_equal(again.tokens("train"), dm.tokens("train"))
    monkeypatch.undo()
    before = len(dm.tokens("val"))
    changed = next(file for file in dm.files if file.split == "val")
    changed.path.write_text(changed.path.read_text() + "# more\n")
    assert len(module(corpus, tmp_path).tokens("val")) == before + len("# more\n")
    assert len(list(cache.glob("tokens-val-*.npy"))) == 2


def test_bpe_trains_on_the_training_split_once_and_round_trips(corpus, tmp_path, monkeypatch):
    dm = module(corpus, tmp_path, tokenizer="bpe", vocab_size=300)
    dm.setup()
    tokenizer = dm.tokenizer
    assert isinstance(tokenizer, BPETokenizer) and dm.vocab_size == 300
    assert len(list((tmp_path / "cache").glob("bpe-300-*.json"))) == 1
    val_file = next(file for file in dm.files if file.split == "val")
    text = val_file.read()
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(text)) < len(text.encode())
    for split in SPLITS:
        stream = dm.tokens(split)
        assert stream.dtype == np.uint16 and int(stream.max()) < 300
        assert int((stream == tokenizer.eos_id).sum()) == sum(f.split == split for f in dm.files)

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(BPETokenizer, "train", refuse)
    again = module(corpus, tmp_path, tokenizer="bpe", vocab_size=300)
    assert again.tokenizer.fingerprint == tokenizer.fingerprint
    monkeypatch.undo()
    elsewhere = module(corpus, tmp_path, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "b")
    assert elsewhere.tokenizer.fingerprint == tokenizer.fingerprint  # training is deterministic


def test_a_tokenizer_object_is_used_as_given(corpus, tmp_path):
    dm = module(corpus, tmp_path, tokenizer=ByteTokenizer())
    assert dm.vocab_size == 258
    dm.setup()
    assert dm.train_set is not None and len(dm.train_set) > 0


def test_corpus_fingerprints_follow_contents_and_limits(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    first = corpus_fingerprint([(path, None)])
    assert corpus_fingerprint([(path, None)]) == first != corpus_fingerprint([(path, 3)])
    path.write_text("hello, world")
    assert corpus_fingerprint([(path, None)]) != first


def test_the_default_cache_follows_kd_lightning_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"


def test_a_slice_of_the_standard_library(tmp_path):
    """200 kB of the real corpus: a deterministic split, byte-exact limits, the block layout, and
    a CausalLM distilled on a batch."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    options: dict[str, Any] = dict(max_bytes=200_000, block_size=64, batch_size=4, val_fraction=0.1)
    dm = TextDataModule(cache_dir=tmp_path / "one", **options)
    twin = TextDataModule(cache_dir=tmp_path / "two", **options)
    assert dm.files == twin.files
    for file in dm.files:
        assert file.path.is_relative_to(stdlib) and file.path.suffix == ".py"
        assert file.name == file.path.relative_to(stdlib).as_posix()
        assert not STDLIB_SKIPPED_DIRS & set(file.name.split("/")[:-1])
        assert file.split == split_of(file.name, 0.1, 0.05)
    for split, share in (("train", 170_000), ("val", 20_000), ("test", 10_000)):
        files = [file for file in dm.files if file.split == split]
        assert sum(file.limit or file.path.stat().st_size for file in files) == share
    dm.setup()
    twin.setup()
    for split, blocks in zip(SPLITS, (dm.train_set, dm.val_set, dm.test_set), strict=True):
        stream = dm.tokens(split)
        np.testing.assert_array_equal(stream, twin.tokens(split))
        assert blocks is not None
        check_blocks(blocks, stream)
    batch = next(iter(dm.val_dataloader()))
    assert "def " in dm.tokenizer.decode(torch.cat(list(batch["input_ids"])).tolist())
    student = CausalLM(dm.vocab_size, d_model=32, n_layers=1, n_heads=2, max_len=64)
    logits = student(batch["input_ids"], batch["attention_mask"])
    teachers = torch.randn(2, *logits.shape)
    out = DistillationLoss("mean_probs")(logits, teachers, batch["labels"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.weights.shape == (4, 64, 2)
