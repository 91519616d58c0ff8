"""``python -m minibn check`` (the public cases on the copy's own code) and lessons run from a handout."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest

from minibn.grading import write_assignment
from minibn.grading.assignment import LESSON_PREAMBLE
from minibn.selfcheck import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "minibn")
NOT_IMPLEMENTED = "NotImplementedError"


def env():
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e.update(MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    return e


def run(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def check(cwd, *tasks):
    return run(cwd, "-m", "minibn", "check", *tasks)


def fail_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("FAIL")]


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    return write_assignment(str(tmp_path_factory.mktemp("selfcheck") / "hw"))


@pytest.fixture
def full_copy(tmp_path):
    """A copy of minibn's own source (every region solved), to plant mistakes in."""
    shutil.copytree(PACKAGE, tmp_path / "minibn", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def plant(root, rel, old, new):
    path = os.path.join(root, rel)
    with open(path) as f:
        text = f.read()
    assert text.count(old) == 1, f"{rel} no longer contains {old!r} once: update this planted mistake"
    with open(path, "w") as f:
        f.write(text.replace(old, new))


# =========================================================================== check

def test_empty_handout_fails_every_public_case_with_not_implemented(handout):
    proc = check(handout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"checking the minibn in {os.path.join(handout, 'minibn')}" in proc.stdout
    fails = fail_lines(proc.stdout)
    assert len(fails) == len(CASES) > 0
    assert all(NOT_IMPLEMENTED in ln for ln in fails), "\n".join(fails)
    tasks = {ln.split()[1] for ln in fails}
    assert tasks == {"bn_forward", "bn_backward", "bn_backward_graph", "ln_gn_backward", "running_stats",
                     "merge_moments"}
    assert f"0 of {len(CASES)} public cases pass" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_full_package_passes_every_public_case():
    proc = check(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not fail_lines(proc.stdout)
    assert f"{len(CASES)} of {len(CASES)} public cases pass" in proc.stdout


def test_check_runs_only_the_named_tasks_and_rejects_unknown_ones():
    proc = check(ROOT, "merge_moments")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("ok")]
    assert listed and set(listed) == {"merge_moments"}
    proc = check(ROOT, "no_such_task")
    assert proc.returncode == 2 and "no_such_task" in proc.stderr and "Traceback" not in proc.stderr


def test_planted_ddof1_fails_with_both_numbers_in_full(full_copy):
    plant(full_copy, "minibn/functional.py",
          "    count, mean, var = stats if stats is not None else batch_norm_statistics(x)\n",
          "    count, mean, var = stats if stats is not None else batch_norm_statistics(x)\n"
          "    var = var * count / (count - 1)\n")
    proc = check(full_copy)
    assert proc.returncode == 1
    fails = fail_lines(proc.stdout)
    article = [ln for ln in fails if "bn_forward / article_section2_example" in ln]
    assert article, proc.stdout
    assert "got 6.666666666666667, expected 5.0" in article[0] and "difference 1.67" in article[0]
    assert {ln.split()[1] for ln in fails} <= {"bn_forward", "bn_backward", "bn_backward_graph"}
    assert "merge_moments" not in " ".join(fails) and "running_stats" not in " ".join(fails)


def test_rebinding_the_running_mean_is_reported_as_not_in_place(full_copy):
    plant(full_copy, "minibn/functional.py", "        running_mean *= (1.0 - a)\n"
          "        running_mean += (a * mean).astype(running_mean.dtype, copy=False)\n",
          "        running_mean = (1.0 - a) * running_mean + a * mean\n")
    proc = check(full_copy, "running_stats")
    article = [ln for ln in fail_lines(proc.stdout) if "article_section3_example" in ln]
    assert article and "not updated in place" in article[0], proc.stdout


def test_a_backward_missing_a_term_fails_the_finite_differences(full_copy):
    plant(full_copy, "minibn/functional.py", "    dx = dxc + dmu / m                                 # mu = mean(x)\n",
          "    dx = dxc\n")
    proc = check(full_copy, "bn_backward_graph", "bn_backward")
    fails = fail_lines(proc.stdout)
    assert fails and all("bn_backward_graph" in ln and "dx vs finite differences" in ln for ln in fails)
    assert "ok    bn_backward / finite_differences_2d" in proc.stdout


def test_selfcheck_imports_only_minibn_itself():
    with open(os.path.join(PACKAGE, "selfcheck.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert not (node.module or "").startswith("grading"), ast.dump(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert all(n.split(".")[0] in {"argparse", "math", "os", "sys", "traceback", "typing", "numpy",
                                           "__future__"} for n in names), ast.dump(node)


# =========================================================================== lessons import the handout

def _fails_in_the_handout(proc, handout):
    assert proc.returncode != 0, "the lesson ran on another minibn: " + proc.stdout[-1500:]
    assert NOT_IMPLEMENTED in proc.stderr
    assert os.path.join(handout, "minibn", "functional.py") in proc.stderr


def test_lesson_script_run_directly_imports_the_handout(handout):
    with open(os.path.join(handout, "lessons", "02_core_logic.py")) as f:
        assert LESSON_PREAMBLE in f.read()
    _fails_in_the_handout(run(handout, "lessons/02_core_logic.py"), handout)


def test_lesson_command_imports_the_handout(handout):
    _fails_in_the_handout(run(handout, "-m", "minibn", "lesson", 2), handout)


def test_lesson_command_puts_the_handout_first_even_without_the_preamble(handout, tmp_path):
    copy = str(tmp_path / "hw")
    shutil.copytree(handout, copy)
    lesson = os.path.join(copy, "lessons", "02_core_logic.py")
    with open(lesson) as f:
        text = f.read()
    with open(lesson, "w") as f:
        f.write(text.replace(LESSON_PREAMBLE, ""))
    _fails_in_the_handout(run(copy, "-m", "minibn", "lesson", 2), copy)
