"""Section 6.3 of the article, measured: how BN, LN, GN and IN depend on the batch size.

Figure ``s6_batch_size_dependence``:

* left: for one fixed sample ``x0`` (shape ``(C, H, W) = (8, 4, 4)``), how far its
  training-mode output is from its inference output when the rest of its batch
  is ``B - 1`` random samples.  BN's inference output uses the population
  statistics (what perfect running statistics give); LN/GN/IN use the same
  per-sample statistics in training and inference.
* right: test accuracy of a small MLP trained with BN, GN or LN at batch sizes
  2 to 256 (same number of epochs, learning rate proportional to the batch
  size).  BN cannot train with a batch of 1 on ``(N, C)`` input (one value per
  channel): the figure records the error it raises.
"""
from __future__ import annotations

import numpy as np

from . import figure, pyplot, style
from ..experiments import make_classification, mlp, train
from ..batchnorm import BatchNorm1d, BatchNorm2d
from ..sample_norm_layers import GroupNorm, InstanceNorm2d, LayerNorm

SHAPE = (8, 4, 4)                    # (C, H, W) of one sample
EPS = 1e-5
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DRAWS = 16
TRAIN_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
TRAIN = dict(n_train=1024, n_test=2048, dim=16, classes=4, width=32, depth=2, groups=4, epochs=5,
             base_lr=0.1, base_batch=32, momentum=0.9, seed=0)
NORM_NAMES = {"bn": "BatchNorm", "gn": "GroupNorm(4)", "ln": "LayerNorm"}


def population(seed=0):
    """Per-channel mean and std of the synthetic image-like samples (seeded)."""
    rng = np.random.default_rng([seed, 60])
    C = SHAPE[0]
    return rng.uniform(-2.0, 2.0, C), rng.uniform(0.5, 3.0, C)


def draw_samples(n, rng, seed=0):
    """``n`` samples ``x[c, h, w] = mu_c + s_c * z``, ``z ~ N(0, 1)``."""
    mu, s = population(seed)
    z = rng.standard_normal((n,) + SHAPE)
    return mu[None, :, None, None] + s[None, :, None, None] * z


def norm_layers():
    """The four normalizations, without affine parameters (gamma = 1, beta = 0)."""
    C, H, W = SHAPE
    return {"BatchNorm2d": BatchNorm2d(C, affine=False, track_running_stats=False, dtype=np.float64),
            "LayerNorm": LayerNorm((C, H, W), elementwise_affine=False, dtype=np.float64),
            "GroupNorm(4)": GroupNorm(4, C, affine=False, dtype=np.float64),
            "InstanceNorm2d": InstanceNorm2d(C, dtype=np.float64)}


def inference_output(name, x0, seed=0):
    """What ``x0`` gives at inference: population statistics for BN, its own statistics otherwise."""
    if name == "BatchNorm2d":
        mu, s = population(seed)
        return (x0 - mu[:, None, None]) / np.sqrt(s[:, None, None] ** 2 + EPS)
    return norm_layers()[name](x0[None])[0]


def output_dependence_data(batch_sizes=BATCH_SIZES, draws=DRAWS, seed=0):
    """RMS difference between ``x0``'s training-mode output inside a batch of ``B`` and its
    inference output, averaged over ``draws`` random batch mates (and the largest of them)."""
    rng = np.random.default_rng([seed, 61])
    x0 = draw_samples(1, rng, seed)[0]
    layers = norm_layers()
    out = {"shape": list(SHAPE), "batch_sizes": list(batch_sizes), "draws": draws, "x0": x0,
           "rms_mean": {}, "rms_max": {}}
    refs = {name: inference_output(name, x0, seed) for name in layers}
    mates = {B: [draw_samples(B - 1, rng, seed) for _ in range(draws if B > 1 else 1)]
             for B in batch_sizes}
    for name, layer in layers.items():
        mean_row, max_row = [], []
        for B in batch_sizes:
            rms = [float(np.sqrt(np.mean((layer(np.concatenate([x0[None], m]))[0] - refs[name]) ** 2)))
                   for m in mates[B]]
            mean_row.append(float(np.mean(rms)))
            max_row.append(float(np.max(rms)))
        out["rms_mean"][name] = mean_row
        out["rms_max"][name] = max_row
    return out


def batch_one_error():
    """The error BatchNorm1d raises in training on a batch of one ``(N, C)`` sample."""
    try:
        BatchNorm1d(TRAIN["width"])(np.zeros((1, TRAIN["width"])))
    except ValueError as exc:
        return str(exc)
    return None


def dataset():
    t = TRAIN
    return make_classification(t["n_train"], t["n_test"], t["dim"], t["classes"], seed=t["seed"])


def lr_for(batch_size):
    """The linear scaling rule: the learning rate grows with the batch size."""
    return TRAIN["base_lr"] * batch_size / TRAIN["base_batch"]


def accuracy_vs_batch_data(batch_sizes=TRAIN_BATCH_SIZES, norms=("bn", "gn", "ln"), epochs=None):
    """Test accuracy (eval mode) and final training loss of the MLP for each norm and batch size."""
    t = TRAIN
    epochs = t["epochs"] if epochs is None else epochs
    d = dataset()
    out = {"setup": dict(t, epochs=epochs), "batch_sizes": list(batch_sizes),
           "lr": [lr_for(B) for B in batch_sizes], "test_acc": {}, "train_loss": {},
           "bn_batch_1_error": batch_one_error()}
    for norm in norms:
        accs, losses = [], []
        for B in batch_sizes:
            model = mlp(d.dim, t["width"], t["depth"], d.classes, norm=norm, groups=t["groups"],
                        seed=t["seed"])
            h = train(model, d, epochs, B, lr_for(B), momentum=t["momentum"], seed=t["seed"],
                      evaluate_each_epoch=False)
            accs.append(None if h.diverged else h.test_acc[-1])
            losses.append(None if h.diverged else h.train_loss[-1])
        out["test_acc"][NORM_NAMES[norm]] = accs
        out["train_loss"][NORM_NAMES[norm]] = losses
    return out


def batch_size_dependence_data():
    return {"output": output_dependence_data(BATCH_SIZES, DRAWS),
            "accuracy": accuracy_vs_batch_data(TRAIN_BATCH_SIZES)}


# every name a panel uses -> the method of the style (one colour and marker per method)
_METHOD = {"BatchNorm2d": "BN", "BatchNorm": "BN", "LayerNorm": "LayerNorm", "GroupNorm(4)": "GroupNorm",
           "InstanceNorm2d": "InstanceNorm"}
# where several curves lie on top of each other, bigger hollow markers go under smaller ones
_STACKED_MARKER = {"LayerNorm": dict(ms=11, mfc="none", mew=1.6), "GroupNorm(4)": dict(ms=8, mfc="none", mew=1.6),
                   "InstanceNorm2d": dict(ms=4)}


def plot_batch_size_dependence(data):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
    o = data["output"]
    for name, row in o["rms_mean"].items():
        a1.plot(o["batch_sizes"], row, **style.look(_METHOD[name]), **_STACKED_MARKER.get(name, {}),
                label=name)
    zero = [n for n, row in o["rms_mean"].items() if max(row) == 0.0]
    if zero:
        a1.annotate(f"{', '.join(zero)}:\nexactly 0 at every batch size\n(markers drawn on top of each other)",
                    xy=(o["batch_sizes"][len(o["batch_sizes"]) // 2], 0.0), xytext=(0.35, 0.3),
                    textcoords="axes fraction", arrowprops=dict(arrowstyle="->", color="0.3"))
    a1.set_xscale("log", base=2)
    a1.set(xlabel="batch size B", ylabel="RMS(training output - inference output)",
           title=f"One sample's output vs its batch ({o['draws']} batches)")
    a1.legend(loc="upper right")
    a = data["accuracy"]
    for name, row in a["test_acc"].items():
        a2.plot(a["batch_sizes"], [np.nan if v is None else v for v in row], **style.look(_METHOD[name]),
                label=name)
    a2.set_xscale("log", base=2)
    a2.set(xlabel="batch size (learning rate proportional to it)", ylabel="test accuracy",
           title=f"Small MLP, {a['setup']['epochs']} epochs")
    a2.text(0.3, 0.3, "BatchNorm at batch 1: ValueError\n(one value per channel)",
            transform=a2.transAxes)
    a2.legend(loc="lower right")
    fig.tight_layout()
    return fig


@figure("s6_batch_size_dependence")
def fig_batch_size_dependence():
    data = batch_size_dependence_data()
    return plot_batch_size_dependence(data), data
