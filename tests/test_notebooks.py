"""The example notebooks run end to end (shrunk by KD_NOTEBOOK_SMOKE=1); they are stored without
outputs, except the LM tour, stored with the outputs of a full run."""

from __future__ import annotations

import json
import re
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
    "lm_distillation.ipynb": [
        "outputs/lm_distillation/logs/distilled/version_0/metrics.csv",
        "outputs/lm_distillation/logs/scratch/version_0/metrics.csv",
        "outputs/lm_distillation/logs/from_cache/version_0/metrics.csv",
        "outputs/lm_distillation/val_loss.png",
    ],
}
# notebook -> texts its cells' outputs must show (printed, or displayed as markdown)
SHOWN = {
    "lm_distillation.ipynb": [
        "blocks of 64 tokens",
        "labels are the next tokens",
        "| student, distilled (live teachers) |",
        "| student, scratch |",
        "Distilled against scratch:",
        "bytes per token per teacher",
        "'distilled (top-k cache)'",
    ],
}
# notebooks stored with the outputs of a full run (the parameters cell's defaults), for readers
STORED_WITH_OUTPUTS = {"lm_distillation.ipynb"}
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


def shown_text(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed as text or markdown."""
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            if output.output_type == "stream":
                texts.append(output.text)
            elif "data" in output:
                texts.append(output.data.get("text/markdown", output.data.get("text/plain", "")))
    return "\n".join(texts)


@pytest.mark.parametrize("name", sorted(set(NOTEBOOKS) - STORED_WITH_OUTPUTS))
def test_notebook_is_stored_without_outputs(name):
    nb = read_notebook(name)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{name}: code cell {index} has stored outputs"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"
        assert "execution" not in cell.metadata, f"{name}: code cell {index} has timing metadata"


@pytest.mark.parametrize("name", sorted(STORED_WITH_OUTPUTS))
def test_notebook_is_stored_with_the_outputs_of_one_full_run(name):
    nb = read_notebook(name)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    # Executed once, top to bottom, without an error, a warning or timing metadata.
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    for index, cell in enumerate(code_cells):
        assert all(output.output_type != "error" for output in cell.outputs), f"cell {index}"
        stderr = [output.text for output in cell.outputs if output.get("name") == "stderr"]
        assert not stderr, f"{name}: code cell {index} wrote to stderr: {stderr}"
        assert "execution" not in cell.metadata, f"{name}: code cell {index} has timing metadata"
    shown = shown_text(nb)
    missing = [text for text in SHOWN[name] if text not in shown]
    assert not missing, f"{name}: the stored outputs do not show {missing}"
    steps = re.search(r"^STUDENT_STEPS = (\d+)", code_cells[0].source, re.MULTILINE)
    assert steps, f"{name}: the parameters cell sets no STUDENT_STEPS"
    assert f"{steps[1]} steps in" in shown, f"{name}: the stored outputs are not of a full run"
    assert any(
        "image/png" in output.get("data", {}) for cell in code_cells for output in cell.outputs
    ), f"{name} stores no figure"


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
    shown = shown_text(nb)
    missing = [text for text in SHOWN.get(name, []) if text not in shown]
    assert not missing, f"{name}: its outputs do not show {missing}"
