"""Smoke runs of the examples with small settings; each checks the numbers it prints."""

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minimal_example_finds_w_fast_and_b_slowly(capsys):
    results = example("minimal_example").main([])
    early, late = results[100], results[1000]
    np.testing.assert_allclose(early["w"], [2, -3], atol=0.05)
    assert 4.2 < early["b"] < 4.45  # 1 − 0.98¹⁰⁰ ≈ 87 % of the way from ~0 to 5
    np.testing.assert_allclose(late["w"], [2, -3], atol=0.05)
    assert abs(late["b"] - 5) < 0.05
    assert abs(late["loss"] - 1 / 6) < 0.02  # the noise: Var(U(−1, 1)) / 2
    assert "0.98" in capsys.readouterr().out


def test_softmax_output_reproduces_the_course_numbers():
    r = example("softmax_output").main([])
    assert r["sum_exp"] == pytest.approx(8, abs=0.01)
    np.testing.assert_allclose(r["softmax"], [0.1, 0.2, 0.7], atol=0.005)
    assert r["jacobian_error"] < 1e-6 and r["grad_minus_delta"] < 1e-6
    np.testing.assert_allclose(r["row_sums"], 1, atol=1e-6)


def test_linear_collapse_gives_the_same_predictions():
    r = example("linear_collapse").main(["--epochs", "2"])
    assert r["collapse_max_difference"] < 1e-5
    assert r["collapsed_same_predictions"]
    assert r["collapsed"] == r["3 hidden layers of 64, identity"]


def test_custom_activation_is_checked_and_trains_with_manual_and_automatic_gradients():
    r = example("custom_activation").main(["--epochs", "1"])
    assert r["check_passed"] and not r["wrong_derivative_passed"]
    assert r["manual"] > 0.5 and abs(r["manual"] - r["auto"]) < 0.01


def test_deep_net_trains_on_mnist5k():
    r = example("deep_net").main(["--epochs", "1"])
    assert r["epochs_run"] == 1 and r["test_accuracy"] > 0.5


def test_mnist1d_example_runs_the_paper_mlp():
    r = example("mnist1d").main(["--steps", "80"])
    assert r["steps"] == 80 and len(r["test_accuracy"]) == 1
    assert r["test_accuracy"][0] > 0.15  # 10 classes: chance is 0.1


def test_mnist1d_cnn_example_runs_the_paper_cnn(xla_optimized):
    r = example("mnist1d_cnn").main(["--seeds", "0", "--steps", "80"])
    assert r["params"] == 5210 and r["steps"] == 80 and len(r["test_accuracy"]) == 1
    assert r["test_accuracy"][0] > 0.15  # 10 classes: chance is 0.1


def test_transformer_example_trains_with_manual_and_automatic_gradients():
    r = example("transformer").main(["--quick"])
    assert r["causal_leak"] == 0
    assert r["max_loss_difference"] < 1e-4
    assert r["auto_losses"][-1] < r["auto_losses"][0]


def test_digits_cnn_example_trains_with_batchnorm(xla_optimized):
    r = example("digits_cnn").main(["--seeds", "0", "--epochs", "1"])
    assert r["state_count"] == 256 and r["epochs_run"] == [1]
    assert r["test_accuracy"][0] > 0.5


def test_custom_layer_is_checked_and_trains_with_manual_gradients():
    out = example("custom_layer").main()
    assert out["check_passed"] and out["accuracy"] > 0.9
