"""The course kit: a student copy of minibn with the solutions taken out, and its grader.

``python -m minibn assignment OUT_DIR``
    writes the student copy (:func:`write_assignment`): every *solution region*
    of minibn's source is replaced by a ``NotImplementedError`` that states the
    article's formula.
``python -m minibn grade DIR [--json] [--timeout S] [--tasks a,b]``
    grades a hand-in (:func:`main`): see below; a score table is printed with
    the run's random seed and the isolation the machine gave.  The exit
    status is 0 only for full marks.

Solution regions are marked in the source by two comment lines::

    # >>> solution: TASK[.PART]
    ...code...
    # <<< solution: TASK[.PART]

at the same indentation (``regions.py`` has the exact rules).  ``TASK`` is one
of the graded tasks of ``tasks.py`` (which also holds each region's hint: the
article's formula); ``PART`` names one of several regions of a task.  Adding
the markers of a task to the source is what makes it part of the assignment.

Decisions a course needs to know:

* A task is graded when the grader's own source has solution regions for it;
  a task whose code is missing from a student's copy then scores zero.  The
  SyncBatchNorm task runs under ``mpiexec -n 2`` and is skipped (and left out
  of the maximum) only where mpi4py or mpiexec is not installed.
* The grader judges; the student's code only computes.  The cases run in the
  grading process; each talks to a fresh child (``server.py``) that sees only
  the submission assembled from the grader's own handout with the hand-in's
  regions of the graded task spliced in (``sandbox.py``; other tasks' regions
  are the grader's reference, files outside the regions are never used), and
  replies with raw outputs that ``remote.py`` parses with a fixed schema.
  Where user+mount namespaces exist, the child sees a read-only file system
  with the grader and the hand-in folder hidden.
* SyncBatchNorm cases run in batch mode (``batch.py``): the grader writes a
  scenario (per-rank inputs and steps) as plain files, ``mpiexec -n N`` runs
  ``mpi_rank.py`` on every rank (the same assembly and isolation, a time
  limit), each rank writes raw outputs to its own ``.npz``, and the grader
  reads them with ``allow_pickle=False``, checks them against the scenario's
  schema and judges them against its own reference on the whole batch.

Modules: ``tasks`` (the task table), ``regions`` (markers, stubs),
``assignment`` (the student copy), ``runner`` (the command line, one child per
case), ``sandbox`` (assembly, the child's isolation), ``server`` (the child),
``remote`` (the wire format and proxies), ``batch`` and ``mpi_rank`` (the
SyncBatchNorm scenarios and their rank program), ``conformance`` (the cases),
``reference`` (the grader's independent float64 implementation).
"""
from .assignment import write_assignment
from .runner import grade, main
from .tasks import TASK_IDS, TASKS

__all__ = ["write_assignment", "grade", "main", "TASKS", "TASK_IDS"]
