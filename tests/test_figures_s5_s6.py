"""The numbers behind figures s5_small_batch_statistics and s6_naive_variance.

Checked against statistics computed here with plain NumPy and against sampling
theory (1/sqrt(m) for a mean, -1/m bias of the biased variance).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minibn.figures import FIGURES, load_all, save_figure
from minibn.figures import s5_sync_batchnorm as s5
from minibn.figures import s6_multi_gpu as s6


@pytest.fixture(scope="module")
def small():
    return s5.small_batch_data(per_rank=(2, 8, 32), ranks=8, channels=8, trials=60)


def test_split_statistics_are_the_per_rank_and_the_whole_batch_statistics(rng):
    x = rng.normal(4.0, 2.0, (24, 5))
    local, (N, mean, var) = s5.split_statistics(x, 3)
    assert N == 24 and [n for n, _, _ in local] == [8, 8, 8]
    for r, (_, m, v) in enumerate(local):
        part = x[8 * r:8 * (r + 1)]
        np.testing.assert_allclose(m, part.mean(axis=0), rtol=1e-14)
        np.testing.assert_allclose(v, ((part - part.mean(axis=0)) ** 2).mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, ((x - x.mean(axis=0)) ** 2).mean(axis=0), rtol=1e-13)


def test_syncbn_equals_the_global_batch_to_round_off(small):
    assert max(small["sync_mean_vs_batch"]) < 1e-13
    assert max(small["sync_var_vs_batch"]) < 1e-13
    assert min(small["local_mean_vs_batch"]) > 0.05      # per-rank BN is far off


def test_errors_follow_sampling_theory(small):
    b = np.array(small["per_rank"], dtype=np.float64)
    theory = {"local_mean_rms": 1 / np.sqrt(b), "sync_mean_rms": 1 / np.sqrt(8 * b),
              "local_var_rms": np.sqrt(2 * b - 1) / b, "sync_var_rms": np.sqrt(16 * b - 1) / (8 * b)}
    for key, want in theory.items():
        np.testing.assert_allclose(small[key], want, rtol=0.15, err_msg=key)
    ratio = np.array(small["local_mean_rms"]) / np.array(small["sync_mean_rms"])
    np.testing.assert_allclose(ratio, np.sqrt(8), rtol=0.15)
    # the biased variance shrinks by 1/m: -50% for per-rank BN at b = 2, 8 times less for SyncBN
    assert small["local_var_bias"][0] == pytest.approx(-0.5, abs=0.06)
    assert abs(small["sync_var_bias"][0]) < 0.15
    assert all(np.diff(small["local_mean_rms"]) < 0)


def test_small_batch_numbers_are_reproducible():
    a = s5.small_batch_data(per_rank=(2,), channels=4, trials=5)
    b = s5.small_batch_data(per_rank=(2,), channels=4, trials=5)
    assert json.dumps(a, default=lambda v: np.asarray(v).tolist()) == \
        json.dumps(b, default=lambda v: np.asarray(v).tolist())


def test_naive_variance_misses_the_between_rank_term():
    d = s6.naive_variance_data(spreads=(0.0, 1.0, 3.0), trials=30)
    assert max(d["max_merge_error"]) < 1e-13               # the article's formula: exact
    np.testing.assert_allclose(d["merged_ratio"], 1.0, atol=1e-13)
    # naive / true = 1 / (1 + between / within), between = (2/3) d^2 for means -d, 0, d
    np.testing.assert_allclose(d["naive_ratio"], [1.0, 1 / (1 + 2 / 3), 1 / (1 + 6)], rtol=0.06)


def test_figures_are_registered_and_written(tmp_path):
    load_all()
    for name in ("s5_small_batch_statistics", "s6_naive_variance"):
        assert name in FIGURES
    fig, data = FIGURES["s6_naive_variance"]()
    png, js = save_figure(fig, data, str(tmp_path), "s6_naive_variance")
    assert os.path.getsize(png) > 1000
    with open(js) as f:
        assert json.load(f)["ranks"] == 3


def test_committed_json_matches_the_data_function():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "figures",
                        "s6_naive_variance.json")
    if not os.path.exists(path):
        pytest.skip("figures not generated yet (make figures)")
    with open(path) as f:
        saved = json.load(f)
    fresh = s6.naive_variance_data()
    np.testing.assert_allclose(saved["naive_ratio"], fresh["naive_ratio"], rtol=1e-12)
