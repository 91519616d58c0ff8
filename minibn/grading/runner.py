"""``python -m minibn grade DIR``: grade a student copy in isolation, print the score table.

Each task runs in its own fresh interpreter (``child.py``) with
``PYTHONPATH=DIR``, from an empty working directory, so the package graded is
the one in DIR and never the installed minibn (the child checks
``minibn.__file__`` and refuses otherwise).  SyncBatchNorm runs under
``mpiexec -n 2``.

Hangs and crashes cost one case, not the grade: the child reports each case
as it starts and ends; when a case runs past its time limit (or the process
dies) the grader kills the process group, marks the case failed and starts a
new process at the next case.  After two timeouts in one task its remaining
cases are marked failed without running them.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from .regions import scan_tree
from .tasks import TASKS

__all__ = ["grade", "main", "present_tasks", "format_table", "resolve_dir"]

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "child.py")
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


# =========================================================================== one task

def _child_env(root: str, mpi: bool) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MINIBN_"))}
    env.update(PYTHONPATH=root, MINIBN_GRADE_DIR=root, MINIBN_BACKEND="numpy", MINIBN_KERNELS="reference",
               PYTHONDONTWRITEBYTECODE="1",
               PYTHONHASHSEED="0", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MPLBACKEND="Agg")
    if mpi:
        env["MINIBN_GRADE_MPI"] = "1"
    return env


def _reader(stream, q):
    for line in stream:
        line = line.strip()
        if not line:
            continue
        try:
            q.put(json.loads(line))
        except ValueError:
            pass                     # not ours (an MPI launcher's chatter)
    q.put(None)


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


def run_task(task, root: str, present, timeout: float = DEFAULT_CASE_TIMEOUT, nprocs: int = 2):
    """Run one task's cases: ``(case results, paths minibn was imported from)``."""
    names = case_names(task.id)
    imported = set()
    results: List[Optional[dict]] = [None] * len(names)
    start, timeouts, fatal = 0, 0, None
    workdir = tempfile.mkdtemp(prefix="minibn-grade-")
    try:
        while start < len(names) and fatal is None:
            if timeouts >= MAX_TIMEOUTS_PER_TASK:
                for i in range(start, len(names)):
                    results[i] = dict(name=names[i], ok=False, seconds=0.0,
                                      message=f"not run: {timeouts} cases of this task already timed out")
                break
            cmd = [sys.executable, CHILD, task.id, str(start), ",".join(sorted(present))]
            if task.mpi:
                cmd = [_mpiexec(), "-n", str(nprocs), sys.executable, "-m", "mpi4py"] + cmd[1:]
            err_path = os.path.join(workdir, f"stderr-{start}.txt")
            with open(err_path, "w") as err:
                proc = subprocess.Popen(cmd, cwd=workdir, env=_child_env(root, task.mpi), stdout=subprocess.PIPE,
                                        stderr=err, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
            q: "queue.Queue" = queue.Queue()
            threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
            try:
                current, deadline, t_case = None, time.monotonic() + STARTUP_TIMEOUT + timeout, time.monotonic()
                ready = ended = False
                while True:
                    try:
                        ev = q.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        _kill(proc)
                        if ended:                                    # all reported; it just did not exit
                            start = len(names)
                        elif not ready:
                            fatal = f"the grading process did not start within {STARTUP_TIMEOUT:.0f} s"
                        else:
                            i = current if current is not None else start
                            results[i] = dict(name=names[i], ok=False, seconds=round(timeout, 1),
                                              message=f"timed out after {timeout:g} s (an endless loop or a deadlock?)")
                            timeouts += 1
                            start = i + 1
                        break
                    if ev is None:                                   # the process ended
                        code = proc.wait()
                        if ended:
                            start = len(names)
                        elif not ready:
                            fatal = f"the grading process died before starting (exit {code}): {_tail(err_path)}"
                        else:
                            i = current if current is not None else start
                            results[i] = dict(name=names[i], ok=False, seconds=0.0,
                                              message=f"crashed the interpreter (exit {code}): {_tail(err_path)}")
                            start = i + 1
                        break
                    kind = ev.get("event")
                    if kind == "fatal":
                        fatal = ev.get("message", "fatal error")
                        _kill(proc)
                        break
                    if kind == "ready":
                        ready = True
                        imported.add(ev.get("minibn", ""))
                        deadline = time.monotonic() + timeout
                    elif kind == "start":
                        current, t_case = ev["index"], time.monotonic()
                        deadline = t_case + timeout
                    elif kind == "result":
                        i = ev["index"]
                        results[i] = dict(name=names[i], ok=bool(ev["ok"]), message=ev.get("message", ""),
                                          seconds=ev.get("seconds", round(time.monotonic() - t_case, 4)))
                        current, start = None, i + 1
                        deadline = time.monotonic() + timeout
                    elif kind == "done":
                        ended = True
                        deadline = time.monotonic() + 10.0
            finally:
                if proc.poll() is None:
                    _kill(proc)
        if fatal is not None:
            for i in range(len(names)):
                if results[i] is None:
                    results[i] = dict(name=names[i], ok=False, seconds=0.0, message=fatal)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cases = [r if r is not None else dict(name=names[i], ok=False, seconds=0.0, message="not run")
             for i, r in enumerate(results)]
    return cases, sorted(imported)


# =========================================================================== the whole grade

def grade(directory: str, tasks=None, timeout: float = DEFAULT_CASE_TIMEOUT, jobs: Optional[int] = None,
          nprocs: int = 2) -> dict:
    """Grade the minibn copy in ``directory``; returns the machine-readable result (see ``--json``)."""
    root = resolve_dir(directory)
    present = present_tasks()
    wanted = [t for t in TASKS if tasks is None or t.id in tasks]
    unknown = set(tasks or ()) - {t.id for t in TASKS}
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(t.id for t in TASKS)}")
    rows, to_run = {}, []
    for t in wanted:
        if t.id not in present:
            rows[t.id] = dict(task=t.id, title=t.title, skipped="no solution regions for this task in the "
                              "grader's source tree")
        elif t.mpi and mpi_available() is not None:
            rows[t.id] = dict(task=t.id, title=t.title, skipped=mpi_available())
        else:
            to_run.append(t)
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {t.id: pool.submit(run_task, t, root, set(present), timeout, nprocs) for t in to_run}
        for t in to_run:
            cases, imported = futures[t.id].result()
            passed = sum(c["ok"] for c in cases)
            score = round(t.points * passed / len(cases), 2) if cases else 0.0
            first = next((c for c in cases if not c["ok"]), None)
            rows[t.id] = dict(task=t.id, title=t.title, points=score, max=t.points, passed=passed,
                              cases_total=len(cases), first_failure=first, imported=imported, cases=cases)
    ordered = [rows[t.id] for t in wanted]
    graded = [r for r in ordered if "skipped" not in r]
    total = round(sum(r["points"] for r in graded), 2)
    maximum = sum(r["max"] for r in graded)
    return dict(directory=root, package=os.path.join(root, "minibn"), total=total, max=maximum,
                full_marks=bool(graded) and total == maximum, seconds=round(time.monotonic() - t0, 2),
                tasks=ordered)


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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = grade(args.dir, tasks=args.tasks.split(",") if args.tasks else None, timeout=args.timeout,
                       jobs=args.jobs, nprocs=args.nprocs)
    except (FileNotFoundError, ValueError) as exc:
        print(f"minibn grade: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return 0 if result["full_marks"] else 1
