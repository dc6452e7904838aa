"""The documentation site builds with warnings as errors: a broken link, include or reference fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


def test_the_site_builds_strictly_with_an_api_reference(tmp_path):
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "api" / "fusion" / "index.html").read_text()
    assert "EntropyWeighted" in reference and "GradientSpaceWeights" in reference
    models = (tmp_path / "language-models" / "index.html").read_text()
    assert "from_config" in models  # the README's tested LM example, included
    assert (tmp_path / "figures" / "previous" / "accuracy.png").is_file()
