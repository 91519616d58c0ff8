"""The lessons as Jupyter notebooks: ``python -m minibn notebooks OUT_DIR``.

A lesson is a Python script in the "percent" format: an optional commented
YAML header between two ``# ---`` lines, then cells, each opened by a marker
line, ``# %%`` (code) or ``# %% [markdown]`` (text, every line commented with
``#``).  :func:`percent_to_notebook` turns that into an nbformat 4.5 notebook
(plain JSON: cells with ``id``, ``source`` as a list of lines, code cells with
no outputs yet).  Anything else in the file is an error that names the line, so
a lesson written in some other way is refused instead of converted wrongly.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Sequence

__all__ = ["percent_to_notebook", "write_notebooks"]

_MARKER = re.compile(r"^# %%(?P<rest>.*)$")
_KINDS = {"": "code", "[markdown]": "markdown", "[md]": "markdown"}
_HEADER_FENCE = "# ---"
NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _skip_header(lines: List[str]) -> int:
    """Index of the first line after the commented YAML header (0 when there is none)."""
    if not lines or lines[0].rstrip() != _HEADER_FENCE:
        return 0
    for i in range(1, len(lines)):
        if lines[i].rstrip() == _HEADER_FENCE:
            return i + 1
    raise ValueError(f"line 1: the header opened by {_HEADER_FENCE!r} is never closed")


def _uncomment(line: str, number: int) -> str:
    """A markdown line: ``# text`` -> ``text``, ``#`` or an empty line -> ``""``."""
    if line.strip() == "" or line.rstrip() == "#":
        return ""
    if line.startswith("# "):
        return line[2:]
    raise ValueError(f"line {number}: a markdown cell holds only comment lines ('# ...'), got {line!r}")


def _trim(lines: List[str]) -> List[str]:
    """Drop the blank lines at both ends of a cell."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _cell(kind: str, lines: List[str], index: int) -> Dict:
    source = [line + "\n" for line in lines[:-1]] + lines[-1:]
    cell = {"cell_type": kind, "id": f"cell-{index}", "metadata": {}, "source": source}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def percent_to_notebook(text: str) -> Dict:
    """The notebook (a JSON-ready dict) of a percent-format script; ``ValueError`` names a bad line."""
    lines = text.splitlines()
    blocks = []                                   # [kind, [lines]] in order
    kind, body = "code", []                       # text before the first marker is code
    for i in range(_skip_header(lines), len(lines)):
        match = _MARKER.match(lines[i])
        if match is None:
            body.append(_uncomment(lines[i], i + 1) if kind == "markdown" else lines[i])
            continue
        blocks.append((kind, body))
        rest = match.group("rest").strip()
        if rest not in _KINDS:
            raise ValueError(f"line {i + 1}: unsupported cell marker {lines[i]!r} "
                             f"(expected '# %%' or '# %% [markdown]')")
        kind, body = _KINDS[rest], []
    blocks.append((kind, body))
    cells = [(k, _trim(b)) for k, b in blocks]
    cells = [_cell(k, b, n) for n, (k, b) in enumerate((c for c in cells if c[1]), start=1)]
    return {"cells": cells, "metadata": dict(NOTEBOOK_METADATA), "nbformat": 4, "nbformat_minor": 5}


def write_notebooks(out_dir: str, scripts: Sequence[str], overwrite: bool = False) -> List[str]:
    """Write ``OUT_DIR/NN_topic.ipynb`` for each script; returns the paths written.

    Existing notebooks are kept (``FileExistsError`` names them) unless
    ``overwrite``: a reader may have edited them.  Every script is converted
    before anything is written, so a bad one leaves the folder unchanged.
    """
    targets = [os.path.join(out_dir, os.path.splitext(os.path.basename(s))[0] + ".ipynb") for s in scripts]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} notebook(s) already in {out_dir} "
                              f"({', '.join(os.path.basename(t) for t in existing)}); "
                              f"pass --force to overwrite them")
    notebooks = []
    for script in scripts:
        with open(script, encoding="utf-8") as f:
            try:
                notebooks.append(percent_to_notebook(f.read()))
            except ValueError as e:
                raise ValueError(f"{script}: {e}") from None
    os.makedirs(out_dir, exist_ok=True)
    for target, notebook in zip(targets, notebooks):
        with open(target, "w", encoding="utf-8") as f:
            json.dump(notebook, f, indent=1, ensure_ascii=False)
            f.write("\n")
    return targets
