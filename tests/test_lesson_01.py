"""Lesson 1: every printed number against an independent computation.

The reference is the same experiment trained by PyTorch (``experiment_reference``): same
initial weights, same batches, PyTorch's layers, loss, autograd and SGD.  In float64 the
two agree to ~1e-12 over the 320 steps, so the lesson's numbers (printed with 4-6 decimals)
must match at their printed precision.
"""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest

from lesson_utils import parse_values, run_lesson

torch = pytest.importorskip("torch")

from experiment_reference import accuracy, to_torch, torch_train  # noqa: E402

from minibn.figures import s1_intuition as s1  # noqa: E402

pytestmark = pytest.mark.slow
KEYS = {"plain, default init": "plain_default", "BN, default init": "bn_default",
        "plain, He init": "plain_he", "BN, He init": "bn_he"}


def close(printed, exact, decimals):
    return abs(printed - exact) <= 0.5 * 10.0 ** (-decimals) * (1 + 1e-9) + 1e-12


def close_list(printed, exact, decimals):
    assert len(printed) == len(exact), (printed, exact)
    for p, e in zip(printed, exact):
        if e is None or (isinstance(e, float) and math.isnan(e)):
            assert math.isnan(p), (printed, exact)
        else:
            assert close(p, e, decimals), (printed, exact)


@pytest.fixture(scope="module")
def out():
    text = run_lesson(1, timeout=900)
    return text, parse_values(text)


@pytest.fixture(scope="module")
def data():
    return s1.dataset()


_RUNS = {}


def reference(name, seed=0, epochs=20, lr=0.1, gain="config", each_epoch=True):
    """PyTorch training of configuration ``name`` (cached for the module)."""
    key = (name, seed, epochs, lr, gain, each_epoch)
    if key not in _RUNS:
        d = s1.dataset()
        tmodel = to_torch(s1.build(name, seed, gain))
        r = torch_train(tmodel, d, epochs, 64, lr, seed=seed, evaluate_each_epoch=each_epoch,
                        probe=d.x_train[:512] if each_epoch else None, snapshot_epochs=(1, 5, 20))
        _RUNS[key] = (r, tmodel)
    return _RUNS[key]


def test_setup_numbers(out, data):
    _, v = out
    counts = np.bincount(data.y_test, minlength=4)
    assert v["n_train"] == 1024 and v["n_test"] == 2048
    assert v["test_class_counts"] == counts.tolist()
    assert close(v["majority_class_accuracy"], counts.max() / 2048, 6)
    assert close(v["chance_loss"], math.log(4), 6)


def test_relu_of_normal_by_quadrature(out):
    _, v = out
    z = np.linspace(0.0, 12.0, 400001)
    pdf = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    mean = np.trapezoid(z * pdf, z)
    second = np.trapezoid(z * z * pdf, z)
    assert close(v["relu_of_normal_mean"], mean, 6)
    assert close(v["relu_of_normal_std"], math.sqrt(second - mean ** 2), 6)


@pytest.mark.parametrize("name", list(KEYS))
def test_activation_stats_match_pytorch(out, name):
    _, v = out
    r, _ = reference(name)
    for e in (0, 1, 5, 20):
        means, stds = r["snapshots"][e]
        close_list(v[f"act_mean {KEYS[name]} e{e}"], means, 4)
        close_list(v[f"act_std {KEYS[name]} e{e}"], stds, 4)


def test_activation_stats_at_init_by_hand(out, data):
    """Epoch 0, independently of PyTorch too: a NumPy forward from the initial weights."""
    _, v = out
    for name in ("plain, default init", "BN, default init"):
        model = s1.build(name)
        h = data.x_train[:512]
        stds = []
        for layer in model:
            kind = type(layer).__name__
            if kind == "Linear":
                h = h @ np.asarray(layer.weight.data, np.float64).T + np.asarray(layer.bias.data, np.float64)
            elif kind == "BatchNorm1d":       # gamma = 1, beta = 0 at init
                h = (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + 1e-5)
            elif kind == "ReLU":
                h = np.maximum(h, 0)
                stds.append(h.std())
        close_list(v[f"act_std {KEYS[name]} e0"], stds, 4)
    bias_floor = math.sqrt(0.5 - 1 / (2 * math.pi)) / math.sqrt(3 * 64)
    assert close(v["bias_floor_std"], bias_floor, 4)
    s = v["act_std plain_default e0"]
    assert close(v["plain_default_std_ratio_layer1_to_layer8"], s[0] / s[-1], 1)


@pytest.mark.parametrize("name", list(KEYS))
def test_training_curves_match_pytorch(out, name):
    _, v = out
    r, _ = reference(name)
    k = KEYS[name]
    close_list(v[f"loss {k}"], r["train_loss"], 4)
    close_list(v[f"train_acc {k}"], r["train_acc"], 4)
    close_list(v[f"test_acc {k}"], r["test_acc"], 4)
    first = next((i + 1 for i, x in enumerate(v[f"loss {k}"]) if x < 0.5), float("nan"))
    printed = v[f"epochs_to_loss_below_0.5 {k}"]
    assert (math.isnan(first) and math.isnan(printed)) or printed == first


@pytest.mark.parametrize("key,label,index", [("gain", "plain", 0), ("gain", "plain", 4), ("gain", "BN", 0),
                                             ("gain", "BN", 5), ("lr", "plain", 5), ("lr", "BN", 5)])
def test_sweep_points_match_pytorch(out, key, label, index):
    """A few points of the init and learning-rate sweeps, including a diverged and a stalled one."""
    _, v = out
    name = "plain, He init" if label == "plain" else "BN, He init"
    gain, lr = math.sqrt(2.0), 0.1
    if key == "gain":
        gain = v["gains"][index]
        gain = math.sqrt(2.0) if abs(gain - math.sqrt(2.0)) < 1e-4 else gain
    else:
        lr = v["lrs"][index]
    r, _ = reference(name, epochs=10, lr=lr, gain=gain, each_epoch=False)
    loss = v[f"{key}_sweep_loss {label}"][index]
    acc = v[f"{key}_sweep_test_acc {label}"][index]
    if r["diverged"]:
        assert math.isnan(loss) and math.isnan(acc)
    else:
        assert close(loss, r["train_loss"][-1], 4) and close(acc, r["test_acc"][-1], 4)


def test_sweep_summaries_follow_the_table(out):
    _, v = out
    for key, xs in (("gain", "gains"), ("lr", "lrs")):
        for label in ("plain", "BN"):
            losses = v[f"{key}_sweep_loss {label}"]
            ok = [x for x, l in zip(v[xs], losses) if not math.isnan(l) and l < 1.0]
            assert np.allclose(v[f"{xs}_reaching_loss_below_1 {label}"], np.round(ok, 2))


def test_generalization_matches_pytorch(out):
    text, v = out
    gaps = {}
    for name in ("plain, He init", "BN, He init"):
        k = KEYS[name]
        runs = [reference(name, seed=s) for s in (0, 1, 2)]
        tr = [r["train_acc"][-1] for r, _ in runs]
        te = [r["test_acc"][-1] for r, _ in runs]
        close_list(v[f"final_train_acc {k}"], tr, 4)
        close_list(v[f"final_test_acc {k}"], te, 4)
        close_list(v[f"gap {k}"], [a - b for a, b in zip(tr, te)], 4)
        gaps[k] = np.mean([a - b for a, b in zip(tr, te)])
        assert close(v[f"mean_gap {k}"], gaps[k], 4)
        assert close(v[f"mean_test_acc {k}"], np.mean(te), 4)
    # the sentence follows the numbers
    if gaps["bn_he"] >= gaps["plain_he"]:
        assert "no regularization effect here" in text
    else:
        assert "consistent with a regularization effect" in text


def test_running_statistics_section_matches_pytorch(out, data):
    _, v = out
    _, tmodel = reference("BN, He init")
    assert close(v["test_acc_running_stats"], accuracy(tmodel, data.x_test, data.y_test), 6)
    m = copy.deepcopy(tmodel)
    m.train()
    with torch.no_grad():
        pred = np.concatenate([m(torch.tensor(data.x_test[i:i + 64])).argmax(1).numpy()
                               for i in range(0, 2048, 64)])
    assert close(v["test_acc_batch_stats_64"], float(np.mean(pred == data.y_test)), 6)
    m = copy.deepcopy(tmodel)
    for layer in m:
        if isinstance(layer, torch.nn.BatchNorm1d):
            layer.reset_running_stats()
    assert close(v["test_acc_reset_running_stats"], accuracy(m, data.x_test, data.y_test), 6)


def test_statements_quote_the_printed_numbers(out):
    text, v = out
    shrink = re.search(r"shrinks the ReLU outputs' std ([\d.]+)x", text)
    assert shrink and close(float(shrink.group(1)), v["plain_default_std_ratio_layer1_to_layer8"], 1)
    assert f"loss {v['loss plain_default'][-1]:.3f}" in text
