"""Precise BatchNorm: running statistics replaced by exact population statistics.

The EMA of section 3 is an estimate with two weaknesses: it weights recent
batches more (so with momentum 0.1 it effectively averages only the last ~10
batches), and during training each batch's statistics were taken with the
weights of *that* step, which are not the final weights.  "Precise BN" (Wu &
Johnson, *Rethinking "Batch" in BatchNorm*, 2021) fixes both after training:
freeze the weights, run the model in training mode over many batches, and set
each layer's running statistics to the statistics of everything it saw::

    mean = mean over all elements of all batches    (of the layer's input, per channel)
    var  = the same for the variance, stored unbiased:  var_biased * M / (M - 1)

where ``M`` is the total number of values per channel.  Per-batch moments are
merged with the article's section 6 formulas (:func:`minibn.moments.merge_moments`),
so each *element* weighs the same and the result is exactly the statistics of
the concatenated batches, whatever the batch sizes.

Layers in sequence: the input of a later BN layer depends on how the earlier
layers normalized.  As in training, every layer normalizes with its own batch
statistics during these passes; the moments recorded are exactly those batch
statistics (read through the layer's ``_batch_statistics`` hook, so a
SyncBatchNorm records the global moments of all processes).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from .backend import get_array_module
from .module import Module
from .moments import merge_moments, unbiased
from .momentum import batchnorm_layers

__all__ = ["precise_bn"]


def _tracked_layers(model):
    layers = [m for m in batchnorm_layers(model) if m.track_running_stats]
    if not layers:
        raise ValueError("precise_bn: no batch-norm layer with running statistics "
                         "(track_running_stats=True) in the model")
    return layers


def precise_bn(model, batches: Iterable, forward: Optional[Callable] = None, progress: bool = False):
    """Set every BN layer's running statistics to the exact statistics over ``batches``.

    Parameters
    ----------
    model:
        a minibn ``Module``; every BatchNorm layer inside it (with
        ``track_running_stats=True``) is updated.
    batches:
        an iterable of inputs (read once; a generator is fine).
    forward:
        ``forward(batch)`` runs the model on one batch; by default
        ``model(batch)``.  Pass e.g. ``lambda b: model(b[0])`` for ``(x, y)``
        pairs.
    progress:
        show a tqdm progress bar.

    Returns a dict ``{layer name: (count, mean, var_unbiased)}`` (float64 NumPy
    or CuPy arrays) of what was written.

    During the passes the model is in training mode; afterwards each module's
    mode, each layer's ``momentum`` and every attribute touched are restored,
    ``num_batches_tracked`` counts the batches seen (as after any training
    passes), and ``running_mean``/``running_var`` hold the population
    statistics.  If anything fails (a forward raises, no batch, fewer than two
    values per channel), every running statistic is restored to its value
    before the call and the error is raised.
    """
    if not isinstance(model, Module):
        raise TypeError(f"precise_bn: model must be a minibn Module, got {type(model).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"precise_bn: forward must be a callable taking one batch, got {forward!r}")
    layers = _tracked_layers(model)
    names = {id(m): name for name, m in model.named_modules()}
    all_modules = list(model.modules())
    run = forward if forward is not None else model

    saved_modes = [(m, m.training) for m in all_modules]
    saved_state = [(layer, layer.momentum, layer.running_mean.copy(), layer.running_var.copy(),
                    layer.num_batches_tracked.copy(), layer.__dict__.get("_batch_statistics"))
                   for layer in layers]
    records = {id(layer): ([], [], []) for layer in layers}

    def recorder(layer, original):
        counts, means, variances = records[id(layer)]

        def _batch_statistics(x):
            count, mean, var = original(x)
            counts.append(int(count))
            means.append(mean.copy())
            variances.append(var.copy())
            return count, mean, var
        return _batch_statistics

    ok = False
    try:
        for layer in layers:
            layer._batch_statistics = recorder(layer, layer._batch_statistics)
        model.train()
        it = batches
        if progress:
            from tqdm import tqdm
            it = tqdm(batches, desc="precise BN", unit="batch")
        n_batches = 0
        for batch in it:
            run(batch)
            n_batches += 1
        if n_batches == 0:
            raise ValueError("precise_bn: no batches were given")

        results = {}
        for layer in layers:
            counts, means, variances = records[id(layer)]
            name = names.get(id(layer)) or type(layer).__name__
            if not counts or sum(counts) == 0:
                raise ValueError(f"precise_bn: layer {name!r} saw no data in the forward passes")
            xp = get_array_module(means[0])
            total, mean, var = merge_moments(counts, xp.stack(means), xp.stack(variances))
            if total < 2:
                raise ValueError(f"precise_bn: layer {name!r} saw {total} value per channel; the "
                                 "unbiased variance needs at least 2")
            results[id(layer)] = (name, total, mean, unbiased(var, total))
        # every layer is computed: only now write them all
        for layer in layers:
            _, _, mean, var_u = results[id(layer)]
            layer.running_mean[...] = mean.astype(layer.running_mean.dtype)
            layer.running_var[...] = var_u.astype(layer.running_var.dtype)
        ok = True
        return {name: (total, mean, var_u) for name, total, mean, var_u in results.values()}
    finally:
        for layer, momentum, rm, rv, nbt, patched in saved_state:
            layer.__dict__.pop("_batch_statistics", None)
            if patched is not None:
                layer._batch_statistics = patched
            layer.momentum = momentum
            if not ok:
                layer.running_mean[...] = rm
                layer.running_var[...] = rv
                layer.num_batches_tracked[...] = nbt
        for m, mode in saved_modes:
            m.training = mode

