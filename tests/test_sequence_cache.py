"""The sequence cache: K causal-LM teachers' top-k outputs over packed blocks, read by block."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.data import TextDataModule
from kd_lightning.data.indexed import IndexedDataModule
from kd_lightning.losses import ChunkedDistillationLoss
from kd_lightning.models.causal_lm import CausalLM
from kd_lightning.teachers import TeacherEnsemble, TeacherSource
from kd_lightning.teachers.cache.sequence_build import build_sequence_cache
from kd_lightning.teachers.cache.sequence_store import (
    CorruptCacheError,
    MismatchedCacheError,
    SequenceCachedTeachers,
    chunk_name,
    decode_ids,
    encode_ids,
    id_bytes,
    pack_bits,
    row_dtype,
    unpack_bits,
)

from .conftest import make_trainer

L = 16  # tokens per block


def lm(vocab_size: int, seed: int, sharp: bool = True) -> CausalLM:
    """A tiny CausalLM; ``sharp`` widens its (tied) embeddings so its softmax is peaked."""
    torch.manual_seed(seed)
    model = CausalLM(vocab_size, d_model=16, n_layers=1, n_heads=2, max_len=64)
    if sharp:
        nn.init.normal_(model.embedding.weight, std=1.0)
    return model


def ensemble(vocab_size: int, **teachers: nn.Module) -> TeacherEnsemble:
    return TeacherEnsemble(
        teachers or {name: lm(vocab_size, seed) for seed, name in enumerate("abc")}
    )


def blocks(vocab_size: int, count: int, seed: int = 0, length: int = L) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, vocab_size, (length,), generator=generator)}
        for _ in range(count)
    ]


def build(teachers: TeacherEnsemble, data: Any, root: Path, **options: Any):
    options = {"tokenizer": "test-tokenizer", "progress": False, **options}
    if "vocab_size" not in options:
        options["vocab_size"] = teachers.teachers["a"].vocab_size
    return build_sequence_cache(teachers, data, root, **options)


def live(teachers: TeacherEnsemble, data: list[dict[str, Tensor]], rows: list[int]) -> Tensor:
    return teachers(torch.stack([data[row]["input_ids"] for row in rows]))


# The format against a NumPy reference -----------------------------------------------------------


@pytest.mark.parametrize(("vocab_size", "top_k"), [(10, 1), (10, 10), (258, 128), (8192, 128)])
def test_elias_fano_ids_round_trip_in_the_documented_size(vocab_size, top_k):
    rng = np.random.default_rng(0)
    ids = np.sort(
        np.stack([rng.choice(vocab_size, top_k, replace=False) for _ in range(50)]), axis=-1
    )
    ids[0] = np.arange(vocab_size - top_k, vocab_size)  # the largest ids
    code = encode_ids(ids.reshape(5, 10, top_k), vocab_size)
    low = math.floor(math.log2(vocab_size / top_k))
    assert code.shape == (
        5,
        10,
        math.ceil((top_k + (vocab_size - 1) // 2**low + 1 + top_k * low) / 8),
    )
    assert code.shape[-1] == id_bytes(vocab_size, top_k)
    np.testing.assert_array_equal(decode_ids(code, top_k, vocab_size).reshape(50, top_k), ids)


@pytest.mark.parametrize("width", [1, 3, 7, 8, 11, 16])
def test_bit_packing_round_trips(width):
    values = np.random.default_rng(width).integers(0, 2**width, size=(4, 6, 13))
    packed = pack_bits(values, width)
    assert packed.shape == (4, 6, math.ceil(13 * width / 8)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_bits(packed, 13, width), values)


def np_rebuilt(logits: np.ndarray, top_k: int, value_bits: int | None) -> tuple[np.ndarray, ...]:
    """The documented format in NumPy: rebuilt logits, the top-k ids, and each row's step."""
    z = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    vocab_size = z.shape[-1]
    order = np.argsort(-z, axis=-1, kind="stable")[:, :top_k]
    top = np.take_along_axis(z, order, axis=-1)
    rest = z.copy()
    np.put_along_axis(rest, order, -np.inf, axis=-1)
    peak = rest.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        tail = (np.log(np.exp(rest - peak).sum(-1)) + peak[:, 0]).astype(np.float32)
    if value_bits is None:
        values, step = top.astype(np.float32), np.zeros(len(z), dtype=np.float32)
    else:
        first = top[:, 0].astype(np.float32)
        step = ((top[:, 0] - top[:, -1]) / (2**value_bits - 1)).astype(np.float32)
        safe = np.where(step > 0, step, 1).astype(np.float64)[:, None]
        codes = np.clip(np.rint((first[:, None].astype(np.float64) - top) / safe), 0, None)
        values = first[:, None] - codes.astype(np.float32) * step[:, None]
    fill = tail - (np.log(vocab_size - top_k) if top_k < vocab_size else 0.0)
    dense = np.repeat(fill[:, None], vocab_size, axis=-1)
    np.put_along_axis(dense, order, values, axis=-1)
    shape = logits.shape
    return dense.reshape(shape), order.reshape(*shape[:-1], top_k), step.reshape(shape[:-1])


@pytest.mark.parametrize(("top_k", "value_bits"), [(8, 8), (32, 4), (32, None), (50, 8)])
def test_a_built_cache_reads_back_what_numpy_makes_of_the_live_logits(tmp_path, top_k, value_bits):
    teachers, data = ensemble(50), blocks(50, 7)
    cache = build(
        teachers,
        {"train": data},
        tmp_path,
        top_k=top_k,
        value_bits=value_bits,
        chunk_blocks=3,
        batch_size=2,
    )
    rows = [6, 0, 3, 3]
    exact = live(teachers, data, rows).numpy()  # (K, B, L, V)
    expected, order, step = np_rebuilt(exact, top_k, value_bits)
    read = cache.logits("train", rows)
    assert read.dtype == torch.float32 and read.shape == (3, 4, L, 50)
    np.testing.assert_allclose(read.numpy(), expected, rtol=1e-6, atol=1e-6)
    sparse = cache.topk("train", rows)
    np.testing.assert_array_equal(sparse.indices.numpy(), np.sort(order, axis=-1))
    # The documented error: each top-k logit within step / 2 of the teacher's logit.
    error = np.abs(np.take_along_axis(read.numpy() - exact, order, axis=-1))
    assert (error <= step[..., None] / 2 + 1e-5).all()
    # Positions, and pickling (DDP spawn, dataloader workers)
    torch.testing.assert_close(cache.logits("train", rows, positions=[0, 9]), read[:, :, [0, 9]])
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy.logits("train", rows), read)


def test_at_most_300_bytes_per_token_per_teacher_at_k_128(tmp_path):
    vocab_size, count = 8192, 10
    cache = build(
        ensemble(vocab_size),
        {"train": blocks(vocab_size, count)},
        tmp_path,
        top_k=128,
        value_bits=8,
        chunk_blocks=5,
    )
    files = sorted(cache.path.glob("train.*.npy"))
    assert len(files) == 2
    per_token = sum(file.stat().st_size for file in files) / (count * L * len(cache))
    assert per_token == pytest.approx(cache.bytes_per_token)
    assert row_dtype(vocab_size, 128, 8).itemsize == 268  # 128 B ids + 128 B codes + 12 B
    assert 268 < per_token <= 300, per_token


# k = V: the cache's KD loss is the live KD loss --------------------------------------------------


@pytest.mark.parametrize("fusion", ["mean_probs", "entropy", "confidence"])
def test_with_k_equal_to_v_the_cached_kd_loss_is_the_live_one(tmp_path, fusion):
    teachers, data = ensemble(64), blocks(64, 6)
    exact = build(teachers, {"train": data}, tmp_path, top_k=64, value_bits=None)
    quantised = build(teachers, {"train": data}, tmp_path, top_k=64, value_bits=8)
    rows = [5, 2, 0]
    student = torch.randn(3, L, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.stack([data[row]["input_ids"] for row in rows]).roll(-1, dims=1)
    loss = DistillationLoss(fusion, alpha=0.5, temperature=2.0)
    reference = loss(student, live(teachers, data, rows), labels)
    assert torch.equal(exact.logits("train", rows), live(teachers, data, rows))
    cached = loss(student, exact.logits("train", rows), labels)
    assert abs(cached.loss.item() - reference.loss.item()) <= 1e-4
    assert abs(cached.soft.item() - reference.soft.item()) <= 1e-4
    # 8-bit values: within the documented error, not the identity.
    approximate = loss(student, quantised.logits("train", rows), labels)
    assert abs(approximate.soft.item() - reference.soft.item()) <= 1e-2 * reference.soft.item()


# Refusals -----------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path) -> SequenceCachedTeachers:
    return build(ensemble(40), {"train": blocks(40, 9)}, tmp_path, top_k=8, chunk_blocks=4)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("tokenizer", "bpe-other", "tokenizer 'test-tokenizer', but this run uses 'bpe-other'"),
        ("block_size", 32, "block length 16, but this run uses 32"),
        ("vocab_size", 41, "vocabulary size 40, but this run uses 41"),
    ],
)
def test_a_cache_of_other_data_is_refused_naming_both_values(built, option, value, message):
    SequenceCachedTeachers(built.path, tokenizer="test-tokenizer", block_size=L, vocab_size=40)
    with pytest.raises(MismatchedCacheError, match=message):
        SequenceCachedTeachers(built.path, **{option: value})


def test_a_tokenizer_object_is_checked_by_its_fingerprint(built):
    class Tokenizer:
        fingerprint = "test-tokenizer"

    SequenceCachedTeachers(built.path, tokenizer=Tokenizer())
    Tokenizer.fingerprint = "another"
    with pytest.raises(MismatchedCacheError, match="'test-tokenizer', but this run uses 'another'"):
        SequenceCachedTeachers(built.path, tokenizer=Tokenizer())


def test_a_truncated_chunk_is_refused_on_open(built):
    path = built.path / chunk_name("train", 1)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptCacheError, match=r"train\.00001\.npy holds \d+ bytes.*truncated"):
        SequenceCachedTeachers(built.path)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused(built):
    path = built.path / chunk_name("train", 2)  # block 8, the last
    flip(path, path.stat().st_size - 3)
    cache = SequenceCachedTeachers(built.path)  # sizes and headers are sound
    cache.logits("train", [0, 7])
    with pytest.raises(CorruptCacheError, match="block 8 of split 'train' fails its checksum"):
        cache.logits("train", [0, 8])
    with pytest.raises(CorruptCacheError, match="block 8 of split 'train' fails its checksum"):
        SequenceCachedTeachers(built.path, verify=True)
    flip(path, 20)  # in the header: another layout
    with pytest.raises(CorruptCacheError, match=r"train\.00002\.npy"):
        SequenceCachedTeachers(built.path)


def test_an_altered_manifest_or_a_partial_directory_is_refused(built):
    manifest = json.loads((built.path / "manifest.json").read_text())
    (built.path / "manifest.json").write_text(json.dumps({**manifest, "top_k": 9}))
    with pytest.raises(CorruptCacheError, match="altered or misplaced"):
        SequenceCachedTeachers(built.path)
    with pytest.raises(CorruptCacheError, match="partial build"):
        SequenceCachedTeachers(built.path.with_name(".partial-" + built.path.name))


def test_a_batch_of_other_tokens_or_length_is_refused(built):
    data = blocks(40, 9)
    batch = {"input_ids": torch.stack([data[3]["input_ids"], data[4]["input_ids"]])}
    good = built.outputs(batch["input_ids"], {**batch, "index": torch.tensor([3, 4])}, "train")
    assert good.logits.shape == (3, 2, L, 40) and good.ran == (0, 1, 2)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": torch.ones_like(batch["input_ids"]),
    }
    from_mapping = built.outputs(inputs, {**batch, "index": torch.tensor([3, 4])}, "train")
    assert torch.equal(from_mapping.logits, good.logits)  # model inputs as BatchAdapter gives them
    with pytest.raises(
        MismatchedCacheError, match=r"mapping holding them as 'input_ids', got dict"
    ):
        built.outputs(
            {"tokens": batch["input_ids"]}, {**batch, "index": torch.tensor([3])}, "train"
        )
    with pytest.raises(MismatchedCacheError, match="block 5 of split 'train' holds other tokens"):
        built.outputs(batch["input_ids"], {**batch, "index": torch.tensor([3, 5])}, "train")
    short = batch["input_ids"][:, :8]
    with pytest.raises(MismatchedCacheError, match="blocks of 16 tokens, the batch blocks of 8"):
        built.outputs(short, {"input_ids": short, "index": torch.tensor([3, 4])}, "train")
    with pytest.raises(KeyError, match="stage 'val' is not cached"):
        built.logits("val", [0])
    with pytest.raises(IndexError, match=r"block indices 0\.\.9 outside"):
        built.logits("train", [0, 9])
    with pytest.raises(ValueError, match="no networks"):
        built.networks()
    assert isinstance(built, TeacherSource)


# A build killed midway ------------------------------------------------------------------------------


class Flaky(nn.Module):
    """A teacher that counts the blocks it runs and fails once it has run ``fail_after``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.blocks = 0
        self.fail_after: int | None = None

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        count = len(inputs["input_ids"])
        if self.fail_after is not None and self.blocks + count > self.fail_after:
            raise RuntimeError("killed")
        self.blocks += count
        return self.inner(inputs)


def test_a_killed_build_leaves_no_cache_and_the_rerun_reuses_its_chunks(tmp_path):
    flaky = {name: Flaky(lm(30, seed)) for seed, name in enumerate("abc")}
    teachers = ensemble(30, **flaky)
    data = {"train": blocks(30, 20), "val": blocks(30, 5, seed=1)}
    options: dict[str, Any] = dict(top_k=8, chunk_blocks=4, batch_size=2, vocab_size=30)
    flaky["b"].fail_after = 10  # chunks 0 and 1 complete, chunk 2 half run
    with pytest.raises(RuntimeError, match="killed"):
        build(teachers, data, tmp_path / "root", **options)
    (partial,) = (tmp_path / "root").iterdir()
    assert partial.name.startswith(".partial-")
    assert sorted(path.name for path in partial.iterdir()) == ["train.00000.npy", "train.00001.npy"]
    with pytest.raises(CorruptCacheError):
        SequenceCachedTeachers(partial)
    flip(partial / chunk_name("train", 1), -2)  # a damaged chunk is run again
    for teacher in flaky.values():
        teacher.blocks, teacher.fail_after = 0, None
    cache = build(teachers, data, tmp_path / "root", **options)
    assert [teacher.blocks for teacher in flaky.values()] == [25 - 4] * 3
    assert [path.name for path in (tmp_path / "root").iterdir()] == [cache.path.name]
    clean = build(teachers, data, tmp_path / "clean", **options)
    assert clean.path.name == cache.path.name
    for stage, size in (("train", 20), ("val", 5)):
        assert torch.equal(cache.logits(stage, range(size)), clean.logits(stage, range(size)))
    for teacher in flaky.values():
        teacher.blocks = 0
    build(teachers, data, tmp_path / "root", **options)  # complete: opened, nothing run
    assert [teacher.blocks for teacher in flaky.values()] == [0] * 3


def test_the_fingerprint_covers_weights_tokenizer_top_k_and_data(tmp_path):
    teachers, data = ensemble(30), {"train": blocks(30, 3)}
    base = build(teachers, data, tmp_path, top_k=4).path.name
    loader = DataLoader(data["train"], batch_size=2, shuffle=True)  # its dataset, in index order
    assert build(teachers, {"train": loader}, tmp_path, top_k=4).path.name == base
    assert build(teachers, data, tmp_path, top_k=5).path.name != base
    assert build(teachers, data, tmp_path, top_k=4, tokenizer="t2").path.name != base
    assert build(teachers, {"train": blocks(30, 3, seed=9)}, tmp_path, top_k=4).path.name != base
    with torch.no_grad():
        teachers.teachers["c"].head.weight[0, 0] += 1
    assert build(teachers, data, tmp_path, top_k=4).path.name != base


# End to end: a DistillationModule trained from the cache ------------------------------------------


def text_data(tmp_path: Path, **overrides: Any) -> TextDataModule:
    options: dict[str, Any] = dict(
        max_bytes=6_000,
        block_size=32,
        batch_size=8,
        val_fraction=0.2,
        test_fraction=0.0,
        cache_dir=tmp_path / "text",
    )
    return TextDataModule(**{**options, **overrides})


@pytest.mark.slow
def test_a_distillation_module_fits_an_epoch_from_the_cache(tmp_path):
    dm = text_data(tmp_path)
    teachers = TeacherEnsemble({name: lm(dm.vocab_size, seed) for seed, name in enumerate("abc")})
    built = build_sequence_cache(teachers, dm, tmp_path / "cache", top_k=32, progress=False)
    assert built.stages == ["train", "val"]
    cache = SequenceCachedTeachers(
        built.path, tokenizer=dm.tokenizer, block_size=dm.block_size, vocab_size=dm.vocab_size
    )
    student = lm(dm.vocab_size, seed=7, sharp=False)
    before = [parameter.clone() for parameter in student.parameters()]
    module = DistillationModule(
        student,
        cache,
        loss=ChunkedDistillationLoss("entropy", alpha=0.5, temperature=2.0, chunk_tokens=64),
    )
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=IndexedDataModule(text_data(tmp_path)))
    assert trainer.global_step == math.ceil(cache.num_blocks("train") / 8)
    assert all(torch.isfinite(value) for value in trainer.callback_metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


# Measured: KD gap against top_k on real text with briefly trained teachers -----------------------


def train_briefly(model: CausalLM, dm: TextDataModule, steps: int, seed: int) -> CausalLM:
    """``steps`` AdamW steps of next-token cross-entropy on ``dm``'s training blocks."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    epochs = itertools.chain.from_iterable(dm.train_dataloader() for _ in itertools.count())
    for batch in itertools.islice(epochs, steps):
        logits = model(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_the_kd_gap_shrinks_with_k_on_the_standard_library(tmp_path, capsys):
    """3 CausalLM teachers trained 150 steps each on 60 kB of the stdlib (BPE, V = 2048, L = 64);
    the KD term (mean_probs, T = 1 and 4) of an untrained and a briefly trained student on the val
    blocks, from the cache against live teachers. Caches at k = V hold the val split only."""
    dm = text_data(
        tmp_path,
        max_bytes=60_000,
        tokenizer="bpe",
        vocab_size=2048,
        block_size=64,
        batch_size=16,
        val_fraction=0.1,
    )
    dm.setup()
    vocab_size, val = dm.vocab_size, dm.val_set
    widths = {"a": 64, "b": 96, "c": 128}
    teachers = TeacherEnsemble(
        {
            name: train_briefly(
                CausalLM(vocab_size, d_model=width, n_layers=2, n_heads=4, max_len=64),
                dm,
                150,
                seed,
            )
            for seed, (name, width) in enumerate(widths.items())
        }
    )
    rows = list(range(len(val)))
    inputs = torch.stack([val[row]["input_ids"] for row in rows])
    labels = torch.stack([val[row]["labels"] for row in rows])
    exact = teachers(inputs)
    small = CausalLM(vocab_size, d_model=32, n_layers=1, n_heads=2, max_len=64)
    networks = {"untrained": lm(vocab_size, seed=11, sharp=False), "trained": small}
    train_briefly(small, dm, 150, seed=5)
    with torch.no_grad():
        students = {name: network.eval()(inputs) for name, network in networks.items()}
    losses = {t: DistillationLoss("mean_probs", temperature=t) for t in (1.0, 4.0)}
    cases = [(name, t) for name in students for t in losses]
    live_kd = {(name, t): losses[t](students[name], exact, labels).soft.item() for name, t in cases}
    lines, gaps = [], {}
    for top_k, bits in ((8, 8), (32, 8), (128, 8), (vocab_size, 8), (vocab_size, None)):
        data = dm if top_k < vocab_size else {"val": val}
        start = time.perf_counter()
        cache = build_sequence_cache(
            teachers,
            data,
            tmp_path / f"k{top_k}-{bits}",
            top_k=top_k,
            value_bits=bits,
            tokenizer=dm.tokenizer,
            vocab_size=vocab_size,
            progress=False,
        )
        seconds = time.perf_counter() - start
        cached = cache.logits("val", rows)
        built = sum(cache.num_blocks(stage) for stage in cache.stages)
        lines.append(
            f"k={top_k:5d} bits={bits!s:4} {cache.bytes_per_token:7.1f} B/token/teacher, "
            f"build {seconds:5.1f} s for {built} blocks"
        )
        for name, t in cases:
            gap = losses[t](students[name], cached, labels).soft.item() - live_kd[name, t]
            gaps[top_k, bits, name, t] = gap
            lines.append(f"    {name:9} T={t:g}: KD gap {gap:+.2e} ({gap / live_kd[name, t]:+.3%})")
    with capsys.disabled():
        print(
            "\nlive KD",
            {case: round(value, 4) for case, value in live_kd.items()},
            *lines,
            sep="\n",
        )
    for name, t in cases:
        assert abs(gaps[vocab_size, None, name, t]) <= 1e-4
        assert abs(gaps[128, 8, name, t]) <= abs(gaps[32, 8, name, t]) <= abs(gaps[8, 8, name, t])
