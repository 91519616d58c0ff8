"""Section 4: the article's static-vs-dynamic experiment, the non-stationary one, and lesson 4.

References: the batches are regenerated here from the seed (NumPy's
``default_rng(seed).standard_normal((16, 5))`` as float32, 50 for the static
run, the next 50 for the dynamic run, as the article's script draws them), the
EMA is a float64 NumPy loop written here, and PyTorch runs the article's own
code on the same batches.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from lesson_utils import REPO, parse_pairs, parse_values, run_lesson
from minibn.figures import s4_dynamic_momentum as s4


def article_momentum(epoch):
    return max(0.9 - (epoch / 50), 0.1)             # the article's line


def regenerate(seed):
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((16, 5)).astype(np.float32) for _ in range(100)]
    return batches[:50], batches[50:]


def numpy_traces(batches, momenta):
    """Per-step (mean over features of running_mean, same for running_var), float64."""
    rm, rv = np.zeros(5), np.ones(5)
    means, variances = [], []
    for x, a in zip(batches, momenta):
        x = x.astype(np.float64)
        mu = x.sum(axis=0) / len(x)
        var_u = ((x - mu) ** 2).sum(axis=0) / (len(x) - 1)
        rm = (1 - a) * rm + a * mu
        rv = (1 - a) * rv + a * var_u
        means.append(rm.mean())
        variances.append(rv.mean())
    return np.array(means), np.array(variances)


@pytest.fixture(scope="module")
def article_data():
    return s4.static_vs_dynamic_data()


@pytest.fixture(scope="module")
def batches():
    return regenerate(s4.ARTICLE_SEED)


# --------------------------------------------------------------------------- the article's experiment

def test_batches_are_the_seeded_numpy_stream(batches):
    static, dynamic = s4.article_batches()
    for a, b in zip(static + dynamic, batches[0] + batches[1]):
        assert a.dtype == np.float32 and a.shape == (16, 5)
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(static[0], dynamic[0])       # the article's two runs see different data


def test_traces_match_an_independent_numpy_ema(article_data, batches):
    static, dynamic = batches
    runs = article_data["runs"]
    cases = (("static", static, [0.9] * 50), ("dynamic", dynamic, [article_momentum(e) for e in range(50)]),
             ("dynamic_same_batches", static, [article_momentum(e) for e in range(50)]))
    for key, data, momenta in cases:
        m, v = numpy_traces(data, momenta)
        # float32 running buffers: agreement to float32 rounding of values of order 1
        np.testing.assert_allclose(runs[key]["mean"], m, atol=3e-7, err_msg=key)
        np.testing.assert_allclose(runs[key]["var"], v, atol=1e-6, err_msg=key)
        assert runs[key]["momentum"] == pytest.approx(momenta, abs=2e-16)


@pytest.mark.slow
def test_traces_match_pytorch_running_the_articles_code(article_data, batches):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class SimpleModel(nn.Module):                      # the article's code, verbatim in substance
        def __init__(self, momentum):
            super(SimpleModel, self).__init__()
            self.bn = nn.BatchNorm1d(5, momentum=momentum)

        def forward(self, x):
            return self.bn(x)

    def train_model(model, data_loader, dynamic_momentum=False):
        running_means, running_vars = [], []
        for epoch, batch in enumerate(data_loader):
            if dynamic_momentum:
                new_momentum = max(0.9 - (epoch / 50), 0.1)
                model.bn.momentum = new_momentum
            _ = model(batch)
            running_means.append(model.bn.running_mean.clone().cpu())
            running_vars.append(model.bn.running_var.clone().cpu())
        return running_means, running_vars

    static, dynamic = batches
    runs = article_data["runs"]
    for key, data, dyn in (("static", static, False), ("dynamic", dynamic, True),
                           ("dynamic_same_batches", static, True)):
        means, variances = train_model(SimpleModel(momentum=0.9), (torch.from_numpy(b) for b in data), dyn)
        np.testing.assert_allclose(runs[key]["mean"], [m.mean().item() for m in means], atol=1e-6,
                                   err_msg=key)
        np.testing.assert_allclose(runs[key]["var"], [v.mean().item() for v in variances], atol=2e-6,
                                   err_msg=key)


def test_committed_figure_json_matches_a_fresh_computation(article_data):
    path = os.path.join(REPO, "figures", "s4_static_vs_dynamic.json")
    with open(path) as f:
        committed = json.load(f)
    for key, run in article_data["runs"].items():
        np.testing.assert_allclose(committed["runs"][key]["mean"], run["mean"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(committed["runs"][key]["var"], run["var"], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- non-stationary data

def scenario_ref(name, steps=200):
    t = np.arange(steps)
    if name == "jump":
        return np.where(t >= 100, -1.0, 1.0), np.where(t >= 100, 2.0, 0.5)
    f = t / (steps - 1)
    return 1.0 - 2.0 * f, 0.5 + 1.5 * f


SCHEDULE_REFS = {
    "constant 0.9": lambda t: 0.9,
    "constant 0.1": lambda t: 0.1,
    "constant 0.01": lambda t: 0.01,
    "linear 0.9->0.1 in 40 (article)": lambda t: max(0.9 - t / 50, 0.1),
    "linear 0.9->0.01 in 100": lambda t: 0.01 if t >= 100 else 0.9 - t / 100 * 0.89,
    "exponential 0.9*0.95^t, floor 0.01": lambda t: max(0.9 * 0.95 ** t, 0.01),
    "cosine 0.9->0.01 in 100": lambda t: 0.01 if t >= 100 else 0.01 + 0.89 * (1 + np.cos(np.pi * t / 100)) / 2,
    "cumulative 1/(t+1)": lambda t: 1.0 / (t + 1),
}


@pytest.fixture(scope="module")
def small_ns():
    return s4.nonstationary_data(repeats=3, seed=11)


def test_nonstationary_errors_match_an_independent_ema(small_ns):
    """Regenerate the data (one Generator(seed); per scenario, jump then drift, a
    (steps, batch, features * repeats) standard-normal draw) and redo every EMA here."""
    rng = np.random.default_rng(11)
    C = 5 * 3
    assert list(small_ns["scenarios"]) == ["jump", "drift"]
    assert list(small_ns["momentum"]) == list(SCHEDULE_REFS)
    for scen in ("jump", "drift"):
        mu, sd = scenario_ref(scen)
        res = small_ns["scenarios"][scen]
        np.testing.assert_allclose(res["true_mean"], mu, atol=1e-15)
        np.testing.assert_allclose(res["true_var"], sd ** 2, atol=1e-15)
        z = rng.standard_normal((200, 16, C))
        for name, ref in SCHEDULE_REFS.items():
            momenta = [ref(t) for t in range(200)]
            np.testing.assert_allclose(small_ns["momentum"][name], momenta, rtol=1e-13, atol=1e-16)
            rm, rv = np.zeros(C), np.ones(C)
            mean_err, var_err = [], []
            for t in range(200):
                x = mu[t] + sd[t] * z[t]
                a = momenta[t]
                rm = (1 - a) * rm + a * x.mean(axis=0)
                rv = (1 - a) * rv + a * x.var(axis=0, ddof=1)
                mean_err.append(np.mean(np.abs(rm - mu[t])))
                var_err.append(np.mean(np.abs(rv / sd[t] ** 2 - 1)))
            got = res["schedules"][name]
            np.testing.assert_allclose(got["mean_err"], mean_err, rtol=1e-9, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(got["var_rel_err"], var_err, rtol=1e-9, atol=1e-12, err_msg=name)
            assert got["mean_err_windows"]["final"] == pytest.approx(np.mean(mean_err[180:]), rel=1e-9)
            if scen == "jump":
                below = [t for t in range(100, 200) if mean_err[t] < 0.2]
                assert got["recovery_steps"] == (below[0] - 100 if below else None)


@pytest.fixture(scope="module")
def full_ns():
    return s4.nonstationary_data()


def test_what_the_lesson_says_about_the_nonstationary_experiment(full_ns):
    """The lesson's statements, checked on the figure's data (fixed seeds)."""
    jump = full_ns["scenarios"]["jump"]["schedules"]
    drift = full_ns["scenarios"]["drift"]["schedules"]
    decayed = ["linear 0.9->0.01 in 100", "exponential 0.9*0.95^t, floor 0.01", "cosine 0.9->0.01 in 100"]
    w = lambda r, win: r["mean_err_windows"][win]                         # noqa: E731
    # stationary phase: small momentum wins; the cumulative average is the best estimate
    assert min(jump, key=lambda n: w(jump[n], "pre_shift")) == "cumulative 1/(t+1)"
    for n in decayed + ["cumulative 1/(t+1)"]:
        assert w(jump[n], "pre_shift") < w(jump["constant 0.9"], "pre_shift") / 3
    assert max(jump, key=lambda n: w(jump[n], "pre_shift")) == "constant 0.01"
    # a late shift: schedules that decayed to 0.01 adapt slowly, the cumulative average never forgets
    for n in decayed + ["cumulative 1/(t+1)", "constant 0.01"]:
        assert w(jump[n], "final") > 5 * w(jump["constant 0.1"], "final"), n
        assert jump[n]["recovery_steps"] is None
    assert max(jump, key=lambda n: w(jump[n], "final")) == "cumulative 1/(t+1)"
    assert jump["constant 0.1"]["recovery_steps"] == jump["linear 0.9->0.1 in 40 (article)"]["recovery_steps"]
    assert jump["constant 0.1"]["recovery_steps"] is not None
    # constant 0.1 (and the article's decay to 0.1) have the lowest final errors in both scenarios
    for res in (jump, drift):
        best = min(w(r, "final") for r in res.values())
        assert w(res["constant 0.1"], "final") == pytest.approx(best, rel=1e-3)
    assert max(drift, key=lambda n: w(drift[n], "final")) == "cumulative 1/(t+1)"


# --------------------------------------------------------------------------- lesson 4

@pytest.fixture(scope="module")
def lesson_out():
    return run_lesson(4)


def test_lesson_article_schedule_equality(lesson_out):
    v = parse_values(lesson_out)
    assert v["max |LinearDecay(0.9, 0.1, 40) - max(0.9 - epoch/50, 0.1)| over 50 steps"] <= 2e-16
    for t in (0, 10, 20, 40, 49):
        assert v[f"linear momentum({t})"] == pytest.approx(article_momentum(t), abs=5e-7)
    assert v["exponential momentum(10)"] == pytest.approx(0.9 * 0.95 ** 10, abs=5e-7)
    assert v["cosine momentum(10)"] == pytest.approx(0.1 + 0.4 * (1 + np.cos(np.pi / 4)), abs=5e-7)
    assert v["seed"] == s4.ARTICLE_SEED


def test_lesson_worked_steps(lesson_out, batches):
    v = parse_values(lesson_out)
    static = batches[0]
    rm, rv = np.zeros(5), np.ones(5)
    for t in range(3):
        x = static[t].astype(np.float64)
        mu, var_u = x.mean(axis=0), x.var(axis=0, ddof=1)
        rm, rv = 0.1 * rm + 0.9 * mu, 0.1 * rv + 0.9 * var_u
        np.testing.assert_allclose(v[f"static batch {t}: batch_mean"], mu, atol=5.1e-7)
        np.testing.assert_allclose(v[f"static batch {t}: batch_var_unbiased"], var_u, atol=5.1e-7)
        np.testing.assert_allclose(v[f"static batch {t}: running_mean"], rm, atol=5.1e-7)
        np.testing.assert_allclose(v[f"static batch {t}: running_var"], rv, atol=5.1e-7)
        assert v[f"static batch {t}: plotted mean"] == pytest.approx(rm.mean(), abs=5.1e-7)
        assert v[f"static batch {t}: plotted var"] == pytest.approx(rv.mean(), abs=5.1e-7)


def test_lesson_trace_table(lesson_out, batches):
    rows = []
    for line in lesson_out.splitlines():
        m = re.fullmatch(r"\s*(\d+) \|(.*)", line)
        if m and "|" in m.group(2):
            nums = [float(x) for x in m.group(2).replace("|", " ").split()]
            if len(nums) == 9:
                rows.append((int(m.group(1)), nums))
    assert [r[0] for r in rows] == list(range(50))
    table = np.array([r[1] for r in rows])
    static, dynamic = batches
    dyn_m = [article_momentum(e) for e in range(50)]
    for col, data, momenta in ((0, static, [0.9] * 50), (3, dynamic, dyn_m), (6, static, dyn_m)):
        m, v = numpy_traces(data, momenta)
        np.testing.assert_allclose(table[:, col], momenta, atol=5.1e-4)
        np.testing.assert_allclose(table[:, col + 1], m, atol=1e-6)
        np.testing.assert_allclose(table[:, col + 2], v, atol=2e-6)


def test_lesson_cumulative_and_summary(lesson_out, batches):
    v = parse_values(lesson_out)
    static = batches[0]
    avg = np.mean([b.astype(np.float64).mean(axis=0) for b in static], axis=0)
    assert v["max |Cumulative - momentum=None|"] == 0
    np.testing.assert_allclose(v["Cumulative schedule: running_mean"], avg, atol=1e-6)
    np.testing.assert_allclose(v["average of the 50 batch means"], avg, atol=5.1e-7)
    m, _ = numpy_traces(static, [0.9] * 50)
    assert v["static: mean |running mean - 0| over the last 10 batches"] == pytest.approx(
        np.mean(np.abs(m[-10:])), abs=1e-6)


def test_lesson_nonstationary_statements(lesson_out, full_ns):
    v = parse_values(lesson_out)
    jump = full_ns["scenarios"]["jump"]["schedules"]
    assert v["jump: lowest final mean error"].startswith("constant 0.1 (")
    assert v["jump: highest final mean error"].startswith("cumulative 1/(t+1)")
    assert v["drift: highest final mean error"].startswith("cumulative 1/(t+1)")
    printed = float(re.search(r"\(([\d.]+)\)$", v["jump: lowest final mean error"]).group(1))
    assert printed == pytest.approx(jump["constant 0.1"]["mean_err_windows"]["final"], abs=5.1e-5)
    # the table rows: schedule name, 4 mean-error windows, 4 variance windows (and recovery for jump)
    for name, r in jump.items():
        line = next(ln for ln in lesson_out.splitlines() if ln.strip().startswith(name))
        nums = [float(x) for x in re.findall(r"\d+\.\d{4}", line[len(name) + 2:])]
        np.testing.assert_allclose(nums[:4], list(r["mean_err_windows"].values()), atol=5.1e-5)
        np.testing.assert_allclose(nums[4:8], list(r["var_rel_err_windows"].values()), atol=5.1e-5)


def test_lesson_precise_bn_numbers(lesson_out):
    pairs = dict(parse_pairs(lesson_out))
    assert pairs["layer 1: max |precise mean - mean(h1 over all samples)|"] < 1e-12
    assert pairs["layer 1: max |precise var - var(h1, ddof=1)|"] < 1e-12
    assert pairs["values per channel used"] == 1024
    for layer in ("layer 1", "layer 2"):
        trained = pairs[f"{layer}, EMA after training: max |ema_mean - pop_mean| / pop_std"]
        frozen = pairs[f"{layer}, EMA after a frozen pass: max |ema_mean - pop_mean| / pop_std"]
        assert trained > frozen > 0
