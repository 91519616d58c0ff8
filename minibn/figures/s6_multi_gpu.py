"""Section 6: merging per-GPU statistics, and why averaging the variances is not enough.

:func:`naive_variance_data` / figure ``s6_naive_variance``: the article's 3
GPUs x 32 samples, where the three ranks' data have means ``-d, 0, +d`` (in
units of the within-rank std).  For each spread ``d``, the global variance is
computed three ways and divided by the true variance of all 96 samples:

* the article's formula (``merge_moments``): exactly 1 at every ``d``;
* the naive average of the local variances (weighted by batch size, without
  the between-rank term ``(mu_g - mu)^2``): it falls like
  ``1 / (1 + 2 d^2 / 3)``, since the between-rank part of the variance is
  ``2 d^2 / 3`` when the within-rank variance is 1.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import figure, pyplot, style

__all__ = ["naive_variance_data"]


def naive_variance_data(spreads=tuple(np.linspace(0.0, 3.0, 13)), ranks: int = 3, per_rank: int = 32,
                        trials: int = 40, seed: int = 6):
    from ..distributed import local_moments
    from ..moments import merge_moments
    offsets = np.arange(ranks) - (ranks - 1) / 2.0           # -1, 0, 1 for three ranks
    out = OrderedDict(spreads=[float(d) for d in spreads], ranks=ranks, per_rank=per_rank,
                      trials=trials, merged_ratio=[], naive_ratio=[], max_merge_error=[])
    for i, d in enumerate(spreads):
        rng = np.random.default_rng([seed, i])
        merged, naive, worst = [], [], 0.0
        for _ in range(trials):
            parts = [d * o + rng.standard_normal((per_rank, 1)) for o in offsets]
            stats = [local_moments(p) for p in parts]
            counts = np.array([n for n, _, _ in stats], dtype=np.float64)
            means = np.stack([m for _, m, _ in stats])
            variances = np.stack([v for _, _, v in stats])
            _, _, var = merge_moments(counts, means, variances)
            whole = np.concatenate(parts)
            true_var = float(((whole - whole.mean()) ** 2).mean())
            naive_var = float((counts @ variances[:, 0]) / counts.sum())
            merged.append(float(var[0]) / true_var)
            naive.append(naive_var / true_var)
            worst = max(worst, abs(float(var[0]) - true_var) / true_var)
        out["merged_ratio"].append(float(np.mean(merged)))
        out["naive_ratio"].append(float(np.mean(naive)))
        out["max_merge_error"].append(worst)
    between = np.mean(offsets ** 2) * np.asarray(spreads, dtype=np.float64) ** 2
    out["theory_naive_ratio"] = list(1.0 / (1.0 + between))
    return out


@figure("s6_naive_variance")
def naive_variance_figure():
    d = naive_variance_data()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    s = np.asarray(d["spreads"])
    ax.plot(s, d["merged_ratio"], **style.look("merged"), label="article's formula (with $(\\mu_g-\\mu)^2$)")
    ax.plot(s, d["naive_ratio"], **style.look("naive"), label="naive: weighted average of local variances")
    ax.plot(s, d["theory_naive_ratio"], color=style.OKABE_ITO["black"], ls=":", lw=1.4, zorder=4, label=r"$1/(1 + 2d^2/3)$")
    ax.set_xlabel("spread of the per-rank means d (in within-rank std)")
    ax.set_ylabel("estimated / true variance of all 96 samples")
    ax.set_ylim(0, 1.1)
    ax.legend(loc="lower left")
    ax.set_title(f"{d['ranks']} ranks x {d['per_rank']} samples: merging variances")
    fig.tight_layout()
    return fig, d
