"""Run a lesson script and read the numbers it prints.

Lessons print lines like::

    mu = (2 + 4 + 6 + 8) / 4 = 5.0
    x_hat = [-1.341641, -0.447214, 0.447214, 1.341641]    # (x - mu) / sqrt(var + eps)

:func:`parse_values` turns such lines into ``{"mu": 5.0, "x_hat": [...]}``: the
name is the text before the first ``" = "``, the value the text after the last
``" = "`` (a formula may stand in between), cut at a ``#`` comment.  A value is
a float, a list of floats (``[a, b]`` or ``[a b]``), or else the raw string.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS = os.path.join(REPO, "lessons")

__all__ = ["REPO", "LESSONS", "lesson_path", "run_lesson", "parse_value", "parse_values",
           "parse_pairs", "matches_printed"]


def lesson_path(path_or_number) -> str:
    """``3`` -> ``lessons/03_*.py``; a path is returned as is (made absolute)."""
    if isinstance(path_or_number, int):
        prefix = f"{path_or_number:02d}_"
        found = sorted(f for f in os.listdir(LESSONS) if f.startswith(prefix) and f.endswith(".py"))
        if not found:
            raise FileNotFoundError(f"no lesson {path_or_number} ({prefix}*.py) in {LESSONS}")
        return os.path.join(LESSONS, found[0])
    return os.path.abspath(os.fspath(path_or_number))


def run_lesson(path_or_number, *args, timeout: float = 300, env=None) -> str:
    """Run a lesson as ``python lessons/NN_topic.py *args`` from the repository root.

    Returns its stdout; a non-zero exit raises ``AssertionError`` with stderr.  The lesson's
    figures go to a temporary folder unless ``env`` names one (``MINIBN_LESSON_FIGURES``).
    """
    path = lesson_path(path_or_number)
    run_env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0")
    run_env.setdefault("MINIBN_LESSON_FIGURES", os.path.join(tempfile.gettempdir(), "minibn-lesson-figures"))
    run_env.update(env or {})
    proc = subprocess.run([sys.executable, path, *map(str, args)], cwd=REPO, env=run_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{os.path.basename(path)} exited with {proc.returncode}\n"
                             f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc.stdout


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"


def parse_value(text: str):
    """``"5.0"`` -> 5.0; ``"[1, 2.5]"`` or ``"[1 2.5]"`` -> [1.0, 2.5]; anything else unchanged."""
    t = text.strip().replace("\u2212", "-")
    try:
        return float(t)
    except ValueError:
        pass
    if t.startswith("[") and t.endswith("]"):
        body = t[1:-1].replace(",", " ").split()
        if all(re.fullmatch(_NUMBER, b) for b in body):
            return [float(b) for b in body]
    return text.strip()


def parse_pairs(text: str):
    """Every ``name = value`` line as a ``(name, value)`` pair, in order (names may repeat)."""
    pairs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].rstrip()
        if " = " not in line:
            continue
        name = line.split(" = ", 1)[0].strip()
        value = line.rsplit(" = ", 1)[1]
        if name:
            pairs.append((name, parse_value(value)))
    return pairs


def parse_values(text: str) -> dict:
    """``{name: value}`` from :func:`parse_pairs` (a repeated name keeps its last value)."""
    return dict(parse_pairs(text))


def matches_printed(value: float, printed) -> bool:
    """True when ``value`` rounds to ``printed`` (a string like ``"-1.68"``) at its decimals."""
    printed = str(printed)
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(value) - float(printed)) <= 0.5 * 10.0 ** (-decimals) * (1 + 1e-9)
