"""Where the lessons and the figures are, in a clone and in an installed minibn.

The lessons are written in the top-level ``lessons/`` folder of the repository
(``lessons/NN_topic.py``, one per section of the article).  A wheel carries a
copy of them inside the package, as ``minibn/lessons/`` (setup.cfg maps that
package onto the ``lessons/`` folder).  So:

* in a clone, an editable install, or a student copy written by
  ``python -m minibn assignment``, the lessons are the ``lessons/`` folder next
  to the package, and the figures go to the ``figures/`` folder next to it;
* in an installed minibn (``pip install minibn``), the lessons are the copy in
  the package, and the figures go to ``figures/`` in the current directory:
  never into site-packages.
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional

__all__ = ["PACKAGE_DIR", "LESSON_PATTERN", "source_tree", "lessons_dir", "lesson_paths",
           "default_figures_dir"]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LESSON_PATTERN = "[0-9][0-9]_*.py"


def _lessons_in(directory: str) -> List[str]:
    return sorted(glob.glob(os.path.join(directory, LESSON_PATTERN)))


def source_tree() -> Optional[str]:
    """The folder that holds ``minibn/`` and ``lessons/`` side by side (a clone), else ``None``."""
    root = os.path.dirname(PACKAGE_DIR)
    return root if _lessons_in(os.path.join(root, "lessons")) else None


def lessons_dir() -> Optional[str]:
    """The folder the lessons are run from: the clone's ``lessons/``, else the installed copy."""
    root = source_tree()
    if root is not None:
        return os.path.join(root, "lessons")
    installed = os.path.join(PACKAGE_DIR, "lessons")
    return installed if _lessons_in(installed) else None


def lesson_paths() -> List[str]:
    """The lesson scripts, in order; empty when minibn was installed without them."""
    directory = lessons_dir()
    return _lessons_in(directory) if directory else []


def default_figures_dir() -> str:
    """The clone's ``figures/`` (the committed ones), else ``figures/`` in the current directory."""
    root = source_tree()
    return os.path.join(root if root is not None else os.getcwd(), "figures")
