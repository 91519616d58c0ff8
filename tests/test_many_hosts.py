"""SyncBatchNorm across "real hosts": network namespaces on this machine, joined by veth links.

Each rank runs in its own network namespace, started by MPICH's hydra launcher
through ``tests/netns/enter_host.sh`` (hydra's ``ssh``, which enters the
namespace instead of logging in), so the ranks share no network stack and talk
TCP over the links (shared memory is switched off too).  The namespaces hang
off one bridge that lives in a namespace of its own, and every address is in
198.18.0.0/24 (the benchmarking range) inside those namespaces only::

    switch namespace:   bridge br0 -- veth -- ctl (mpiexec, 198.18.0.1)
                                    -- veth -- host 0 (rank 0, 198.18.0.2)
                                    -- veth -- host 1 (rank 1, 198.18.0.3) ...

Two checks: SyncBatchNorm over the hosts equals BatchNorm on the whole batch
(outputs, dx, parameter gradients, running statistics), and cutting one host's
link in the middle of a run ends the job with the collective timeout's message
within the timeout plus a margin, instead of a hang.

Needs root, ``ip`` with netns support and MPICH's hydra ``mpiexec``; skipped
with the reason otherwise.  Every wait is bounded; the namespaces and every
process in them are removed afterwards, also when a check fails.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import minibn as mb

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LAUNCHER = os.path.join(HERE, "netns", "enter_host.sh")
SUBNET = "198.18.0"                 # RFC 2544 benchmarking range, used only inside the namespaces
TIMEOUT = 3                         # MINIBN_COLLECTIVE_TIMEOUT for the link-cut run, seconds
MARGIN = 20                         # seconds allowed beyond it (start-up, abort, a busy CI machine)
SHELL_LIMIT = 20                    # any single `ip` command, seconds


def mpiexec():
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return path if os.path.exists(path) else shutil.which("mpiexec")


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=SHELL_LIMIT,
                          check=check)


def why_not_here():
    """The reason this machine cannot run the test, or ``None``."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and veth links"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if mpiexec() is None:
        return "no mpiexec"
    version = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True, timeout=30)
    if "HYDRA" not in version.stdout.upper():
        return "mpiexec is not MPICH's hydra (needs -launcher ssh -launcher-exec)"
    probe = f"mbprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def hosts():
    """Three "hosts" (namespaces with one rank's address each) plus mpiexec's own, on one bridge.

    Yields ``(names, run)``: ``names`` has the namespace names, the switch-side
    link of each host (``links``) and the address map for the launcher.
    """
    reason = why_not_here()
    if reason:
        pytest.skip(reason)
    tag = f"mb{os.getpid()}"                          # unique per run; veth names stay <= 15 chars
    switch, ctl = f"{tag}s", f"{tag}c"
    host_names = [f"{tag}h{i}" for i in range(3)]
    made = []
    try:
        for name in (switch, ctl, *host_names):
            ip("netns", "add", name)
            made.append(name)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        links = {}
        for i, name in enumerate((ctl, *host_names), start=1):
            inner, outer = f"{tag}a{i}", f"{tag}b{i}"
            ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            ip("link", "set", inner, "netns", name)
            ip("link", "set", outer, "netns", switch)
            ip("-n", name, "link", "set", inner, "name", "eth0")
            ip("-n", name, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            for dev in ("eth0", "lo"):
                ip("-n", name, "link", "set", dev, "up")
            ip("-n", switch, "link", "set", outer, "master", "br0")
            ip("-n", switch, "link", "set", outer, "up")
            links[name] = outer
        addresses = {name: f"{SUBNET}.{i}" for i, name in enumerate(host_names, start=2)}
        yield dict(switch=switch, ctl=ctl, hosts=host_names, links=links, addresses=addresses)
    finally:
        for name in reversed(made):
            _kill_everything_in(name)
            ip("netns", "del", name, check=False)


def _kill_everything_in(netns):
    """SIGKILL each process still running in ``netns`` (by pid), so the namespace can go."""
    pids = ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def launch(hosts, script_path, nranks, env_extra, args=()):
    """Start ``mpiexec`` in the control namespace with one rank per host; a new process group."""
    ranks = hosts["hosts"][:nranks]
    env = dict(os.environ,
               MINIBN_NETNS_HOSTS=" ".join(f"{hosts['addresses'][h]}={h}" for h in ranks),
               MPIR_CVAR_NOLOCAL="1",             # never shared memory between ranks
               MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_extra)
    cmd = ["ip", "netns", "exec", hosts["ctl"], mpiexec(), "-launcher", "ssh",
           "-launcher-exec", LAUNCHER, "-iface", "eth0",
           "-hosts", ",".join(hosts["addresses"][h] for h in ranks), "-n", str(nranks),
           sys.executable, str(script_path), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def finish(proc, limit):
    """``(returncode, stdout, stderr)`` of ``proc``; killed (whole group) after ``limit`` s."""
    try:
        out, err = proc.communicate(timeout=limit)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        return None, out, err + f"\n[test: killed after {limit} s]"


def write_script(tmp_path, text):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(text))
    return path


# =========================================================================== equivalence

EQUIVALENCE_JOB = """
    import sys
    import numpy as np
    import minibn as mb
    from minibn.distributed import allreduce_gradients
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    out_dir, sizes = sys.argv[1], [3, 5, 2][:size]
    start = sum(sizes[:rank])
    rng = np.random.default_rng(7)
    x_all = rng.normal(2.0, 3.0, size=(2, sum(sizes), 4, 3))      # two steps of a whole batch
    dy_all = rng.normal(size=x_all.shape)
    sync = mb.SyncBatchNorm(4, momentum=0.3, dtype=np.float64)
    saved = {}
    for step in range(2):
        part = slice(start, start + sizes[rank])
        y = sync(x_all[step, part])
        dx = sync.backward(dy_all[step, part])
        allreduce_gradients(sync, average=False)                  # local sums -> whole-batch sums
        saved.update({f"y{step}": y, f"dx{step}": dx, f"dweight{step}": sync.weight.grad,
                      f"dbias{step}": sync.bias.grad})
        sync.zero_grad()
    saved.update(running_mean=sync.running_mean, running_var=sync.running_var)
    np.savez(f"{out_dir}/rank{rank}.npz", **saved)
    print(f"rank {rank} of {size} done", flush=True)
"""


def test_syncbn_across_hosts_equals_batchnorm_on_the_whole_batch(hosts, tmp_path):
    script = write_script(tmp_path, EQUIVALENCE_JOB)
    proc = launch(hosts, script, 3, {"MINIBN_COLLECTIVE_TIMEOUT": "30"}, args=(tmp_path,))
    code, out, err = finish(proc, 90)
    assert code == 0, f"mpiexec exit {code}\n{out}\n{err[-3000:]}"
    sizes = [3, 5, 2]
    rng = np.random.default_rng(7)
    x_all = rng.normal(2.0, 3.0, size=(2, sum(sizes), 4, 3))
    dy_all = rng.normal(size=x_all.shape)
    whole = mb.BatchNorm1d(4, momentum=0.3, dtype=np.float64)
    expected = {}
    for step in range(2):
        expected[f"y{step}"] = whole(x_all[step])
        expected[f"dx{step}"] = whole.backward(dy_all[step])
        expected[f"dweight{step}"], expected[f"dbias{step}"] = whole.weight.grad, whole.bias.grad
        whole.zero_grad()
    bounds = np.cumsum([0] + sizes)
    for rank in range(3):
        got = np.load(tmp_path / f"rank{rank}.npz")
        part = slice(bounds[rank], bounds[rank + 1])
        for key, want in expected.items():
            if key.startswith(("y", "dx")):                        # per sample: this rank's rows
                want = want[part]
            np.testing.assert_allclose(got[key], want, rtol=1e-12, atol=1e-12,
                                       err_msg=f"rank {rank}: {key}")
        np.testing.assert_allclose(got["running_mean"], whole.running_mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got["running_var"], whole.running_var, rtol=1e-12, atol=1e-14)


# =========================================================================== a link goes down

LINK_CUT_JOB = """
    import sys, time
    import numpy as np
    import minibn as mb
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    marker = sys.argv[1]
    sync = mb.SyncBatchNorm(4)
    x = np.random.default_rng(rank).normal(size=(6, 4)).astype(np.float32)
    give_up = time.monotonic() + 60                # bounded even if nothing stops it
    step = 0
    while time.monotonic() < give_up:
        sync.backward(np.ones_like(sync(x)))
        step += 1
        if step == 5 and rank == 0:
            open(marker, "w").close()              # the test may cut a link now
        time.sleep(0.01)
    print(f"rank {rank}: still running after {step} steps", flush=True)
"""


def test_a_cut_link_ends_the_job_with_the_timeout_message(hosts, tmp_path):
    script = write_script(tmp_path, LINK_CUT_JOB)
    marker = tmp_path / "running"
    proc = launch(hosts, script, 2, {"MINIBN_COLLECTIVE_TIMEOUT": str(TIMEOUT)}, args=(marker,))
    try:
        started = time.monotonic()
        while not marker.exists() and proc.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.05)
        assert marker.exists(), f"the job never got going:\n{finish(proc, 5)}"
        cut_host = hosts["hosts"][1]                               # rank 1's host
        ip("-n", hosts["switch"], "link", "set", hosts["links"][cut_host], "down")
        cut_at = time.monotonic()
        code, out, err = finish(proc, TIMEOUT + MARGIN)
        ended_after = time.monotonic() - cut_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    lines = [ln for ln in err.splitlines() if "minibn: collective timeout:" in ln]
    print(f"link cut -> job ended after {ended_after:.1f} s, exit {code}; stderr lines:",
          *lines, sep="\n")
    assert code is not None, f"the job did not end within {TIMEOUT + MARGIN} s of the cut:\n{err}"
    assert code != 0 and "still running" not in out
    assert any(" on rank 0 of 2 " in ln for ln in lines), err[-3000:]
    for line in lines:
        assert f"within {TIMEOUT} s" in line and "SyncBatchNorm." in line
        assert "a lost network link" in line and "MPI_Abort" in line
        waited = float(re.search(r"\(waited ([0-9.]+) s\)", line).group(1))
        assert waited >= TIMEOUT - 0.05, line             # printed with one decimal
    # no lower bound on ended_after: a rank's deadline runs from the start of its collective,
    # which may come before the cut; the line itself says the full timeout was waited
