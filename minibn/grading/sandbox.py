"""What the child sees: a submission assembled from the handout, and a process that sees only it.

:func:`assemble` builds, for one graded task, a ``minibn/`` package from the
grader's own handout (``assignment.write_assignment`` of the grader's source)
with region bodies filled in: the graded task's from the hand-in, every other
task's from the grader's own source (the reference everywhere else).  Files of
the hand-in outside the regions are never used; a difference there is
reported.  While ``bn_backward_graph`` is graded, the closed-form backward is
a function that raises (the graph derivation must be its own).

:func:`launch` starts ``server.py`` with ``python -I -S`` and a ``sys.path`` of
the assembled package, the standard library and links to NumPy only.  Where
Linux user and mount namespaces work without root, the child runs in one in
which the grader's package, its source tree, the hand-in folder and the
grading folder are hidden under empty file systems, every file system is
read-only and only an empty working folder can be written (:func:`isolation`).
"""
from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from typing import Dict, List, Tuple

from .regions import MarkerError, find_regions

__all__ = ["assemble", "launch", "launch_mpi", "isolation", "GRAPH_BLOCK"]

HERE = os.path.dirname(os.path.abspath(__file__))
OWN_PACKAGE = os.path.dirname(HERE)
SERVER = os.path.join(HERE, "server.py")
MPI_RANK = os.path.join(HERE, "mpi_rank.py")
GRAPH_BLOCK = ("raise RuntimeError('batch_norm_backward (the closed form) is not available while "
               "bn_backward_graph is graded: derive the gradient through the graph yourself')")


def _read(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _bodies(text, rel) -> Dict[str, List[str]]:
    lines = text.splitlines(keepends=True)
    return {r.region_id: lines[r.start + 1:r.end] for r in find_regions(text, rel)}


def _outside(text, rel) -> str:
    """``text`` with every region body removed (what must equal the handout)."""
    lines = text.splitlines()
    for r in reversed(find_regions(text, rel)):
        del lines[r.start + 1:r.end]
    return "\n".join(line.rstrip() for line in lines).strip()


def _parses_alone(body: List[str]) -> bool:
    """A region body must be whole statements on its own (no unclosed string swallowing later code)."""
    try:
        ast.parse("def _region():\n" + textwrap.indent(textwrap.dedent("".join(body)), "    ") + "    pass\n")
        return True
    except SyntaxError:
        return False


def assemble(handout: str, submission: str, task: str, dest: str) -> List[str]:
    """Write ``dest/minibn`` for grading ``task``; returns notes about the hand-in for the report."""
    notes: List[str] = []
    src_pkg, target = os.path.join(handout, "minibn"), os.path.join(dest, "minibn")
    shutil.copytree(src_pkg, target)
    for root, dirs, files in os.walk(target):
        dirs[:] = sorted(d for d in dirs if not (root == target and d == "grading"))   # the grader's stub
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, dest)
            text = _read(path)
            regions = find_regions(text, rel)
            own_rel = os.path.relpath(path, target)
            own = _read(os.path.join(OWN_PACKAGE, own_rel))
            theirs = _read(os.path.join(submission, rel))
            if theirs is None:
                if regions:
                    notes.append(f"{rel}: missing from the hand-in")
                their_bodies = {}
            else:
                try:
                    their_bodies = _bodies(theirs, rel)
                    if _outside(theirs, rel) not in (_outside(text, rel), _outside(own or "", rel)):
                        notes.append(f"{rel}: changes outside the solution regions were ignored")
                except MarkerError as exc:
                    notes.append(f"{rel}: {exc}; its regions were not used")
                    their_bodies = {}
            if not regions:
                continue
            own_bodies = _bodies(own, rel)
            lines = text.splitlines(keepends=True)
            out, pos = [], 0
            for r in regions:
                out.extend(lines[pos:r.start + 1])
                body = lines[r.start + 1:r.end]                       # the handout's stub
                if r.task == task:
                    if r.region_id in their_bodies and _parses_alone(their_bodies[r.region_id]):
                        body = their_bodies[r.region_id]
                    elif r.region_id in their_bodies:
                        notes.append(f"{rel}: region {r.region_id} is not a sequence of whole statements "
                                     "(a syntax error, or an unclosed string or bracket); it was not used")
                        body = [f"{r.indent}raise SyntaxError('region {r.region_id} does not parse')\n"]
                    else:
                        notes.append(f"{rel}: region {r.region_id} is missing")
                elif task == "bn_backward_graph" and r.task == "bn_backward":
                    body = [f"{r.indent}{GRAPH_BLOCK}\n"]
                else:
                    body = own_bodies[r.region_id]
                out.extend(body)
                pos = r.end
            out.extend(lines[pos:])
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write("".join(out))
    return notes


# =========================================================================== the child process

def _library_links(dest: str) -> List[str]:
    """``sys.path`` for the child: the standard library and a folder of links to NumPy (and mpi4py)."""
    libs = os.path.join(dest, "libs")
    os.makedirs(libs, exist_ok=True)
    paths = sysconfig.get_paths()
    for site in {paths["purelib"], paths["platlib"]}:
        for name in sorted(os.listdir(site)) if os.path.isdir(site) else ():
            if name.split("-")[0].split(".")[0] in ("numpy", "mpi4py") and not os.path.exists(
                    os.path.join(libs, name)):
                os.symlink(os.path.join(site, name), os.path.join(libs, name))
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    stdlib = [base["stdlib"], base["platstdlib"], os.path.join(base["platstdlib"], "lib-dynload")]
    return list(dict.fromkeys(p for p in stdlib if os.path.isdir(p))) + [libs]


_NAMESPACES = None


def isolation() -> str:
    """``"namespaces"`` when an unprivileged user+mount namespace can be made here, else ``"process"``."""
    global _NAMESPACES
    if _NAMESPACES is None:
        unshare = shutil.which("unshare")
        ok = False
        if unshare and sys.platform.startswith("linux"):
            try:
                ok = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
                                     "mount -t tmpfs none /tmp && true"], capture_output=True,
                                    timeout=20).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        _NAMESPACES = ok
    return "namespaces" if _NAMESPACES else "process"


def _hide_targets(paths: List[str], keep: List[str]) -> List[Tuple[str, bool]]:
    """``(path, is_dir)`` to cover so that ``paths`` are hidden but nothing in ``keep`` is."""
    out = []
    keep = [os.path.realpath(k) for k in keep]
    for p in dict.fromkeys(os.path.realpath(p) for p in paths if p and os.path.lexists(p)):
        if any(p.startswith(o + os.sep) for o, _ in out):
            continue
        inside = [k for k in keep if k == p or k.startswith(p + os.sep)]
        if not inside:
            out.append((p, os.path.isdir(p)))
        elif p not in keep and os.path.isdir(p):
            out.extend(_hide_targets([os.path.join(p, n) for n in os.listdir(p)], keep))
    return out


def _environment(workdir):
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MINIBN_KERNELS": "reference",
            "MINIBN_BACKEND": "numpy", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": workdir}


def _isolated(cmd: List[str], stage: str, view: str, hide: List[str], workdir: str,
              writable: Tuple[str, ...] = (), mpi: bool = False) -> List[str]:
    """``cmd`` run in a user+mount namespace (where available): ``stage`` seen read-only as ``view``,
    ``hide`` covered, every file system read-only but an empty ``workdir`` and the ``writable`` folders.
    ``mpi``: the ranks of ``mpiexec`` get a private ``/dev/shm`` and a PID namespace (they start sessions of
    their own; killing the launcher then ends every process it started)."""
    if isolation() != "namespaces":
        return cmd
    keep = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), view, workdir,
            *writable, *sysconfig.get_paths().values()]
    script = [f"mount --bind {shlex.quote(stage)} {shlex.quote(view)}",
              f"mount -o remount,bind,ro {shlex.quote(view)} || true"]
    for path, is_dir in _hide_targets(hide, keep):
        script.append(f"mount -t tmpfs -o size=64k,mode=0555 none {shlex.quote(path)}" if is_dir
                      else f"mount --bind /dev/null {shlex.quote(path)}")
    # then every mount read-only (nothing on this machine can be written, the grader's interpreter
    # included), and a fresh, empty, writable working folder
    script.append('for m in $(cut -d" " -f2 /proc/self/mounts | sort -u); do '
                  'mount -o remount,bind,ro "$m" 2>/dev/null || true; done')
    script.append(f"mount -t tmpfs -o size=64m none {shlex.quote(workdir)}")
    if mpi and os.path.isdir("/dev/shm"):    # MPI's shared memory between the ranks: a fresh, private one
        script.append("mount -t tmpfs -o size=256m none /dev/shm")
    for path in writable:                # a folder the grader reads back (its files are parsed strictly)
        script.append(f"mount --bind {shlex.quote(path)} {shlex.quote(path)}")
        script.append(f"mount -o remount,bind,rw {shlex.quote(path)}")
    script.append("exec " + " ".join(shlex.quote(a) for a in cmd))
    pid = ["--pid", "--fork", "--kill-child", "--mount-proc"] if mpi else []
    return [shutil.which("unshare"), "--user", "--map-root-user", "--mount", *pid, "sh", "-ec",
            "\n".join(script)]


def _config(stage, view, workdir, **more):
    base = view if isolation() == "namespaces" else stage
    return base, {"root": os.path.join(base, "pkg"),
                  "path": [p.replace(stage, base) if p.startswith(stage) else p for p in _library_links(stage)],
                  "cwd": workdir, **more}


def launch(stage: str, view: str, hide: List[str], req_r: int, rep_w: int, workdir: str, stdout, stderr):
    """Start the child on the assembled package ``stage/pkg`` (seen as ``view/pkg``)."""
    shutil.copy(SERVER, os.path.join(stage, "server.py"))
    base, config = _config(stage, view, workdir, req=req_r, rep=rep_w)
    python = [sys.executable, "-I", "-S", os.path.join(base, "server.py"), json.dumps(config)]
    return subprocess.Popen(_isolated(python, stage, view, hide, workdir), cwd=workdir,
                            env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            pass_fds=(req_r, rep_w), start_new_session=True)


def libmpi() -> str:
    """The MPI library mpi4py loads (``python -S`` does not search the site prefixes for it)."""
    for d in (os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")):
        for name in ("libmpi.so.12", "libmpi.so.40", "libmpi.dylib", "libmpi.so"):   # .so may be a linker script
            if os.path.exists(os.path.join(d, name)):
                return os.path.join(d, name)
    return ""


def launch_mpi(mpiexec: str, nprocs: int, stage: str, view: str, hide: List[str], scenario: str, out: str,
               workdir: str, stdout, stderr):
    """``mpiexec -n nprocs`` of ``mpi_rank.py`` on the assembled package; ``scenario`` is read (it lies
    in ``stage``), each rank writes ``out/rank<R>.npz``."""
    if not os.path.exists(os.path.join(stage, "mpi_rank.py")):
        shutil.copy(MPI_RANK, os.path.join(stage, "mpi_rank.py"))
    base = view if isolation() == "namespaces" else stage
    base, config = _config(stage, view, workdir, scenario=scenario.replace(stage, base, 1), out=out)
    python = [sys.executable, "-I", "-S", os.path.join(base, "mpi_rank.py"), json.dumps(config)]
    env = _environment(workdir)
    if libmpi():
        env["MPI4PY_LIBMPI"] = libmpi()
    cmd = [mpiexec, "-n", str(nprocs), *python]
    return subprocess.Popen(_isolated(cmd, stage, view, hide, workdir, writable=(out,), mpi=True), cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
