"""Section 1 of the article, measured: what BN does to a deep MLP's activations and training.

One setting for everything (see :data:`SETUP`): a 8-layer ReLU MLP of width 64
on a seeded synthetic 4-class problem (``minibn.experiments``), plain SGD,
batch 64, float64.  Compared: the same network with and without a
``BatchNorm1d`` after every hidden ``Linear``; with minibn's default
``Linear`` init (PyTorch's: uniform, ``gain = 1/sqrt(3)``) and with He init
(``gain = sqrt(2)``).

Figures: ``s1_activation_stats``, ``s1_training_curves``, ``s1_init_lr_sweep``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

from . import figure, pyplot, style
from ..experiments import activation_stats, make_classification, mlp, train

SETUP = dict(n_train=1024, n_test=2048, dim=16, classes=4, depth=8, width=64, batch_size=64,
             lr=0.1, epochs=20, probe=512, data_seed=0)
HE = math.sqrt(2.0)
# name -> (norm, init gain); gain None = minibn's default Linear init
CONFIGS = {
    "plain, default init": (None, None),
    "BN, default init": ("bn", None),
    "plain, He init": (None, HE),
    "BN, He init": ("bn", HE),
}
SNAPSHOT_EPOCHS = (0, 1, 5, 20)
SWEEP_GAINS = (0.25, 0.5, 1.0, HE, 2.0, 3.0)
SWEEP_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
SWEEP_EPOCHS = 10
GAP_SEEDS = (0, 1, 2)


def dataset():
    s = SETUP
    return make_classification(s["n_train"], s["n_test"], s["dim"], s["classes"], seed=s["data_seed"])


def build(name, seed=0, gain="config"):
    """The model of configuration ``name`` (``gain`` overrides its init gain)."""
    norm, g = CONFIGS[name]
    d = dataset()
    return mlp(d.dim, SETUP["width"], SETUP["depth"], d.classes, norm=norm,
               init_gain=g if gain == "config" else gain, seed=seed)


@lru_cache(maxsize=None)
def _run(name, seed=0, epochs=SETUP["epochs"], lr=SETUP["lr"], gain="config", each_epoch=True):
    """Train one configuration; returns ``(history, model)`` (cached: several figures share runs)."""
    d = dataset()
    model = build(name, seed, gain)
    probe = d.x_train[:SETUP["probe"]]
    hist = train(model, d, epochs, SETUP["batch_size"], lr, seed=seed,
                 snapshot=(lambda m: activation_stats(m, probe)) if each_epoch else None,
                 snapshot_epochs=SNAPSHOT_EPOCHS, evaluate_each_epoch=each_epoch)
    return hist, model


def trained_model(name, seed=0):
    """The model of configuration ``name`` after the standard training run (a shared object:
    restore its state dict after changing it)."""
    return _run(name, seed)[1]


def _nan(v):
    return None if v is None or not np.isfinite(v) else float(v)


# --------------------------------------------------------------------------- data

def activation_stats_data(epochs=SETUP["epochs"]):
    """Mean and std of every hidden layer's ReLU output on a fixed probe batch of 512
    training samples, in training mode, at the epochs of :data:`SNAPSHOT_EPOCHS`."""
    out = {"layers": list(range(1, SETUP["depth"] + 1)),
           "epochs": [e for e in SNAPSHOT_EPOCHS if e <= epochs], "configs": {}}
    for name in CONFIGS:
        hist, _ = _run(name, epochs=epochs)
        out["configs"][name] = {
            "mean": [hist.snapshots[e][0] if e in hist.snapshots else None for e in out["epochs"]],
            "std": [hist.snapshots[e][1] if e in hist.snapshots else None for e in out["epochs"]],
        }
    return out


def training_curves_data(epochs=SETUP["epochs"]):
    """Per-epoch training loss and train/test accuracy of every configuration."""
    out = {"setup": dict(SETUP, epochs=epochs), "epochs": list(range(1, epochs + 1)), "configs": {}}
    for name in CONFIGS:
        hist, _ = _run(name, epochs=epochs)
        out["configs"][name] = {"train_loss": hist.train_loss, "train_acc": hist.train_acc,
                                "test_acc": hist.test_acc, "diverged": hist.diverged}
    return out


def generalization_data(seeds=GAP_SEEDS, epochs=SETUP["epochs"]):
    """Final train and test accuracy (and their gap) of plain vs BN, He init, over seeds."""
    out = {"seeds": list(seeds), "configs": {}}
    for name in ("plain, He init", "BN, He init"):
        rows = [_run(name, seed=s, epochs=epochs) for s in seeds]
        tr = [h.train_acc[-1] for h, _ in rows]
        te = [h.test_acc[-1] for h, _ in rows]
        out["configs"][name] = {"train_acc": tr, "test_acc": te,
                                "gap": [a - b for a, b in zip(tr, te)]}
    return out


def init_lr_sweep_data(gains=SWEEP_GAINS, lrs=SWEEP_LRS, epochs=SWEEP_EPOCHS):
    """Final-epoch training loss and test accuracy after ``epochs`` epochs, over init gains
    (at the standard lr) and over learning rates (at He init), with and without BN.
    ``None`` marks a run that blew up (``History.diverged``)."""
    out = {"epochs": epochs, "lr_for_gain_sweep": SETUP["lr"], "gain_for_lr_sweep": HE,
           "gains": list(gains), "lrs": list(lrs), "gain_sweep": {}, "lr_sweep": {}}
    for label, name in (("plain", "plain, He init"), ("BN", "BN, He init")):
        for key, values, kw in (("gain_sweep", gains, "gain"), ("lr_sweep", lrs, "lr")):
            loss, acc = [], []
            for v in values:
                args = {"lr": float(SETUP["lr"]), "gain": float(HE)}   # HE = this config's gain
                args[kw] = float(v)
                h, _ = _run(name, epochs=epochs, each_epoch=False, **args)
                loss.append(None if h.diverged else _nan(h.train_loss[-1]))
                acc.append(None if h.diverged else h.test_acc[-1])
            out[key][label] = {"final_train_loss": loss, "test_acc": acc}
    return out


# --------------------------------------------------------------------------- figures

# configuration -> (method of the style, line style): BN blue, plain vermillion; solid He, dashed default
_LOOKS = {"plain, default init": ("plain", "--"), "BN, default init": ("BN", "--"),
          "plain, He init": ("plain", "-"), "BN, He init": ("BN", "-")}


def _look(name, **kw):
    method, line = _LOOKS[name]
    return dict(style.look(method, line), **kw)


def _epoch_ticks(ax, epochs):
    """Whole-epoch ticks only (1, 5, 10, ...): an epoch has no fractions."""
    last = max(epochs)
    ax.set_xticks([1] + list(range(5, last + 1, 5)))
    ax.set_xlim(0.5, last + 0.5)


def plot_activation_stats(data):
    plt = pyplot()
    names = list(data["configs"])
    fig, axes = plt.subplots(2, len(names), figsize=(11, 5.6), sharex=True, sharey="row")
    shades = _epoch_shades(len(data["epochs"]))
    for j, name in enumerate(names):
        c = data["configs"][name]
        for i, e in enumerate(data["epochs"]):
            for r, key in enumerate(("mean", "std")):
                if c[key][i] is not None:
                    axes[r, j].plot(data["layers"], c[key][i], "o-", ms=4, color=shades[i],
                                    label=f"epoch {e}")
        axes[0, j].set_title(name)
        for r in range(2):
            ax = axes[r, j]
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes[1, j].set_xlabel("hidden layer")
        axes[1, j].set_xticks(data["layers"])
    axes[0, 0].set_ylabel("mean of ReLU output")
    axes[1, 0].set_ylabel("std of ReLU output")
    fig.suptitle("Activations through training (probe batch of 512, training mode)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    style.legend_below(fig, axes[0, :1], ncol=len(data["epochs"]))
    return fig


def _epoch_shades(n):
    """``n`` colours from light to dark blue (all of them readable on white)."""
    light, dark = np.array([0x56, 0xB4, 0xE9]) / 255, np.array([0x00, 0x1F, 0x4D]) / 255
    return [tuple(light + (dark - light) * i / max(n - 1, 1)) for i in range(n)]


def plot_training_curves(data):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
    for name, c in data["configs"].items():
        ep = data["epochs"][:len(c["train_loss"])]
        a1.plot(ep, c["train_loss"], **_look(name, ms=3), label=name)
        a2.plot(ep, c["test_acc"], **_look(name, ms=3), label=name)
        a2.plot(ep, c["train_acc"], color=style.color(_LOOKS[name][0]), ls=":", lw=1.2)
    chance_loss = math.log(data["setup"]["classes"])
    a1.axhline(chance_loss, **style.REFERENCE, label=f"chance: ln {data['setup']['classes']}")
    a1.set(xlabel="epoch", ylabel="mean training loss", title="Training loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy: test (with markers), train (dotted)")
    for a in (a1, a2):
        _epoch_ticks(a, data["epochs"])
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    style.legend_below(fig, (a1,), ncol=5)
    return fig


def plot_init_lr_sweep(data):
    """Final training loss over the init gain and over the learning rate; a diverged run has no
    loss: it is marked by an x on the top edge of its panel, and no line runs through it."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    chance = math.log(4)
    for ax, key, xs, xlabel in ((a1, "gain_sweep", data["gains"], "init gain (weight std = gain/sqrt(fan_in))"),
                                (a2, "lr_sweep", data["lrs"], "learning rate")):
        for label, c in data[key].items():
            ys = [np.nan if v is None else v for v in c["final_train_loss"]]
            ax.plot(xs, ys, **style.look(label), label=label)
            bad = [x for x, v in zip(xs, c["final_train_loss"]) if v is None]
            if bad:
                ax.plot(bad, [1.0] * len(bad), "x", color=style.color(label), ms=10, mew=2,
                        transform=ax.get_xaxis_transform(), clip_on=False, zorder=5,
                        label=f"{label}: diverged (no loss)")
        ax.axhline(chance, **style.REFERENCE, label="chance: ln 4")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.3g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
    a1.set_ylim(0, chance * 1.15)
    a1.set_ylabel(f"training loss after {data['epochs']} epochs")
    a1.set_title(f"Init scale (lr = {data['lr_for_gain_sweep']})")
    a2.set_title("Learning rate (He init)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    style.legend_below(fig, (a1, a2), ncol=5)
    return fig


@figure("s1_activation_stats")
def fig_activation_stats():
    data = activation_stats_data(SETUP["epochs"])
    return plot_activation_stats(data), data


@figure("s1_training_curves")
def fig_training_curves():
    data = training_curves_data(SETUP["epochs"])
    data["generalization"] = generalization_data(GAP_SEEDS, SETUP["epochs"])
    return plot_training_curves(data), data


@figure("s1_init_lr_sweep")
def fig_init_lr_sweep():
    data = init_lr_sweep_data(SWEEP_GAINS, SWEEP_LRS, SWEEP_EPOCHS)
    return plot_init_lr_sweep(data), data
