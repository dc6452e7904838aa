"""The README's embedding snippet runs as written (with a shorter training)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kd_lightning.models import CNN1D, MLP, GRUClassifier

README = Path(__file__).parents[1] / "README.md"


def readme_snippet(marker: str = "README snippet") -> str:
    text = README.read_text()
    match = re.search(
        rf"<!-- {marker}.*?-->\n(?:<!-- .*? -->\n)?```python\n(.*?)```", text, re.DOTALL
    )
    assert match, f"README lost its tested snippet ({marker})"
    return match.group(1)


def test_readme_snippet_distils_and_logs_agreement(tmp_path, monkeypatch):
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    Path("teachers").mkdir()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in CNN1D().state_dict().items()}},
        "teachers/cnn.ckpt",
    )
    torch.save(GRUClassifier().state_dict(), "teachers/gru.pt")
    save_file(MLP(hidden=512).state_dict(), "teachers/mlp.safetensors")
    shortened = snippet.replace(
        "max_epochs=100", "max_epochs=1, limit_train_batches=3, limit_val_batches=2"
    )
    assert shortened != snippet
    namespace: dict = {}
    exec(compile(shortened, str(README), "exec"), namespace)
    metrics = namespace["trainer"].callback_metrics
    for name in ("cnn", "gru", "mlp"):
        assert 0.0 <= float(metrics[f"val/agreement/student_vs_{name}"]) <= 1.0
    assert "val/agreement/cnn_vs_gru" in metrics
    assert any(Path("lightning_logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_readme_language_model_snippet_trains_hf_teachers_then_distils(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    snippet = readme_snippet("LM snippet")
    assert len(snippet.splitlines()) <= 25
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_LIGHTNING_CACHE", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    module = namespace["module"]
    assert module.teacher_names == ["gpt2", "llama"] and module.trainer.global_step == 20
    assert all(math.isfinite(value) for value in module.trainer.callback_metrics.values())
