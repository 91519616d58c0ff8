"""The course kit: solution markers, the student copy, and the grader.

The grader is run the way a course runs it, ``python -m minibn grade DIR
--json``, on: minibn's own source (full marks), the untouched student copy
(zero), and copies of the real source with one mistake planted by a text
substitution (the marks of exactly that mistake's task are lost).
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from minibn.grading import TASK_IDS, write_assignment
from minibn.grading.regions import MarkerError, find_regions, scan_tree, stub_source
from minibn.grading.runner import mpi_available, present_tasks
from minibn.grading.tasks import hint_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "minibn")
BN_TASKS = {"bn_forward", "bn_backward", "bn_backward_graph", "running_stats", "merge_moments"}


def grade(directory, *options, timeout=300):
    """``python -m minibn grade DIR --json``: (exit status, parsed result)."""
    proc = subprocess.run([sys.executable, "-m", "minibn", "grade", str(directory), "--json", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.stdout.strip(), f"no output (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(proc.stdout)


def graded(result):
    return {t["task"]: t for t in result["tasks"] if "skipped" not in t}


def copy_source(dest):
    shutil.copytree(PACKAGE, os.path.join(dest, "minibn"), ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def plant(root, rel, old, new, count=1):
    path = os.path.join(root, rel)
    with open(path) as f:
        text = f.read()
    assert text.count(old) == count, (f"{rel} no longer contains {old!r} {count} time(s): the source changed, "
                                      "update this planted mistake")
    with open(path, "w") as f:
        f.write(text.replace(old, new))


# =========================================================================== markers

GOOD = '''def f(x):
    """doc"""
    y = 1
    # >>> solution: bn_forward.normalize
    z = x + y
    if z:
        return z
    # <<< solution: bn_forward.normalize
    return 0


class A:
    def g(self):
        # >>> solution: running_stats
        return 2
        # <<< solution: running_stats
'''


def test_regions_are_found_and_stubbed():
    regions = find_regions(GOOD)
    assert [(r.region_id, r.task, r.start, r.end, r.indent) for r in regions] == [
        ("bn_forward.normalize", "bn_forward", 3, 7, "    "),
        ("running_stats", "running_stats", 13, 15, "        ")]
    stubbed = stub_source(GOOD, lambda rid: f"hint for {rid}")
    ast.parse(stubbed)
    assert "z = x + y" not in stubbed and "return 2" not in stubbed
    assert "return 0" in stubbed and '"""doc"""' in stubbed
    assert len(find_regions(stubbed)) == 2                      # markers are kept
    namespace = {}
    exec(compile(stubbed, "<stub>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="bn_forward.normalize: hint for bn_forward.normalize"):
        namespace["f"](1)
    with pytest.raises(NotImplementedError, match="running_stats: hint for running_stats"):
        namespace["A"]().g()


@pytest.mark.parametrize("text, message", [
    ("# >>> solution: a\nx = 1\n", "never closed"),
    ("x = 1\n# <<< solution: a\n", "without an opening"),
    ("# >>> solution: a\n# >>> solution: b\nx=1\n# <<< solution: b\n# <<< solution: a\n", "do not nest"),
    ("# >>> solution: a\nx = 1\n# <<< solution: b\n", "names 'b'"),
    ("if 1:\n    # >>> solution: a\n    x = 1\n# <<< solution: a\n", "indented differently"),
    ("if 1:\n    # >>> solution: a\nx = 1\n    # <<< solution: a\n", "indented less"),
    ("# >>> solution: a\n\n# <<< solution: a\n", "empty"),
    ("#>>> solution a\n", "malformed"),
])
def test_malformed_markers_are_errors(text, message):
    with pytest.raises(MarkerError, match=message):
        find_regions(text)


def test_real_source_markers():
    """Every region of minibn names a known task, and stubbing each file leaves valid Python."""
    found = scan_tree(PACKAGE)
    assert found, "minibn has no solution regions"
    for rel, regions in found.items():
        for r in regions:
            assert r.task in TASK_IDS, f"{rel}:{r.start + 1}: unknown task {r.task}"
            assert hint_for(r.region_id)
        with open(os.path.join(ROOT, rel)) as f:
            ast.parse(stub_source(f.read(), hint_for, rel))
    assert BN_TASKS <= set(present_tasks())


# =========================================================================== the student copy

@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    return write_assignment(str(tmp_path_factory.mktemp("assignment") / "course"))


def test_student_copy_contents(student_copy):
    assert os.path.isfile(os.path.join(student_copy, "README.md"))
    assert os.path.isdir(os.path.join(student_copy, "lessons")) == os.path.isdir(os.path.join(ROOT, "lessons"))
    # the grader (which holds a reference solution) is not handed out
    assert os.listdir(os.path.join(student_copy, "minibn", "grading")) == ["__init__.py"]
    with open(os.path.join(student_copy, "README.md")) as f:
        readme = f.read()
    real, stub = scan_tree(PACKAGE), scan_tree(os.path.join(student_copy, "minibn"))
    assert sorted(real) == sorted(stub)
    for rel in real:
        with open(os.path.join(ROOT, rel)) as f:
            src = f.read().splitlines()
        with open(os.path.join(student_copy, rel)) as f:
            out = f.read().splitlines()
        inside = set()
        for r in real[rel]:
            inside.update(range(r.start + 1, r.end))
        kept = [line for i, line in enumerate(src) if i not in inside]
        stubbed_inside = set()
        for r in stub[rel]:
            stubbed_inside.update(range(r.start + 1, r.end))
            body = "\n".join(out[r.start + 1:r.end]).strip()
            assert body.startswith("raise NotImplementedError(") and r.region_id in body
            assert f"`{r.task}`" in readme
        assert [line for i, line in enumerate(out) if i not in stubbed_inside][:len(kept)] == kept


def test_student_copy_imports_and_raises_with_hints(student_copy):
    code = """
import os, sys, numpy as np, minibn
assert os.path.realpath(minibn.__file__).startswith(os.path.realpath(sys.argv[1]))
from minibn import functional as F, moments as M
x = np.arange(8.0).reshape(4, 2)
for call, task in ((lambda: F.batch_norm_forward(x), "bn_forward"),
                   (lambda: F.update_running_stats(np.zeros(2), np.ones(2), x[0], x[1], 4, 0.1), "running_stats"),
                   (lambda: M.merge_moments([2, 2], x[:2], x[2:]), "merge_moments")):
    try:
        call()
    except NotImplementedError as exc:
        assert str(exc).startswith(task) and "article" in str(exc), exc
    else:
        raise SystemExit(task + " did not raise")
# the layers must run the student's code, not a fast path that already has the answer
try:
    minibn.BatchNorm1d(2)(x.astype(np.float32))
except NotImplementedError as exc:
    assert str(exc).startswith("bn_forward"), exc
else:
    raise SystemExit("BatchNorm1d ran without the student's forward")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=student_copy, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", code, student_copy], cwd=student_copy, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_assignment_refuses_a_nonempty_directory(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        write_assignment(str(tmp_path))


# =========================================================================== grading

def test_grade_needs_a_minibn_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minibn", "grade", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no minibn package" in proc.stderr


@pytest.fixture(scope="module")
def grades(student_copy, tmp_path_factory):
    """Every grade the tests below look at, computed once, three at a time.

    ``"real"``: minibn's own source; ``"stubs"``: the untouched student copy;
    one entry per planted mistake (``None`` where its task is not graded here).
    """
    jobs = {"real": (ROOT, ()), "stubs": (student_copy, ())}
    base = tmp_path_factory.mktemp("planted")
    for name, (task, substitutions) in PLANTS.items():
        if task not in present_tasks() or (task == "syncbn" and mpi_available() is not None):
            continue
        root = copy_source(str(base / name))
        for rel, old, new in substitutions:
            plant(root, rel, old, new)
        jobs[name] = (root, ("--timeout", "5"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(grade, root, *opts) for name, (root, opts) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.slow
def test_real_tree_scores_full_marks(grades):
    code, result = grades["real"]
    tasks = graded(result)
    assert code == 0 and result["full_marks"], json.dumps(result["tasks"], indent=1)[:3000]
    assert BN_TASKS <= set(tasks)
    if mpi_available() is None:
        assert tasks["syncbn"]["cases_total"] >= 10   # graded under mpiexec, in batch mode
    for t in tasks.values():
        assert t["points"] == t["max"] and t["passed"] == t["cases_total"] > 0
        # the assembled package, never the hand-in's or the grader's own files
        assert len(t["imported"]) == 1 and t["imported"][0].endswith(os.path.join("pkg", "minibn", "__init__.py"))
        assert not t["imported"][0].startswith(os.path.realpath(ROOT))


@pytest.mark.slow
def test_untouched_stubs_score_zero(student_copy, grades):
    code, result = grades["stubs"]
    assert code == 1 and result["total"] == 0 and result["max"] > 0
    for t in graded(result).values():
        assert t["passed"] == 0
        assert "NotImplementedError" in t["first_failure"]["message"]
        assert t["task"] in t["first_failure"]["message"]
        assert len(t["imported"]) == 1 and not t["imported"][0].startswith(os.path.realpath(student_copy))


# Each planted mistake: (task that must lose marks, substitutions). The first four are the
# mistakes named in the course kit's specification; the others cover the remaining tasks.
PLANTS = {
    "biased_running_var": ("running_stats", [
        ("minibn/functional.py", "unbiased_var = var * (count / (count - 1))", "unbiased_var = var")]),
    "dgamma_wrong_axis": ("bn_backward", [
        ("minibn/functional.py", "local_dweight = sum_float64(dy * cache.x_hat, axes)",
         "local_dweight = sum_float64(dy * cache.x_hat, 0)")]),
    "syncbn_local_count": ("syncbn", [
        ("minibn/distributed.py", "return total, xp.asarray(g_mean), xp.asarray(g_var)",
         "return count, xp.asarray(g_mean), xp.asarray(g_var)")]),
    "keras_momentum": ("running_stats", [
        ("minibn/functional.py", "running_mean *= (1.0 - a)", "running_mean *= a"),
        ("minibn/functional.py", "running_mean += (a * mean)", "running_mean += ((1.0 - a) * mean)"),
        ("minibn/functional.py", "running_var *= (1.0 - a)", "running_var *= a"),
        ("minibn/functional.py", "running_var += (a * unbiased_var)", "running_var += ((1.0 - a) * unbiased_var)")]),
    "eps_outside_sqrt": ("bn_forward", [
        ("minibn/functional.py", "inv_std = 1.0 / xp.sqrt(var.astype(np.float64) + eps)",
         "inv_std = 1.0 / (xp.sqrt(var.astype(np.float64)) + eps)")]),
    "graph_drops_variance_path": ("bn_backward_graph", [
        ("minibn/functional.py", "dxc = dxc + dvar * 2.0 * xc / m", "dxc = dxc")]),
    "merge_without_spread_of_means": ("merge_moments", [
        ("minibn/moments.py", "var = (w * (variances + (means - mean) ** 2)).sum(axis=0)",
         "var = (w * variances).sum(axis=0)")]),
    "layernorm_dgamma_without_x_hat": ("ln_gn_backward", [
        ("minibn/sample_norms.py", "dweight = sum_float64(dy * cache.x_hat, cache.param_axes)",
         "dweight = sum_float64(dy, cache.param_axes)")]),
    "syncbn_local_variance": ("syncbn", [
        ("minibn/distributed.py", "return total, xp.asarray(g_mean), xp.asarray(g_var)",
         "return total, xp.asarray(g_mean), xp.asarray(var)")]),
    "syncbn_backward_not_reduced": ("syncbn", [
        ("minibn/distributed.py", "return total[:C], total[C:]", "return sum_dy, sum_dy_xhat")]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PLANTS))
def test_planted_mistake_costs_exactly_its_task(name, grades):
    task = PLANTS[name][0]
    if name not in grades:
        pytest.skip(f"{task} is not graded here (no solution regions, or no MPI)")
    code, result = grades[name]
    tasks = graded(result)
    assert code == 1
    assert tasks[task]["points"] < tasks[task]["max"], tasks[task]
    others = {t: (r["points"], r["max"], r["first_failure"]) for t, r in tasks.items()
              if t != task and r["points"] != r["max"]}
    assert not others, f"{name} also cost marks in other tasks: {others}"
    assert result["total"] == result["max"] - (tasks[task]["max"] - tasks[task]["points"])


@pytest.mark.slow
def test_student_output_hangs_and_crashes_are_contained(tmp_path):
    """Prints do not confuse the grader; an endless loop or a dead interpreter costs only its cases."""
    root = copy_source(str(tmp_path / "unruly"))
    plant(root, "minibn/moments.py", "    # >>> solution: merge_moments\n",
          "    # >>> solution: merge_moments\n    while True:\n        pass\n")
    plant(root, "minibn/functional.py", "    # >>> solution: running_stats\n",
          "    # >>> solution: running_stats\n    import os\n    os._exit(7)\n")
    plant(root, "minibn/functional.py", "    # >>> solution: bn_forward.normalize\n",
          '    # >>> solution: bn_forward.normalize\n    print(\'{"event": "done"}\', flush=True)\n')
    code, result = grade(root, "--timeout", "3", "--tasks", "merge_moments,running_stats,bn_forward")
    tasks = graded(result)
    assert set(tasks) == {"merge_moments", "running_stats", "bn_forward"} and code == 1
    assert tasks["bn_forward"]["points"] == tasks["bn_forward"]["max"]
    merge = [c["message"] for c in tasks["merge_moments"]["cases"]]
    assert merge[0].startswith("timed out") and merge[1].startswith("timed out")
    assert all(m.startswith("not run") for m in merge[2:])
    assert tasks["merge_moments"]["points"] == 0
    assert all(c["message"].startswith("crashed") and "exit 7" in c["message"]
               for c in tasks["running_stats"]["cases"])
