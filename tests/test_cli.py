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


@pytest.mark.slow
def test_lesson_4_runs_like_the_script():
    proc = cli("lesson", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[2] == "04_dynamic_momentum.py"                   # the header, then the lesson's output
    for expected in ("seed = 2024", "max |Cumulative - momentum=None| = 0",
                     "values per channel used = 1024"):
        assert expected in lines


@pytest.mark.slow
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


@pytest.mark.slow
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


# =========================================================================== lessons and notebooks, anywhere

def test_setup_cfg_ships_every_package_and_maps_the_lessons():
    """The wheel's package list is written out in setup.cfg; a new subpackage must be added there."""
    import configparser
    from setuptools import find_packages
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    listed = cfg["options"]["packages"].split()
    mapping = dict(line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines())
    on_disk = find_packages(REPO, include=["minibn", "minibn.*"])
    assert sorted(listed) == sorted(on_disk + ["minibn.lessons"])
    assert {k.strip(): v.strip() for k, v in mapping.items()} == {"minibn.lessons": "lessons"}


def _fake_layout(root, lessons_at):
    """A ``minibn/`` package folder under ``root`` with one lesson file in ``lessons_at``."""
    package = root / "minibn"
    package.mkdir(parents=True)
    (root / lessons_at).mkdir(parents=True)
    (root / lessons_at / "02_core_logic.py").write_text("print('lesson 2')\n")
    (root / lessons_at / "notes.txt").write_text("not a lesson\n")
    return str(package)


def test_lessons_in_a_clone_are_the_lessons_folder(tmp_path, monkeypatch):
    from minibn import lessons_index
    monkeypatch.setattr(lessons_index, "PACKAGE_DIR", _fake_layout(tmp_path / "clone", "lessons"))
    assert lessons_index.source_tree() == str(tmp_path / "clone")
    assert lessons_index.lesson_paths() == [str(tmp_path / "clone" / "lessons" / "02_core_logic.py")]
    assert lessons_index.default_figures_dir() == str(tmp_path / "clone" / "figures")


def test_lessons_installed_are_the_copy_in_the_package(tmp_path, monkeypatch):
    from minibn import lessons_index
    site = tmp_path / "site-packages"
    monkeypatch.setattr(lessons_index, "PACKAGE_DIR", _fake_layout(site, os.path.join("minibn", "lessons")))
    monkeypatch.chdir(tmp_path)
    assert lessons_index.source_tree() is None
    assert lessons_index.lesson_paths() == [str(site / "minibn" / "lessons" / "02_core_logic.py")]
    assert lessons_index.default_figures_dir() == str(tmp_path / "figures")     # never site-packages


def test_without_lessons_the_commands_say_so(tmp_path, monkeypatch, capsys):
    from minibn import __main__ as main_mod, lessons_index
    package = tmp_path / "site-packages" / "minibn"
    package.mkdir(parents=True)
    monkeypatch.setattr(lessons_index, "PACKAGE_DIR", str(package))
    for argv in (["lesson", "2"], ["lessons"], ["notebooks", str(tmp_path / "nb")]):
        with pytest.raises(SystemExit) as exit_info:
            main_mod.main(argv)
        assert exit_info.value.code == 2
        assert "no lessons" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "nb")


def test_clone_defaults_to_the_repository_figures():
    from minibn.__main__ import build_parser
    for command in ("article", "figures"):
        assert build_parser().parse_args([command]).out == os.path.join(REPO, "figures")


def test_notebooks_command_writes_every_lesson_and_keeps_edited_ones(tmp_path):
    out = tmp_path / "nb"
    proc = cli("notebooks", out)
    assert proc.returncode == 0, proc.stderr
    lessons = sorted(f[:-3] for f in os.listdir(LESSONS) if f[:2].isdigit() and f.endswith(".py"))
    assert sorted(os.listdir(out)) == [f"{name}.ipynb" for name in lessons]
    (out / f"{lessons[0]}.ipynb").write_text("edited by a reader")
    proc = cli("notebooks", out)
    assert proc.returncode == 2 and "--force" in proc.stderr and lessons[0] in proc.stderr
    assert (out / f"{lessons[0]}.ipynb").read_text() == "edited by a reader"
    assert cli("notebooks", "--force", out).returncode == 0
    with open(out / f"{lessons[0]}.ipynb") as f:
        assert json.load(f)["nbformat"] == 4


def test_notebooks_equal_jupytext_conversion_and_validate():
    """Our percent -> ipynb conversion against jupytext's, cell by cell, and nbformat's schema."""
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    from minibn.notebooks import percent_to_notebook
    names = sorted(f for f in os.listdir(LESSONS) if f[:2].isdigit() and f.endswith(".py"))
    assert names
    for name in names:
        path = os.path.join(LESSONS, name)
        with open(path) as f:
            ours = percent_to_notebook(f.read())
        nbformat.validate(nbformat.from_dict(ours))
        theirs = json.loads(jupytext.writes(jupytext.read(path), fmt="ipynb"))
        assert [(c["cell_type"], "".join(c["source"])) for c in ours["cells"]] == \
               [(c["cell_type"], "".join(c["source"])) for c in theirs["cells"]], name


def test_percent_to_notebook_reads_the_format_and_refuses_the_rest():
    from minibn.notebooks import percent_to_notebook
    text = ("# ---\n# jupyter:\n#   kernel: x\n# ---\n\n# %% [markdown]\n# # Title\n#\n# Some *text*.\n\n"
            "# %%\nimport math\n\nprint(math.pi)  # a comment stays\n\n\n# %%\n\n")
    cells = percent_to_notebook(text)["cells"]
    assert [(c["cell_type"], c["source"]) for c in cells] == [
        ("markdown", ["# Title\n", "\n", "Some *text*."]),
        ("code", ["import math\n", "\n", "print(math.pi)  # a comment stays"])]
    with pytest.raises(ValueError, match=r"line 2: unsupported cell marker '# %% \[raw\]'"):
        percent_to_notebook("x = 1\n# %% [raw]\n")
    with pytest.raises(ValueError, match=r"line 3: a markdown cell holds only comment lines"):
        percent_to_notebook("# %% [markdown]\n# text\nnot a comment\n")
    with pytest.raises(ValueError, match="never closed"):
        percent_to_notebook("# ---\n# jupyter:\n")
