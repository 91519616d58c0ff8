"""Section 2's figure: its numbers against the hand formulas, and byte-identical renders."""
import json
import math
import os

import pytest

from minibn.figures import make_figures
from minibn.figures.s2_core_logic import example_activations_data
from lesson_utils import REPO, matches_printed

NAME = "s2_example_activations"


def hand_computation():
    x = [2.0, 4.0, 6.0, 8.0]
    gamma, beta, eps = 2.0, 1.0, 1e-5
    mu = sum(x) / len(x)
    var = sum((v - mu) ** 2 for v in x) / len(x)
    x_hat = [(v - mu) / math.sqrt(var + eps) for v in x]
    return {"x": x, "mean": mu, "var": var, "x_hat": x_hat, "y": [gamma * v + beta for v in x_hat],
            "gamma": gamma, "beta": beta, "eps": eps}


def check_numbers(data):
    ref = hand_computation()
    for key in ("x", "x_hat", "y"):
        assert data[key] == pytest.approx(ref[key], rel=1e-14, abs=1e-14), key
    for key in ("mean", "var", "gamma", "beta", "eps"):
        assert data[key] == pytest.approx(ref[key], rel=1e-15), key
    # and the article's printed values are these, rounded
    for v, p in zip(data["x_hat"], ["-1.34", "-0.45", "0.45", "1.34"]):
        assert matches_printed(v, p)
    for v, p in zip(data["y"], ["-1.68", "0.1", "1.9", "3.68"]):
        assert matches_printed(v, p)


def test_data_function_matches_hand_formulas():
    data = example_activations_data()
    check_numbers({k: (list(v) if hasattr(v, "__len__") else v) for k, v in data.items()})


def test_rendered_json_and_identical_png_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_figures(str(a), names=[NAME], progress=False)
    make_figures(str(b), names=[NAME], progress=False)
    with open(a / f"{NAME}.json") as f:
        data = json.load(f)
    check_numbers(data)
    png_a = (a / f"{NAME}.png").read_bytes()
    assert png_a[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_a == (b / f"{NAME}.png").read_bytes()
    assert (a / f"{NAME}.json").read_bytes() == (b / f"{NAME}.json").read_bytes()


def test_committed_json_is_current():
    """The committed figures/NAME.json holds the same numbers (skipped before it is generated)."""
    path = os.path.join(REPO, "figures", f"{NAME}.json")
    if not os.path.exists(path):
        pytest.skip("figures/ not generated yet")
    with open(path) as f:
        check_numbers(json.load(f))
