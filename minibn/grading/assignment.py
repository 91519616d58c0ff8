"""``python -m minibn assignment OUT_DIR``: the student copy of minibn.

The copy holds ``minibn/`` (every solution region replaced by a
``NotImplementedError`` that states the article's formula), ``lessons/`` and a
``README.md`` for students.  Everything outside the regions is copied
unchanged, so the copy imports and its lessons run up to the first missing
piece.  The grader itself (``minibn/grading``, which holds a reference
solution) is replaced by a small module that says it is kept by the staff.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from typing import Dict, List

from .regions import scan_tree, stub_source
from .tasks import TASKS, hint_for

__all__ = ["write_assignment", "student_readme"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO = os.path.dirname(_PACKAGE)

_GRADING_PLACEHOLDER = '''"""The course grader is kept by the course staff and is not part of this copy.

Check your work with ``python -m minibn check`` (the public cases), the lessons
(``python -m minibn lesson N``) and finite differences
(``minibn.gradcheck.check_layer``); see README.md.
"""


def _staff_only(*args, **kwargs):
    raise SystemExit("minibn: the grader is not part of the student copy; hand your minibn/ in to be graded")


write_assignment = main = _staff_only
'''


def _ignore(directory, names):
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def student_readme(regions_by_file: Dict[str, list]) -> str:
    by_task: Dict[str, List[str]] = {}
    for rel, regions in regions_by_file.items():
        for r in regions:
            where = f"`{rel}` line {r.start + 1} (`{r.region_id}`)"
            if "." in r.region_id:
                where += f": {hint_for(r.region_id)}"
            by_task.setdefault(r.task, []).append(where)
    lines = [
        "# minibn: the batch-normalization assignment",
        "",
        "This is minibn, a small batch-normalization framework written to accompany the article",
        "*Batch Normalization in Neural Networks: A Comprehensive Guide*, with the interesting parts",
        "taken out. Each missing piece is a **solution region** between two comment lines:",
        "",
        "```python",
        "        # >>> solution: bn_forward.normalize",
        "        raise NotImplementedError(\"bn_forward.normalize: ...the formula to implement...\")",
        "        # <<< solution: bn_forward.normalize",
        "```",
        "",
        "Replace the `raise` line with your code. Keep both marker lines (the grader uses them) and",
        "change nothing outside the regions: everything else already works and relies on the",
        "signatures and return values described in the docstrings.",
        "",
        "## The tasks",
        "",
    ]
    for t in TASKS:
        if t.id not in by_task:
            continue
        lines.append(f"### `{t.id}`: {t.title} ({t.points} points)")
        lines.append("")
        lines.append(t.hint)
        lines.append("")
        lines.extend(f"- {where}" for where in by_task[t.id])
        lines.append("")
    lines += [
        "## Setup",
        "",
        "You need Python 3 and NumPy (`pip install numpy`; matplotlib draws the lessons' figures). Work in",
        "this folder, the one that holds `minibn/`, `lessons/` and this README: every command below runs",
        "from here, so `import minibn` is your copy. Do not `pip install` this copy or the course's full",
        "minibn into the environment you work in; if one is installed, the commands below still use this",
        "folder's `minibn/`.",
        "",
        "## Running the lessons on your code",
        "",
        "The lessons (one per article section) print the article's worked examples step by step,",
        "computed by *your* code, and stop with `NotImplementedError` at the first missing piece:",
        "",
        "```",
        "python -m minibn lesson 2        # or: python lessons/02_core_logic.py",
        "python -m minibn lessons         # all of them",
        "```",
        "",
        "Both import this folder's `minibn/`, never an installed one (each lesson starts with two lines",
        "that put this folder first on `sys.path`).",
        "",
        "## Checking your work: `python -m minibn check`",
        "",
        "```",
        "python -m minibn check                  # every task's public cases",
        "python -m minibn check bn_forward       # one task",
        "```",
        "",
        "runs the public cases on your code: the article's worked examples (section 2's x = [2, 4, 6, 8],",
        "gamma 2, beta 1, eps 1e-5; section 3's running mean 4.5, 5.85, 6.885; section 6's merge of",
        "per-part moments) and finite-difference checks of your backward passes. A failing case prints",
        "its task, its name and what differs, with both numbers in full and their difference, in the",
        "form the grader uses, e.g.",
        "",
        "```",
        "FAIL  bn_forward / article_section2_example  var (biased: divide by m): relative error 3.33e-01 > 1e-12;",
        "      worst at index [0]: got 6.666666666666667, expected 5.0 (difference 1.67)",
        "```",
        "",
        "The exit status is 0 only when every public case passes. Passing them is necessary, not",
        "sufficient: the grader runs more cases, which stay with the course staff. SyncBatchNorm has no",
        "public case here (the grader runs it under `mpiexec -n 2`; lesson 5 exercises it).",
        "",
        "More on your own:",
        "",
        "- `minibn.gradcheck.check_layer(layer, x)` compares a layer's backward with finite differences",
        "  (use float64 input); relative errors around 1e-8 or smaller mean the gradient is right.",
        "- Conventions (they are graded): the variance used to normalize is biased (divide by m); the",
        "  running variance is updated with the unbiased one (m / (m - 1)), in place (write into the",
        "  buffers, do not rebind them); `momentum` is the weight of the *new* batch, as in the article",
        "  and PyTorch; float32 in gives float32 out; never modify the inputs you are given.",
        "- A slip in the article: its third running-mean step (section 3) reads 6.765, but its own",
        "  formula gives (1 - 0.9) * 5.85 + 0.9 * 7.0 = 0.585 + 6.3 = 6.885, which is what is graded.",
        "",
        "## Grading",
        "",
        "Hand in your `minibn/` folder. The grader takes only the code inside your solution regions: it",
        "splices them into its own pristine copy of this handout, so changes to files outside the",
        "regions are not used (the report lists them). Each task is graded on its own, with the other",
        "tasks replaced by a reference solution, so a crash in one region costs only its task; a task's",
        "code may not call another task's solution. Your functions run in an isolated process that",
        "gets the inputs (read-only) and sends back its outputs; the grader compares them, on hidden",
        "cases (the article's numbers, an independent float64 implementation, finite differences,",
        "randomized inputs, shapes from 2-D to 5-D, eps, affine on and off, dtypes, eval mode, running",
        "statistics over several steps, and SyncBatchNorm under `mpiexec -n 2` with uneven batches).",
        "Every case has a time limit. The score of a task is its points times the fraction of its",
        "cases that pass.",
        "",
    ]
    return "\n".join(lines)


def write_assignment(out_dir: str, source_package: str = _PACKAGE, check_import: bool = True) -> str:
    """Write the student copy into ``out_dir`` (which must not exist or be empty); returns its path."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"minibn assignment: {out_dir} exists and is not empty; give a new directory")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "minibn")
    shutil.copytree(source_package, target, ignore=_ignore)
    shutil.rmtree(os.path.join(target, "grading"), ignore_errors=True)
    shutil.rmtree(os.path.join(target, "lessons"), ignore_errors=True)   # an installed copy: goes to lessons/
    os.makedirs(os.path.join(target, "grading"))
    with open(os.path.join(target, "grading", "__init__.py"), "w") as f:
        f.write(_GRADING_PLACEHOLDER)
    for rel in scan_tree(target):
        path = os.path.join(out_dir, rel)
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(stub_source(text, hint_for, rel))
    _force_reference_path(target)
    _leave_out_working_alternatives(target)
    lessons = os.path.join(os.path.dirname(source_package), "lessons")        # a clone
    if not os.path.isdir(lessons):
        lessons = os.path.join(source_package, "lessons")                     # an installed wheel
    if os.path.isdir(lessons):
        shutil.copytree(lessons, os.path.join(out_dir, "lessons"), ignore=_ignore)
        _import_this_copy(os.path.join(out_dir, "lessons"))
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(student_readme(scan_tree(target)))        # line numbers of the stubbed files
    if check_import:
        _check_imports(out_dir)
    return out_dir


# Two lines before a lesson's first import: `python lessons/NN_topic.py` imports the copy's own
# minibn (the folder above lessons/), never an installed one (in a notebook there is no __file__;
# there the notebook's folder decides).
LESSON_PREAMBLE = (
    "import os, sys  # this copy's own minibn (the folder above lessons/), never an installed one\n"
    "if \"__file__\" in globals(): sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))\n"
)


def _import_this_copy(lessons_dir: str):
    """Put :data:`LESSON_PREAMBLE` before the first import of every lesson in ``lessons_dir``."""
    for name in sorted(os.listdir(lessons_dir)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(lessons_dir, name)
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines(keepends=True)
        first = next((i for i, ln in enumerate(lines)
                      if ln.startswith(("import ", "from ")) and not ln.startswith("from __future__")), None)
        if first is None:
            continue
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("".join(lines[:first]) + LESSON_PREAMBLE + "".join(lines[first:]))


_REFERENCE_DEFAULT = """# Student copy: the layers run the readable ``functional`` code (yours): the reference engine
# is the default engine (MINIBN_KERNELS is read once, when minibn.engines is first imported).
import os as _os
_os.environ["MINIBN_KERNELS"] = "reference"
"""


def _force_reference_path(target: str):
    """Make the copy's layers use the code the student writes.

    The fast engines (``engines/``) are a faster arrangement of the same math
    that layers would use by default.  The copy's ``__init__.py`` selects the
    reference engine (``functional.py``) as the default, with ``MINIBN_KERNELS``
    semantics, before anything imports the engines; an explicit choice
    (``using_engine``, a layer's ``engine``) still works.
    """
    init = os.path.join(target, "__init__.py")
    with open(init, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    head = _header_lines("".join(lines))
    with open(init, "w", encoding="utf-8") as f:
        f.write("".join(lines[:head]) + _REFERENCE_DEFAULT + "".join(lines[head:]))


# The fast engines, the benchmark and the GPU check are a second, working implementation of the
# tasks' math (or run one): they are not part of the copy.  Of the engines package only what the
# reference engine (``functional.py`` itself) needs is kept: a list of what stays, so that an
# engine added later is left out without anyone remembering to name it here.
_LEFT_OUT = ("bench.py", "gpu_check.py")
_ENGINES_KEPT = ("__init__.py", "interface.py", "selection.py", "reference.py")

_ENGINES_INIT = '''"""Engines: what computes batch norm.  This copy has one, ``reference``: ``functional.py`` itself.

The course's full minibn also has fast engines (tiled NumPy, numba, CuPy); they are a
second implementation of the math you write, so they are not part of this copy, and
selecting one says so.
"""
from contextlib import contextmanager as _contextmanager

from .interface import Engine
from .selection import (default_engine_name, engine_available, engine_names, get_engine, select_engine,
                        using_engine)


def num_threads() -> int:
    """Threads of the fast engines: none in this copy."""
    return 1


def set_num_threads(n):
    return 1


def release_buffers():
    return None


@_contextmanager
def no_output_recycling():
    yield


__all__ = ["Engine", "get_engine", "select_engine", "using_engine", "engine_names", "engine_available",
           "default_engine_name", "num_threads", "set_num_threads", "release_buffers", "no_output_recycling"]
'''

_MERGE_RECORDS_BODY = '''    # Student copy: the pairwise merge is your moments.merge_moments, record by record.
    from .moments import merge_moments
    a = np.asarray(a, dtype=np.float64).reshape(-1, RECORD_WIDTH)
    b = np.asarray(b, dtype=np.float64).reshape(-1, RECORD_WIDTH)
    if out is None:
        out = np.empty_like(b)
    for i in range(a.shape[0]):
        (na, ma, va), (nb, mb, vb) = a[i], b[i]
        if na < 0 or nb < 0:
            out[i] = (HEADER_MARK, min(ma, mb), max(va, vb))
        elif na + nb == 0:
            out[i] = (0.0, 0.0, 0.0)
        else:
            total, mean, var = merge_moments(np.array([na, nb]), np.array([ma, mb]), np.array([va, vb]))
            out[i] = (total, mean, var)
    return out
'''


def _leave_out_working_alternatives(target: str):
    """Remove the fast engines and the benchmark; the engine interface keeps its base class only;
    ``comm.merge_moment_records`` merges with the student's ``merge_moments``."""
    engines = os.path.join(target, "engines")
    left_out = [os.path.join(target, rel) for rel in _LEFT_OUT]
    left_out += [os.path.join(engines, name) for name in os.listdir(engines) if name not in _ENGINES_KEPT]
    for path in left_out:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    with open(os.path.join(engines, "__init__.py"), "w", encoding="utf-8") as f:
        f.write(_ENGINES_INIT)
    interface = os.path.join(engines, "interface.py")
    with open(interface, encoding="utf-8") as f:
        text = f.read()
    text = text[:text.index("\nclass FastEngine")].rstrip() + "\n"
    text = text.replace("from .coefficients import KernelCache, NeedsFloat64, check_range, forward_coefficients\n", "")
    text = text.replace('__all__ = ["Engine", "FastEngine"]', '__all__ = ["Engine"]')
    with open(interface, "w", encoding="utf-8") as f:
        f.write(text)
    _replace_function_body(os.path.join(target, "comm.py"), "merge_moment_records", _MERGE_RECORDS_BODY)


def _replace_function_body(path: str, name: str, body: str):
    """Everything of function ``name`` after its docstring replaced by ``body``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    fn = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == name)
    lines = text.splitlines(keepends=True)
    first = fn.body[1].lineno - 1 if ast.get_docstring(fn) else fn.body[0].lineno - 1
    new = "".join(lines[:first]) + body + "".join(lines[fn.end_lineno:])
    ast.parse(new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def _header_lines(source: str) -> int:
    """Lines of a module's docstring and ``from __future__`` imports (code must come after)."""
    end = 0
    for node in ast.parse(source).body:
        is_docstring = (end == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                        and isinstance(node.value.value, str))
        if not (is_docstring or (isinstance(node, ast.ImportFrom) and node.module == "__future__")):
            break
        end = node.end_lineno
    return end


def _check_imports(out_dir: str):
    """The copy must import (non-solution code must not call a stub at import time)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=out_dir, PYTHONDONTWRITEBYTECODE="1")
    code = ("import os, sys, minibn, minibn.functional, minibn.moments, minibn.nn\n"
            "assert os.path.realpath(minibn.__file__).startswith(os.path.realpath(sys.argv[1]))\n")
    proc = subprocess.run([sys.executable, "-c", code, out_dir], cwd=out_dir, env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"minibn assignment: the student copy in {out_dir} does not import:\n{proc.stderr}")
