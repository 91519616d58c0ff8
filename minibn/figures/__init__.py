"""Every figure of the project, one function each; ``make figures`` calls them all.

The figures live in one module per article section (``s1_intuition.py``,
``s2_core_logic.py``, ...), each registering its functions with ``@figure``;
this file is the pipeline they share.

Reproducibility rules, enforced here once for every figure:

* the Agg backend (no screen, same pixels everywhere),
* fixed seeds inside each figure function,
* no timestamps or version strings in the PNG (``metadata={"Software": None}``),
* the numbers behind each plot written next to it as JSON (``NAME.json``),
  so tests can check numbers rather than pixels.

A figure function takes no argument and returns ``(fig, data)``; register it
with ``@figure("name")``.  Data functions (``*_data``) are kept separate from
plotting so lessons and tests can call them directly.

Every figure shares one look (:mod:`minibn.figures.style`, applied by
:func:`pyplot`).  The lessons draw the same figures with :func:`show`: inline
in a notebook, and into a folder of their own when run as scripts (never into
the committed ``figures/``).
"""
from __future__ import annotations

import importlib
import io
import json
import os
import sys
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

__all__ = ["FIGURES", "figure", "save_figure", "make_figures", "to_jsonable", "load_all", "pyplot",
           "LESSON_FIGURES_ENV", "lesson_figures_dir", "show"]

FIGURES: "OrderedDict[str, Callable]" = OrderedDict()


def figure(name: str):
    """Register a figure function under ``name`` (the file stem of its PNG and JSON)."""
    def register(fn):
        if name in FIGURES:
            raise ValueError(f"figure {name!r} registered twice")
        FIGURES[name] = fn
        return fn
    return register


def pyplot():
    """matplotlib.pyplot on the Agg backend with the project's fixed settings."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from . import style
    plt.rcParams.update({"svg.hashsalt": "minibn", "figure.dpi": 100, "savefig.dpi": 100})
    style.apply(plt)
    return plt


def to_jsonable(obj):
    """Arrays and NumPy scalars to plain lists and floats (recursively)."""
    from ..backend import asnumpy
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return to_jsonable(asnumpy(obj).tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_figure(fig, data, out_dir: str, name: str) -> List[str]:
    """Write ``NAME.png`` and ``NAME.json`` into ``out_dir``; returns the two paths."""
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, f"{name}.png")
    js = os.path.join(out_dir, f"{name}.json")
    fig.savefig(png, metadata={"Software": None})
    plt.close(fig)
    with open(js, "w") as f:
        json.dump(to_jsonable(data), f, indent=1, sort_keys=False)
        f.write("\n")
    return [png, js]


SECTION_MODULES = ("s1_intuition", "s2_core_logic", "s4_dynamic_momentum",
                   "s5_sync_batchnorm", "s6_multi_gpu", "s6_alternatives")


def load_all():
    """Import every section module, so that ``FIGURES`` holds every figure."""
    for name in SECTION_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return FIGURES


def make_figures(out_dir: str = "figures", names: Optional[Iterable[str]] = None,
                 progress: bool = True) -> Dict[str, List[str]]:
    """Regenerate figures (all by default) into ``out_dir``; returns name -> written paths."""
    load_all()
    pyplot()
    chosen = list(FIGURES) if names is None else list(names)
    unknown = [n for n in chosen if n not in FIGURES]
    if unknown:
        raise KeyError(f"unknown figure(s) {unknown}; known: {list(FIGURES)}")
    it = chosen
    if progress:
        from tqdm import tqdm
        it = tqdm(chosen, desc="figures", unit="fig")
    written = {}
    for name in it:
        fig, data = FIGURES[name]()
        written[name] = save_figure(fig, data, out_dir, name)
    return written



# --------------------------------------------------------------------------- figures in the lessons

LESSON_FIGURES_ENV = "MINIBN_LESSON_FIGURES"
DEFAULT_LESSON_FIGURES = "lesson-figures"


def lesson_figures_dir() -> str:
    """Where a lesson run as a script writes its figures: ``$MINIBN_LESSON_FIGURES``, else
    ``lesson-figures/`` in the current directory (never the committed ``figures/``)."""
    return os.environ.get(LESSON_FIGURES_ENV) or DEFAULT_LESSON_FIGURES


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython shell with a kernel attached)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def show(name: str, fig=None, data=None) -> Optional[str]:
    """Draw figure ``name`` in a lesson, with the same code as the ``figures/`` pipeline.

    ``fig`` and ``data`` are the figure and its numbers when the lesson has
    already computed them; by default the registered figure function makes
    both.  In a notebook the figure is shown inline (as a PNG under the cell);
    in a script it is written, with its JSON, to :func:`lesson_figures_dir`.
    Returns the PNG's path (``None`` in a notebook).
    """
    if fig is None:
        load_all()
        if name not in FIGURES:
            raise KeyError(f"unknown figure {name!r}; known: {list(FIGURES)}")
        fig, data = FIGURES[name]()
    if _in_notebook():
        from IPython.display import Image, display
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        pyplot().close(fig)
        display(Image(data=buffer.getvalue(), format="png"))
        return None
    png, _ = save_figure(fig, data, lesson_figures_dir(), name)
    print(f"figure {name} written to {png}")
    return png
