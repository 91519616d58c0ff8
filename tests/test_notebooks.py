"""Every lesson, converted to a notebook (``python -m minibn notebooks``), executes headless from top
to bottom in a Jupyter kernel and shows its section's figure inline."""
from __future__ import annotations

import os

import pytest

from lesson_utils import LESSONS, REPO

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from minibn.notebooks import write_notebooks  # noqa: E402

LESSON_SCRIPTS = sorted(os.path.join(LESSONS, f) for f in os.listdir(LESSONS)
                        if f[:2].isdigit() and f.endswith(".py"))
# section 3 of the article has no figure of its own (lesson 4 draws the running statistics)
WITHOUT_FIGURE = {"03_running_statistics"}


def images(notebook):
    return [o for cell in notebook["cells"] if cell["cell_type"] == "code"
            for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


@pytest.mark.slow
@pytest.mark.parametrize("script", LESSON_SCRIPTS, ids=lambda p: os.path.basename(p)[:2])
def test_notebook_executes_and_shows_its_figure(script, tmp_path, monkeypatch):
    import nbformat
    monkeypatch.setenv("MINIBN_LESSON_FIGURES", str(tmp_path / "written"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    path, = write_notebooks(str(tmp_path), [script])
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    client.execute()                # raises CellExecutionError, naming the cell, on any error
    errors = [o for cell in notebook["cells"] for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    name = os.path.splitext(os.path.basename(script))[0]
    if name not in WITHOUT_FIGURE:
        assert images(notebook), f"{name}: no figure shown inline"
    assert not os.path.exists(tmp_path / "written"), "a notebook wrote figure files"
