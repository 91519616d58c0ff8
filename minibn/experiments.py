"""Small, seeded experiments for lesson 1 and the section 6.3 lesson: data, models, training.

Everything here is deliberately tiny (a few thousand samples, MLPs of width
64) so that a whole sweep runs in seconds on a laptop CPU, and everything is
seeded, so the same call gives the same numbers bit for bit.

* :func:`make_classification`: inputs ``x ~ N(0, I)``; labels from a fixed
  random "teacher" network, so the task is learnable but not linear.
* :func:`mlp`: ``[Linear -> (norm) -> ReLU] * depth -> Linear`` from minibn's layers.
* :func:`train`: mini-batch SGD with minibn's hand-written backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .nn import (BatchNorm1d, CrossEntropyLoss, GroupNorm, LayerNorm, Linear, ReLU, SGD,
                 Sequential)

__all__ = ["Dataset", "make_classification", "mlp", "set_init", "History", "train", "evaluate",
           "activation_stats", "NORMS", "single_thread_blas"]


# --------------------------------------------------------------------------- one BLAS thread

def single_thread_blas():
    """Matrix products on one BLAS thread inside the ``with`` block.

    The products here are small (at most 3072 x 64 by 64 x 64); spreading them over
    threads costs more than it saves: measured on a 2-core machine, an evaluation
    pass used 5x less CPU time on one thread.  Same effect as OPENBLAS_NUM_THREADS=1,
    but scoped: the previous limits are restored on exit (threadpoolctl).
    """
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


# --------------------------------------------------------------------------- data

@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def dim(self):
        return self.x_train.shape[1]

    @property
    def classes(self):
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def make_classification(n_train: int = 1024, n_test: int = 2048, dim: int = 16, classes: int = 4,
                        label_noise: float = 0.0, seed: int = 0, dtype=np.float64) -> Dataset:
    """A seeded synthetic classification set.

    ``x ~ N(0, I_dim)``; the label is ``argmax(tanh(x A) B)`` for a fixed random
    teacher ``A`` (dim x 32), ``B`` (32 x classes).  ``label_noise`` replaces that
    fraction of the *training* labels by uniformly random classes (the test
    labels stay clean), which gives a model something to overfit.
    """
    rng = np.random.default_rng([seed, 1])
    A = rng.standard_normal((dim, 32)) / np.sqrt(dim)
    B = rng.standard_normal((32, classes))
    x = rng.standard_normal((n_train + n_test, dim))
    y = np.argmax(np.tanh(x @ A * 2.0) @ B, axis=1).astype(np.int64)
    if label_noise > 0:
        flip = rng.random(n_train) < label_noise
        y[:n_train][flip] = rng.integers(0, classes, int(flip.sum()))
    x = x.astype(dtype)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


# --------------------------------------------------------------------------- models

NORMS = (None, "bn", "ln", "gn")


def set_init(model, gain: float, seed: int = 0):
    """Gaussian weights with std ``gain / sqrt(fan_in)`` and zero biases, for every Linear.

    ``gain = sqrt(2)`` is He initialization (keeps the scale of ReLU activations
    from layer to layer); PyTorch's default uniform init of ``Linear`` has std
    ``1 / sqrt(3 fan_in)``, i.e. ``gain = 0.577``, which shrinks the activations
    of a ReLU network by ``sqrt(6)`` per layer when biases are small.
    """
    rng = np.random.default_rng([seed, 2])
    for m in model.modules():
        if isinstance(m, Linear):
            w = m.weight.data
            m.weight.data = (rng.standard_normal(w.shape) * gain / np.sqrt(w.shape[1])).astype(w.dtype)
            if m.bias is not None:
                m.bias.data = np.zeros_like(m.bias.data)
    return model


def mlp(in_dim: int, width: int, depth: int, out_dim: int, norm: Optional[str] = None,
        groups: int = 8, init_gain: Optional[float] = None, seed: int = 0, dtype=np.float64):
    """``[Linear -> norm -> ReLU] * depth -> Linear`` (``norm`` in ``None, "bn", "ln", "gn"``).

    ``init_gain=None`` keeps minibn's (PyTorch's) default ``Linear`` init;
    a number applies :func:`set_init`.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    rng = np.random.default_rng([seed, 3])
    layers, d = [], in_dim
    for _ in range(depth):
        layers.append(Linear(d, width, seed=rng, dtype=dtype))
        if norm == "bn":
            layers.append(BatchNorm1d(width, dtype=dtype))
        elif norm == "ln":
            layers.append(LayerNorm(width, dtype=dtype))
        elif norm == "gn":
            layers.append(GroupNorm(groups, width, dtype=dtype))
        layers.append(ReLU())
        d = width
    layers.append(Linear(d, out_dim, seed=rng, dtype=dtype))
    model = Sequential(*layers)
    if init_gain is not None:
        set_init(model, init_gain, seed)
    return model


# --------------------------------------------------------------------------- training

# A run has diverged when a batch loss overflows or exceeds this: the weights have blown up
# (chance level is ln(classes), about 1.4).  Past this point float64 overflow decides what
# happens next, and two correct implementations stop agreeing.
BLOWUP_LOSS = 1e6

@dataclass
class History:
    """Per-epoch numbers of one run; ``diverged`` is set when the loss blows up (see :func:`train`)."""
    train_loss: List[float] = field(default_factory=list)   # mean training-batch loss of each epoch
    train_acc: List[float] = field(default_factory=list)    # eval mode, whole training set
    test_acc: List[float] = field(default_factory=list)     # eval mode, whole test set
    diverged: bool = False
    snapshots: Dict[int, object] = field(default_factory=dict)


def evaluate(model, x, y):
    """Accuracy of ``model`` in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    with np.errstate(all="ignore"), single_thread_blas():
        pred = np.argmax(model(x), axis=1)
    model.train()
    return float(np.mean(pred == y))


def train(model, data: Dataset, epochs: int, batch_size: int, lr: float, momentum: float = 0.0,
          seed: int = 0, snapshot=None, snapshot_epochs=(), evaluate_each_epoch: bool = True) -> History:
    """Mini-batch SGD on the softmax cross-entropy; returns a :class:`History`.

    Each epoch visits the training set in a seeded random order; a last batch
    smaller than ``batch_size`` is dropped, so every step sees exactly
    ``batch_size`` samples.  Training stops, with ``diverged`` set, when a
    batch loss is not finite or exceeds :data:`BLOWUP_LOSS`.
    ``snapshot(model)``, if given, is called before the first epoch (key 0) and
    after each epoch in ``snapshot_epochs``.  With ``evaluate_each_epoch=False``
    the accuracies are measured once, at the end.
    """
    with single_thread_blas():
        return _train(model, data, epochs, batch_size, lr, momentum, seed, snapshot,
                      snapshot_epochs, evaluate_each_epoch)


def _train(model, data, epochs, batch_size, lr, momentum, seed, snapshot, snapshot_epochs,
           evaluate_each_epoch):
    rng = np.random.default_rng([seed, 4])
    loss_fn = CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=lr, momentum=momentum)
    hist = History()
    n = data.x_train.shape[0]
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n})")
    model.train()
    if snapshot is not None:
        hist.snapshots[0] = snapshot(model)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        total = 0.0
        with np.errstate(all="ignore"):          # a diverging run overflows; we detect it below
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size]
                opt.zero_grad()
                loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
                if not np.isfinite(loss) or loss > BLOWUP_LOSS:
                    hist.diverged = True
                    break
                model.backward(loss_fn.backward())
                opt.step()
                total += loss
        if hist.diverged:
            break
        hist.train_loss.append(total / steps)
        if evaluate_each_epoch or epoch == epochs:
            hist.train_acc.append(evaluate(model, data.x_train, data.y_train))
            hist.test_acc.append(evaluate(model, data.x_test, data.y_test))
        if snapshot is not None and epoch in snapshot_epochs:
            hist.snapshots[epoch] = snapshot(model)
    return hist


def activation_stats(model, x):
    """Mean and std of the output of every ReLU for the batch ``x``, in training mode.

    This is what the next layer sees during training.  Running statistics are
    restored afterwards, so the measurement does not disturb the model.
    Returns two lists (one value per hidden layer).
    """
    state = model.state_dict()
    means, stds = [], []
    model.train()
    with np.errstate(all="ignore"):
        h = x
        for layer in model:
            h = layer(h)
            if isinstance(layer, ReLU):
                means.append(float(np.mean(h)))
                stds.append(float(np.std(h)))
    model.load_state_dict(state)
    return means, stds
