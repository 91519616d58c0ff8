"""Figures of section 1 (``s1_*``) and section 6.3 (``s6_batch_size_dependence``).

* determinism: each registered figure function, run twice (on a reduced setting, so the test
  stays fast), writes byte-identical PNG and JSON files;
* the committed ``figures/*.json`` numbers against independent recomputations: NumPy forward
  passes and formulas written here, and the same training done by PyTorch.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from experiment_reference import reference_rms

from minibn.experiments import mlp
from minibn.figures import FIGURES, save_figure
from minibn.figures import s1_intuition as s1
from minibn.figures import s6_alternatives as s6

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("s1_activation_stats", "s1_training_curves", "s1_init_lr_sweep", "s6_batch_size_dependence")


@pytest.fixture
def small(monkeypatch):
    """Every figure on a reduced setting (fewer samples, epochs and sweep points)."""
    monkeypatch.setitem(s1.SETUP, "n_train", 256)
    monkeypatch.setitem(s1.SETUP, "n_test", 256)
    monkeypatch.setitem(s1.SETUP, "epochs", 2)
    monkeypatch.setattr(s1, "SNAPSHOT_EPOCHS", (0, 1, 2))
    monkeypatch.setattr(s1, "SWEEP_GAINS", (0.5, 3.0))
    monkeypatch.setattr(s1, "SWEEP_LRS", (0.1, 3.0))
    monkeypatch.setattr(s1, "SWEEP_EPOCHS", 1)
    monkeypatch.setattr(s1, "GAP_SEEDS", (0, 1))
    monkeypatch.setattr(s6, "BATCH_SIZES", (1, 2, 8))
    monkeypatch.setattr(s6, "DRAWS", 3)
    monkeypatch.setattr(s6, "TRAIN_BATCH_SIZES", (8, 64))
    monkeypatch.setitem(s6.TRAIN, "n_train", 256)
    monkeypatch.setitem(s6.TRAIN, "epochs", 1)
    s1._run.cache_clear()
    yield
    s1._run.cache_clear()


def test_figures_are_registered():
    for name in NAMES:
        assert name in FIGURES


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_figure_is_deterministic(small, tmp_path, name):
    outputs = []
    for i in range(2):
        s1._run.cache_clear()             # recompute, do not reuse the first run's numbers
        fig, data = FIGURES[name]()
        paths = save_figure(fig, data, str(tmp_path / str(i)), name)
        outputs.append([read_bytes(p) for p in paths])
    assert outputs[0][0] == outputs[1][0], "PNG differs between two runs"
    assert outputs[0][1] == outputs[1][1], "JSON differs between two runs"
    assert outputs[0][0][:8] == b"\x89PNG\r\n\x1a\n"
    json.loads(outputs[0][1])


# --------------------------------------------------------------------------- committed numbers

def committed(name):
    path = os.path.join(REPO, "figures", f"{name}.json")
    if not os.path.exists(path):
        pytest.skip(f"figures/{name}.json not generated (python -m minibn figures {name})")
    with open(path) as f:
        return json.load(f)


def test_activation_stats_at_init_by_hand():
    """Epoch 0 of every configuration: a NumPy forward pass from the initial weights."""
    data = committed("s1_activation_stats")
    assert data["epochs"][0] == 0
    d = s1.dataset()
    for name, c in data["configs"].items():
        h = d.x_train[:s1.SETUP["probe"]]
        means, stds = [], []
        for layer in s1.build(name):
            kind = type(layer).__name__
            if kind == "Linear":
                h = h @ np.asarray(layer.weight.data, np.float64).T + np.asarray(layer.bias.data, np.float64)
            elif kind == "BatchNorm1d":        # training mode, gamma = 1, beta = 0
                h = (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + 1e-5)
            elif kind == "ReLU":
                h = np.maximum(h, 0.0)
                means.append(h.mean())
                stds.append(h.std())
        np.testing.assert_allclose(c["mean"][0], means, rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(c["std"][0], stds, rtol=1e-9, err_msg=name)


@pytest.mark.slow
def test_training_curve_matches_pytorch():
    pytest.importorskip("torch")
    from experiment_reference import to_torch, torch_train
    data = committed("s1_training_curves")
    d = s1.dataset()
    name = "BN, He init"
    r = torch_train(to_torch(s1.build(name)), d, data["setup"]["epochs"], data["setup"]["batch_size"],
                    data["setup"]["lr"])
    c = data["configs"][name]
    np.testing.assert_allclose(c["train_loss"], r["train_loss"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(c["test_acc"], r["test_acc"], rtol=0, atol=1e-12)
    g = data["generalization"]["configs"][name]
    assert g["test_acc"][0] == c["test_acc"][-1]
    np.testing.assert_allclose(g["gap"], np.subtract(g["train_acc"], g["test_acc"]), atol=1e-15)


def test_sweep_point_matches_pytorch():
    pytest.importorskip("torch")
    from experiment_reference import to_torch, torch_train
    data = committed("s1_init_lr_sweep")
    d = s1.dataset()
    i = 0                                   # BN at the smallest init gain
    r = torch_train(to_torch(s1.build("BN, He init", gain=data["gains"][i])), d, data["epochs"],
                    s1.SETUP["batch_size"], data["lr_for_gain_sweep"], evaluate_each_epoch=False)
    assert not r["diverged"]
    assert abs(data["gain_sweep"]["BN"]["final_train_loss"][i] - r["train_loss"][-1]) < 1e-8
    assert data["gain_sweep"]["BN"]["test_acc"][i] == r["test_acc"][-1]


def test_batch_size_dependence_output_by_formulas():
    data = committed("s6_batch_size_dependence")["output"]
    ref = reference_rms(data["batch_sizes"], data["draws"])
    for name, row in ref.items():
        np.testing.assert_allclose(data["rms_mean"][name], row, rtol=1e-9, atol=1e-12, err_msg=name)
    # and the stored sample is the one the generator draws
    rng = np.random.default_rng([0, 61])
    np.testing.assert_array_equal(np.asarray(data["x0"]), s6.draw_samples(1, rng)[0])


def test_batch_size_dependence_accuracy_point_matches_pytorch():
    pytest.importorskip("torch")
    from experiment_reference import to_torch, torch_train
    data = committed("s6_batch_size_dependence")["accuracy"]
    t = data["setup"]
    B = 64
    i = data["batch_sizes"].index(B)
    d = s6.dataset()
    model = mlp(d.dim, t["width"], t["depth"], d.classes, norm="gn", groups=t["groups"], seed=t["seed"])
    r = torch_train(to_torch(model), d, t["epochs"], B, data["lr"][i], momentum=t["momentum"],
                    seed=t["seed"], evaluate_each_epoch=False)
    assert abs(data["train_loss"]["GroupNorm(4)"][i] - r["train_loss"][-1]) < 1e-8
    assert data["test_acc"]["GroupNorm(4)"][i] == r["test_acc"][-1]
    assert math.isclose(data["lr"][i], t["base_lr"] * B / t["base_batch"])
    assert "Expected more than 1 value per channel" in data["bn_batch_1_error"]
