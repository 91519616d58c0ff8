"""Section 4: dynamic momentum against static momentum, and where each one fails.

Two experiments, each a ``*_data`` function (numbers) and a figure:

* :func:`static_vs_dynamic_data` / figure ``s4_static_vs_dynamic`` -- the
  article's own experiment: 50 batches of 16 x 5 standard-normal values through
  ``BatchNorm1d(5)``, static momentum 0.9 against the article's linear decay
  ``max(0.9 - epoch / 50, 0.1)``, the running mean and variance (averaged over
  the 5 features) traced after every batch.  The article's code draws *new*
  random batches for the dynamic run, so its two curves differ in data as well
  as in momentum; this reproduces that faithfully and adds the dynamic run on
  the *same* batches as the static one.
* :func:`nonstationary_data` / figure ``s4_nonstationary`` -- beyond the
  article: the data distribution changes (a jump half-way, or a steady drift)
  and every schedule's running estimate is compared with the true mean and
  variance of the current distribution.

Batches are drawn with NumPy from fixed seeds (as float32, like ``torch.randn``)
so that PyTorch can be fed the very same numbers.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import figure, pyplot, style

__all__ = ["ARTICLE_SEED", "generate_data", "article_batches", "SimpleModel", "train_model",
           "static_vs_dynamic_data", "NONSTATIONARY_SCHEDULES", "scenario", "nonstationary_data",
           "WINDOWS", "final_error_table"]

ARTICLE_SEED = 2024
BATCH_SIZE, FEATURES, NUM_BATCHES = 16, 5, 50


# =========================================================================== the article's experiment

def generate_data(rng, batch_size: int, features: int, num_batches: int):
    """The article's dummy data generator, with a NumPy ``Generator`` in place of ``torch.randn``."""
    for _ in range(num_batches):
        yield rng.standard_normal((batch_size, features)).astype(np.float32)


def article_batches(seed: int = ARTICLE_SEED):
    """``(static_batches, dynamic_batches)`` as the article's script draws them.

    The script calls its generator twice on one random stream: the static run
    gets the first 50 batches, the dynamic run the next 50 -- different data.
    """
    rng = np.random.default_rng(seed)
    static = list(generate_data(rng, BATCH_SIZE, FEATURES, NUM_BATCHES))
    dynamic = list(generate_data(rng, BATCH_SIZE, FEATURES, NUM_BATCHES))
    return static, dynamic


def _simple_model_class():
    from ..nn import BatchNorm1d, Module

    class SimpleModel(Module):
        """The article's model: one ``BatchNorm1d(5)``."""

        def __init__(self, momentum):
            super().__init__()
            self.bn = BatchNorm1d(FEATURES, momentum=momentum)

        def forward(self, x):
            return self.bn(x)

    return SimpleModel


SimpleModel = _simple_model_class()


def train_model(model, data_loader, dynamic_momentum: bool = False):
    """The article's ``train_model``, with the linear decay as a minibn schedule.

    Returns ``{"mean", "var", "momentum"}``: after each batch, the running mean
    and running variance averaged over the features (float64 of the float32
    buffers), and the momentum that batch's forward used.
    """
    from ..momentum import LinearDecay
    sched = LinearDecay(model, start=0.9, end=0.1, total_steps=40) if dynamic_momentum else None
    means, variances, used = [], [], []
    for batch in data_loader:
        used.append(model.bn.momentum)
        model(batch)
        means.append(float(np.mean(model.bn.running_mean, dtype=np.float64)))
        variances.append(float(np.mean(model.bn.running_var, dtype=np.float64)))
        if sched is not None:
            sched.step()
    return {"mean": means, "var": variances, "momentum": used}


def _summary(run, last: int = 10):
    """How far the last ``last`` points of a trace are from the population (mean 0, variance 1)."""
    m, v = np.asarray(run["mean"][-last:]), np.asarray(run["var"][-last:])
    return {"mean_abs_err_last10": float(np.mean(np.abs(m))),
            "var_abs_err_last10": float(np.mean(np.abs(v - 1.0))),
            "mean_std_last10": float(np.std(m)), "var_std_last10": float(np.std(v))}


def static_vs_dynamic_data(seed: int = ARTICLE_SEED):
    """The traces of the article's section 4 experiment (see the module docstring)."""
    static_batches, dynamic_batches = article_batches(seed)
    runs = OrderedDict()
    runs["static"] = train_model(SimpleModel(momentum=0.9), static_batches)
    runs["dynamic"] = train_model(SimpleModel(momentum=0.9), dynamic_batches, dynamic_momentum=True)
    runs["dynamic_same_batches"] = train_model(SimpleModel(momentum=0.9), static_batches,
                                               dynamic_momentum=True)
    return {
        "seed": seed, "batch_size": BATCH_SIZE, "features": FEATURES, "num_batches": NUM_BATCHES,
        "population": {"mean": 0.0, "var": 1.0},
        "note": ("static: first 50 batches of the stream; dynamic: the next 50 (as the article's "
                 "script); dynamic_same_batches: the static run's batches"),
        "runs": runs,
        "summary": OrderedDict((k, _summary(r)) for k, r in runs.items()),
    }


@figure("s4_static_vs_dynamic")
def fig_static_vs_dynamic():
    data = static_vs_dynamic_data()
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    runs = data["runs"]
    steps = np.arange(data["num_batches"])
    styles = (("static", "static momentum 0.9", style.look("static")),
              ("dynamic", "dynamic momentum (article: new batches)", style.look("dynamic")),
              ("dynamic_same_batches", "dynamic momentum, same batches as static",
               dict(style.look("dynamic, same batches", "--"), lw=1.4)))
    for ax, key, title, ylabel, pop in ((axes[0], "mean", "Running mean", "running mean (mean over features)", 0.0),
                                        (axes[1], "var", "Running variance", "running variance (mean over features)", 1.0)):
        ax.axhline(pop, **style.REFERENCE, label="population (mean 0, variance 1)")
        for run, label, look in styles:
            ax.plot(steps, runs[run][key], label=label, **look)
        ax.set_title(title)
        ax.set_xlabel("batch (the article's \"epoch\")")
        ax.set_ylabel(ylabel)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    style.legend_below(fig, axes[:1], ncol=2)
    return fig, data


# =========================================================================== non-stationary data

STEPS, SHIFT_AT = 200, 100
WINDOWS = OrderedDict([("warmup", (0, 20)), ("pre_shift", (80, 100)), ("post_shift", (100, 120)),
                       ("final", (180, 200))])
_PHASE1 = (1.0, 0.5)     # mean, std before the shift (and at the start of the drift)
_PHASE2 = (-1.0, 2.0)    # after the shift (and at the end of the drift)


def _schedules():
    from .. import momentum as M
    return OrderedDict([
        ("constant 0.9", lambda bn: M.Constant(bn, 0.9)),
        ("constant 0.1", lambda bn: M.Constant(bn, 0.1)),
        ("constant 0.01", lambda bn: M.Constant(bn, 0.01)),
        ("linear 0.9->0.1 in 40 (article)", lambda bn: M.LinearDecay(bn, 0.9, 0.1, 40)),
        ("linear 0.9->0.01 in 100", lambda bn: M.LinearDecay(bn, 0.9, 0.01, 100)),
        ("exponential 0.9*0.95^t, floor 0.01", lambda bn: M.ExponentialDecay(bn, 0.9, 0.95, floor=0.01)),
        ("cosine 0.9->0.01 in 100", lambda bn: M.Cosine(bn, 0.9, 0.01, 100)),
        ("cumulative 1/(t+1)", lambda bn: M.Cumulative(bn)),
    ])


NONSTATIONARY_SCHEDULES = tuple(_schedules())


def scenario(name: str, steps: int = STEPS):
    """``(true_mean, true_std)`` per step for ``"jump"`` (at step 100) or ``"drift"`` (linear)."""
    t = np.arange(steps, dtype=np.float64)
    if name == "jump":
        after = t >= SHIFT_AT
        return (np.where(after, _PHASE2[0], _PHASE1[0]), np.where(after, _PHASE2[1], _PHASE1[1]))
    if name == "drift":
        f = t / (steps - 1)
        return (_PHASE1[0] + f * (_PHASE2[0] - _PHASE1[0]), _PHASE1[1] + f * (_PHASE2[1] - _PHASE1[1]))
    raise ValueError(f"unknown scenario {name!r}; expected 'jump' or 'drift'")


def _window_means(err):
    return OrderedDict((w, float(np.mean(err[a:b]))) for w, (a, b) in WINDOWS.items())


def nonstationary_data(repeats: int = 40, seed: int = 7, batch_size: int = BATCH_SIZE,
                       features: int = FEATURES):
    """Error of each schedule's running estimate against the current distribution.

    Every step draws a ``(batch_size, features)`` batch from ``N(mean_t, std_t^2)``
    (the same distribution for every feature).  ``repeats`` independent runs are
    done at once as extra channels of one BatchNorm1d (channels never interact),
    so the reported errors average ``features * repeats`` independent estimates:

    * ``mean_err[t]``: mean over channels of ``|running_mean - mean_t|``
      (in the data's units);
    * ``var_rel_err[t]``: mean over channels of ``|running_var / std_t^2 - 1|``
      (relative, since the variance changes 16-fold).

    Each schedule drives its own float64 layer; all of them see the same batches.
    """
    from ..nn import BatchNorm1d
    factories = _schedules()
    C = features * repeats
    rng = np.random.default_rng(seed)
    out = OrderedDict(settings=OrderedDict(steps=STEPS, shift_at=SHIFT_AT, batch_size=batch_size,
                                           features=features, repeats=repeats, seed=seed,
                                           phase1=dict(mean=_PHASE1[0], std=_PHASE1[1]),
                                           phase2=dict(mean=_PHASE2[0], std=_PHASE2[1]),
                                           windows=WINDOWS))
    out["momentum"] = OrderedDict()
    for name, make in factories.items():
        out["momentum"][name] = make(BatchNorm1d(1)).values(STEPS)
    out["scenarios"] = OrderedDict()
    for scen in ("jump", "drift"):
        mu, sd = scenario(scen)
        z = rng.standard_normal((STEPS, batch_size, C))
        batches = mu[:, None, None] + sd[:, None, None] * z
        res = OrderedDict(true_mean=mu, true_var=sd ** 2, schedules=OrderedDict())
        for name, make in factories.items():
            bn = BatchNorm1d(C, dtype=np.float64)
            sched = make(bn)
            mean_err, var_err = np.empty(STEPS), np.empty(STEPS)
            for t in range(STEPS):
                bn(batches[t])
                mean_err[t] = np.mean(np.abs(bn.running_mean - mu[t]))
                var_err[t] = np.mean(np.abs(bn.running_var / sd[t] ** 2 - 1.0))
                sched.step()
            res["schedules"][name] = r = OrderedDict(
                mean_err=mean_err, var_rel_err=var_err,
                mean_err_windows=_window_means(mean_err), var_rel_err_windows=_window_means(var_err),
                final_mean_err=float(mean_err[-1]), final_var_rel_err=float(var_err[-1]))
            if scen == "jump":
                below = np.nonzero(mean_err[SHIFT_AT:] < 0.1 * abs(_PHASE2[0] - _PHASE1[0]))[0]
                r["recovery_steps"] = int(below[0]) if below.size else None
        out["scenarios"][scen] = res
    out["note"] = ("jump only, recovery_steps: steps after the shift until mean_err first falls below "
                   "10% of the jump in the mean (None: not within the run, e.g. when the estimate's "
                   "own noise stays above that level)")
    return out


def final_error_table(data) -> str:
    """A plain-text table of the windowed errors of every schedule, one block per scenario."""
    lines = []
    for scen, res in data["scenarios"].items():
        lines.append(f"{scen}: |running_mean - mean_t| and |running_var / var_t - 1|, "
                     "averaged over the window's steps")
        jump = scen == "jump"
        head = f"  {'schedule':36s}" + "".join(f"{w:>11s}" for w in WINDOWS) + "   |" \
            + "".join(f"{w:>11s}" for w in WINDOWS) + ("  recovery" if jump else "")
        lines.append(f"  {'':36s}{'mean error':^44s}   |{'variance relative error':^44s}")
        lines.append(head)
        for name, r in res["schedules"].items():
            rec = ""
            if jump:
                rec = "   never" if r["recovery_steps"] is None else f"{r['recovery_steps']:8d}"
            lines.append(f"  {name:36s}" + "".join(f"{v:11.4f}" for v in r["mean_err_windows"].values())
                         + "   |" + "".join(f"{v:11.4f}" for v in r["var_rel_err_windows"].values())
                         + ("  " + rec if jump else ""))
    return "\n".join(lines)


# schedule -> its method in the style (colour); the article's decay is drawn as a wide light band
# under the others, since after step 40 it *is* constant 0.1 and a thin line would vanish under it
_SCHEDULE_LOOKS = OrderedDict([
    ("constant 0.9", "constant 0.9"), ("constant 0.1", "constant 0.1"), ("constant 0.01", "constant 0.01"),
    ("linear 0.9->0.1 in 40 (article)", "linear (article)"), ("linear 0.9->0.01 in 100", "linear to 0.01"),
    ("exponential 0.9*0.95^t, floor 0.01", "exponential"), ("cosine 0.9->0.01 in 100", "cosine"),
    ("cumulative 1/(t+1)", "cumulative"),
])
_ARTICLE_SCHEDULE = "linear 0.9->0.1 in 40 (article)"


def _schedule_look(name):
    look = dict(color=style.color(_SCHEDULE_LOOKS[name]), lw=1.3,
                ls="--" if name.startswith("constant") else "-", zorder=3)
    if name == _ARTICLE_SCHEDULE:
        look.update(lw=5, alpha=0.45, solid_capstyle="butt", zorder=2)
    return look


def _schedule_label(name):
    if name == _ARTICLE_SCHEDULE:
        return name + " = constant 0.1 from step 40"
    return name


@figure("s4_nonstationary")
def fig_nonstationary():
    data = nonstationary_data()
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.6))
    names = list(data["momentum"])
    steps = np.arange(STEPS)

    ax = axes[0, 0]
    for n in names:
        ax.plot(steps, data["momentum"][n], label=_schedule_label(n), **_schedule_look(n))
    ax.set_yscale("log")
    ax.set_title("Momentum schedules")
    ax.set_xlabel("step (batch)")
    ax.set_ylabel("momentum (weight of the new batch)")

    ax = axes[1, 0]
    for scen, ls in (("jump", "-"), ("drift", ":")):
        res = data["scenarios"][scen]
        ax.plot(steps, res["true_mean"], color=style.OKABE_ITO["black"], ls=ls, label=f"{scen}: mean")
        ax.plot(steps, res["true_var"], color=style.OKABE_ITO["vermillion"], ls=ls, label=f"{scen}: variance")
    ax.set_title("The data: true mean and variance")
    ax.set_xlabel("step (batch)")
    ax.legend(loc="upper left")

    for row, scen in enumerate(("jump", "drift")):
        res = data["scenarios"][scen]
        for col, key, what in ((1, "mean_err", "|running mean - true mean|"),
                               (2, "var_rel_err", "|running var / true var - 1|")):
            ax = axes[row, col]
            for n in names:
                ax.plot(steps, res["schedules"][n][key], **_schedule_look(n))
            if scen == "jump":
                ax.axvline(SHIFT_AT, **style.REFERENCE)
            ax.set_yscale("log")
            ax.set_title(f"{scen}: {what}")
            ax.set_xlabel("step (batch)")
    fig.suptitle(f"Running statistics under a changing distribution "
                 f"(mean over {data['settings']['features']} features x "
                 f"{data['settings']['repeats']} runs)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    style.legend_below(fig, axes[0, :1], ncol=4, fontsize=10)
    return fig, data
