"""Independent references for the experiments of lessons 1 and 7 and their figures.

* :func:`to_torch` / :func:`torch_train`: the same MLP trained by PyTorch.  ``to_torch``
  copies a minibn ``Sequential`` of Linear / BatchNorm1d / LayerNorm / GroupNorm / ReLU
  layers (weights, biases, running statistics) into a float64 PyTorch model; ``torch_train``
  trains it with ``torch.optim.SGD`` and autograd on the same batches as
  ``minibn.experiments.train`` (each epoch the order ``default_rng([seed, 4]).permutation(n)``,
  consecutive batches of ``batch_size``, a last partial batch dropped).  Nothing of minibn's
  math is used, so agreement checks minibn's layers, loss, backward and optimizer at once.
* :func:`reference_rms`: the section 6.3 output-dependence table with every normalization
  computed by the float64 reference (``minibn.grading.reference``).
"""
from __future__ import annotations

import copy
import math

import numpy as np

from minibn.grading import reference as R

try:
    import torch
except ImportError:  # pragma: no cover - the callers skip without torch
    torch = None

EPS = 1e-5
T = torch.float64 if torch is not None else None


def to_torch(model):
    layers = []
    for layer in model:
        kind = type(layer).__name__
        if kind == "Linear":
            t = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=T)
            t.weight.data = torch.tensor(np.asarray(layer.weight.data), dtype=T)
            if layer.bias is not None:
                t.bias.data = torch.tensor(np.asarray(layer.bias.data), dtype=T)
        elif kind == "BatchNorm1d":
            t = torch.nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum, dtype=T)
            for name in ("weight", "bias"):
                getattr(t, name).data = torch.tensor(np.asarray(getattr(layer, name).data), dtype=T)
            t.running_mean.data = torch.tensor(np.asarray(layer.running_mean), dtype=T)
            t.running_var.data = torch.tensor(np.asarray(layer.running_var), dtype=T)
        elif kind == "LayerNorm":
            t = torch.nn.LayerNorm(layer.normalized_shape, eps=layer.eps, dtype=T)
            for name in ("weight", "bias"):
                getattr(t, name).data = torch.tensor(np.asarray(getattr(layer, name).data), dtype=T)
        elif kind == "GroupNorm":
            t = torch.nn.GroupNorm(layer.num_groups, layer.num_channels, eps=layer.eps, dtype=T)
            for name in ("weight", "bias"):
                getattr(t, name).data = torch.tensor(np.asarray(getattr(layer, name).data), dtype=T)
        elif kind == "ReLU":
            t = torch.nn.ReLU()
        else:
            raise TypeError(f"no PyTorch twin for {kind}")
        layers.append(t)
    return torch.nn.Sequential(*layers)


def accuracy(tmodel, x, y):
    tmodel.eval()
    with torch.no_grad():
        pred = tmodel(torch.tensor(x, dtype=T)).argmax(dim=1).numpy()
    tmodel.train()
    return float(np.mean(pred == y))


def relu_stats(tmodel, x):
    """Mean and std of every ReLU output for the batch ``x`` in training mode (model unchanged)."""
    m = copy.deepcopy(tmodel)
    m.train()
    means, stds = [], []
    h = torch.tensor(x, dtype=T)
    with torch.no_grad():
        for layer in m:
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU):
                means.append(float(h.mean()))
                stds.append(float(h.std(unbiased=False)))
    return means, stds


def torch_train(tmodel, data, epochs, batch_size, lr, momentum=0.0, seed=0, evaluate_each_epoch=True,
                probe=None, snapshot_epochs=()):
    """Returns ``{"train_loss", "train_acc", "test_acc", "diverged", "snapshots"}``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny matrices: one thread is faster, and steadier
    try:
        return _torch_train(tmodel, data, epochs, batch_size, lr, momentum, seed, evaluate_each_epoch,
                            probe, snapshot_epochs)
    finally:
        torch.set_num_threads(threads)


def _torch_train(tmodel, data, epochs, batch_size, lr, momentum, seed, evaluate_each_epoch, probe,
                 snapshot_epochs):
    rng = np.random.default_rng([seed, 4])
    opt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = data.x_train.shape[0]
    steps = n // batch_size
    xt = torch.tensor(data.x_train, dtype=T)
    yt = torch.tensor(data.y_train)
    out = {"train_loss": [], "train_acc": [], "test_acc": [], "diverged": False, "snapshots": {}}
    tmodel.train()
    if probe is not None:
        out["snapshots"][0] = relu_stats(tmodel, probe)
    for epoch in range(1, epochs + 1):
        order = torch.tensor(rng.permutation(n))
        total = 0.0
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            opt.zero_grad()
            loss = loss_fn(tmodel(xt[idx]), yt[idx])
            if not torch.isfinite(loss) or loss.item() > 1e6:     # minibn.experiments.BLOWUP_LOSS
                out["diverged"] = True
                return out
            loss.backward()
            opt.step()
            total += loss.item()
        out["train_loss"].append(total / steps)
        if evaluate_each_epoch or epoch == epochs:
            out["train_acc"].append(accuracy(tmodel, data.x_train, data.y_train))
            out["test_acc"].append(accuracy(tmodel, data.x_test, data.y_test))
        if probe is not None and epoch in snapshot_epochs:
            out["snapshots"][epoch] = relu_stats(tmodel, probe)
    return out


def reference_rms(batch_sizes, draws, seed=0):
    """RMS(training output - inference output) of one fixed sample, averaged over ``draws``
    batches of each size: the same random samples as ``s6_alternatives.output_dependence_data``
    (drawn with its generator), every normalization by the float64 reference."""
    from minibn.figures import s6_alternatives as s6
    rng = np.random.default_rng([seed, 61])
    x0 = s6.draw_samples(1, rng, seed)[0]
    mu, s = s6.population(seed)
    pop = R.bn_forward(x0[None], eps=EPS, stats=(0, mu, s ** 2))["y"][0]

    def grouped(b, G):          # G groups per sample (G = 1: layer norm, G = C: instance norm)
        return R.gn_forward(b, G, eps=EPS)["y"]

    def bn(b):
        return R.bn_forward(b, eps=EPS)["y"]

    C = x0.shape[0]
    norms = {"BatchNorm2d": (bn, pop),
             "LayerNorm": (lambda b: grouped(b, 1), grouped(x0[None], 1)[0]),
             "GroupNorm(4)": (lambda b: grouped(b, 4), grouped(x0[None], 4)[0]),
             "InstanceNorm2d": (lambda b: grouped(b, C), grouped(x0[None], C)[0])}
    mates = {B: [s6.draw_samples(B - 1, rng, seed) for _ in range(draws if B > 1 else 1)]
             for B in batch_sizes}
    out = {}
    for name, (f, ref) in norms.items():
        out[name] = [float(np.mean([math.sqrt(np.mean((f(np.concatenate([x0[None], m]))[0] - ref) ** 2))
                                    for m in mates[B]])) for B in batch_sizes]
    return out
