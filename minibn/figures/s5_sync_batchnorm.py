"""Section 5: the small-batch problem, and what SyncBatchNorm does about it.

:func:`small_batch_data` / figure ``s5_small_batch_statistics``: 8 ranks, a
per-rank batch of 2 to 64 samples.  Every trial draws a global batch from a
known population (per-channel mean and standard deviation), splits it over the
ranks, and measures how far two estimates are from the truth:

* **per-rank BN**: each rank's own batch statistics (what plain BatchNorm on
  each GPU normalizes with);
* **SyncBN**: the statistics of the whole global batch, merged from the
  ranks' local moments with the article's section 6 formulas.

"Truth" is taken two ways.  Against the *global batch* (what one process
would normalize the same samples with) SyncBN is exact, to round-off, at
every batch size, while per-rank BN is off by O(1/sqrt(b)).  Against the
*population*, both are noisy estimates, but SyncBN's sample is 8 times
larger: its errors are sqrt(8) ~ 2.8 times smaller, and the biased
variance's systematic shrinkage, ``E[var_b] = (1 - 1/m) sigma^2``, is 8 times
smaller (-50% for per-rank BN at b = 2, -6% for SyncBN).

The ranks are simulated in one process (:func:`split_statistics`); a test
under ``tests/mpi`` checks that real ranks running SyncBatchNorm give the
same numbers.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import figure, pyplot, style

__all__ = ["PER_RANK", "RANKS", "CHANNELS", "TRIALS", "population", "draw_global_batch",
           "split_statistics", "small_batch_data"]

PER_RANK = (2, 4, 8, 16, 32, 64)
RANKS, CHANNELS, TRIALS, SEED = 8, 16, 100, 5


def population(channels: int = CHANNELS, seed: int = SEED):
    """The per-channel population mean and standard deviation the batches are drawn from."""
    rng = np.random.default_rng([seed, 0])
    return rng.normal(0.0, 3.0, channels), rng.uniform(0.5, 2.0, channels)


def draw_global_batch(rng, ranks: int, per_rank: int, mean, std):
    """A global batch ``(ranks * per_rank, C)``; rank ``r`` owns rows ``r*per_rank ... (r+1)*per_rank - 1``."""
    return mean + std * rng.standard_normal((ranks * per_rank, len(mean)))


def split_statistics(x, ranks: int):
    """Per-rank and synchronized statistics of a global batch split evenly over ``ranks``.

    Returns ``(local, sync)``: ``local`` is a list of per-rank ``(n, mean, var)``
    (plain BatchNorm's batch statistics on each rank), ``sync`` the merged
    ``(N, mean, var)`` (SyncBatchNorm's), both with biased variances.
    """
    from ..distributed import local_moments, simulate_sync_moments
    parts = np.split(x, ranks)
    return [local_moments(p) for p in parts], simulate_sync_moments(parts)


def _rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


def small_batch_data(per_rank=PER_RANK, ranks: int = RANKS, channels: int = CHANNELS,
                     trials: int = TRIALS, seed: int = SEED):
    """RMS errors of per-rank and synchronized batch statistics, per per-rank batch size.

    Mean errors are in units of the population std; variance errors are
    relative to the population variance.  ``*_vs_batch`` compares with the
    statistics of the whole global batch, the rest with the population.
    """
    mu_pop, sd_pop = population(channels, seed)
    out = OrderedDict(per_rank=list(per_rank), ranks=ranks, channels=channels, trials=trials,
                      population_mean=mu_pop, population_std=sd_pop)
    keys = ["local_mean_rms", "sync_mean_rms", "local_var_rms", "sync_var_rms", "local_var_bias",
            "sync_var_bias", "local_mean_vs_batch", "sync_mean_vs_batch", "local_var_vs_batch",
            "sync_var_vs_batch"]
    for k in keys:
        out[k] = []
    for b in per_rank:
        rng = np.random.default_rng([seed, b])
        acc = {k: [] for k in keys}
        for _ in range(trials):
            x = draw_global_batch(rng, ranks, b, mu_pop, sd_pop)
            local, (_, s_mean, s_var) = split_statistics(x, ranks)
            whole_mean = x.mean(axis=0)
            whole_var = ((x - whole_mean) ** 2).mean(axis=0)
            l_mean = np.stack([m for _, m, _ in local])
            l_var = np.stack([v for _, _, v in local])
            var_pop = sd_pop ** 2
            acc["local_mean_rms"].append((l_mean - mu_pop) / sd_pop)
            acc["sync_mean_rms"].append((s_mean - mu_pop) / sd_pop)
            acc["local_var_rms"].append(l_var / var_pop - 1)
            acc["sync_var_rms"].append(s_var / var_pop - 1)
            acc["local_mean_vs_batch"].append((l_mean - whole_mean) / sd_pop)
            acc["sync_mean_vs_batch"].append((s_mean - whole_mean) / sd_pop)
            acc["local_var_vs_batch"].append(l_var / whole_var - 1)
            acc["sync_var_vs_batch"].append(s_var / whole_var - 1)
        for k in keys:
            if k.endswith("_bias"):
                continue
            out[k].append(_rms(np.concatenate([np.ravel(a) for a in acc[k]])))
        out["local_var_bias"].append(float(np.mean(np.concatenate([np.ravel(a) for a in acc["local_var_rms"]]))))
        out["sync_var_bias"].append(float(np.mean(np.concatenate([np.ravel(a) for a in acc["sync_var_rms"]]))))
    m = np.asarray(per_rank, dtype=np.float64)
    out["theory_mean_rms_local"] = list(1 / np.sqrt(m))                 # std of a mean of m values
    out["theory_mean_rms_sync"] = list(1 / np.sqrt(ranks * m))
    out["theory_var_rms_local"] = list(np.sqrt(2 * m - 1) / m)          # biased var of m normals
    out["theory_var_rms_sync"] = list(np.sqrt(2 * ranks * m - 1) / (ranks * m))
    out["theory_var_bias_local"] = list(-1 / m)
    out["theory_var_bias_sync"] = list(-1 / (ranks * m))
    return out


def _theory(ax, b, values, label):
    """A reference curve, drawn over the data so that it stays visible where they agree."""
    ax.loglog(b, values, color=style.OKABE_ITO["black"], ls=":", lw=1.4, zorder=4, label=label)


@figure("s5_small_batch_statistics")
def small_batch_figure():
    d = small_batch_data()
    plt = pyplot()
    b = np.asarray(d["per_rank"])
    local, sync = style.look("per-rank BN"), style.look("SyncBN")
    local_label, sync_label = "per-rank BN", f"SyncBN ({d['ranks']} ranks)"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    ax = axes[0]
    ax.loglog(b, d["local_mean_rms"], **local, label=local_label)
    ax.loglog(b, d["sync_mean_rms"], **sync, label=sync_label)
    _theory(ax, b, d["theory_mean_rms_local"], r"theory: $1/\sqrt{b}$ and $1/\sqrt{8b}$")
    _theory(ax, b, d["theory_mean_rms_sync"], None)
    ax.set_title("mean vs population")
    ax.set_ylabel("RMS error of the mean (in population std)")
    ax = axes[1]
    ax.loglog(b, d["local_var_rms"], **local, label=local_label)
    ax.loglog(b, d["sync_var_rms"], **sync, label=sync_label)
    ax.loglog(b, np.abs(d["local_var_bias"]), **style.look("per-rank BN", "--"), mfc="white",
              label="|bias|, per-rank BN")
    ax.loglog(b, np.abs(d["sync_var_bias"]), **style.look("SyncBN", "--"), mfc="white",
              label="|bias|, SyncBN")
    _theory(ax, b, d["theory_var_rms_local"], "theory")
    _theory(ax, b, d["theory_var_rms_sync"], None)
    _theory(ax, b, np.abs(d["theory_var_bias_local"]), None)
    _theory(ax, b, np.abs(d["theory_var_bias_sync"]), None)
    ax.set_title("variance vs population")
    ax.set_ylabel("relative RMS error and |bias| of the variance")
    ax = axes[2]
    floor = 1e-17
    ax.loglog(b, d["local_mean_vs_batch"], **local, label=local_label)
    ax.loglog(b, d["local_var_vs_batch"], **style.look("per-rank BN", "--"), mfc="white")
    ax.loglog(b, np.maximum(d["sync_mean_vs_batch"], floor), **sync, label=sync_label)
    ax.loglog(b, np.maximum(d["sync_var_vs_batch"], floor), **style.look("SyncBN", "--"), mfc="white")
    ax.axhline(np.finfo(np.float64).eps, **style.REFERENCE, label="float64 epsilon")
    ax.set_title("vs the global batch's own statistics")
    ax.set_ylabel("RMS error: mean (solid), variance (dashed)")
    for ax in axes:
        ax.set_xlabel("samples per rank b")
        ax.set_xticks(b)
        ax.set_xticks([], minor=True)
        ax.set_xticklabels([str(v) for v in b])
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"Batch statistics with {d['ranks']} ranks, {d['channels']} channels, "
                 f"{d['trials']} trials per batch size")
    fig.tight_layout()
    return fig, d
