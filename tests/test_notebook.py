"""The attention-heatmap notebook: stored without outputs, and it runs headless end to end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "attention_heatmaps.ipynb"
KERNEL = "mil-pytest-python"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec that runs ipykernel in this very interpreter (not whatever `python3` resolves to)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "mil tests", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_notebook_executes(tmp_path, monkeypatch, this_python_kernel):
    from nbclient import NotebookClient

    monkeypatch.setenv("MIL_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MIL_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend shows the figures
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb,
        kernel_name=this_python_kernel,
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    print(f"notebook executed in {seconds:.0f} s")
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
    assert (tmp_path / "demo" / "demo_classification" / "summary.csv").is_file()
    images = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    )
    assert images >= 5  # ROC, two heatmap panels, distributions, fold stability
