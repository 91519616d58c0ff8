"""``python -m minibn grade DIR``: grade a hand-in in isolation, print the score table.

The grader judges; the student's code only computes.  For each task the
hand-in's regions of that task are spliced into the grader's own handout
(``sandbox.assemble``: every other task's regions are the grader's
reference), and each case runs HERE, in the grading process
(``conformance.py``), talking to a fresh child per case (``server.py``,
``remote.py``) that runs the student's functions and replies with raw
outputs.  SyncBatchNorm cases run in batch mode instead (``batch.py``): a
scenario written as plain files, ``mpiexec -n N`` of ``mpi_rank.py``, one
output file per rank parsed with a fixed schema.  Expected values,
tolerances and verdicts never leave this process.

A case fails when the student's code raises, when the child breaks the
message schema, dies, or runs past the time limit (the child's process group
is killed).  After two timeouts in one task its remaining cases are marked
failed without running them.  ``grade`` writes only in a temporary folder: the
hand-in and the grader's files are left as they are.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from .regions import scan_tree
from .tasks import TASKS

__all__ = ["grade", "main", "present_tasks", "format_table", "resolve_dir"]

HERE = os.path.dirname(os.path.abspath(__file__))
OWN_PACKAGE = os.path.dirname(HERE)          # the grader's own minibn: it decides what is graded
DEFAULT_CASE_TIMEOUT = 10.0
STARTUP_TIMEOUT = 30.0
MAX_TIMEOUTS_PER_TASK = 2


def resolve_dir(path: str) -> str:
    """The directory that holds the student's ``minibn/`` package (DIR itself, or DIR's parent)."""
    path = os.path.realpath(path)
    if os.path.isfile(os.path.join(path, "minibn", "__init__.py")):
        return path
    if os.path.basename(path) == "minibn" and os.path.isfile(os.path.join(path, "__init__.py")):
        return os.path.dirname(path)
    raise FileNotFoundError(f"no minibn package in {path}: expected {os.path.join(path, 'minibn', '__init__.py')}")


def present_tasks(package_dir: str = OWN_PACKAGE) -> Dict[str, List[str]]:
    """``{task: [files]}`` for every task that has solution regions in ``package_dir`` (grading/ excluded)."""
    found: Dict[str, List[str]] = {}
    for rel, regions in scan_tree(package_dir).items():
        for r in regions:
            files = found.setdefault(r.task, [])
            if rel not in files:
                files.append(rel)
    return found


def case_names(task: str) -> List[str]:
    from .conformance import CASES
    return [name for name, _ in CASES.get(task, [])]


def _mpiexec() -> Optional[str]:
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.access(local, os.X_OK) else shutil.which("mpiexec")


def mpi_available() -> Optional[str]:
    """``None`` when SyncBatchNorm can be graded here, else the reason it cannot."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed"
    if _mpiexec() is None:
        return "no mpiexec found"
    return None


# =========================================================================== one case

def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path, n=600):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    text = text.strip()
    return ("..." + text[-n:]) if len(text) > n else text


def run_case(fn, stage: str, view: str, hide: List[str], timeout: float, seed: int):
    """Run one case against a fresh child: ``(ok, message, seconds, imported path)``."""
    import minibn.grading.remote as remote
    import minibn.grading.sandbox as sandbox
    from .conformance import Fail
    workdir = tempfile.mkdtemp(prefix="minibn-case-")
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    err_path = os.path.join(stage, f"stderr-{os.getpid()}-{req_r}.txt")
    t0 = time.monotonic()
    proc = None
    imported = ""
    try:
        with open(err_path, "w") as err:
            proc = sandbox.launch(stage, view, hide, req_r, rep_w, workdir, err, err)
        os.close(req_r)
        os.close(rep_w)
        req_r = rep_w = -1
        channel = remote.Channel(req_w, rep_r, time.monotonic() + STARTUP_TIMEOUT, lambda: _kill(proc))
        try:
            ready = channel.receive()
        except remote.ChildTimeout:
            return False, f"the grading process did not start within {STARTUP_TIMEOUT:.0f} s", 0.0, ""
        except remote.ChildDied:
            return False, f"the grading process died before starting (exit {proc.wait()}): {_tail(err_path)}", 0.0, ""
        except remote.ProtocolError as exc:
            return False, f"the student's process broke the grader's message format: {exc}", 0.0, ""
        if set(ready) == {"err"}:
            return False, "import minibn failed: " + remote._remote_error(ready["err"]).describe(), 0.0, ""
        imported = remote.expected_ready(ready) or ""
        root = os.path.join(view if sandbox.isolation() == "namespaces" else stage, "pkg") + os.sep
        if not imported.startswith(root):
            return False, f"the child did not import the assembled package (it reported {imported[:200]!r})", 0.0, ""
        t0 = time.monotonic()
        channel.deadline = t0 + timeout
        c = remote.Student(channel)
        c.seed = seed
        try:
            fn(c)
            return True, "", round(time.monotonic() - t0, 4), imported
        except Fail as exc:
            message = str(exc)
        except remote.RemoteError as exc:
            message = exc.describe()
        except remote.ChildTimeout:
            message = f"timed out after {timeout:g} s (an endless loop or a deadlock?)"
        except remote.ChildDied:
            code = proc.wait()
            message = f"crashed the interpreter (exit {code}): {_tail(err_path)}"
        except remote.ProtocolError as exc:
            message = f"the student's process broke the grader's message format: {exc}"
        except Exception as exc:  # noqa: B902 - a reply of an unexpected kind (an object where a number was due)
            message = f"unexpected result: {type(exc).__name__}: {exc}"
        return False, message[:1200], round(time.monotonic() - t0, 4), imported
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc)
        for fd in (req_r, req_w, rep_r, rep_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_mpi_case(fn, stage: str, view: str, hide: List[str], timeout: float, seed: int, nprocs: int):
    """Run one SyncBatchNorm case (its scenarios under ``mpiexec``, ``batch.py``):
    ``(ok, message, seconds, imported paths)``."""
    import minibn.grading.batch as batch
    import minibn.grading.remote as remote
    from .conformance import Fail
    ctx = batch.Context(stage, view, hide, timeout, _mpiexec(), nprocs, seed)
    t0 = time.monotonic()
    try:
        fn(ctx)
        return True, "", round(time.monotonic() - t0, 4), ctx.imported
    except (Fail, batch.MpiTimeout) as exc:
        message = str(exc)
    except batch.MpiDied as exc:
        message = f"crashed: {exc}"
    except remote.ProtocolError as exc:
        message = f"the student's processes broke the grader's output format: {exc}"
    except Exception as exc:  # noqa: B902 - an output of an unexpected kind
        message = f"unexpected result: {type(exc).__name__}: {exc}"
    return False, message[:1200], round(time.monotonic() - t0, 4), ctx.imported


def run_task(task, stage: str, view: str, hide: List[str], timeout: float, seed: int, nprocs: int = 2):
    """Every case of one task, one fresh child (or mpiexec) each: ``(case results, imported paths)``."""
    from .conformance import CASES
    cases, imported, timeouts = [], set(), 0
    for name, fn in CASES.get(task.id, []):
        if timeouts >= MAX_TIMEOUTS_PER_TASK:
            cases.append(dict(name=name, ok=False, seconds=0.0,
                              message=f"not run: {timeouts} cases of this task already timed out"))
            continue
        if task.id == "syncbn":
            ok, message, seconds, where = run_mpi_case(fn, stage, view, hide, timeout, seed, nprocs)
            imported.update(where)
        else:
            ok, message, seconds, where = run_case(fn, stage, view, hide, timeout, seed)
            if where:
                imported.add(where)
        timeouts += message.startswith("timed out")
        cases.append(dict(name=name, ok=ok, message=message, seconds=seconds))
    return cases, sorted(imported)


# =========================================================================== the whole grade

def grade(directory: str, tasks=None, timeout: float = DEFAULT_CASE_TIMEOUT, jobs: Optional[int] = None,
          nprocs: int = 2, seed: Optional[int] = None) -> dict:
    """Grade the hand-in in ``directory``; returns the machine-readable result (see ``--json``)."""
    import minibn.grading.sandbox as sandbox
    from .assignment import write_assignment
    root = resolve_dir(directory)
    present = present_tasks()
    wanted = [t for t in TASKS if tasks is None or t.id in tasks]
    unknown = set(tasks or ()) - {t.id for t in TASKS}
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(t.id for t in TASKS)}")
    seed = random.SystemRandom().randrange(1 << 31) if seed is None else int(seed)
    rows, to_run = {}, []
    for t in wanted:
        if t.id not in present:
            rows[t.id] = dict(task=t.id, title=t.title, skipped="no solution regions for this task in the "
                              "grader's source tree")
        elif t.id == "syncbn" and mpi_available() is not None:
            rows[t.id] = dict(task=t.id, title=t.title, skipped=mpi_available())
        else:
            to_run.append(t)
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    t0 = time.monotonic()
    top = tempfile.mkdtemp(prefix="minibn-grade-")
    views = []
    notes: Dict[str, List[str]] = {}
    try:
        handout = write_assignment(os.path.join(top, "handout"), OWN_PACKAGE, check_import=False)
        repo = os.path.dirname(OWN_PACKAGE)
        hide = [OWN_PACKAGE, root, top]
        if os.path.isfile(os.path.join(repo, "pyproject.toml")):
            hide.append(repo)
        stages = {}
        for t in to_run:
            stage = os.path.join(top, t.id)
            notes[t.id] = sandbox.assemble(handout, root, t.id, os.path.join(stage, "pkg"))
            views.append(tempfile.mkdtemp(prefix="minibn-view-"))
            stages[t.id] = (stage, views[-1])
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {t.id: pool.submit(run_task, t, *stages[t.id], hide, timeout, seed, nprocs) for t in to_run}
            for t in to_run:
                cases, imported = futures[t.id].result()
                passed = sum(c["ok"] for c in cases)
                score = round(t.points * passed / len(cases), 2) if cases else 0.0
                first = next((c for c in cases if not c["ok"]), None)
                rows[t.id] = dict(task=t.id, title=t.title, points=score, max=t.points, passed=passed,
                                  cases_total=len(cases), first_failure=first, imported=imported, cases=cases,
                                  notes=notes[t.id])
    finally:
        shutil.rmtree(top, ignore_errors=True)
        for v in views:
            shutil.rmtree(v, ignore_errors=True)
    ordered = [rows[t.id] for t in wanted]
    graded = [r for r in ordered if "skipped" not in r]
    total = round(sum(r["points"] for r in graded), 2)
    maximum = sum(r["max"] for r in graded)
    hand_in_notes = sorted({n for r in graded for n in r.get("notes", [])})
    return dict(directory=root, package=os.path.join(root, "minibn"), total=total, max=maximum,
                full_marks=bool(graded) and total == maximum, seconds=round(time.monotonic() - t0, 2),
                seed=seed, isolation=_isolation_note(sandbox.isolation()), notes=hand_in_notes, tasks=ordered)


def _isolation_note(kind: str) -> str:
    if kind == "namespaces":
        return ("namespaces: each child ran in a user+mount namespace with every file system read-only, "
                "the grader's package, its source tree and the hand-in folder hidden")
    return ("process only: this machine gives no unprivileged user+mount namespaces, so the children "
            "ran as ordinary processes (python -I -S, a sys.path of the submission, the standard library "
            "and NumPy); they could read (not import) files of this user, the grader's included")


def _clip(text, n):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def format_table(result: dict) -> str:
    lines = [f"minibn grade: {result['package']}", "",
             f"  {'task':<20} {'score':>13}  {'cases':>7}  title"]
    for r in result["tasks"]:
        if "skipped" in r:
            lines.append(f"  {r['task']:<20} {'skipped':>13}  {'':>7}  {r['title']} ({r['skipped']})")
            continue
        lines.append(f"  {r['task']:<20} {r['points']:>6.2f} / {r['max']:<4}  "
                     f"{r['passed']:>3}/{r['cases_total']:<3}  {r['title']}")
        f = r["first_failure"]
        if f is not None:
            lines.append(f"      first failing case: {f['name']}: {_clip(f['message'], 160)}")
    lines += ["", f"  {'total':<20} {result['total']:>6.2f} / {result['max']:<4}"
              + ("  full marks" if result["full_marks"] else ""), ""]
    for note in result.get("notes", []):
        lines.append(f"  note: {note}")
    lines += [f"  random seed of this grading run: {result['seed']} (--seed {result['seed']} repeats it)",
              f"  isolation: {result['isolation']}", ""]
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m minibn grade",
                                description="Grade a minibn copy (the output of `python -m minibn assignment`, "
                                            "filled in) against the conformance suite.")
    p.add_argument("dir", help="the directory holding the student's minibn/ package")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--timeout", type=float, default=DEFAULT_CASE_TIMEOUT,
                   help=f"seconds allowed per case (default {DEFAULT_CASE_TIMEOUT:g})")
    p.add_argument("--tasks", help="comma-separated task ids to grade (default: all)")
    p.add_argument("--jobs", type=int, default=None, help="tasks graded in parallel (default: CPU count, at most 4)")
    p.add_argument("--np", type=int, default=2, dest="nprocs", help="processes for the SyncBatchNorm task (default 2)")
    p.add_argument("--seed", type=int, default=None, help="the random cases' seed (default: a fresh one, printed)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = grade(args.dir, tasks=args.tasks.split(",") if args.tasks else None, timeout=args.timeout,
                       jobs=args.jobs, nprocs=args.nprocs, seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"minibn grade: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return 0 if result["full_marks"] else 1
