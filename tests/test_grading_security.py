"""Attacks on the grader, written as a student would write them: each scores 0 on its task.

One hand-in per class of attack of issue 12 (the honest source with one
task's region, or a file outside the regions, replaced by the attack); every
other task must keep its full marks, and grading must not change a file of
the grader.  The wire format's parser is tested on its own at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from minibn.grading import remote, sandbox
from minibn.grading.runner import mpi_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "minibn")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grading import copy_source, graded  # noqa: E402


def replace_region(root, rel, region, body):
    """The hand-in's region ``region`` of ``rel`` replaced by ``body`` (indented like the markers)."""
    path = os.path.join(root, rel)
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == f"# >>> solution: {region}")
    end = next(i for i, line in enumerate(lines) if line.strip() == f"# <<< solution: {region}")
    indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]
    new = [indent + line + "\n" if line.strip() else "\n" for line in body.strip("\n").splitlines()]
    with open(path, "w") as f:
        f.write("".join(lines[:start + 1] + new + lines[end:]))


def tree_hash(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".pyc"):
                continue
            p = os.path.join(root, name)
            h.update(p.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


GRADER_FILE = os.path.join(PACKAGE, "grading", "conformance.py")

# class 1: a region reaches the grader's checks through sys.modules and switches them off
SYS_MODULES = '''
import sys
for name, mod in list(sys.modules.items()):
    if "conformance" in name or "grading" in name or "runner" in name:
        for attr in ("close", "expect", "Fail", "raises"):
            if hasattr(mod, attr):
                setattr(mod, attr, lambda *a, **k: None)
raise NotImplementedError("switched the checks off")
'''

# class 2a: the work done outside the regions (minibn/__init__.py), the region left as handed out
OUTSIDE_INIT = '''

def _cheat():
    import numpy as _np
    from . import functional as _F

    def update_running_stats(rm, rv, mean, var, count, momentum):
        a = float(momentum)
        rm[...] = (1 - a) * rm + a * mean
        rv[...] = (1 - a) * rv + a * var * count / (count - 1)
    _F.update_running_stats = update_running_stats


_cheat()
'''

# class 2b: a sitecustomize.py next to minibn/ in the hand-in folder
SITECUSTOMIZE = '''
import builtins, sys
sys.modules.pop("conformance", None)
builtins.GRADER_OVERRIDE = True
def _ok(*a, **k):
    return None
for name, mod in list(sys.modules.items()):
    if "grading" in name:
        for attr in ("close", "expect"):
            setattr(mod, attr, _ok)
'''

# class 3: write the grader's files; import the grader's reference
WRITE_GRADER = f'''
for path in ({GRADER_FILE!r}, {os.path.join(PACKAGE, "grading", "runner.py")!r}):
    try:
        with open(path, "a") as f:
            f.write("\\nclose = expect = lambda *a, **k: None\\n")
    except OSError:
        pass
try:
    import minibn.grading.reference as R
except ImportError:
    try:
        import reference as R
    except ImportError:
        R = None
if R is None:
    raise NotImplementedError("no reference to copy")
counts = np.asarray(counts, dtype=np.float64)
return int(counts.sum()), R.two_pass(means, (0,))[1], R.two_pass(variances, (0,))[1]
'''

# class 4: forge the result channel found through gc, then leave
FORGE_PIPE = '''
import gc, io, json, os, struct
for obj in gc.get_objects():
    try:
        if isinstance(obj, io.IOBase) and obj.writable() and obj.fileno() > 2:
            for i in range(100):
                for message in ({"event": "result", "index": i, "ok": True, "message": ""},
                                {"ok": {"$t": [[0.0], [1.0], [2.0]]}}, {"ok": True, "verdict": "pass"}):
                    data = json.dumps(message).encode()
                    obj.write(struct.pack(">I", len(data)) + data)
            obj.flush()
    except Exception:
        pass
os._exit(0)
'''

# class 5a: call the shipped working math of another task (merge_moments) from the forward
SHIPPED_MATH = '''
count, mean, var = stats if stats is not None else (None, None, None)
if stats is None:
    from .moments import merge_moments
    C = x.shape[1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, C)
    count, mean, var = merge_moments(np.ones(rows.shape[0]), rows, np.zeros_like(rows))
try:
    from .engines.numpy_tiled import NumpyEngine
    y, cache = NumpyEngine().forward(x, weight, bias, eps)
except Exception:
    pass
from .bench import textbook_forward
return textbook_forward(x, weight, bias, eps)
'''

# class 5b: the graph backward calls the closed-form task
GRAPH_CALLS_CLOSED_FORM = '''
return batch_norm_backward(dy, cache)
'''

# class 6: write into the inputs so that the expected values follow the answer
MODIFY_INPUTS = '''
counts = np.asarray(counts)
means[...] = 0.0
variances[...] = 1.0
return int(counts.sum()), means[0] * 0, variances[0] * 0 + 1
'''

# class 7 (SyncBatchNorm, batch mode): every rank forges its output file, with a verdict, then leaves
FORGE_RANK_FILES = '''
import json, os, sys
import minibn
config = json.loads(sys.argv[1])
for r in range(self.comm.size):
    np.savez(os.path.join(config["out"], f"rank{r}.npz"), ready=np.array(os.path.realpath(minibn.__file__)),
             verdict=np.array("pass"), points=np.array(25.0))
with open(os.path.join(config["out"], "verdict.txt"), "w") as f:
    f.write("syncbn: 25/25 passed")
print("syncbn 25.00 / 25  11/11", flush=True)
os._exit(0)
'''

ATTACKS = {
    "sys_modules": ("bn_forward", [("minibn/functional.py", "bn_forward.stats", SYS_MODULES)], None),
    "outside_regions_init": ("running_stats", [("minibn/functional.py", "running_stats",
                                                'raise NotImplementedError("done in __init__")')],
                             ("minibn/__init__.py", OUTSIDE_INIT)),
    "sitecustomize": ("merge_moments", [("minibn/moments.py", "merge_moments",
                                         'raise NotImplementedError("sitecustomize does it")')],
                      ("sitecustomize.py", SITECUSTOMIZE)),
    "write_grader_import_reference": ("merge_moments", [("minibn/moments.py", "merge_moments", WRITE_GRADER)],
                                      None),
    "forge_pipe_via_gc": ("bn_backward", [("minibn/functional.py", "bn_backward", FORGE_PIPE)], None),
    "shipped_working_math": ("bn_forward", [("minibn/functional.py", "bn_forward.stats", SHIPPED_MATH)], None),
    "graph_calls_closed_form": ("bn_backward_graph", [("minibn/functional.py", "bn_backward_graph",
                                                       GRAPH_CALLS_CLOSED_FORM)], None),
    "modify_inputs": ("merge_moments", [("minibn/moments.py", "merge_moments", MODIFY_INPUTS)], None),
}
if mpi_available() is None:
    ATTACKS["syncbn_forged_rank_files"] = ("syncbn", [("minibn/distributed.py", "syncbn.forward",
                                                       FORGE_RANK_FILES)], None)


def grade(directory, *options):
    proc = subprocess.run([sys.executable, "-m", "minibn", "grade", str(directory), "--json", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"no output (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """``{attack: (exit status, result)}``, with the grader's package hashed before and after."""
    before = tree_hash(PACKAGE)
    jobs = {}
    for name, (task, regions, outside) in ATTACKS.items():
        root = copy_source(str(tmp_path_factory.mktemp(name)))
        for rel, region, body in regions:
            replace_region(root, rel, region, body)
        if outside is not None:
            rel, text = outside
            with open(os.path.join(root, rel), "a") as f:
                f.write(text)
        jobs[name] = root
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(grade, root, "--timeout", "5") for name, root in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    return results, before, tree_hash(PACKAGE)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_scores_zero_on_its_task_only(name, attacked):
    results, _, _ = attacked
    task = ATTACKS[name][0]
    code, result = results[name]
    tasks = graded(result)
    assert code == 1
    assert tasks[task]["points"] == 0, json.dumps(tasks[task], indent=1)[:3000]
    others = {t: (r["points"], r["first_failure"]) for t, r in tasks.items() if t != task and r["points"] != r["max"]}
    assert not others, f"{name} cost marks in other tasks: {others}"


@pytest.mark.slow
def test_changes_outside_regions_are_reported(attacked):
    results, _, _ = attacked
    notes = results["outside_regions_init"][1]["notes"]
    assert any("minibn/__init__.py" in n and "outside the solution regions" in n for n in notes), notes


@pytest.mark.slow
def test_modified_inputs_are_named(attacked):
    results, _, _ = attacked
    cases = graded(results["modify_inputs"][1])["merge_moments"]["cases"]
    assert any("input modified in place" in c["message"] for c in cases), [c["message"] for c in cases]


@pytest.mark.slow
def test_grading_never_writes_the_graders_files(attacked):
    _, before, after = attacked
    if sandbox.isolation() != "namespaces":
        pytest.skip("no user+mount namespaces here: the grader's files are as writable as the user's")
    assert before == after


@pytest.mark.slow
def test_child_cannot_find_the_grader(tmp_path):
    """From inside the child: no grader module importable, no path to the grader on sys.path."""
    root = copy_source(str(tmp_path / "probe"))
    probe = f'''
import sys, importlib
found = []
for name in ("minibn.grading.reference", "minibn.grading.conformance", "reference", "conformance"):
    try:
        importlib.import_module(name)
        found.append(name)
    except ImportError:
        pass
leaks = [p for p in sys.path if p.startswith({ROOT!r})]
if found or leaks:
    raise RuntimeError(f"found {{found}} on {{leaks}}")
raise NotImplementedError("nothing found")
'''
    replace_region(root, "minibn/moments.py", "merge_moments", probe)
    code, result = grade(root, "--tasks", "merge_moments", "--timeout", "5")
    message = graded(result)["merge_moments"]["first_failure"]["message"]
    assert "NotImplementedError: nothing found" in message, message


# =========================================================================== the wire format

@pytest.mark.parametrize("value, what", [
    ({"$a": ["object", [1], "AA==", False]}, "dtype"),
    ({"$a": ["float64", [2], "AAAAAAAAAAA=", False]}, "does not match"),
    ({"$a": ["float64", [-1], "", False]}, "shape"),
    ({"verdict": "pass"}, "unexpected object"),
    ({"$o": "1", "type": "x"}, "unexpected object"),
    ("x" * 10000, "too long"),
])
def test_malformed_replies_are_protocol_errors(value, what):
    with pytest.raises(remote.ProtocolError, match=what):
        remote.decode(value)


def test_arrays_round_trip_and_come_back_writable():
    arr = np.arange(6.0).reshape(2, 3)
    back = remote.decode(remote.encode(arr))
    assert back.dtype == arr.dtype and np.array_equal(back, arr) and back.flags.writeable


def _rank_file(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_rank_outputs_are_parsed_with_a_strict_schema(tmp_path):
    """A SyncBatchNorm rank's file (batch mode) must hold exactly the outputs its scenario calls for."""
    from minibn.grading import batch
    s = batch.Scenario(2, 3, weight=np.ones(3), bias=np.zeros(3))
    i = s.forward([np.zeros((2, 3)), np.zeros((1, 3))])
    root = "/pkg/"
    good = {"ready": np.array("/pkg/minibn/__init__.py"), f"s{i}.y": np.ones((2, 3)),
            f"s{i}.running_mean": np.zeros(3), f"s{i}.running_var": np.ones(3),
            f"s{i}.calls": np.int64(1), f"s{i}.bytes": np.int64(96)}
    out = batch.parse_rank(s, 0, _rank_file(str(tmp_path / "good.npz"), **good), root)
    assert out["error"] is None and np.array_equal(out["steps"][i]["y"], np.ones((2, 3)))
    bad = {
        "verdict": dict(good, verdict=np.array("pass")),
        "missing": {k: v for k, v in good.items() if k != f"s{i}.running_var"},
        "dtype": dict(good, **{f"s{i}.y": np.ones((2, 3), np.float32)}),
        "shape": dict(good, **{f"s{i}.y": np.ones((1, 3))}),
        "strings": dict(good, **{f"s{i}.calls": np.array("1")}),
        "elsewhere": dict(good, ready=np.array("/grader/minibn/__init__.py")),
        "pickled": dict(good, **{f"s{i}.y": np.array([{"ok": True}], dtype=object)}),
    }
    for name, arrays in bad.items():
        with pytest.raises(remote.ProtocolError):
            batch.parse_rank(s, 0, _rank_file(str(tmp_path / f"{name}.npz"), **arrays), root)
    (tmp_path / "text.npz").write_text("syncbn: 25/25")
    with pytest.raises(remote.ProtocolError):
        batch.parse_rank(s, 0, str(tmp_path / "text.npz"), root)
    # a raising step ends the rank's outputs there: later outputs are outside the schema
    err = {"ready": good["ready"], f"s{i}.error": np.array("ValueError: m = 1"),
           f"s{i}.error_types": np.array(["ValueError", "Exception"])}
    out = batch.parse_rank(s, 0, _rank_file(str(tmp_path / "err.npz"), **err), root)
    assert out["error"][0] == i and "ValueError" in out["error"][1].types
    with pytest.raises(remote.ProtocolError):
        batch.parse_rank(s, 0, _rank_file(str(tmp_path / "err2.npz"), **dict(good, **err)), root)


def test_the_handout_ships_the_reference_engine_only(tmp_path):
    """Every engine but the reference is a working implementation of the tasks: none is in the
    copy, including any engine added after the list of what stays was written."""
    from minibn.grading import write_assignment
    write_assignment(str(tmp_path / "hw"), check_import=False)
    package = tmp_path / "hw" / "minibn"
    engines = sorted(p.name for p in (package / "engines").iterdir() if p.suffix == ".py")
    assert engines == ["__init__.py", "interface.py", "reference.py", "selection.py"]
    for name in ("bench.py", "gpu_check.py"):
        assert not (package / name).exists(), name
