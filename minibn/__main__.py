"""``python -m minibn {article,figures,lessons,lesson,info,bench,assignment,grade}``."""
from __future__ import annotations

import argparse
import glob
import os
import runpy
import sys


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lesson_paths():
    """The lesson scripts, in order (``lessons/NN_topic.py`` next to the package)."""
    return sorted(glob.glob(os.path.join(_repo_root(), "lessons", "[0-9][0-9]_*.py")))


def find_lesson(number: int) -> str:
    for path in lesson_paths():
        if os.path.basename(path).startswith(f"{number:02d}_"):
            return path
    raise SystemExit(f"minibn: no lesson {number}; there are: "
                     + ", ".join(os.path.basename(p) for p in lesson_paths()))


def run_lesson(path: str):
    print(f"\n{'=' * 78}\n{os.path.basename(path)}\n{'=' * 78}", flush=True)
    runpy.run_path(path, run_name="__main__")


def cmd_lesson(args):
    run_lesson(find_lesson(args.number))


def cmd_lessons(args):
    for path in lesson_paths():
        run_lesson(path)


def cmd_figures(args):
    from .figures import make_figures
    written = make_figures(args.out, names=args.names or None, progress=not args.quiet)
    for name, paths in written.items():
        print(f"{name}: " + ", ".join(paths))


def cmd_article(args):
    cmd_lessons(args)
    args.names = None
    cmd_figures(args)


def cmd_info(args):
    from .info import info_lines
    print("\n".join(info_lines()))


def cmd_bench(args):
    from .bench import main as bench_main
    return bench_main(args.rest)


def cmd_assignment(args):
    from .grading import write_assignment
    write_assignment(args.out)


def cmd_grade(args):
    from .grading import main as grade_main
    return grade_main([args.dir] + list(args.rest))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m minibn",
                                description="minibn: batch normalization from scratch")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("article", help="every lesson, then every figure (what `make article` runs)")
    a.add_argument("--out", default=os.path.join(_repo_root(), "figures"))
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_article)
    f = sub.add_parser("figures", help="regenerate the figures (PNG + JSON numbers)")
    f.add_argument("--out", default=os.path.join(_repo_root(), "figures"))
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("names", nargs="*", help="only these figures")
    f.set_defaults(func=cmd_figures)
    ls = sub.add_parser("lessons", help="run every lesson")
    ls.set_defaults(func=cmd_lessons)
    l1 = sub.add_parser("lesson", help="run one lesson, printing its steps")
    l1.add_argument("number", type=int)
    l1.set_defaults(func=cmd_lesson)
    i = sub.add_parser("info", help="versions, backend, GPU, MPI")
    i.set_defaults(func=cmd_info)
    b = sub.add_parser("bench", help="the benchmark tables")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    s = sub.add_parser("assignment", help="write a student copy with solution regions removed")
    s.add_argument("out")
    s.set_defaults(func=cmd_assignment)
    g = sub.add_parser("grade", help="grade a student copy")
    g.add_argument("dir")
    g.add_argument("rest", nargs=argparse.REMAINDER)
    g.set_defaults(func=cmd_grade)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
