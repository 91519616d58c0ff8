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
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

__all__ = ["FIGURES", "figure", "save_figure", "make_figures", "to_jsonable", "load_all", "pyplot"]

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
    plt.rcParams.update({"svg.hashsalt": "minibn", "figure.dpi": 100, "savefig.dpi": 100})
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


SECTION_MODULES = ("s1_intuition", "s2_core_logic", "s3_running_statistics", "s4_dynamic_momentum",
                   "s5_sync_batchnorm", "s6_multi_gpu", "s6_alternatives")


def load_all():
    """Import every section module, so that ``FIGURES`` holds every figure."""
    import importlib
    import pkgutil
    present = {m.name for m in pkgutil.iter_modules(__path__)}
    for name in SECTION_MODULES:
        if name in present:
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

