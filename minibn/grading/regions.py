"""Solution regions: finding them in the source and replacing them with stubs.

A solution region is a run of lines between two comment markers at the same
indentation::

    def normalize(x, mean, var, weight, bias, eps):
        \"\"\"docstring stays\"\"\"
        # >>> solution: bn_forward.normalize
        ...the code a student writes...
        # <<< solution: bn_forward.normalize

The marker names a *region id* ``TASK`` or ``TASK.PART``: ``TASK`` is the graded
task the region belongs to (a task may span several regions, in several files),
``PART`` tells regions of one task apart.  The closing marker repeats the id.
The hint shown to students (the article's formula) lives in the task table in
``tasks.py``, keyed by region id, so the markers stay one short line each.

Rules, checked by :func:`find_regions`: markers are whole comment lines; the
opening and closing markers of a region have the same indentation; every line
of the region is blank or indented at least as deep; regions do not nest; a
region is not empty.  :func:`stub_source` replaces every region's body by one
``raise NotImplementedError("<region id>: <hint>")`` at the marker's
indentation and keeps both markers, so the stubbed file still parses and the
grader (and course staff) can still find the regions.

This module uses only the standard library: the grader imports it without
importing the package under test.
"""
from __future__ import annotations

import ast
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

__all__ = ["Region", "MarkerError", "find_regions", "stub_source", "scan_tree", "OPEN", "CLOSE"]

OPEN = "# >>> solution: "
CLOSE = "# <<< solution: "
_OPEN_RE = re.compile(r"^(?P<indent>[ \t]*)# >>> solution: (?P<id>[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?)\s*$")
_CLOSE_RE = re.compile(r"^(?P<indent>[ \t]*)# <<< solution: (?P<id>[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?)\s*$")
_ANY_MARKER_RE = re.compile(r"#\s*(>>>|<<<)\s*solution")


class MarkerError(ValueError):
    """A malformed solution marker (the message names the file and line)."""


@dataclass(frozen=True)
class Region:
    """One solution region: ``start``/``end`` are the 0-based line numbers of its two markers."""
    region_id: str
    path: str
    start: int
    end: int
    indent: str

    @property
    def task(self) -> str:
        return self.region_id.split(".", 1)[0]

    @property
    def body_lines(self) -> int:
        return self.end - self.start - 1


def _indent_width(s: str) -> int:
    return len(s.expandtabs(8))


def find_regions(text: str, path: str = "<source>") -> List[Region]:
    """Every solution region of ``text``, in order; :class:`MarkerError` if a marker is malformed."""
    lines = text.splitlines()
    regions: List[Region] = []
    open_at: Optional[int] = None
    open_id = open_indent = ""
    for i, line in enumerate(lines):
        m_open, m_close = _OPEN_RE.match(line), _CLOSE_RE.match(line)
        where = f"{path}:{i + 1}"
        if m_open:
            if open_at is not None:
                raise MarkerError(f"{where}: region {m_open['id']!r} opens inside region {open_id!r} "
                                  f"(opened at line {open_at + 1}); regions do not nest")
            open_at, open_id, open_indent = i, m_open["id"], m_open["indent"]
        elif m_close:
            if open_at is None:
                raise MarkerError(f"{where}: closing marker for {m_close['id']!r} without an opening one")
            if m_close["id"] != open_id:
                raise MarkerError(f"{where}: closing marker names {m_close['id']!r}, but the open "
                                  f"region is {open_id!r} (line {open_at + 1})")
            if m_close["indent"] != open_indent:
                raise MarkerError(f"{where}: closing marker of {open_id!r} is indented differently "
                                  f"from its opening marker (line {open_at + 1})")
            body = lines[open_at + 1:i]
            if not any(b.strip() for b in body):
                raise MarkerError(f"{where}: region {open_id!r} is empty")
            for k, b in enumerate(body):
                if b.strip() and _indent_width(b[:len(b) - len(b.lstrip())]) < _indent_width(open_indent):
                    raise MarkerError(f"{path}:{open_at + 2 + k}: line of region {open_id!r} is indented "
                                      "less than its markers")
            regions.append(Region(open_id, path, open_at, i, open_indent))
            open_at = None
        elif _ANY_MARKER_RE.search(line) and line.lstrip().startswith("#"):
            raise MarkerError(f"{where}: malformed solution marker {line.strip()!r}; expected "
                              f"'{OPEN}TASK[.PART]' or '{CLOSE}TASK[.PART]' on a line of its own")
    if open_at is not None:
        raise MarkerError(f"{path}:{open_at + 1}: region {open_id!r} is never closed")
    return regions


def _raise_statement(indent: str, message: str, newline: str, width: int = 100) -> str:
    """``raise NotImplementedError("...")``, the message split into string literals of short lines."""
    chunks = textwrap.wrap(message, width=max(30, width - len(indent) - 8), drop_whitespace=False,
                           break_long_words=False, break_on_hyphens=False)
    if len(chunks) < 2 or "".join(chunks) != message:
        return f"{indent}raise NotImplementedError({message!r}){newline}"
    inner = indent + " " * 4
    body = newline.join(f"{inner}{chunk!r}" for chunk in chunks)
    return f"{indent}raise NotImplementedError({newline}{body}){newline}"


def stub_source(text: str, hint_for: Callable[[str], str], path: str = "<source>") -> str:
    """``text`` with the body of every region replaced by ``raise NotImplementedError(...)``.

    ``hint_for(region_id)`` gives the message after ``"<region id>: "``.  The
    result is checked to parse (:class:`MarkerError` otherwise).
    """
    regions = find_regions(text, path)
    if not regions:
        return text
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    out: List[str] = []
    pos = 0
    for r in regions:
        out.extend(lines[pos:r.start + 1])              # everything up to and including the opening marker
        message = f"{r.region_id}: {hint_for(r.region_id)}"
        out.append(_raise_statement(r.indent, message, newline))
        pos = r.end                                     # the closing marker is kept
    out.extend(lines[pos:])
    result = "".join(out)
    try:
        ast.parse(result, filename=path)
    except SyntaxError as exc:
        raise MarkerError(f"{path}: the stubbed file does not parse ({exc}); a region must be a "
                          "sequence of whole statements") from exc
    return result


def scan_tree(package_dir: str, exclude=("grading",)) -> Dict[str, List[Region]]:
    """``{relative path: regions}`` for every ``.py`` file under ``package_dir`` that has regions.

    Paths are relative to the package's parent (``minibn/functional.py``).  The
    sub-packages named in ``exclude`` are skipped: the grader's own files quote
    the marker format in their documentation.
    """
    found: Dict[str, List[Region]] = {}
    for root, dirs, files in os.walk(package_dir):
        top = os.path.abspath(root) == os.path.abspath(package_dir)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (top and d in exclude))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            rel = os.path.relpath(path, os.path.dirname(package_dir))
            regions = find_regions(text, rel)
            if regions:
                found[rel] = regions
    return found
