"""SyncBatchNorm cases in batch mode: a scenario out, raw outputs back, the verdict here.

A SyncBatchNorm case needs several processes that talk to each other, so it
does not use ``server.py``'s request/reply channel.  Instead the case (in
``conformance.py``, run in the grading process) describes a :class:`Scenario`:
the layer to build, and per rank the arrays of each step (forward, backward,
eval).  :func:`run_scenario` writes it as plain files (``plan.json`` and one
``rank<R>.npz`` per rank) into the task's read-only stage, launches ``mpiexec
-n N`` of ``mpi_rank.py`` (``sandbox.launch_mpi``: ``python -I -S`` on the
assembled package, in the namespaces where available) under a time limit,
killing the process group on timeout, and reads each rank's
``rank<R>.npz`` back with ``allow_pickle=False``.  :func:`parse_rank` checks
it against the schema the plan implies (the exact key set, dtypes, shapes);
anything else raises :class:`~.remote.ProtocolError` and fails the case.
Expected values are computed by the case from its own copies of the inputs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import zipfile
from typing import Dict, List

import numpy as np

from .remote import ProtocolError

__all__ = ["Scenario", "StepError", "Context", "run_scenario", "parse_rank", "MpiTimeout", "MpiDied"]

MAX_FILE = 64 << 20
MAX_TEXT = 4000


class MpiTimeout(Exception):
    pass


class MpiDied(Exception):
    pass


class StepError:
    """A step that raised on a rank: the exception's class names (MRO) and its text."""

    def __init__(self, types: List[str], message: str):
        self.types, self.message = types, message

    def describe(self):
        return self.message


class Scenario:
    """What every rank runs: ``build`` first, then forward/backward/eval steps with per-rank arrays."""

    def __init__(self, nprocs: int, C: int, dtype=np.float64, affine=True, momentum=0.1, weight=None, bias=None):
        self.nprocs, self.C, self.dtype, self.affine = nprocs, C, np.dtype(dtype), affine
        self.steps = [dict(op="build", C=int(C), dtype=self.dtype.name, affine=bool(affine),
                           momentum=float(momentum))]
        self.arrays: List[Dict[str, np.ndarray]] = [{} for _ in range(nprocs)]
        if affine:
            for r in range(nprocs):
                self.arrays[r]["weight"] = np.asarray(weight, dtype=self.dtype)
                self.arrays[r]["bias"] = np.asarray(bias, dtype=self.dtype)

    def _add(self, op, parts):
        assert len(parts) == self.nprocs
        i = len(self.steps)
        name = f"a{i}"
        for r, part in enumerate(parts):
            self.arrays[r][name] = np.ascontiguousarray(part)
        self.steps.append(dict(op=op, array=name))
        return i

    def forward(self, parts) -> int:
        """A forward of ``parts[r]`` on rank ``r``; returns the step's index."""
        return self._add("forward", parts)

    def backward(self, parts) -> int:
        return self._add("backward", parts)

    def eval(self) -> int:
        self.steps.append(dict(op="eval"))
        return len(self.steps) - 1

    def write(self, folder: str):
        os.makedirs(folder)
        with open(os.path.join(folder, "plan.json"), "w") as f:
            json.dump({"steps": self.steps}, f)
        for r, arrays in enumerate(self.arrays):
            np.savez(os.path.join(folder, f"rank{r}.npz"), **arrays)

    # -- the schema of a rank's reply --------------------------------------------------
    def expected_keys(self, r: int) -> Dict[str, tuple]:
        """``{key: (dtype, shape)}`` of every output a rank writes when no step raises."""
        keys = {}
        for i, s in enumerate(self.steps):
            if s["op"] not in ("forward", "backward"):
                continue
            shape = self.arrays[r][s["array"]].shape
            if s["op"] == "forward":
                keys[f"s{i}.y"] = (self.dtype, shape)
                keys[f"s{i}.running_mean"] = (self.dtype, (self.C,))
                keys[f"s{i}.running_var"] = (self.dtype, (self.C,))
            else:
                keys[f"s{i}.dx"] = (self.dtype, shape)
                if self.affine:
                    keys[f"s{i}.weight_grad"] = (None, (self.C,))      # any float dtype: judged by value
                    keys[f"s{i}.bias_grad"] = (None, (self.C,))
            keys[f"s{i}.calls"] = (np.dtype(np.int64), ())
            keys[f"s{i}.bytes"] = (np.dtype(np.int64), ())
        return keys


def _step_of(key):
    head = key.split(".", 1)[0]
    return int(head[1:]) if head.startswith("s") and head[1:].isdigit() else -1


def parse_rank(scenario: Scenario, r: int, path: str, package_root: str) -> dict:
    """Rank ``r``'s outputs: ``{"steps": {i: {name: value}}, "error": (step, StepError) or None}``.

    Raises :class:`ProtocolError` for a file that is missing, not an ``.npz`` of plain arrays, or has a key,
    dtype or shape the plan does not call for."""
    if not os.path.isfile(path) or os.path.islink(path):
        raise ProtocolError(f"rank {r} wrote no output file")
    if os.path.getsize(path) > MAX_FILE:
        raise ProtocolError(f"rank {r}'s output file is too large")
    try:
        with np.load(path, allow_pickle=False) as npz:
            got = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ProtocolError(f"rank {r}'s output file is not a plain .npz: {type(exc).__name__}: {exc}"[:400])
    ready = got.pop("ready", None)
    if ready is None or ready.dtype.kind != "U" or ready.shape != () or len(str(ready)) > MAX_TEXT:
        raise ProtocolError(f"rank {r}'s output has no valid 'ready' entry")
    if not str(ready).startswith(package_root):
        raise ProtocolError(f"rank {r} did not import the assembled package (it reported {str(ready)[:200]!r})")
    error = None
    errors = [k for k in got if k.endswith(".error")]
    if len(errors) > 1:
        raise ProtocolError(f"rank {r} reported errors in several steps: {sorted(errors)}")
    if errors:
        i = _step_of(errors[0])
        text, types = got.pop(f"s{i}.error"), got.pop(f"s{i}.error_types", None)
        if not (0 <= i < len(scenario.steps)) or text.dtype.kind != "U" or text.shape != () \
                or types is None or types.dtype.kind != "U" or types.ndim != 1 or not 0 < types.size <= 64 \
                or len(str(text)) > MAX_TEXT:
            raise ProtocolError(f"rank {r}'s error entry is malformed")
        error = (i, StepError([str(t)[:200] for t in types], str(text)))
    want = {k: v for k, v in scenario.expected_keys(r).items() if error is None or _step_of(k) < error[0]}
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5]
        raise ProtocolError(f"rank {r}'s outputs do not match the schema (unexpected {extra}, missing {missing})")
    steps: Dict[int, Dict[str, np.ndarray]] = {}
    for k, (dtype, shape) in want.items():
        a = got[k]
        if a.dtype.kind not in "fi" or (dtype is not None and a.dtype != dtype) or a.shape != shape:
            raise ProtocolError(f"rank {r}'s {k}: {a.dtype} {a.shape}, expected "
                                f"{dtype if dtype is not None else 'float'} {shape}")
        steps.setdefault(_step_of(k), {})[k.split(".", 1)[1]] = a
    return {"steps": steps, "error": error, "ready": str(ready)}


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_scenario(scenario: Scenario, ctx) -> List[dict]:
    """Run ``scenario`` under ``mpiexec`` (``ctx``: the case's stage, view, hide, timeout, mpiexec);
    returns every rank's parsed outputs (:func:`parse_rank`)."""
    import minibn.grading.sandbox as sandbox
    folder = tempfile.mkdtemp(prefix="scenario-", dir=os.path.join(ctx.stage, "scenarios"))
    os.rmdir(folder)
    scenario.write(folder)
    out = tempfile.mkdtemp(prefix="minibn-ranks-")
    workdir = tempfile.mkdtemp(prefix="minibn-case-")
    err_path = os.path.join(ctx.stage, f"stderr-{os.path.basename(folder)}.txt")
    try:
        with open(err_path, "w") as err:
            proc = sandbox.launch_mpi(ctx.mpiexec, scenario.nprocs, ctx.stage, ctx.view, ctx.hide, folder, out,
                                      workdir, err, err)
        try:
            code = proc.wait(timeout=ctx.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise MpiTimeout(f"timed out after {ctx.timeout:g} s (an endless loop, or ranks that do not make "
                             "the same collective calls?)")
        names = set(os.listdir(out))
        extra = names - {f"rank{r}.npz" for r in range(scenario.nprocs)}
        if extra:
            raise ProtocolError(f"unexpected files in the ranks' output folder: {sorted(extra)[:5]}")
        missing = [r for r in range(scenario.nprocs) if f"rank{r}.npz" not in names]
        if missing:
            raise MpiDied(f"rank(s) {missing} wrote no output (mpiexec exit {code}): {_tail(err_path)}")
        root = os.path.join(ctx.view if sandbox.isolation() == "namespaces" else ctx.stage, "pkg") + os.sep
        ranks = [parse_rank(scenario, r, os.path.join(out, f"rank{r}.npz"), root) for r in range(scenario.nprocs)]
        ctx.imported.update(rank["ready"] for rank in ranks)
        return ranks
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def _tail(path, n=600):
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return ""
    return ("..." + text[-n:]) if len(text) > n else text


class Context:
    """What a SyncBatchNorm case needs to run scenarios (the runner makes one per case)."""

    def __init__(self, stage, view, hide, timeout, mpiexec, nprocs, seed):
        self.stage, self.view, self.hide, self.timeout = stage, view, hide, timeout
        self.mpiexec, self.nprocs, self.seed = mpiexec, nprocs, seed
        self.imported: set = set()
        os.makedirs(os.path.join(stage, "scenarios"), exist_ok=True)

    def run(self, scenario: Scenario) -> List[dict]:
        return run_scenario(scenario, self)
