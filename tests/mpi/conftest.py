"""Set-up for the tests that run under ``mpiexec -n P python -m mpi4py -m pytest tests/mpi``.

Every rank runs the same tests in the same order, so every collective has all
its partners.  Two things keep a failure from turning into a hang:

* a test that fails on any rank ends the whole job at once (``MPI.Abort``),
  after printing the failure: the other ranks may be waiting in a collective
  that the failing rank will never reach (pytest catches the exception, so
  ``python -m mpi4py`` alone would not see it);
* a watchdog ends the process if one test runs longer than
  ``MINIBN_MPI_TEST_TIMEOUT`` seconds (default 60), printing where each
  thread was.

Tests compare results only after all their collectives are done, and agree
on the outcome (:func:`syncbn_helpers.agree`), so an ordinary failure is a
failure on every rank together.  Only rank 0 prints pytest's report.

Without ``mpiexec`` (plain ``pytest tests/mpi``) the tests run on one rank,
where SyncBatchNorm must equal BatchNorm; tests that need more ranks skip.
"""
from __future__ import annotations

import faulthandler
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

try:
    from mpi4py import MPI
except ImportError:     # pragma: no cover - mpi4py is part of the dev set-up
    MPI = None

TIMEOUT = float(os.environ.get("MINIBN_MPI_TEST_TIMEOUT", "60"))


def _size():
    return MPI.COMM_WORLD.Get_size() if MPI is not None else 1


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if MPI is not None and MPI.COMM_WORLD.Get_rank() != 0:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(TIMEOUT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and MPI is not None and _size() > 1:
        rank = MPI.COMM_WORLD.Get_rank()
        sys.stderr.write(f"\n[rank {rank}] {report.nodeid} failed ({report.when}); "
                         f"ending the whole job so no rank waits forever:\n{report.longreprtext}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
