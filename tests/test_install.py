"""minibn installed the way users install it: the wheel, in a fresh virtual environment.

The source tree of the minibn under test (the folder holding the imported
``minibn/``) is copied, its sdist built, the wheel built from that sdist, and
the wheel installed with ``pip`` into a new virtual environment whose
dependencies come from the package index, pinned by ``constraints.txt``.  The
commands then run from a temporary folder with no ``PYTHONPATH``: nothing can
reach the source tree.  Every subprocess has a time limit.

It needs the network and takes about a minute and a half (most of it
``article``, which runs every lesson and renders every figure), so it runs
only with ``MINIBN_TEST_INSTALL=1``: ``make test-install``, part of ``make test``.
Run it with ``-s`` to see each command, its time and the tail of its output.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from lesson_utils import parse_values

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MINIBN_TEST_INSTALL") != "1",
                       reason="builds the wheel and a fresh virtual environment from PyPI: "
                              "set MINIBN_TEST_INSTALL=1 (`make test-install`)"),
]

import minibn  # noqa: E402  (the minibn under test: a clone, or /tmp/base with PYTHONPATH)

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(minibn.__file__)))
NOT_COPIED = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
              ".hypothesis", "notebooks", "out")
TRAINED = ("s1_", "s6_batch_size_dependence")
LESSONS = ("01_intuition", "02_core_logic", "03_running_statistics", "04_dynamic_momentum",
           "05_sync_batchnorm", "06_multi_gpu_running_stats", "07_alternatives")


def user_env():
    """The environment of a user's shell: nothing that points Python at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "MINIBN_", "VIRTUAL_ENV", "CONDA"))}
    env.update(MPLBACKEND="Agg", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def run(cmd, cwd, timeout, expect=0):
    """Run ``cmd`` in ``cwd``; show it with its time and output; check its exit status."""
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=user_env(), capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    shown = " ".join(os.path.basename(str(c)) if i == 0 else str(c) for i, c in enumerate(cmd))
    print(f"\n$ {shown}    (in {os.path.basename(str(cwd))}/, {seconds:.1f} s, exit {proc.returncode})")
    print("\n".join((proc.stdout + proc.stderr).rstrip().splitlines()[-12:]))
    if expect is not None:
        assert (proc.returncode == 0) == (expect == 0), \
            f"{shown}: exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


def python_files(directory):
    """``{path relative to directory}`` of every ``.py`` file under it."""
    found = set()
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/")
                     for f in files if f.endswith(".py"))
    return found


# =========================================================================== build and install

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(sdist, wheel)``: the sdist of a copy of the source tree, and the wheel built from that sdist."""
    assert os.path.isfile(os.path.join(SOURCE, "setup.cfg")), f"{SOURCE} is not a minibn source tree"
    tmp = tmp_path_factory.mktemp("build")
    tree = tmp / "source"
    shutil.copytree(SOURCE, tree, ignore=shutil.ignore_patterns(*NOT_COPIED))
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", build_sdist, tmp / "dist"], tree, 300).stdout.strip().splitlines()[-1]
    sdist = tmp / "dist" / name
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked")
    (unpacked,) = glob.glob(str(tmp / "unpacked" / "minibn-*"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", tmp / "wheels", unpacked], tmp, 300)
    (wheel,) = glob.glob(str(tmp / "wheels" / "minibn-*.whl"))
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """``(python, work)``: the fresh environment's interpreter, and an empty folder to run in."""
    tmp = tmp_path_factory.mktemp("user")
    run([sys.executable, "-m", "venv", tmp / "venv"], tmp, 300)
    python = tmp / "venv" / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", "-c", os.path.join(SOURCE, "constraints.txt"),
         built[1]], tmp, 600)
    work = tmp / "work"
    work.mkdir()
    return python, work


def minibn_cli(installed, *args, timeout=300, expect=0):
    python, work = installed
    return run([python, "-m", "minibn", *args], work, timeout, expect)


# =========================================================================== what the archives hold

def test_sdist_holds_what_make_test_needs(built):
    with tarfile.open(built[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"Makefile", "constraints.txt", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in"}
    needed |= {f"tests/{p}" for p in python_files(os.path.join(SOURCE, "tests"))}
    needed |= {f"lessons/{p}" for p in python_files(os.path.join(SOURCE, "lessons"))}
    needed |= {f"minibn/{p}" for p in python_files(os.path.join(SOURCE, "minibn"))}
    needed |= {f"figures/{f}" for f in os.listdir(os.path.join(SOURCE, "figures"))}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_holds_the_package_and_its_lessons_only(built):
    with zipfile.ZipFile(built[1]) as whl:
        names = set(whl.namelist())
    metadata = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    package = {n[len("minibn/"):] for n in names - metadata if n.startswith("minibn/")}
    assert names == metadata | {f"minibn/{p}" for p in package}, "files outside minibn/ in the wheel"
    expected = python_files(os.path.join(SOURCE, "minibn"))
    expected |= {f"lessons/{name}.py" for name in LESSONS}
    assert package == expected, (f"missing: {sorted(expected - package)}; "
                                 f"not part of the package: {sorted(package - expected)}")


# =========================================================================== the commands, installed

def test_the_installed_minibn_is_the_wheel(installed):
    python, work = installed
    where = run([python, "-c", "import minibn; print(minibn.__file__)"], work, 120).stdout.strip()
    assert os.path.realpath(where).startswith(os.path.realpath(python.parent.parent))
    assert not os.path.realpath(where).startswith(os.path.realpath(SOURCE) + os.sep)


def test_lesson_2_prints_the_article_numbers(installed):
    proc = minibn_cli(installed, "lesson", 2)
    assert proc.stdout.splitlines()[2] == "02_core_logic.py"
    values = parse_values(proc.stdout)
    x, gamma, beta, eps = [2.0, 4.0, 6.0, 8.0], 2.0, 1.0, 1e-5     # the article's example, section 2
    mean = sum(x) / 4
    var = sum((a - mean) ** 2 for a in x) / 4
    assert values["mu"] == 5.0 and values["var"] == 5.0
    for i, a in enumerate(x, start=1):
        x_hat = (a - mean) / math.sqrt(var + eps)
        assert values[f"x_hat_{i}"] == pytest.approx(x_hat, abs=1e-7)
        assert values[f"y_{i}"] == pytest.approx(gamma * x_hat + beta, abs=1e-7)
    assert "# article: -1.34" in proc.stdout and "# article: 3.68" in proc.stdout


def test_article_writes_the_committed_figures_where_asked(installed):
    python, work = installed
    proc = minibn_cli(installed, "article", "--quiet", "--out", "article-figures", timeout=900)
    assert f"lessons: {len(LESSONS)} of {len(LESSONS)} ran without error" in proc.stdout
    committed = os.path.join(SOURCE, "figures")
    names = sorted(os.listdir(committed))
    assert sorted(os.listdir(work / "article-figures")) == names
    for name in names:
        with open(work / "article-figures" / name, "rb") as made, open(os.path.join(committed, name), "rb") as ref:
            made, ref = made.read(), ref.read()
        if name.startswith(TRAINED):   # matrix products in training: last digits vary with the machine's BLAS
            assert made[:8] == ref[:8] if name.endswith(".png") else json.loads(made).keys() == json.loads(ref).keys()
        else:                          # the pinned versions reproduce the committed files byte for byte
            assert made == ref, f"{name} differs from the committed figures/{name}"
    # the default folder is figures/ in the current directory; nothing lands in site-packages
    minibn_cli(installed, "figures", "--quiet", "s4_static_vs_dynamic")
    assert sorted(os.listdir(work / "figures")) == ["s4_static_vs_dynamic.json", "s4_static_vs_dynamic.png"]
    (site_packages,) = glob.glob(str(python.parent.parent / "lib" / "python*" / "site-packages"))
    assert not os.path.exists(os.path.join(site_packages, "figures"))
    assert not glob.glob(os.path.join(site_packages, "minibn", "**", "*.png"), recursive=True)


def test_notebooks_are_written_as_valid_notebooks(installed):
    python, work = installed
    proc = minibn_cli(installed, "notebooks", "lesson-notebooks")
    assert f"{len(LESSONS)} notebooks in" in proc.stdout
    assert sorted(os.listdir(work / "lesson-notebooks")) == [f"{name}.ipynb" for name in LESSONS]
    for number, name in enumerate(LESSONS, start=1):
        with open(work / "lesson-notebooks" / f"{name}.ipynb") as f:
            notebook = json.load(f)
        assert (notebook["nbformat"], notebook["nbformat_minor"]) == (4, 5)
        cells = notebook["cells"]
        assert cells[0]["cell_type"] == "markdown"
        assert cells[0]["source"][0].startswith(f"# Lesson {number}")
        assert {c["cell_type"] for c in cells} == {"markdown", "code"}
        assert len({c["id"] for c in cells}) == len(cells)
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in cells if c["cell_type"] == "code")
        code = "".join("".join(c["source"]) + "\n" for c in cells if c["cell_type"] == "code")
        compile(code, name, "exec")                      # the code cells together are the lesson's program
        assert re.search(r"^(from|import) minibn", code, re.MULTILINE)
    again = minibn_cli(installed, "notebooks", "lesson-notebooks", expect=2)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


def test_assignment_and_grade_of_the_empty_copy(installed):
    python, work = installed
    minibn_cli(installed, "assignment", "course")
    assert sorted(os.listdir(work / "course" / "lessons")) == [f"{name}.py" for name in LESSONS]
    assert not os.path.exists(work / "course" / "minibn" / "lessons")
    assert os.listdir(work / "course" / "minibn" / "grading") == ["__init__.py"]
    proc = minibn_cli(installed, "grade", "course", timeout=600, expect=1)
    assert proc.returncode != 0
    total = re.search(r"^\s*total\s+(\S+) / (\d+)", proc.stdout, re.MULTILINE)
    assert total is not None, proc.stdout[-3000:]
    assert float(total.group(1)) == 0.0 and int(total.group(2)) > 0
