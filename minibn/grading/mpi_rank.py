"""The SyncBatchNorm grading child: one rank of ``mpiexec -n N``, run on a scenario, raw outputs only.

This file is copied next to an assembled submission and run on every rank as
``python -I -S mpi_rank.py CONFIG_JSON``; like ``server.py`` it imports nothing
of the grader and holds no expected value, tolerance or verdict.  It reads the
scenario the grader wrote (``plan.json``: the steps; ``rank<R>.npz``: this
rank's arrays, loaded with ``allow_pickle=False``), runs the student's
``SyncBatchNorm`` step by step and writes what came out to
``OUT/rank<R>.npz``:

``ready``                  the path ``minibn`` was imported from
``s<i>.y`` / ``s<i>.dx``   a forward's output / a backward's input gradient
``s<i>.weight_grad``, ``s<i>.bias_grad``      after a backward (affine layers)
``s<i>.running_mean``, ``s<i>.running_var``   after a forward
``s<i>.calls``, ``s<i>.bytes``                the ledger's collectives of the step
``s<i>.error``, ``s<i>.error_types``          the step raised: the rank stops there

Steps: ``build`` (the layer, its weight and bias from the arrays ``weight``
and ``bias``), ``forward`` and ``backward`` (of the array named ``array``),
``eval``.  The grader parses the file with a fixed schema and judges.
"""
import json
import os
import sys

CONFIG = json.loads(sys.argv[1])
sys.path[:] = [CONFIG["root"]] + CONFIG["path"]
os.chdir(CONFIG["cwd"])

import numpy as np  # noqa: E402  (after sys.path is set)


def ledger_total(ledger, before):
    if ledger is None:
        return -1, -1
    since = ledger.since(before)
    return sum(int(v[0]) for v in since.values()), sum(int(v[1]) for v in since.values())


def step(i, spec, state, arrays, out):
    op = spec["op"]
    if op == "build":
        from minibn.distributed import SyncBatchNorm
        layer = SyncBatchNorm(spec["C"], momentum=spec["momentum"], affine=spec["affine"],
                              dtype=np.dtype(spec["dtype"]).type)
        if layer.affine:
            layer.weight.data[...] = arrays["weight"]
            layer.bias.data[...] = arrays["bias"]
        state["layer"] = layer
        return
    layer = state["layer"]
    if op == "eval":
        layer.eval()
        return
    ledger = getattr(getattr(layer, "comm", None), "ledger", None)
    before = ledger.snapshot() if ledger is not None else None
    data = arrays[spec["array"]]
    if op == "forward":
        out[f"s{i}.y"] = np.array(layer(data))
        out[f"s{i}.running_mean"] = np.array(layer.running_mean)
        out[f"s{i}.running_var"] = np.array(layer.running_var)
    elif op == "backward":
        if layer.affine:
            layer.weight.grad = layer.bias.grad = None
        out[f"s{i}.dx"] = np.array(layer.backward(data))
        if layer.affine:
            out[f"s{i}.weight_grad"] = np.array(layer.weight.grad)
            out[f"s{i}.bias_grad"] = np.array(layer.bias.grad)
    else:
        raise ValueError(f"unknown step {op!r}")
    calls, sent = ledger_total(ledger, before)
    out[f"s{i}.calls"], out[f"s{i}.bytes"] = np.int64(calls), np.int64(sent)


def main():
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    out = {}
    try:
        import minibn
        out["ready"] = np.array(os.path.realpath(minibn.__file__))
        with open(os.path.join(CONFIG["scenario"], "plan.json")) as f:
            plan = json.load(f)
        with np.load(os.path.join(CONFIG["scenario"], f"rank{rank}.npz"), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        for a in arrays.values():
            a.flags.writeable = False          # inputs are read-only, as in every other task
        state = {}
        for i, spec in enumerate(plan["steps"]):
            try:
                step(i, spec, state, arrays, out)
            except BaseException as exc:  # noqa: B902 - a student's SystemExit is an error of the step
                out[f"s{i}.error"] = np.array(f"{type(exc).__name__}: {exc}"[:2000])
                out[f"s{i}.error_types"] = np.array([t.__name__ for t in type(exc).__mro__])
                break
    finally:
        np.savez(os.path.join(CONFIG["out"], f"rank{rank}.npz"), **out)


if __name__ == "__main__":
    main()
