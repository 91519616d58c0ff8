"""Figures of the article's section 2 (core logic): the worked example, computed with minibn."""
from __future__ import annotations

import numpy as np

from . import figure, pyplot, style
from .. import functional as F

__all__ = ["example_activations_data", "example_activations"]

# The article's example: one feature, a mini-batch of four activations.
EXAMPLE_X = (2.0, 4.0, 6.0, 8.0)
EXAMPLE_GAMMA = 2.0
EXAMPLE_BETA = 1.0
EXAMPLE_EPS = 1e-5
# What the article prints (rounded), for comparison on the plot and in lesson 2.
ARTICLE_X_HAT = (-1.34, -0.45, 0.45, 1.34)
ARTICLE_Y = (-1.68, 0.1, 1.9, 3.68)


def example_activations_data():
    """The section 2 example through minibn's training forward: x, statistics, x_hat, y.

    The four values are a batch of shape ``(4, 1)`` (N = 4 samples, C = 1 feature).
    """
    x = np.asarray(EXAMPLE_X, dtype=np.float64).reshape(-1, 1)
    gamma = np.array([EXAMPLE_GAMMA])
    beta = np.array([EXAMPLE_BETA])
    y, cache = F.batch_norm_forward(x, gamma, beta, EXAMPLE_EPS)
    return {
        "x": x[:, 0],
        "mean": float(cache.mean[0]),
        "var": float(cache.var[0]),
        "std": float(np.sqrt(cache.var[0] + EXAMPLE_EPS)),
        "x_hat": cache.x_hat[:, 0],
        "y": y[:, 0],
        "gamma": EXAMPLE_GAMMA,
        "beta": EXAMPLE_BETA,
        "eps": EXAMPLE_EPS,
        "article_x_hat": list(ARTICLE_X_HAT),
        "article_y": list(ARTICLE_Y),
    }


@figure("s2_example_activations")
def example_activations():
    """Three panels: the activations before normalization, after it, and after scale and shift."""
    d = example_activations_data()
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9))
    idx = np.arange(len(d["x"]))
    labels = [f"$x_{i + 1}$" for i in idx]
    panels = [
        (d["x"], style.OKABE_ITO["blue"], "before: $x$",
         [(d["mean"], "-", f"$\\mu$ = {d['mean']:g}"),
          (d["mean"] - d["std"], ":", f"$\\mu \\pm \\sqrt{{\\sigma^2+\\epsilon}}$ ({d['std']:.3f})"),
          (d["mean"] + d["std"], ":", None)]),
        (d["x_hat"], style.OKABE_ITO["orange"], "normalized: $\\hat{x} = (x-\\mu)/\\sqrt{\\sigma^2+\\epsilon}$",
         [(0.0, "-", "mean 0"), (-1.0, ":", "$\\pm 1$ (unit variance)"), (1.0, ":", None)]),
        (d["y"], style.OKABE_ITO["bluish green"], f"scaled and shifted: $y = {d['gamma']:g}\\,\\hat{{x}} + {d['beta']:g}$",
         [(d["beta"], "-", f"$\\beta$ = {d['beta']:g}"),
          (d["beta"] - d["gamma"], ":", f"$\\beta \\pm \\gamma$"), (d["beta"] + d["gamma"], ":", None)]),
    ]
    for ax, (values, color, title, lines) in zip(axes, panels):
        bars = ax.bar(idx, values, color=color, width=0.6)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2)
        for level, line_style, label in lines:
            ax.axhline(level, color="0.3", lw=1, ls=line_style, label=label)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(idx)
        ax.set_xticklabels(labels)
        ax.set_title(title)
        lo, hi = min(0.0, float(np.min(values))), max(0.0, float(np.max(values)))
        pad = 0.18 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
        ax.legend(loc="upper left", frameon=False)
        ax.grid(False)
    axes[0].set_ylabel("activation")
    fig.suptitle(f"Batch normalization of x = {list(EXAMPLE_X)} "
                 f"($\\epsilon$ = {d['eps']:g}), computed with minibn")
    fig.tight_layout()
    return fig, d
