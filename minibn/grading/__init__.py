"""The course kit: a student copy of minibn with the solutions taken out, and its grader.

``python -m minibn assignment OUT_DIR``
    writes the student copy (:func:`write_assignment`): every *solution region*
    of minibn's source is replaced by a ``NotImplementedError`` that states the
    article's formula.
``python -m minibn grade DIR [--json] [--timeout S] [--tasks a,b]``
    grades a copy (:func:`main`): each task's conformance cases run in a fresh
    interpreter that imports DIR's minibn (never the installed one), with a
    time limit per case, and a score table is printed.  The exit status is 0
    only for full marks.

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
* Each task is graded with every *other* task's functions replaced by the
  grader's reference (``conformance.install_references``): a mistake costs the
  marks of its own task only.
* The fast engines (``engines/``) hold a second arrangement of the same math
  that the layers use by default.  The grader selects the reference engine,
  which *is* ``functional.py`` (``MINIBN_KERNELS=reference``, checked in each
  grading process), and the student copy's ``__init__.py`` makes it the
  default at import, so the layers always run the ``functional`` code the
  student writes.  The engines stay in the copy as they are.

Modules: ``tasks`` (the task table), ``regions`` (markers, stubs),
``assignment`` (the student copy), ``runner`` (the grader's command line and
process handling), ``child`` (the grading subprocess), ``conformance`` (the
cases), ``reference`` (the grader's independent float64 implementation).
"""
from .assignment import write_assignment
from .runner import grade, main
from .tasks import TASK_IDS, TASKS

__all__ = ["write_assignment", "grade", "main", "TASKS", "TASK_IDS"]
