"""The documentation site builds with warnings as errors: a broken link, include or reference fails;
the results page quotes the generated tables as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
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
    assert (tmp_path / "figures" / "mnist1d" / "accuracy.png").is_file()


def markdown_table(text: str, header: str) -> list[str]:
    """The lines of the table whose first line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_results_page_quotes_the_mnist1d_table_as_kd_results_wrote_it():
    page = (ROOT / "docs" / "results.md").read_text().split("## MNIST-1D\n")[1]
    table = (ROOT / "results" / "mnist1d" / "mnist1d.md").read_text()
    quoted = markdown_table(page, "| group |")
    assert len(quoted) == 28  # header, rule, scratch and 25 entries
    assert quoted == markdown_table(table, "| group |")
