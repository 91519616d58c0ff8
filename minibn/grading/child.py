"""The grading subprocess: import the student's minibn, run one task's cases, report each result.

Run as a script (never imported): ``python child.py TASK START PRESENT`` with
``PYTHONPATH`` set to the student's directory and ``MINIBN_GRADE_DIR`` to the
same directory.  Results go to the original standard output as one JSON
object per line; the student's own prints are moved to standard error so they
cannot corrupt them.  Events, in order::

    {"event": "ready", "minibn": "<path of the imported package>"}
    {"event": "start", "index": i}                then
    {"event": "result", "index": i, "ok": bool, "message": str, "seconds": float}
    {"event": "done"}
or  {"event": "fatal", "message": str}            (the package could not be imported, or not from DIR)

Under ``mpiexec`` every rank runs every case; the grader's own duplicate of
COMM_WORLD combines the ranks' outcomes and rank 0 reports.
"""
import json
import os
import sys
import time
import traceback


def _emit_channel():
    """A private copy of stdout for results; fd 1 then points at stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(fd, "w", buffering=1)
    sys.stdout = sys.stderr
    return out


def _short(exc):
    if type(exc).__name__ == "Fail":                    # the suite's own assertion: the message says it all
        return str(exc)[:600]
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not isinstance(exc, AssertionError):           # say where in the student's code it was raised
        grade_dir = os.path.realpath(os.environ.get("MINIBN_GRADE_DIR", "/nonexistent")) + os.sep
        grader = os.path.dirname(os.path.realpath(__file__)) + os.sep
        student = [fr for fr in traceback.extract_tb(exc.__traceback__)
                   if os.path.realpath(fr.filename).startswith(grade_dir)
                   and not os.path.realpath(fr.filename).startswith(grader)]
        if student:
            fr = student[-1]
            text += f" (at {os.path.relpath(os.path.realpath(fr.filename), grade_dir)}:{fr.lineno})"
    return text[:600]


class Context:
    pass


def _reference_path():
    """Layers must run the graded ``functional`` code, not a fast engine: the runner sets
    ``MINIBN_KERNELS=reference``, and the graded copy's default engine must follow it."""
    import minibn.engines
    default = minibn.engines.default_engine_name()
    if default != "reference":
        raise RuntimeError(f"the layers would run the {default!r} engine, not the graded functional "
                           "code: minibn.engines does not follow MINIBN_KERNELS=reference")


def main(argv):
    task, start, present = argv[0], int(argv[1]), set(argv[2].split(",")) if len(argv) > 2 else set()
    grade_dir = os.path.realpath(os.environ["MINIBN_GRADE_DIR"])
    comm = None
    if os.environ.get("MINIBN_GRADE_MPI") == "1":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD.Dup()
    rank = comm.Get_rank() if comm is not None else 0
    out = _emit_channel() if rank == 0 else None
    if rank != 0:
        sys.stdout = sys.stderr

    def emit(**event):
        if out is not None:
            out.write(json.dumps(event) + "\n")
            out.flush()

    def agree(ok, message):
        """All ranks' outcomes combined: the case passes only if it passed everywhere."""
        if comm is None:
            return ok, message
        results = comm.allgather((ok, message))
        for r, (ok_r, msg_r) in enumerate(results):
            if not ok_r:
                return False, (f"rank {r}: {msg_r}" if len(results) > 1 else msg_r)
        return True, ""

    try:
        import numpy  # noqa: F401
        import minibn
        where = os.path.realpath(minibn.__file__)
        if not where.startswith(grade_dir + os.sep):
            emit(event="fatal", message=f"imported minibn from {where}, not from the graded directory {grade_dir}")
            return 3
        import minibn.functional
        import minibn.moments
        import minibn.nn
        import minibn.sample_norms
        _reference_path()
    except BaseException as exc:  # a syntax error or a failing import in the student's code
        ok, msg = agree(False, "import minibn failed: " + _short(exc))
        emit(event="fatal", message=msg)
        return 3

    c = Context()
    c.mb, c.F, c.M, c.nn, c.comm, c.grade_dir = minibn, minibn.functional, minibn.moments, minibn.nn, comm, grade_dir
    c.SN = minibn.sample_norms
    c.dist = None
    if task == "syncbn":
        try:
            import minibn.distributed
            c.dist = minibn.distributed
        except BaseException as exc:
            ok, msg = agree(False, "import minibn.distributed failed: " + _short(exc))
            emit(event="fatal", message=msg)
            return 3
    import conformance
    c.replaced = conformance.install_references(c, task, present)
    emit(event="ready", minibn=where, replaced=c.replaced)
    cases = conformance.CASES.get(task, [])
    for index in range(start, len(cases)):
        name, fn = cases[index]
        emit(event="start", index=index, name=name)
        t0 = time.perf_counter()
        try:
            fn(c)
            ok, message = True, ""
        except BaseException as exc:  # noqa: B902 - a student's SystemExit must not end the grading
            ok, message = False, _short(exc)
        ok, message = agree(ok, message)
        emit(event="result", index=index, name=name, ok=ok, message=message,
             seconds=round(time.perf_counter() - t0, 4))
    emit(event="done")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    if os.environ.get("MINIBN_GRADE_MPI") == "1":
        sys.exit(code)              # mpi4py finalizes MPI on the way out
    os._exit(code)                  # do not wait for threads a student's code may have left running
