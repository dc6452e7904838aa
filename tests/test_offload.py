"""Teacher offloading: teachers stay on the host and visit the compute device one at a time.

What a CPU can show, and how. A CPU has one device, so a copy stands in for the device:
``offload.to_device`` is replaced by a clone (:class:`FakeDevice`) whose storage is tracked until
it is freed, a fake device allocator. Against it the tests show which teacher's tensors are lent
when, that the forward reads the lent copies, that only one teacher's copies are ever alive (the
bound: the largest teacher, not the sum), and that every tensor goes back. A real move of a whole
module to the ``meta`` device shows that the teachers stay on the host while everything else
moves, as when Lightning moves its module to a GPU. Real host-to-device copies, pinned memory and
CUDA memory are not shown: no GPU was available.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from kd_lightning import DistillationLoss, DistillationModule
from kd_lightning.teachers import DrawnTeachers, Standardize, TeacherEnsemble
from kd_lightning.teachers import offload as offload_module
from kd_lightning.teachers.cache.build import build_output_cache
from kd_lightning.teachers.offload import weight_bytes

from .conftest import NUM_CLASSES, NUM_FEATURES, make_trainer, small_mlp


class _GRUTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 6, batch_first=True)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(x.unsqueeze(-1))[0][:, -1])


def teachers() -> dict[str, nn.Module]:
    """Three teachers of different sizes, one with a weight used twice, one recurrent."""
    torch.manual_seed(0)
    shared = nn.Linear(NUM_FEATURES, NUM_FEATURES)
    return {
        "small": nn.Linear(NUM_FEATURES, NUM_CLASSES),
        "wide": small_mlp(hidden=64),
        "tied": nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(NUM_FEATURES, 2)),
        "gru": _GRUTeacher(),
    }


def options() -> dict:
    return {
        "input_transforms": {"small": Standardize(1.0, 2.0)},
        "class_maps": {"tied": [3, 0]},
        "num_classes": NUM_CLASSES,
    }


class FakeDevice:
    """Stands in for the compute device: a copy is a clone, whose bytes count until it is freed."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.owner = {
            t.data_ptr(): name
            for name, model in models.items()
            for t in (*model.parameters(), *model.buffers())
        }
        self.copies: list[str] = []  # the owner of each copy, in order
        self.live_bytes = 0
        self.peak_bytes = 0

    def __call__(self, host: Tensor, device: torch.device) -> Tensor:
        copy = host.clone()
        size = host.numel() * host.element_size()
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(copy.untyped_storage(), self._free, size)
        self.copies.append(self.owner[host.data_ptr()])
        return copy

    def _free(self, size: int) -> None:
        self.live_bytes -= size

    def lent(self, models: dict[str, nn.Module]) -> set[str]:
        """The teachers any of whose tensors is not its host tensor right now."""
        return {
            name
            for name, model in models.items()
            if any(t.data_ptr() not in self.owner for t in (*model.parameters(), *model.buffers()))
        }


@pytest.fixture
def fake_device(monkeypatch):
    def install(models: dict[str, nn.Module]) -> FakeDevice:
        device = FakeDevice(models)
        monkeypatch.setattr(offload_module, "to_device", device)
        return device

    return install


def test_teachers_visit_the_device_one_at_a_time_and_all_go_back(fake_device):
    models = teachers()
    ensemble = TeacherEnsemble(models, offload=True, **options())
    device = fake_device(models)
    during: list[tuple[str, set[str]]] = []
    for name, model in models.items():
        model.register_forward_pre_hook(
            lambda m, args, name=name: during.append((name, device.lent(models)))
        )
    gru = models["gru"].gru  # type: ignore[union-attr]
    flat: list[bool] = []
    gru.register_forward_pre_hook(
        lambda m, args: flat.append(all(w.data_ptr() not in device.owner for w in m._flat_weights))
    )
    x = torch.randn(5, NUM_FEATURES)
    logits = ensemble(x)

    assert during == [(name, {name}) for name in models]  # each alone on the device, in order
    assert flat == [True]  # the GRU's own list of its weights reads the lent copies
    counts = {name: len([*m.parameters(), *m.buffers()]) for name, m in models.items()}
    assert counts["tied"] == 4  # its shared Linear's two tensors are one copy each, not two
    assert device.copies == [name for name in models for _ in range(counts[name])]
    assert device.lent(models) == set() and device.live_bytes == 0  # all back, copies freed
    sizes = {name: weight_bytes(model) for name, model in models.items()}
    assert device.peak_bytes == max(sizes.values()) == sizes["wide"] < sum(sizes.values())
    assert ensemble._offload is not None and ensemble._offload.peak_bytes == device.peak_bytes
    transforms = weight_bytes(ensemble.input_transforms)
    assert ensemble.device_weight_bytes() == sizes["wide"] + transforms
    resident = TeacherEnsemble(teachers(), **options())
    assert resident.device_weight_bytes() == sum(sizes.values()) + transforms
    torch.testing.assert_close(logits, resident(x), rtol=0, atol=0)

    during.clear()
    device.copies.clear()
    ensemble(x, only=[2, 0])  # a subset, e.g. DrawnTeachers: only those visit, in that order
    assert during == [("tied", {"tied"}), ("small", {"small"})]
    assert set(device.copies) == {"tied", "small"} and device.copies[0] == "tied"
    during.clear()
    torch.manual_seed(0)
    DrawnTeachers(ensemble, per_step=1).outputs(x, batch=None, stage="train")
    assert len(during) == 1 and during[0][1] == {during[0][0]}


def test_a_failing_teacher_gives_every_tensor_back(fake_device):
    models = teachers()
    ensemble = TeacherEnsemble(models, offload=True, **options())
    device = fake_device(models)

    def fail(module, args):
        raise RuntimeError("out of memory, say")

    models["wide"].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        ensemble(torch.randn(3, NUM_FEATURES))
    assert device.lent(models) == set() and device.live_bytes == 0
    assert ensemble._offload is not None and ensemble._offload._lent_bytes == 0


@pytest.mark.parametrize(
    "runtime",
    [{}, {"inference_mode": True}, {"autocast_dtype": "bf16", "inference_mode": True}],
    ids=["plain", "inference_mode", "bf16_autocast"],
)
def test_offloaded_outputs_are_the_resident_ensembles(runtime, fake_device):
    resident = TeacherEnsemble(teachers(), **options(), **runtime)
    models = teachers()
    offloaded = TeacherEnsemble(models, **options(), **runtime, offload=True)
    fake_device(models)  # the forward reads copies, not the host tensors
    x = torch.randn(6, NUM_FEATURES)
    for ensemble in (resident, offloaded):
        ensemble.tap({"wide": "0"})
    expected, got = resident.outputs(x), offloaded.outputs(x)
    assert torch.equal(got.logits, expected.logits) and not got.logits.is_inference()
    assert torch.equal(got.features["wide"], expected.features["wide"])
    assert torch.equal(offloaded.view("gru")(x), resident.view("gru")(x))
    assert torch.equal(offloaded(x, only=[3, 1]), resident(x, only=[3, 1]))
    assert offloaded.select(["tied"]).offload


def test_moving_the_module_leaves_the_teachers_on_the_host():
    models = teachers()
    ensemble = TeacherEnsemble(models, offload=True, **options())
    module = DistillationModule(small_mlp(), ensemble, save_teachers=True)
    resident = DistillationModule(
        small_mlp(), TeacherEnsemble(teachers(), **options()), save_teachers=True
    )
    assert module.state_dict().keys() == resident.state_dict().keys()

    module.to("meta")  # a real move of the whole module, as Lightning moves it to a GPU
    assert ensemble.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in module.student.parameters())
    assert all(
        t.device.type == "cpu"
        for t in (*ensemble.teachers.parameters(), *ensemble.teachers.buffers())
    )
    assert ensemble.input_transforms["small"].mean.device.type == "meta"  # transforms follow
    assert ensemble._class_index_tied.device.type == "meta"  # so do class maps
    module.to(torch.float64)  # a dtype change reaches the teachers, on the host
    assert {(t.device.type, t.dtype) for t in ensemble.teachers.parameters()} == {
        ("cpu", torch.float64)
    }
    assert module.state_dict().keys() == resident.state_dict().keys()


def test_offload_refuses_stacked_naming_both_options():
    same = {f"t{k}": small_mlp() for k in range(2)}
    with pytest.raises(ValueError, match=r"offload=True \(teacher_runtime\.offload\).*stacked"):
        TeacherEnsemble(same, offload=True, stacked=True)


def test_lightning_fit_with_offloaded_teachers_trains_the_same_student(tmp_path, datamodule):
    def fit(offload: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        ensemble = TeacherEnsemble(teachers(), **options(), offload=offload)
        module = DistillationModule(small_mlp(), ensemble, DistillationLoss(alpha=0.5))
        trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
        trainer.fit(module, datamodule=datamodule)
        trainer.save_checkpoint(tmp_path / f"offload{offload}.ckpt")
        checkpoint = torch.load(tmp_path / f"offload{offload}.ckpt", weights_only=False)
        return checkpoint["state_dict"]

    resident_state, offloaded_state = fit(False), fit(True)
    assert resident_state.keys() == offloaded_state.keys()
    for key, value in resident_state.items():
        assert torch.equal(offloaded_state[key], value), key


def test_a_cache_of_offloaded_teachers_holds_the_resident_logits(tmp_path):
    x = torch.randn(20, NUM_FEATURES)
    data = {"train": TensorDataset(x, torch.zeros(20))}
    resident = TeacherEnsemble(teachers(), **options())
    offloaded = TeacherEnsemble(teachers(), **options(), offload=True)
    cache = build_output_cache(offloaded, data, tmp_path, batch_size=8)
    assert cache.path == build_output_cache(resident, data, tmp_path, batch_size=8).path
    assert torch.equal(cache.logits("train", torch.arange(20)), resident(x))


def test_the_config_passes_teacher_runtime_offload_on(tmp_path):
    from kd_lightning.cli.teacher_checkpoints import STEP_OPTIONS, build_teachers
    from kd_lightning.teachers.runtime import RUNTIME_OPTIONS

    from .app_helpers import FAST, compose_config

    cfg = compose_config(tmp_path, FAST)
    assert set(cfg.teacher_runtime) - set(STEP_OPTIONS) == set(RUNTIME_OPTIONS)
    assert cfg.teacher_runtime.offload is False
    assert cfg.teacher_runtime.check_finite == "first_step"
    cfg = compose_config(tmp_path, [*FAST, "teacher_runtime.offload=true"])
    options = {k: v for k, v in cfg.teacher_runtime.items() if k not in STEP_OPTIONS}
    assert TeacherEnsemble({"a": small_mlp()}, **options).offload
    both = ["teacher_runtime.offload=true", "teacher_runtime.stacked=true"]
    with pytest.raises(ValueError, match=r"teacher_runtime\.offload"):
        build_teachers(compose_config(tmp_path, [*FAST, *both]), datamodule=None)


@pytest.mark.slow
def test_offloaded_compiled_teachers_give_the_resident_logits(fake_device):
    models = {name: model for name, model in teachers().items() if name != "gru"}
    resident = TeacherEnsemble({k: v for k, v in teachers().items() if k != "gru"}, **options())
    compiled = TeacherEnsemble(models, **options(), compile_teachers=True, offload=True)
    device = fake_device(models)
    x = torch.randn(4, NUM_FEATURES)
    try:
        logits = compiled(x)
    except Exception as error:  # no working compiler toolchain on this machine
        pytest.skip(f"torch.compile unavailable: {error}")
    torch.testing.assert_close(logits, resident(x))
    assert device.lent(models) == set() and device.peak_bytes == max(
        weight_bytes(m) for m in models.values()
    )
    with torch._dynamo.config.patch(error_on_recompile=True):  # new copies, the same graphs
        torch.testing.assert_close(compiled(x), resident(x))
