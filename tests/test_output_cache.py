"""The teacher-output cache: exact logits by index, staleness, atomic builds, top-k, training."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from kd_lightning import DistillationLoss, DistillationModule, TeacherEnsemble
from kd_lightning.bench.run import format_report, run_benchmark
from kd_lightning.data import SyntheticDataModule
from kd_lightning.data.augmented_views import AugmentedViewsDataModule
from kd_lightning.data.indexed import IndexedDataModule
from kd_lightning.losses.hints import FeatureHintLoss
from kd_lightning.teachers import ReverseSequence, TeacherSource
from kd_lightning.teachers.cache.build import (
    MANIFEST,
    PARTIAL_PREFIX,
    CachedTeachers,
    CorruptCacheError,
    StaleCacheError,
    build_output_cache,
    remove_partial_builds,
)
from kd_lightning.teachers.cache.topk import TopKTeacherOutputs, compress_topk, expand_topk


def ensemble(seed: int = 0) -> TeacherEnsemble:
    torch.manual_seed(seed)
    return TeacherEnsemble(
        {
            "wide": nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)),
            "pair": nn.Linear(6, 3),
            "flip": nn.Linear(6, 5),
        },
        input_transforms={"flip": ReverseSequence()},
        class_maps={"pair": [4, 0, 2]},
        num_classes=5,
    )


def splits(seed: int = 0, size: int = 37) -> dict[str, Dataset]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 6, generator=generator)
    y = torch.randint(0, 5, (size,), generator=generator)
    return {"train": TensorDataset(x, y), "val": TensorDataset(x[:9] * 2, y[:9])}


def test_cached_logits_are_the_ensemble_outputs(tmp_path):
    teachers, data = ensemble(), splits()
    cache = build_output_cache(teachers, data, tmp_path, batch_size=8)
    indices = torch.tensor([36, 0, 17, 17, 5])
    x = data["train"].tensors[0]  # type: ignore[attr-defined]
    torch.testing.assert_close(cache.logits("train", indices), teachers(x[indices]))
    torch.testing.assert_close(cache.logits("val", [3]), teachers(data["val"][3][0][None]))
    assert cache.names == ["wide", "pair", "flip"]
    assert cache.logits("train", indices).dtype == torch.float32
    with pytest.raises(IndexError, match="outside the 'train' split of 37"):
        cache.logits("train", [37])
    with pytest.raises(KeyError, match="stage 'test' is not cached"):
        cache.logits("test", [0])
    assert cache.stages == ["train", "val"]
    # A second build finds it; a pickled copy (DDP spawn, workers) reopens its arrays lazily.
    again = build_output_cache(teachers, splits(), tmp_path, batch_size=8)
    assert again.path == cache.path
    copy = pickle.loads(pickle.dumps(cache))
    torch.testing.assert_close(copy.logits("train", indices), cache.logits("train", indices))


def test_the_cache_as_a_teacher_source_reads_the_batch_indices(tmp_path):
    teachers, data = ensemble(), splits()
    cache = build_output_cache(teachers, data, tmp_path, batch_size=8)
    assert isinstance(cache, TeacherSource)
    x = data["train"].tensors[0]  # type: ignore[attr-defined]
    indices = torch.tensor([4, 30, 2])
    for batch in ((x[indices], None, indices), {"input": x[indices], "index": indices}):
        outputs = cache.outputs(x[indices], batch, "train")
        torch.testing.assert_close(outputs.logits, teachers(x[indices]))
        assert outputs.ran == (0, 1, 2) and outputs.features == {}
    val = cache.outputs(None, (None, None, torch.tensor([3])), "val")
    torch.testing.assert_close(val.logits, teachers(data["val"][3][0][None]))
    with pytest.raises(ValueError, match="the batch carries no sample indices"):
        cache.outputs(x[:2], (x[:2], torch.zeros(2)), "train")
    with pytest.raises(ValueError, match="logits only, no layer outputs"):
        cache.tap({"wide": "0"})
    cache.tap({})  # nothing asked, nothing refused
    with pytest.raises(ValueError, match="no networks"):
        cache.networks()
    with pytest.raises(ValueError, match="runs no teachers, so there is none to shard"):
        cache.shard(0, 1)
    with pytest.raises(ValueError, match="logits only, no layer outputs"):
        DistillationModule(
            nn.Linear(6, 5), cache, hints=FeatureHintLoss("", dict.fromkeys(cache.names, "0"))
        )
    with pytest.raises(ValueError, match="none to shard"):
        DistillationModule(nn.Linear(6, 5), cache, shard_teachers=True)


def test_changed_teacher_or_data_is_never_read_and_is_named(tmp_path):
    first = build_output_cache(ensemble(), splits(), tmp_path)
    changed = ensemble()
    with torch.no_grad():
        changed.teachers["pair"].bias[0] += 1e-3
    with pytest.raises(StaleCacheError, match=r"is stale: changed teacher 'pair'\n"):
        build_output_cache(changed, splits(), tmp_path, missing="error")
    moved = ensemble()
    moved.input_transforms["flip"].dim = 0  # settings of a transform module count too
    with pytest.raises(StaleCacheError, match="changed teacher 'flip'"):
        build_output_cache(moved, splits(), tmp_path, missing="error")
    other_data = splits()
    other_data["val"].tensors[0][4, 2] += 1e-6  # type: ignore[attr-defined]
    with pytest.raises(StaleCacheError, match=r"changed data split 'val'\n"):
        build_output_cache(ensemble(), other_data, tmp_path, missing="error")
    rebuilt = build_output_cache(changed, splits(), tmp_path)
    assert rebuilt.path != first.path
    x = splits()["train"].tensors[0]  # type: ignore[attr-defined]
    torch.testing.assert_close(rebuilt.logits("train", [2]), changed(x[[2]]))


def test_a_cache_built_at_another_batch_size_is_rebuilt_or_refused(tmp_path):
    """A row's last bits depend on the batch it was computed in, so the batch size is in the key."""
    first = build_output_cache(ensemble(), splits(), tmp_path, batch_size=8)
    assert json.loads((first.path / MANIFEST).read_text())["batch_size"] == 8
    with pytest.raises(StaleCacheError, match=r"is stale: changed batch_size \(8 → 16\)\n"):
        build_output_cache(ensemble(), splits(), tmp_path, batch_size=16, missing="error")
    rebuilt = build_output_cache(ensemble(), splits(), tmp_path, batch_size=16)
    assert rebuilt.path != first.path
    found = build_output_cache(ensemble(), splits(), tmp_path, batch_size=8, missing="error")
    assert found.path == first.path  # the first cache is still found at its own batch size
    x = splits()["train"].tensors[0]  # type: ignore[attr-defined]
    torch.testing.assert_close(rebuilt.logits("train", [30]), ensemble()(x[[30]]))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        build_output_cache(ensemble(), splits(), tmp_path, batch_size=0)


class _RandomView(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return torch.randn(6), 0


def test_randomly_augmented_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="different sample each time index 0 is read"):
        build_output_cache(ensemble(), {"train": _RandomView()}, tmp_path)
    assert not any(tmp_path.iterdir())


class _FailingTeacher(nn.Linear):
    def __init__(self) -> None:
        super().__init__(6, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("teacher crashed")
        return super().forward(x)


def test_failed_build_leaves_nothing(tmp_path):
    teachers = TeacherEnsemble({"a": _FailingTeacher()})
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_output_cache(teachers, splits(), tmp_path, batch_size=8)
    assert list(tmp_path.iterdir()) == []


KILLED_BUILD = """
import os, signal, sys, torch
from torch import nn
from torch.utils.data import TensorDataset
from kd_lightning import TeacherEnsemble
from kd_lightning.teachers.cache.build import build_output_cache

class Dies(nn.Linear):
    calls = 0
    def forward(self, x):
        Dies.calls += 1
        if Dies.calls == 3:  # two batches written, manifest not yet
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)

torch.manual_seed(0)
data = TensorDataset(torch.randn(40, 6), torch.zeros(40))
build_output_cache(TeacherEnsemble({"a": Dies(6, 5)}), {"train": data}, sys.argv[1], batch_size=8)
"""


@pytest.mark.slow  # a real process killed with SIGKILL
def test_build_killed_midway_is_never_read(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(KILLED_BUILD))
    root = tmp_path / "root"
    done = subprocess.run(
        [sys.executable, str(script), str(root)], capture_output=True, timeout=300
    )
    assert done.returncode == -9, done.stderr.decode()
    (partial_dir,) = root.iterdir()
    assert partial_dir.name.startswith(PARTIAL_PREFIX)
    assert not (partial_dir / MANIFEST).exists()
    assert any(partial_dir.glob("*.npy"))  # it was killed while writing

    torch.manual_seed(0)
    teachers = TeacherEnsemble({"a": nn.Linear(6, 5)})
    data = {"train": TensorDataset(torch.randn(40, 6), torch.zeros(40))}
    with pytest.raises(StaleCacheError, match="no teacher-output cache"):
        build_output_cache(teachers, data, root, missing="error")
    with pytest.raises(CorruptCacheError, match="partial build"):
        CachedTeachers(partial_dir)
    assert remove_partial_builds(root) == [partial_dir]
    cache = build_output_cache(teachers, data, root, batch_size=8)
    torch.testing.assert_close(cache.logits("train", [39]), teachers(data["train"][39][0][None]))


def test_manifest_that_does_not_match_is_refused(tmp_path):
    cache = build_output_cache(ensemble(), splits(), tmp_path)
    manifest = json.loads((cache.path / MANIFEST).read_text())
    manifest["splits"]["train"]["num_samples"] = 40
    (cache.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match="has 37 rows, the manifest 40"):
        CachedTeachers(cache.path)


def numpy_topk_reference(logits: np.ndarray, k: int) -> np.ndarray:
    """Probabilities: the true ones on each row's top k, the rest of the mass spread evenly."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.empty_like(p)
    for row in range(len(p)):
        top = np.argsort(-z[row], kind="stable")[:k]
        rest = np.setdiff1d(np.arange(z.shape[1]), top)
        expected[row, top] = p[row, top]
        expected[row, rest] = p[row, rest].sum() / len(rest) if len(rest) else 0.0
    return expected


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_reconstruction_against_numpy(k):
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(k)) * 4
    rebuilt = expand_topk(compress_topk(logits, k))
    expected = numpy_topk_reference(logits.numpy(), k)
    np.testing.assert_allclose(rebuilt.double().softmax(-1).numpy(), expected, rtol=1e-5, atol=1e-7)
    top = logits.topk(k).indices
    torch.testing.assert_close(rebuilt.gather(-1, top), logits.gather(-1, top))


def test_topk_at_all_classes_is_exact_and_indices_are_narrow():
    logits = torch.randn(4, 3, 6)
    packed = compress_topk(logits, 6)
    assert packed.indices.dtype == torch.int16
    assert torch.equal(expand_topk(packed), logits)
    assert compress_topk(torch.zeros(1, 40000), 2).indices.dtype == torch.int32
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 6\]"):
        compress_topk(logits, 7)


def test_topk_cache_stores_top_k_and_rebuilds_them(tmp_path):
    teachers, data = ensemble(), splits()
    cache = build_output_cache(teachers, data, tmp_path, top_k=2)
    full = build_output_cache(teachers, data, tmp_path)
    assert cache.path != full.path
    values = np.load(cache.path / "train.teacher0.values.npy", mmap_mode="r")
    indices = np.load(cache.path / "train.teacher0.indices.npy", mmap_mode="r")
    assert values.shape == indices.shape == (37, 2) and indices.dtype == np.int16
    live = teachers(data["train"].tensors[0][:5])  # type: ignore[attr-defined]
    torch.testing.assert_close(cache.logits("train", range(5)), expand_topk(compress_topk(live, 2)))


def test_files_stay_inside_the_cache_directory_whatever_the_teacher_names(tmp_path):
    odd = TeacherEnsemble({"~": nn.Linear(6, 5), "a b\\c": nn.Linear(6, 5)})
    root = tmp_path / "outputs"
    cache = build_output_cache(odd, splits(), root)
    assert cache.path.parent == root
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.parent == cache.path for p in written)
    assert cache.names == ["~", "a b\\c"]


def _losses(module: DistillationModule, datamodule: L.LightningDataModule) -> list[float]:
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, datamodule=datamodule)
    return losses


def test_training_from_the_cache_gives_the_live_losses(tmp_path):
    def data() -> SyntheticDataModule:
        return SyntheticDataModule(num_samples=240, in_features=6, num_classes=5, batch_size=16)

    def module(teachers) -> DistillationModule:
        torch.manual_seed(1)
        loss = DistillationLoss("confidence", alpha=0.7, temperature=3.0)
        return DistillationModule(nn.Linear(6, 5), teachers, loss, partial(torch.optim.SGD, lr=0.1))

    live_data = data()
    live_data.setup("fit")
    sets = {"train": live_data.train_set, "val": live_data.val_set}
    cache = build_output_cache(ensemble(), sets, tmp_path, batch_size=64)  # type: ignore[arg-type]
    L.seed_everything(3)
    live = _losses(module(ensemble()), live_data)
    L.seed_everything(3)
    cached = _losses(module(cache), IndexedDataModule(data()))
    assert len(live) == len(cached) == 2 + 2 * (8 + 4)  # sanity check, then 2 epochs
    np.testing.assert_allclose(cached, live, rtol=0, atol=1e-6)


class ExpandingLoss(DistillationLoss):
    """The loss of the expanded top-k logits: it never takes the top-k form."""

    accepts_topk = False  # type: ignore[assignment]


def test_a_top_k_cache_trains_from_its_top_k_as_from_their_expansion(tmp_path):
    def data() -> SyntheticDataModule:
        return SyntheticDataModule(num_samples=240, in_features=6, num_classes=5, batch_size=16)

    base = data()
    base.setup("fit")
    sets = {"train": base.train_set, "val": base.val_set}
    cache = build_output_cache(ensemble(), sets, tmp_path, batch_size=64, top_k=2)  # type: ignore[arg-type]
    batch = (torch.zeros(3, 6), torch.zeros(3), torch.tensor([4, 0, 7]))
    outputs = cache.outputs(batch[0], batch, "train")
    assert isinstance(outputs, TopKTeacherOutputs) and outputs.topk.values.shape == (3, 3, 2)
    assert torch.equal(outputs.logits, cache.logits("train", [4, 0, 7]))
    losses = []
    for loss in (
        DistillationLoss("confidence", alpha=0.7, temperature=3.0),
        ExpandingLoss("confidence", alpha=0.7, temperature=3.0),
        DistillationLoss("confidence", alpha=0.7, temperature=3.0, topk_tail="student"),
    ):
        torch.manual_seed(1)
        module = DistillationModule(nn.Linear(6, 5), cache, loss, partial(torch.optim.SGD, lr=0.1))
        L.seed_everything(3)
        losses.append(_losses(module, IndexedDataModule(data())))
    sparse, dense, shaped = losses
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-5)
    assert np.isfinite(shaped).all() and not np.allclose(shaped, dense)


def test_benchmark_times_training_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path))
    tiny = {"num_samples": 200, "limit_batches": 2, "batch_size": 32, "teachers": ["mlp"]}
    report = run_benchmark(epochs=1, warmup=0, threads=1, workloads=("plain", "cached"), **tiny)
    workloads = report["workloads"]
    assert report["ratios"]["cached/plain"] == (
        workloads["cached"]["ms_per_epoch"] / workloads["plain"]["ms_per_epoch"]
    )
    (cache_dir,) = (tmp_path / "outputs").iterdir()
    assert CachedTeachers(cache_dir).names == ["mlp"]
    assert "cached/plain" in format_report(report)


def test_cached_augmented_views_give_the_live_losses(tmp_path):
    def noisy(x, generator):
        return x + 0.3 * torch.randn(x.shape, generator=generator)

    def data() -> AugmentedViewsDataModule:
        base = SyntheticDataModule(num_samples=120, in_features=6, num_classes=5, batch_size=16)
        return AugmentedViewsDataModule(base, noisy, num_views=3, seed=7)

    def module(teachers) -> DistillationModule:
        torch.manual_seed(1)
        return DistillationModule(nn.Linear(6, 5), teachers, DistillationLoss(alpha=0.5))

    views = data()
    views.setup("fit")
    sets = {"train": views.train_dataloader().dataset, "val": views.val_dataloader().dataset}
    cache = build_output_cache(ensemble(), sets, tmp_path)
    assert cache.manifest["splits"]["train"]["num_samples"] == 3 * 60
    L.seed_everything(3)
    live = _losses(module(ensemble()), data())
    L.seed_everything(3)
    cached = _losses(module(cache), IndexedDataModule(data()))
    assert len(live) == len(cached) == 2 + 2 * (4 + 2)
    np.testing.assert_allclose(cached, live, rtol=0, atol=1e-6)
