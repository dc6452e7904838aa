"""kd-bench's memory probe: teachers under no_grad add no autograd state, only their weights."""

from __future__ import annotations

import pytest

from kd_lightning.bench.memory import memory_table, probe, probe_in_subprocess

TINY = {"teachers": ["cnn", "gru", "mlp"], "batch_size": 32, "num_samples": 200, "seed": 0}
BATCH, CLASSES = 32, 10


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path / "cache"))


def test_live_teachers_save_nothing_for_backward():
    plain = probe("plain", limit_batches=2, **TINY)
    live = probe("live", limit_batches=2, **TINY)
    handwritten = probe("handwritten", limit_batches=2, **TINY)
    assert live["autograd_saved_bytes_per_step"] == handwritten["autograd_saved_bytes_per_step"]
    # Beyond the student's own activations, distillation saves a couple of (B, C) float32
    # tensors (the fused target and its softmax), far below one teacher's activations.
    extra = live["autograd_saved_bytes_per_step"] - plain["autograd_saved_bytes_per_step"]
    assert 0 < extra <= 4 * BATCH * CLASSES * 4
    assert live["teacher_weight_bytes"] > 0 == plain["teacher_weight_bytes"]
    assert live["student_weight_bytes"] == plain["student_weight_bytes"] > 0

    table = "\n".join(memory_table({"plain": plain, "live": live}))
    assert "saved KiB/step" in table and f"{live['teacher_weight_bytes'] / 2**20:.2f}" in table


@pytest.mark.slow
def test_probe_runs_in_a_fresh_process():
    alone = probe_in_subprocess("plain_handwritten", limit_batches=1, **TINY)
    assert alone["workload"] == "plain_handwritten" and alone["teacher_weight_bytes"] == 0
    assert alone["autograd_saved_bytes_per_step"] > 0
    assert alone["peak_rss_growth_bytes"] is None or alone["peak_rss_growth_bytes"] >= 0
