"""Lesson 7 (section 6.3): printed numbers against NumPy formulas written here and PyTorch."""
from __future__ import annotations

import ast
import math

import numpy as np
import pytest

from experiment_reference import reference_rms
from lesson_utils import parse_values, run_lesson

from minibn.experiments import mlp
from minibn.figures import s6_alternatives as s6

pytestmark = pytest.mark.slow
EPS = 1e-5


def close(printed, exact, decimals):
    return abs(printed - exact) <= 0.5 * 10.0 ** (-decimals) * (1 + 1e-9) + 1e-12


def close_list(printed, exact, decimals):
    assert len(printed) == len(exact), (printed, exact)
    assert all(close(p, e, decimals) for p, e in zip(printed, exact)), (printed, exact)


@pytest.fixture(scope="module")
def out():
    text = run_lesson(7, timeout=600)
    return text, parse_values(text)


@pytest.fixture(scope="module")
def x(out):
    text, _ = out
    rows = [ast.literal_eval(line.split(" = ", 1)[1]) for line in text.splitlines()
            if line.startswith("x[0] = ") or line.startswith("x[1] = ")]
    return np.array(rows, dtype=np.float64)


def _check_group(v, label, values):
    m = values.size
    mu = values.sum() / m
    var = ((values - mu) ** 2).sum() / m
    assert v[f"{label}: values"] == values.ravel().tolist()
    assert close(v[f"{label}: mu"], mu, 6)
    assert close(v[f"{label}: var"], var, 6)
    close_list(v[f"{label}: x_hat"], ((values - mu) / math.sqrt(var + EPS)).ravel(), 4)


def test_article_example_read_two_ways(out):
    _, v = out
    a = np.array([2.0, 4.0, 6.0, 8.0])
    expect = (a - 5.0) / math.sqrt(5.0 + EPS)
    close_list(v["article_bn_x_hat"], expect, 4)
    close_list(v["article_ln_x_hat"], expect, 4)


def test_every_group_of_the_worked_example(out, x):
    _, v = out
    N, C, L = x.shape
    assert (N, C, L) == (2, 4, 3)
    for c in range(C):
        _check_group(v, f"BN channel {c}", x[:, c, :])
    for n in range(N):
        _check_group(v, f"LN sample {n}", x[n])
        for g in range(2):
            _check_group(v, f"GN sample {n} group {g}", x[n, 2 * g:2 * g + 2])
        for c in range(C):
            _check_group(v, f"IN sample {n} channel {c}", x[n, c])
    for name in ("BN", "LN", "GN", "IN"):
        assert v[f"max_abs_diff {name}"] < 1e-12


def test_batch_independence_lines(out, x):
    _, v = out
    # BN of sample 0 alone vs inside the batch, by the formulas
    mu_all, var_all = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    mu_0, var_0 = x[0].mean(axis=1), x[0].var(axis=1)
    in_batch = (x[0] - mu_all[:, None]) / np.sqrt(var_all[:, None] + EPS)
    alone = (x[0] - mu_0[:, None]) / np.sqrt(var_0[:, None] + EPS)
    assert close(v["sample0_alone_vs_in_batch BN"], np.max(np.abs(alone - in_batch)), 4)
    # split into two one-sample "GPUs": BN of each part is its instance-like normalization
    x1 = x[1]
    split1 = (x1 - x1.mean(axis=1)[:, None]) / np.sqrt(x1.var(axis=1)[:, None] + EPS)
    whole1 = (x1 - mu_all[:, None]) / np.sqrt(var_all[:, None] + EPS)
    assert close(v["two_gpus_vs_one BN"], max(np.max(np.abs(alone - in_batch)),
                                             np.max(np.abs(split1 - whole1))), 4)
    for name in ("LN", "GN", "IN"):
        assert v[f"sample0_alone_vs_in_batch {name}"] == 0.0
        assert v[f"two_gpus_vs_one {name}"] == 0.0
    assert v["bn_batch1_vs_instance_norm"] < 1e-12


def test_batch_one_errors(out):
    text, _ = out
    assert "BatchNorm1d on shape (1, 4): ValueError: Expected more than 1 value per channel" in text
    assert "InstanceNorm1d on shape (2, 4, 1): ValueError: Expected more than 1 spatial element" in text
    assert "bn_batch_1 = ValueError: Expected more than 1 value per channel when training" in text


def test_output_dependence_table(out):
    _, v = out
    bs = [int(b) for b in v["batch_sizes"]]
    ref = reference_rms(bs, s6.DRAWS)
    for name, row in ref.items():
        close_list(v[f"rms_mean {name}"], row, 4)
    # BN's dependence shrinks with the batch size; the others have none
    bn = ref["BatchNorm2d"]
    assert bn[bs.index(256)] < bn[bs.index(16)] < bn[bs.index(2)]


@pytest.mark.parametrize("norm,B", [("gn", 64), ("ln", 16), ("bn", 32), ("bn", 8)])
def test_accuracy_points_match_pytorch(out, norm, B):
    """Points where the training is not chaotic.  BN at batch 2 or 4 is: there minibn and
    PyTorch (both float64, both correct) start 1e-14 apart and the difference grows about
    1000x per epoch, to 2e-3 in the loss after 5 epochs at batch 4."""
    torch = pytest.importorskip("torch")
    from experiment_reference import to_torch, torch_train
    _, v = out
    t = s6.TRAIN
    bsz = [int(b) for b in v["train_batch_sizes"]]
    assert bsz == list(s6.TRAIN_BATCH_SIZES)
    d = s6.dataset()
    model = mlp(d.dim, t["width"], t["depth"], d.classes, norm=norm, groups=t["groups"], seed=t["seed"])
    lr = t["base_lr"] * B / t["base_batch"]
    assert close(v["learning_rates"][bsz.index(B)], lr, 5)
    r = torch_train(to_torch(model), d, t["epochs"], B, lr, momentum=t["momentum"], seed=t["seed"],
                    evaluate_each_epoch=False)
    name = s6.NORM_NAMES[norm]
    assert close(v[f"test_acc {name}"][bsz.index(B)], r["test_acc"][-1], 4)
    assert close(v[f"final_train_loss {name}"][bsz.index(B)], r["train_loss"][-1], 4)
    del torch


def test_summary_numbers_follow_the_table(out):
    _, v = out
    bsz = [int(b) for b in v["train_batch_sizes"]]
    bn, gn, ln = v["test_acc BatchNorm"], v["test_acc GroupNorm(4)"], v["test_acc LayerNorm"]
    first = next(b for i, b in enumerate(bsz)
                 if all(bn[j] >= max(gn[j], ln[j]) - 0.03 for j in range(i, len(bsz))))
    assert v["bn_within_0.03_of_gn_ln_from_batch"] == first
