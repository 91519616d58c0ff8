"""One look for every figure: palette, markers, font sizes.

* Colours are the Okabe-Ito palette, chosen to stay distinguishable for the
  common forms of colour blindness and in greyscale print.
* Every method keeps one colour and one marker in every figure
  (:data:`METHODS`): BatchNorm is always blue with circles, LayerNorm always
  vermillion with squares, and so on, so that a reader who learned the legend
  of one figure can read the next one without it.
* Font sizes are set for a figure about 6.5 inches wide, printed at the
  article's column width (about 60% of its size on screen): 10-11 pt text,
  9 pt legends.

:func:`apply` sets the shared rcParams; :func:`look` gives the keyword
arguments of one method's line.
"""
from __future__ import annotations

from typing import Dict

__all__ = ["OKABE_ITO", "METHODS", "REFERENCE", "RCPARAMS", "apply", "look", "color", "legend_below"]

OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7",
    "grey": "#7F7F7F",
}
_C = OKABE_ITO

# method -> (colour, marker).  Normalization methods first, then the other roles figures give lines.
METHODS: Dict[str, tuple] = {
    # normalizations (sections 1, 5, 6)
    "BN": (_C["blue"], "o"),
    "plain": (_C["vermillion"], "v"),
    "SyncBN": (_C["bluish green"], "s"),
    "per-rank BN": (_C["blue"], "o"),
    "LayerNorm": (_C["vermillion"], "s"),
    "GroupNorm": (_C["reddish purple"], "^"),
    "InstanceNorm": (_C["orange"], "D"),
    # the merge of section 6
    "merged": (_C["bluish green"], "s"),
    "naive": (_C["vermillion"], "o"),
    # momentum schedules (section 4)
    "static": (_C["blue"], None),
    "dynamic": (_C["orange"], None),
    "dynamic, same batches": (_C["bluish green"], None),
    "constant 0.9": (_C["vermillion"], None),
    "constant 0.1": (_C["blue"], None),
    "constant 0.01": (_C["sky blue"], None),
    "linear (article)": (_C["orange"], None),
    "linear to 0.01": (_C["bluish green"], None),
    "exponential": (_C["reddish purple"], None),
    "cosine": (_C["grey"], None),
    "cumulative": (_C["black"], None),
}
REFERENCE = dict(color=_C["grey"], lw=1.0, ls="--", zorder=1)   # population / chance / theory lines

RCPARAMS = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12, "lines.linewidth": 1.6,
    "lines.markersize": 5, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "legend.framealpha": 0.9,
}


def apply(plt) -> None:
    """Set the shared rcParams on ``plt`` (called by :func:`minibn.figures.pyplot`)."""
    plt.rcParams.update(RCPARAMS)


def color(method: str) -> str:
    return METHODS[method][0]


def look(method: str, line: str = "-", marker: bool = True) -> dict:
    """``plot`` keyword arguments of ``method``: its colour, its marker (unless ``marker=False``)."""
    c, m = METHODS[method]
    kw = dict(color=c, ls=line)
    if marker and m is not None:
        kw["marker"] = m
    return kw


def legend_below(fig, axes, ncol: int, **kw):
    """One legend for the figure, under the panels (it never covers data); returns it."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    return fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, **kw)
