"""The example notebooks run end to end (shrunk by KD_NOTEBOOK_SMOKE=1) and are stored without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).parents[1] / "notebooks"
# notebook -> files its run must leave in the working directory
NOTEBOOKS = {
    "quickstart.ipynb": [
        "outputs/quickstart/teachers/cnn.ckpt",
        "outputs/quickstart/teachers/gru.pt",
        "outputs/quickstart/teachers/mlp.safetensors",
        "outputs/quickstart/logs/distillation/version_0/metrics.csv",
        "outputs/quickstart/agreement_test.png",
    ],
    "fusion_comparison.ipynb": [
        "outputs/fusion_comparison/accuracy_by_rule.png",
        "outputs/fusion_comparison/fusion_weights_by_rule.png",
        "outputs/fusion_comparison/agreement_test.png",
    ],
}
CELL_TIMEOUT_S = 300


def read_notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def python3_kernel_of_this_interpreter(root: Path) -> None:
    """Write a ``python3`` kernelspec under ``root`` that runs this venv's interpreter."""
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (kd_lightning tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(name):
    nb = read_notebook(name)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{name}: code cell {index} has stored outputs"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"
        assert "execution" not in cell.metadata, f"{name}: code cell {index} has timing metadata"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_has_one_parameters_cell_first(name):
    code_cells = [cell for cell in read_notebook(name).cells if cell.cell_type == "code"]
    tagged = [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected exactly one cell tagged 'parameters'"
    assert tagged[0] is code_cells[0], f"{name}: the parameters cell must be the first code cell"
    assert "KD_NOTEBOOK_SMOKE" in tagged[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_in_smoke_mode(name, tmp_path, monkeypatch):
    kernels_root, workdir = tmp_path / "jupyter", tmp_path / "work"
    python3_kernel_of_this_interpreter(kernels_root)
    workdir.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(kernels_root))  # searched before user/system kernels
    monkeypatch.setenv("KD_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = read_notebook(name)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, f"{name}: cells raised {[error.ename for error in errors]}"
    missing = [path for path in NOTEBOOKS[name] if not (workdir / path).is_file()]
    assert not missing, f"{name} did not write {missing} into its working directory"
    images = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{name} displayed no figure"
