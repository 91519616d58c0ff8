"""One style for every figure: a method keeps its colour and marker across panels and figures,
diverged runs are not drawn at a made-up loss, and the lessons' figures never touch figures/."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from minibn.figures import s1_intuition, s6_alternatives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def committed(name):
    with open(os.path.join(REPO, "figures", f"{name}.json")) as f:
        return json.load(f)


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_every_method_keeps_its_colour_and_marker_across_the_panels():
    fig = s6_alternatives.plot_batch_size_dependence(committed("s6_batch_size_dependence"))
    left, right = (lines_by_label(ax) for ax in fig.axes[:2])
    for name_left, name_right in (("BatchNorm2d", "BatchNorm"), ("LayerNorm", "LayerNorm"),
                                  ("GroupNorm(4)", "GroupNorm(4)")):
        a, b = left[name_left], right[name_right]
        assert a.get_color() == b.get_color(), name_left
        assert a.get_marker() == b.get_marker(), name_left
    colours = [line.get_color() for line in left.values()]
    assert len(set(colours)) == len(colours)


def test_curves_that_coincide_stay_distinguishable():
    fig = s6_alternatives.plot_batch_size_dependence(committed("s6_batch_size_dependence"))
    left = lines_by_label(fig.axes[0])
    zero = [line for line in left.values() if np.all(np.asarray(line.get_ydata()) == 0)]
    assert len(zero) >= 2
    sizes = {line.get_markersize() for line in zero}
    assert len(sizes) == len(zero), "curves on top of each other need different marker sizes"


def test_diverged_runs_have_no_loss_and_no_line_through_them():
    data = committed("s1_init_lr_sweep")
    fig = s1_intuition.plot_init_lr_sweep(data)
    chance = math.log(4)
    for ax, key in zip(fig.axes[:2], ("gain_sweep", "lr_sweep")):
        for label, c in data[key].items():
            line = lines_by_label(ax)[label]
            y = np.asarray(line.get_ydata(), dtype=float)
            diverged = [v is None for v in c["final_train_loss"]]
            assert np.all(np.isnan(y[diverged])), f"{key} {label}: diverged runs drawn at a loss"
            assert np.all(y[~np.asarray(diverged)] < chance * 1.1)
    # a marker for diverged runs in every panel that has one, and one legend entry for it
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("diverged" in t for t in labels)


def test_palette_is_okabe_ito():
    from minibn.figures import style
    palette = set(style.OKABE_ITO.values())
    assert {c for c, _ in style.METHODS.values()} <= palette
