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

from . import figure, pyplot
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

_COLORS = {"plain, default init": "tab:red", "BN, default init": "tab:blue",
           "plain, He init": "tab:orange", "BN, He init": "tab:green"}


def plot_activation_stats(data):
    plt = pyplot()
    names = list(data["configs"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.6), sharex=True, sharey="row")
    cmap = plt.get_cmap("viridis")
    for j, name in enumerate(names):
        c = data["configs"][name]
        for i, e in enumerate(data["epochs"]):
            col = cmap(i / max(len(data["epochs"]) - 1, 1))
            for r, key in enumerate(("mean", "std")):
                if c[key][i] is not None:
                    axes[r, j].plot(data["layers"], c[key][i], "o-", ms=3, color=col, label=f"epoch {e}")
        axes[0, j].set_title(name, fontsize=10)
        for r, key in enumerate(("mean", "std")):
            axes[r, j].set_yscale("log")
            axes[r, j].grid(alpha=0.3)
        axes[1, j].set_xlabel("hidden layer")
    axes[0, 0].set_ylabel("mean of ReLU output")
    axes[1, 0].set_ylabel("std of ReLU output")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Activations through training (probe batch of 512, training mode)")
    fig.tight_layout()
    return fig


def plot_training_curves(data):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in data["configs"].items():
        ep = data["epochs"][:len(c["train_loss"])]
        a1.plot(ep, c["train_loss"], "-", color=_COLORS.get(name), label=name)
        a2.plot(ep, c["test_acc"], "-", color=_COLORS.get(name), label=f"{name} (test)")
        a2.plot(ep, c["train_acc"], ":", color=_COLORS.get(name))
    a1.axhline(math.log(data["setup"]["classes"]), color="gray", lw=0.8, ls="--")
    a1.set(xlabel="epoch", ylabel="mean training loss", title="Training loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy: test (solid), train (dotted)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_init_lr_sweep(data):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"plain": "tab:orange", "BN": "tab:green"}
    for ax, key, xs, xlabel in ((a1, "gain_sweep", data["gains"], "init gain (weight std = gain/sqrt(fan_in))"),
                                (a2, "lr_sweep", data["lrs"], "learning rate")):
        top = math.log(4) * 1.15
        for label, c in data[key].items():
            ys = [top if v is None else v for v in c["final_train_loss"]]
            ax.plot(xs, ys, "o-", color=colors[label], label=label)
            bad = [x for x, v in zip(xs, c["final_train_loss"]) if v is None]
            if bad:
                ax.plot(bad, [top] * len(bad), "x", color="k", ms=9)
        ax.axhline(math.log(4), color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.3g}" for x in xs])
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel=f"training loss after {data['epochs']} epochs")
        ax.grid(alpha=0.3)
    a1.set_title(f"Init scale (lr = {data['lr_for_gain_sweep']})")
    a2.set_title("Learning rate (He init); x = diverged")
    a1.legend()
    fig.tight_layout()
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
