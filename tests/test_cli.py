"""``python -m minibn``: the subcommands a reader uses, and clear errors (exit 2, no traceback)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from lesson_utils import LESSONS, REPO


def cli(*args, timeout=300):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, "-m", "minibn", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_info_reports_versions_backend_gpu_and_mpi():
    proc = cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert np.__version__ in lines["numpy"]
    assert platform.python_version() in lines["python"]
    assert "numpy" in lines["backend"] or "cupy" in lines["backend"]
    assert lines["GPU"].split()[1] in ("yes", "no")
    try:
        from mpi4py import MPI
    except ImportError:
        assert "not installed" in lines["mpi4py"]
    else:
        first = MPI.Get_library_version().strip().splitlines()[0]
        assert first in out                                  # the MPI library, as it names itself
        assert "CUDA-aware" in out
    assert "Traceback" not in proc.stderr


def test_unknown_lesson_is_exit_2_with_a_message():
    proc = cli("lesson", 99)
    assert proc.returncode == 2
    assert "no lesson 99" in proc.stderr and "04_dynamic_momentum.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lesson_argument_must_be_a_number():
    proc = cli("lesson", "four")
    assert proc.returncode == 2 and "invalid int value" in proc.stderr


def test_no_subcommand_is_a_usage_error():
    proc = cli()
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_unknown_figure_is_exit_2_and_lists_the_figures(tmp_path):
    proc = cli("figures", "--out", tmp_path, "s4_static_vs_dynamic", "s9_no_such_figure")
    assert proc.returncode == 2
    assert "s9_no_such_figure" in proc.stderr and "s4_nonstationary" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.listdir(tmp_path)                          # nothing rendered before the check


def test_lesson_4_runs_like_the_script():
    proc = cli("lesson", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[2] == "04_dynamic_momentum.py"                   # the header, then the lesson's output
    for expected in ("seed = 2024", "max |Cumulative - momentum=None| = 0",
                     "values per channel used = 1024"):
        assert expected in lines


def test_figures_writes_png_and_json(tmp_path):
    proc = cli("figures", "--quiet", "--out", tmp_path, "s4_static_vs_dynamic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["s4_static_vs_dynamic.json", "s4_static_vs_dynamic.png"]
    assert "s4_static_vs_dynamic:" in proc.stdout
    with open(tmp_path / "s4_static_vs_dynamic.json") as f:
        data = json.load(f)
    # an independent look at the numbers: momentum 0.9 on the first batch of the seeded stream
    x = np.random.default_rng(data["seed"]).standard_normal((16, 5)).astype(np.float32).astype(np.float64)
    assert data["runs"]["static"]["mean"][0] == pytest.approx(0.9 * x.mean(axis=0).mean(), abs=1e-7)


@pytest.mark.slow
def test_article_runs_lessons_then_figures(tmp_path, monkeypatch, capfd):
    """The control flow of ``article``, in process, on lesson 4 and the section 4 figures only
    (the full command takes minutes; the figures pipeline tests run it with
    MINIBN_TEST_ALL_FIGURES=1)."""
    from minibn import __main__ as main_mod
    from minibn import figures as pipeline
    pipeline.load_all()
    subset = OrderedDict((k, v) for k, v in pipeline.FIGURES.items() if k.startswith("s4_"))
    monkeypatch.setattr(pipeline, "FIGURES", subset)
    monkeypatch.setattr(main_mod, "lesson_paths", lambda: [os.path.join(LESSONS, "04_dynamic_momentum.py")])
    assert main_mod.main(["article", "--quiet", "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "seed = 2024" in out                              # the lesson's own output
    assert out.index("04_dynamic_momentum.py") < out.index("s4_static_vs_dynamic:")
    assert "lessons: 1 of 1 ran without error" in out
    assert sorted(os.listdir(tmp_path)) == sorted(f"{n}{e}" for n in subset for e in (".png", ".json"))


def test_article_reports_a_failing_lesson_and_goes_on(tmp_path, monkeypatch, capfd):
    from minibn import __main__ as main_mod
    from minibn import figures as pipeline
    bad = tmp_path / "01_broken.py"
    bad.write_text("import numpy\nnumpy.set_printoptions(precision=1)\nraise RuntimeError('broken lesson')\n")
    good = tmp_path / "02_fine.py"
    good.write_text("import numpy, os\nprint('fine lesson ran', numpy.array([0.123456]), os.getcwd())\n")
    monkeypatch.setattr(main_mod, "lesson_paths", lambda: [str(bad), str(good)])
    monkeypatch.setattr(pipeline, "FIGURES", OrderedDict())
    monkeypatch.setattr(pipeline, "load_all", lambda: pipeline.FIGURES)
    assert main_mod.main(["article", "--quiet", "--out", str(tmp_path / "figs")]) == 1
    captured = capfd.readouterr()
    # the second lesson runs in a fresh interpreter (no print options leak), from the repository root
    assert f"fine lesson ran [0.123456] {REPO}" in captured.out and "[2/2] 02_fine.py" in captured.out
    assert "broken lesson" in captured.err and "01_broken.py" in captured.err


def test_a_failing_lesson_gives_a_nonzero_exit(tmp_path, monkeypatch, capfd):
    from minibn import __main__ as main_mod
    bad = tmp_path / "07_broken.py"
    bad.write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(main_mod, "lesson_paths", lambda: [str(bad)])
    assert main_mod.main(["lesson", "7"]) == 3
