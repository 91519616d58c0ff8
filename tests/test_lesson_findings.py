"""Every lesson states its findings in its output ("Finding: ..." lines, built from the computed
numbers); these tests check each sentence against an independent computation, the numbers the
lesson prints elsewhere, or the committed figure JSON of its section."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from lesson_utils import REPO, parse_values, run_lesson

pytestmark = pytest.mark.slow          # each test runs lessons

NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def findings(out):
    return [line for line in out.splitlines() if line.startswith("Finding: ")]


def finding(out, start):
    """The one finding whose text begins with ``start`` (after ``Finding: ``)."""
    found = [f for f in findings(out) if f.startswith("Finding: " + start)]
    assert len(found) == 1, f"expected one finding starting {start!r}, got {found}\n{out[-3000:]}"
    return found[0]


def numbers(text):
    return [float(x) for x in re.findall(NUMBER, text)]


def committed(name):
    with open(os.path.join(REPO, "figures", f"{name}.json")) as f:
        return json.load(f)


def run(number, tmp_path, *args):
    out = run_lesson(number, *args, env={"MINIBN_LESSON_FIGURES": str(tmp_path)})
    return out


def test_lesson_02_findings_quote_the_exact_and_rounded_numbers(tmp_path):
    out = run(2, tmp_path)
    x = np.array([2.0, 4.0, 6.0, 8.0])
    var = float(np.mean((x - x.mean()) ** 2))
    x_hat = (x - x.mean()) / math.sqrt(var + 1e-5)
    y = 2 * x_hat + 1
    first = finding(out, "the article's x_hat")
    article, exact = first.split(" are the exact values ")
    assert numbers(article.split("x_hat")[1]) == [-1.34, -0.45, 0.45, 1.34]
    np.testing.assert_allclose(numbers(exact), x_hat, atol=1e-7)
    np.testing.assert_allclose(np.round(x_hat, 2), [-1.34, -0.45, 0.45, 1.34])
    second = finding(out, "the article's y")
    lists = [numbers(m) for m in re.findall(r"\[([^\]]*)\]", second)]
    np.testing.assert_allclose(lists[0], 2 * np.round(x_hat, 2) + 1, atol=1e-12)
    np.testing.assert_allclose(lists[1], y, atol=1e-7)
    np.testing.assert_allclose(lists[2], np.round(y, 2), atol=1e-12)
    err = float(np.max(np.abs(np.round(x_hat, 2) - x_hat)))
    assert second.endswith(f"error of {err:.4f} to {2 * err:.4f}.")
    third = finding(out, "eps = 1e-05 moves y_1")
    moved = numbers(third.split("by only")[1])[0]
    assert moved == pytest.approx(abs(y[0] - (2 * -3 / math.sqrt(5) + 1)), rel=0.05)
    assert os.path.exists(tmp_path / "s2_example_activations.png")


def test_lesson_04_findings_match_the_section_4_figures(tmp_path):
    out = run(4, tmp_path)
    summary = committed("s4_static_vs_dynamic")["summary"]
    err = {k: s["mean_abs_err_last10"] for k, s in summary.items()}
    batches = finding(out, "the article's script gives the dynamic run the next 50 batches")
    same, static, ratio, article = [v for v in numbers(batches) if v not in (50.0, 10.0, 0.0)]
    assert same == pytest.approx(err["dynamic_same_batches"], abs=5e-5)
    assert static == pytest.approx(err["static"], abs=5e-5)
    assert article == pytest.approx(err["dynamic"], abs=5e-5)
    assert ratio == pytest.approx(err["static"] / err["dynamic_same_batches"], abs=0.05)

    ns = committed("s4_nonstationary")
    jump = ns["scenarios"]["jump"]["schedules"]
    post = {n: r["mean_err_windows"]["final"] for n, r in jump.items()}
    decayed = [n for n in jump if ns["momentum"][n][100] <= 0.01 + 1e-12]
    late = finding(out, "a late shift punishes")
    count = numbers(late.split("step 100, the ")[1])[0]
    low, high = numbers(late.split("mean errors of ")[1])[:2]
    assert count == len(decayed)
    assert low == pytest.approx(min(post[n] for n in decayed), abs=5e-4)
    assert high == pytest.approx(max(post[n] for n in decayed), abs=5e-4)
    assert high > 5 * post["constant 0.1"]          # the finding's claim, checked on the data
    pre = {n: r["mean_err_windows"]["pre_shift"] for n, r in jump.items()}
    best = min(pre, key=pre.get)
    assert f"is {best}'s {pre[best]:.4f}" in finding(out, "on stationary data")
    assert os.path.exists(tmp_path / "s4_static_vs_dynamic.png")
    assert os.path.exists(tmp_path / "s4_nonstationary.png")
    values = parse_values(out)
    precise = finding(out, "precise BN changes")
    assert numbers(precise) == [values["eval-mode loss with EMA statistics"],
                                values["eval-mode loss with precise statistics"],
                                values["eval-mode accuracy with EMA statistics"],
                                values["eval-mode accuracy with precise statistics"]]


def test_lesson_05_findings_statistics_not_activations(tmp_path):
    out = run(5, tmp_path)
    gathers = finding(out, "the article says SyncBN \"gathers activations")
    n_stats, n_bytes, n_act, act_bytes, batch = numbers(gathers)
    channels = 8                                    # the lesson's BN layer
    assert n_stats == 3 * (channels + 1) + 2 * channels and n_bytes == 8 * n_stats
    assert batch == 48 and n_act == batch * channels and act_bytes == 8 * n_act
    sync = finding(out, "SyncBN's merge")
    assert numbers(sync.split("global batch to ")[1])[0] < 1e-13
    small = committed("s5_small_batch_statistics")
    i2 = small["per_rank"].index(2)
    quoted = numbers(finding(out, "with 8 ranks of 2 samples each").split("each,")[1])
    np.testing.assert_allclose(quoted, [small["local_mean_rms"][i2], small["sync_mean_rms"][i2],
                                        -100 * small["local_var_bias"][i2], -100 * small["sync_var_bias"][i2]],
                               atol=0.051)
    assert os.path.exists(tmp_path / "s5_small_batch_statistics.png")


def test_lesson_06_findings_quote_the_naive_and_merged_variance(tmp_path):
    out = run(6, tmp_path)
    values = parse_values(out)
    naive, var = values["naive variance"], values["var_global"]
    text = finding(out, "the article's formula is right")
    lists = [numbers(m) for m in re.findall(r"\[([^\]]*)\]", text)]
    np.testing.assert_allclose(lists[0], naive, rtol=1e-8)
    np.testing.assert_allclose(lists[1], var, rtol=1e-8)
    np.testing.assert_allclose(lists[2], 100 * (1 - np.array(naive) / np.array(var)), atol=0.051)
    np.testing.assert_allclose(lists[3], values["literal prose"], rtol=1e-8)
    spread = committed("s6_naive_variance")
    i3 = spread["spreads"].index(3.0)
    quoted = numbers(finding(out, "over 40 draws per spread").split("falls to")[1])
    assert quoted[0] == pytest.approx(spread["naive_ratio"][i3], abs=5e-4)
    assert quoted[2] == pytest.approx(1 / (1 + 2 * 9 / 3), abs=5e-4)
    assert os.path.exists(tmp_path / "s6_naive_variance.png")


@pytest.mark.slow
def test_lesson_07_findings_come_from_the_measured_accuracies(tmp_path):
    out = run(7, tmp_path)
    values = parse_values(out)
    sizes = [int(b) for b in values["train_batch_sizes"]]
    acc = {name: values[f"test_acc {name}"] for name in ("BatchNorm", "GroupNorm(4)", "LayerNorm")}
    ok_from = next(b for i, b in enumerate(sizes)
                   if all(acc["BatchNorm"][j] >= max(acc["GroupNorm(4)"][j], acc["LayerNorm"][j]) - 0.03
                          for j in range(i, len(sizes))))
    assert values["bn_within_0.03_of_gn_ln_from_batch"] == ok_from
    text = finding(out, f"from batch {ok_from} on BN stays within 0.03")
    rows = [a[i] for a in acc.values() for i, b in enumerate(sizes) if b >= ok_from]
    assert numbers(text.split("within", 2)[2])[0] == pytest.approx(max(rows) - min(rows), abs=5e-4)
    assert "From batch 32 on" not in out or ok_from == 32
    small = finding(out, "at batch sizes 2, 4 BN reaches")
    quoted = numbers(small.split("accuracy")[1])
    np.testing.assert_allclose(quoted, [acc[k][i] for k in acc for i in (0, 1)], atol=5e-4)
    assert numbers(finding(out, "at batch 2 BN's training loss"))[1] == pytest.approx(
        values["final_train_loss BatchNorm"][0], abs=6e-4)
    assert os.path.exists(tmp_path / "s6_batch_size_dependence.png")


@pytest.mark.parametrize("number", [2, 4, 5, 6])
def test_every_finding_is_a_sentence_with_numbers(number, tmp_path):
    found = findings(run(number, tmp_path))
    assert found, f"lesson {number} prints no finding"
    for line in found:
        assert numbers(line), line
        assert line.rstrip().endswith("."), line
