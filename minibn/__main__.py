"""``python -m minibn {article,figures,lessons,lesson,notebooks,info,bench,gpu-check,check,assignment,grade}``.

Every command works from any directory, in a clone and in an installed minibn:
:mod:`minibn.lessons_index` says where the lessons are and where the figures go.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import lessons_index

NO_LESSONS = ("this minibn has no lessons (neither a lessons/ folder next to the package nor the copy "
              "a wheel installs in minibn/lessons/); reinstall it with `pip install minibn`")


def lesson_paths():
    """The lesson scripts, in order (see :mod:`minibn.lessons_index`)."""
    return lessons_index.lesson_paths()


def fail(message: str, code: int = 2):
    """A usage error: one line on stderr and exit status 2 (no traceback)."""
    print(f"python -m minibn: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def find_lesson(number: int) -> str:
    paths = lesson_paths()
    for path in paths:
        if os.path.basename(path).startswith(f"{number:02d}_"):
            return path
    if not paths:
        fail(NO_LESSONS)
    fail(f"no lesson {number}; the lessons are: {', '.join(os.path.basename(p) for p in paths)}")


def run_lesson(path: str, index: int = 1, total: int = 1) -> int:
    """Run one lesson exactly as ``python lessons/NN_topic.py`` from the repository root
    (in an installed minibn, from the current directory).  A lesson writes its figures to
    ``lesson-figures/`` there, or to ``$MINIBN_LESSON_FIGURES``, never to ``figures/``.

    Each lesson gets a fresh interpreter, so no state (backend, print options,
    random generators) leaks from one lesson into the next.  Returns its exit status.
    """
    import subprocess
    counter = f"[{index}/{total}] " if total > 1 else ""
    print(f"\n{'=' * 78}\n{counter}{os.path.basename(path)}\n{'=' * 78}", flush=True)
    sys.stderr.flush()
    # the lesson imports this minibn (the one running this command), never another installed one:
    # the folder that holds this package comes first on the lesson's sys.path
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(lessons_index.PACKAGE_DIR),
                                                    env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, path], cwd=lessons_index.source_tree() or os.getcwd(), env=env)


def cmd_lesson(args):
    return run_lesson(find_lesson(args.number))


def cmd_lessons(args):
    """Every lesson in order; a failing lesson is reported and the others still run."""
    import time
    paths = lesson_paths()
    if not paths:
        fail(NO_LESSONS)
    failed, start = [], time.perf_counter()
    for i, path in enumerate(paths, start=1):
        if run_lesson(path, i, len(paths)) != 0:
            failed.append(os.path.basename(path))
    print(f"\nlessons: {len(paths) - len(failed)} of {len(paths)} ran without error "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    if failed:
        print("lessons that failed: " + ", ".join(failed), file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_figures(args):
    from .figures import FIGURES, load_all, make_figures
    load_all()
    unknown = [n for n in (args.names or []) if n not in FIGURES]
    if unknown:
        fail(f"unknown figure name(s) {', '.join(unknown)}; the figures are: {', '.join(FIGURES)}")
    written = make_figures(args.out, names=args.names or None, progress=not args.quiet)
    for name, paths in written.items():
        print(f"{name}: " + ", ".join(paths))
    return 0


def cmd_article(args):
    status = cmd_lessons(args)
    args.names = None
    return cmd_figures(args) or status


def cmd_notebooks(args):
    from .notebooks import write_notebooks
    paths = lesson_paths()
    if not paths:
        fail(NO_LESSONS)
    try:
        written = write_notebooks(args.out, paths, overwrite=args.force)
    except (FileExistsError, ValueError) as e:
        fail(str(e))
    print(f"{len(written)} notebooks in {os.path.abspath(args.out)}:")
    for path in written:
        print(f"  {os.path.basename(path)}")
    return 0


def cmd_info(args):
    from .info import info_lines
    print("\n".join(info_lines()))


def cmd_assignment(args):
    from .grading import write_assignment
    write_assignment(args.out)


def cmd_grade(args):
    from .grading import main as grade_main
    return grade_main([args.dir] + list(args.rest))


FIGURES_OUT_HELP = ("the folder for the figures (default: the clone's figures/, or figures/ "
                    "in the current directory when minibn is installed)")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m minibn",
                                description="minibn: batch normalization from scratch")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("article", help="every lesson, then every figure (what `make article` runs)")
    a.add_argument("--out", default=lessons_index.default_figures_dir(), help=FIGURES_OUT_HELP)
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_article)
    f = sub.add_parser("figures", help="regenerate the figures (PNG + JSON numbers)")
    f.add_argument("--out", default=lessons_index.default_figures_dir(), help=FIGURES_OUT_HELP)
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("names", nargs="*", help="only these figures")
    f.set_defaults(func=cmd_figures)
    ls = sub.add_parser("lessons", help="run every lesson")
    ls.set_defaults(func=cmd_lessons)
    l1 = sub.add_parser("lesson", help="run one lesson, printing its steps")
    l1.add_argument("number", type=int)
    l1.set_defaults(func=cmd_lesson)
    nb = sub.add_parser("notebooks", help="write the lessons as Jupyter notebooks into a folder")
    nb.add_argument("out", help="the folder to write NN_topic.ipynb into (created if missing)")
    nb.add_argument("--force", action="store_true", help="overwrite notebooks already there")
    nb.set_defaults(func=cmd_notebooks)
    i = sub.add_parser("info", help="versions, backend, GPU, MPI")
    i.set_defaults(func=cmd_info)
    sub.add_parser("bench", help="the benchmark tables (options: python -m minibn bench --help)")
    sub.add_parser("gpu-check", help="on a GPU machine: install, test, compare, bench, SyncBN (under 5 min)")
    sub.add_parser("check", help="run the assignment's public cases on this minibn's own code "
                                 "(options: python -m minibn check --help)")
    s = sub.add_parser("assignment", help="write a student copy with solution regions removed")
    s.add_argument("out")
    s.set_defaults(func=cmd_assignment)
    g = sub.add_parser("grade", help="grade a student copy")
    g.add_argument("dir")
    g.add_argument("rest", nargs=argparse.REMAINDER)
    g.set_defaults(func=cmd_grade)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:       # the benchmark parses its own options (--quick, --shapes ...)
        if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")):
            print("minibn bench: the benchmark is not part of this copy of minibn", file=sys.stderr)
            return 2
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["gpu-check"]:   # so does the GPU check (--no-install, --only ...)
        from .gpu_check import main as gpu_check_main
        return gpu_check_main(argv[1:])
    if argv[:1] == ["check"]:       # the self-check parses its own arguments (task names)
        from .selfcheck import main as check_main
        return check_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except BrokenPipeError:          # output piped into e.g. `head`, which closed early
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
