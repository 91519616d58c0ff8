"""Lessons 2 and 3: every printed number against an independent computation."""
import math

import numpy as np
import pytest

from lesson_utils import matches_printed, parse_pairs, parse_values, run_lesson

EPS = 1e-5


@pytest.fixture(scope="module")
def out2():
    text = run_lesson(2)
    return text, parse_values(text)


@pytest.fixture(scope="module")
def out3():
    text = run_lesson(3)
    return text, parse_values(text)


def close(printed, exact, decimals):
    """The printed number is ``exact`` at the printed number of decimals."""
    return abs(printed - exact) <= 0.5 * 10.0 ** (-decimals) * (1 + 1e-9) + 1e-15


# --------------------------------------------------------------------------- lesson 2

X = [2.0, 4.0, 6.0, 8.0]
MU = sum(X) / 4
VAR = sum((a - MU) ** 2 for a in X) / 4
STD = math.sqrt(VAR + EPS)
XHAT = [(a - MU) / STD for a in X]
Y = [2.0 * h + 1.0 for h in XHAT]


def test_lesson2_statistics(out2):
    _, vals = out2
    assert vals["x"] == X
    assert vals["mu"] == 5.0 and vals["var"] == 5.0
    for i, a in enumerate(X, start=1):
        assert vals[f"sq_dev_{i}"] == (a - 5.0) ** 2
    assert close(vals["std"], STD, 9)
    assert close(vals["inv_std"], 1.0 / STD, 9)


def test_lesson2_normalized_and_output(out2):
    text, vals = out2
    for i in range(4):
        assert close(vals[f"x_hat_{i + 1}"], XHAT[i], 7)
        assert close(vals[f"y_{i + 1}"], Y[i], 7)
    assert close(vals["var(x_hat)"], VAR / (VAR + EPS), 9)
    # the article's printed values are shown next to minibn's ...
    article_lines = [line for line in text.splitlines() if "# article:" in line]
    printed = {line.split(" = ")[0]: line.split("# article:")[1].strip() for line in article_lines}
    assert printed["mu"] == "5.0" and printed["var"] == "5.0"
    assert [printed[f"x_hat_{i}"] for i in range(1, 5)] == ["-1.34", "-0.45", "0.45", "1.34"]
    assert [printed[f"y_{i}"] for i in range(1, 5)] == ["-1.68", "0.1", "1.9", "3.68"]
    # ... and each is the exact value at the article's number of decimals
    for i in range(4):
        assert matches_printed(XHAT[i], printed[f"x_hat_{i + 1}"])
        assert matches_printed(Y[i], printed[f"y_{i + 1}"])


def test_lesson2_rounding_explanation(out2):
    _, vals = out2
    for i in range(4):
        assert vals[f"y_from_rounded_{i + 1}"] == pytest.approx(2 * round(XHAT[i], 2) + 1, abs=1e-12)
        assert vals[f"y_exact_rounded_{i + 1}"] == round(Y[i], 2)
    assert vals["y_exact_rounded_2"] == 0.11 and vals["y_from_rounded_2"] == 0.10
    assert close(vals["y_1_without_eps"], 2 * -3 / math.sqrt(5) + 1, 7)
    assert close(vals["x_hat_1_if_eps_were_e^-5"], -3 / math.sqrt(5 + math.exp(-5)), 7)


def test_lesson2_backward(out2):
    _, vals = out2
    dy = vals["dy"]
    assert len(dy) == 4
    m = 4
    # the chain rule by hand, in plain Python: through x_hat, var and mu
    dxhat = [2.0 * d for d in dy]
    dvar = sum(g * (a - MU) for g, a in zip(dxhat, X)) * -0.5 * (VAR + EPS) ** -1.5
    dmu = -sum(dxhat) / STD
    dx = [g / STD + dvar * 2 * (a - MU) / m + dmu / m for g, a in zip(dxhat, X)]
    assert close(vals["dbeta"], sum(dy), 7)
    assert close(vals["dgamma"], sum(d * h for d, h in zip(dy, XHAT)), 7)
    for i in range(4):
        assert close(vals[f"dx_{i + 1}"], dx[i], 7)
        assert close(vals["dx_graph"][i], dx[i], 7)
    assert vals["max_abs_diff_closed_vs_graph"] < 1e-12
    assert vals["rel_error_vs_finite_differences"] < 1e-7
    assert abs(vals["sum(dx)"]) < 1e-12


def test_lesson2_eval_mode(out2):
    _, vals = out2
    rv = VAR * 4 / 3
    assert close(vals["running_mean"], 5.0, 7) and close(vals["running_var"], rv, 7)
    for i, a in enumerate(X, start=1):
        assert close(vals[f"y_eval_{i}"], 2 * (a - 5) / math.sqrt(rv + EPS) + 1, 7)
    assert vals["y_eval_single_sample_8"] == vals["y_eval_4"]
    assert vals["layer_y_train"] == pytest.approx([round(v, 7) for v in Y], abs=1e-12)


# --------------------------------------------------------------------------- lesson 3

def test_lesson3_article_example(out3):
    _, vals = out3
    r, expect = 0.0, []
    for mu in (5.0, 6.0, 7.0):
        r = 0.1 * r + 0.9 * mu
        expect.append(r)
    assert vals["running_mean_0"] == 0.0
    for t in range(3):
        assert close(vals[f"running_mean_{t + 1}"], expect[t], 6)
    assert expect[:2] == pytest.approx([4.5, 5.85]) and expect[2] == pytest.approx(6.885)
    assert close(vals["article_step3_error"], 6.765 - 6.885, 6)


def test_lesson3_says_where_the_article_is_wrong(out3):
    text, _ = out3
    line = [ln for ln in text.splitlines() if ln.startswith("running_mean_3")][0]
    assert "6.885000" in line and "# article: 6.765" in line


def test_lesson3_keras_convention(out3):
    _, vals = out3
    r = 0.0
    for t, mu in enumerate((5.0, 6.0, 7.0), start=1):
        r = 0.9 * r + 0.1 * mu
        assert close(vals[f"keras_running_mean_{t}"], r, 6)
        assert close(vals[f"minibn_momentum_0.1_running_mean_{t}"], r, 6)
    assert [vals[f"keras_running_mean_{t}"] for t in (1, 2, 3)] == [0.5, 1.05, 1.645]


def test_lesson3_running_variance(out3):
    _, vals = out3
    assert vals["batch_var_biased"] == 5.0
    assert close(vals["batch_var_unbiased"], 20 / 3, 6)
    rb = ru = 1.0
    for t in range(1, 4):
        rb = 0.1 * rb + 0.9 * 5.0
        ru = 0.1 * ru + 0.9 * 20 / 3
        assert close(vals[f"running_var_biased_{t}"], rb, 6)
        assert close(vals[f"running_var_unbiased_{t}"], ru, 6)
    assert close(vals["minibn_running_var"], ru, 6)


def test_lesson3_bias_simulation(out3):
    _, vals = out3
    sigma2, n = 4.0, 200_000
    for m in (2, 4, 8, 32):
        # standard error of the mean of n unbiased sample variances of normal data
        se = sigma2 * math.sqrt(2.0 / (m - 1)) / math.sqrt(n)
        assert abs(vals[f"mean_unbiased_var_m{m}"] - sigma2) < 5 * se
        assert abs(vals[f"mean_biased_var_m{m}"] - (m - 1) / m * sigma2) < 5 * se
    # the m = 2 biased average is clearly below sigma^2: the bias is not noise
    assert sigma2 - vals["mean_biased_var_m2"] > 100 * sigma2 * math.sqrt(2.0) / math.sqrt(n)


def test_lesson3_layer_and_inference(out3):
    _, vals = out3
    se = 4.0 * math.sqrt(2.0 / 3) / math.sqrt(8000)
    assert abs(vals["layer_running_mean"] - 3.0) < 0.05
    assert abs(vals["layer_running_var"] - 4.0) < 5 * se
    assert abs(vals["average_of_biased_var"] - 3.0) < 5 * se
    ratio = vals["eval_output_std_with_biased_running_var"] / vals["eval_output_std_with_unbiased_running_var"]
    assert ratio == pytest.approx(math.sqrt(vals["layer_running_var"] / vals["average_of_biased_var"]),
                                  rel=2e-3)
    assert abs(vals["eval_output_std_with_unbiased_running_var"] - 1.0) < 0.03
    rm, rv = 6.885, 0.1 * (0.1 * (0.1 + 6.0) + 6.0) + 6.0       # from the steps above
    for i, a in enumerate(X, start=1):
        assert close(vals[f"eval_x_hat_{i}"], (a - rm) / math.sqrt(rv + EPS), 6)
    assert vals["eval_x_hat_of_6_alone"] == vals["eval_x_hat_3"]
    assert vals["eval_num_batches_tracked"] == 3


def test_parse_helpers():
    text = "a = 1 + 2 = 3.5    # note = 7\nb = [1, -2.5]\nc = [1 2 3e-1]\nno equals here\nd = text"
    assert parse_values(text) == {"a": 3.5, "b": [1.0, -2.5], "c": [1.0, 2.0, 0.3], "d": "text"}
    assert parse_pairs("x = 1\nx = 2") == [("x", 1.0), ("x", 2.0)]
    assert matches_printed(0.1056, "0.1") and not matches_printed(0.1056, "0.10")
