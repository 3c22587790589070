"""summary, collapse_linear and check_activation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fast import normal, numpy_init

import jaxnet
from jaxnet import Dense, Identity, Relu, check_activation, collapse_linear, residual, serial

KEY = jax.random.key(0)


# --- summary -----------------------------------------------------------------

def test_summary_of_the_course_deep_net():
    s = jaxnet.summary(jaxnet.mlp([50, 50], 10, "relu", "softmax"), (-1, 784))
    assert s.depth == 2  # two hidden layers
    assert s.width == 50  # the widest layer
    assert s.widths == [50, 50, 10]
    assert s.param_count == 784 * 50 + 50 + 50 * 50 + 50 + 50 * 10 + 10
    assert s.output_shape == (-1, 10)
    assert [i.output_shape for i in s.layers][:2] == [(-1, 50), (-1, 50)]
    table = str(s)
    assert "dense_0" in table and "Dense(50)" in table and "depth 2" in table
    assert "width 50" in table and "42,310" in table


def test_summary_counts_match_init():
    net = serial(Dense(32), Relu, residual(Dense(32), jaxnet.Tanh, Dense(32)), jaxnet.LayerNorm(),
                 Dense(128), Relu, Dense(3))
    s = jaxnet.summary(net, (-1, 7))
    _, params = jax.eval_shape(lambda: net.init(KEY, (-1, 7)))  # init's shapes, not compiled
    assert s.param_count == sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert (s.depth, s.width) == (4, 128)
    assert "residual_0/dense_1" in [i.path for i in s.layers]


def test_summary_linear_model_has_depth_zero():
    s = jaxnet.summary(Dense(1), (-1, 2))
    assert (s.depth, s.width, s.param_count) == (0, 1, 3)


# --- linear collapse -----------------------------------------------------------

# The params below are numpy draws (tests/_fast.py) with nonzero biases, so that the folded
# biases are checked too; both nets' outputs are computed in one compiled program.

def _outputs(net, params, new_net, new_params, in_dim):
    return jax.jit(lambda p, q, x: (new_net.apply(q, x), net.apply(p, x)))(
        params, new_params, normal((5, in_dim), 1))


def _outputs_equal(net, params, new_net, new_params, in_dim):
    chex.assert_trees_all_close(*_outputs(net, params, new_net, new_params, in_dim),
                                rtol=1e-10, atol=1e-12)


def test_two_dense_layers_are_one():
    net = serial(Dense(9), Dense(4))  # the seed's 8x9 and 9x4 example
    _, params = numpy_init(net, (-1, 8))
    new_net, new_params = collapse_linear(net, params)
    assert list(new_params) == ["dense_0"]
    assert new_params["dense_0"]["w"].shape == (8, 4)
    w1, w2 = params["dense_0"]["w"], params["dense_1"]["w"]
    chex.assert_trees_all_close(new_params["dense_0"]["w"], w1 @ w2, rtol=1e-12)
    chex.assert_trees_all_close(new_params["dense_0"]["b"],
                                params["dense_0"]["b"] @ w2 + params["dense_1"]["b"], rtol=1e-12)
    _outputs_equal(net, params, new_net, new_params, 8)


def test_runs_fuse_but_nonlinearities_stay():
    net = serial(Dense(6), Identity, Dense(5), Dense(4), Relu, Dense(3), Dense(2),
                 residual(Dense(5), Dense(2)))
    _, params = numpy_init(net, (-1, 3))
    new_net, new_params = collapse_linear(net, params)
    assert [c.label for _, c in new_net.children] == ["Dense(4)", "Relu", "Dense(2)", "residual"]
    assert jaxnet.summary(new_net, (-1, 3)).depth == 2
    _outputs_equal(net, params, new_net, new_params, 3)


def test_collapse_of_a_nonlinear_net_changes_nothing():
    net = jaxnet.mlp([8, 8], 2, "tanh")
    _, params = numpy_init(net, (-1, 3))
    new_net, new_params = collapse_linear(net, params)
    assert jaxnet.summary(new_net, (-1, 3)).widths == [8, 8, 2]
    _outputs_equal(net, params, new_net, new_params, 3)


def test_collapse_of_a_linear_mlp():
    net = jaxnet.mlp([16, 16, 16], 3, activation="identity")
    _, params = numpy_init(net, (-1, 4))
    new_net, new_params = collapse_linear(net, params)
    assert jaxnet.summary(new_net, (-1, 4)).depth == 0
    _outputs_equal(net, params, new_net, new_params, 4)


def test_collapse_inside_mixed_precision_keeps_the_policy():
    net = jaxnet.mixed_precision(jaxnet.mlp([16, 16], 3, activation="identity"), "float32")
    _, params = numpy_init(net, (-1, 4))
    new_net, new_params = collapse_linear(net, params)
    assert new_net.kind == "mixed_precision"
    assert new_net.config["policy"] == net.config["policy"]
    assert jaxnet.summary(new_net, (-1, 4)).depth == 0
    # float32 compute: W₁(W₂W₃) against (xW₁)W₂W₃ differ by reassociation, a few float32
    # ulps (eps 1.2e-7) on sums of 16 terms.
    chex.assert_trees_all_close(*_outputs(net, params, new_net, new_params, 4),
                                rtol=1e-5, atol=1e-6)


def test_collapse_needs_a_jaxnet_net():
    from jax.example_libraries import stax

    with pytest.raises(TypeError, match="needs a jaxnet net"):
        collapse_linear(stax.Relu, ())
    assert collapse_linear(Relu, {}) == (Relu, {})  # a lone leaf: nothing to fuse


# --- check_activation ------------------------------------------------------------

@pytest.mark.parametrize("name", list(jaxnet.ACTIVATIONS))
def test_every_builtin_activation_passes(name):
    report = check_activation(name)
    assert report.passed
    assert report["derivative_vs_grad"].max_abs_err < 1e-9
    assert {"finite_float16", "finite_bfloat16", "finite_float32", "finite_float64"} <= {
        c.name for c in report.checks}


def _softsign(a):
    return a / (1 + jnp.abs(a))  # softsign


def _softsign_derivative(a):
    return 1 / (1 + jnp.abs(a)) ** 2


def test_a_users_activation_passes():
    report = check_activation(_softsign, _softsign_derivative, name="softsign",
                              monotonic=True, continuous=True, differentiable=True)
    assert report.passed
    assert "softsign" in str(report) and "all checks passed" in str(report)


def test_a_wrong_derivative_fails_loudly():
    with pytest.raises(jaxnet.ActivationCheckError, match="derivative_vs_grad"):
        check_activation(jnp.tanh, lambda a: 1 - jnp.tanh(a) ** 2 + 1e-3 * a)
    report = check_activation(jnp.tanh, lambda a: 1 - jnp.tanh(a), raise_on_failure=False)
    assert not report.passed
    assert not report["derivative_vs_finite_differences"].passed
    assert report["derivative_vs_grad"].max_abs_err > 0.1


def test_false_claims_fail():
    report = check_activation(jnp.sin, jnp.cos, monotonic=True, raise_on_failure=False)
    assert not report["monotonic"].passed
    report = check_activation(jax.nn.relu, lambda a: (a > 0).astype(a.dtype),
                              differentiable=True, raise_on_failure=False)
    assert not report["differentiable"].passed
    assert report["derivative_vs_grad"].passed  # away from the kink the derivative is right
    step = check_activation(lambda a: jnp.where(a > 0, 1.0, 0.0) + 0.0 * a, jnp.zeros_like,
                            continuous=True, raise_on_failure=False)
    assert not step["continuous"].passed


def test_nan_derivative_fails():
    report = check_activation(jnp.exp, lambda a: jnp.exp(a) * jnp.where(a > 5000, jnp.nan, 1.0),
                              raise_on_failure=False)
    assert not report.passed


def test_needs_a_derivative():
    with pytest.raises(ValueError, match="derivative"):
        check_activation(jnp.tanh)


def test_report_numbers_are_floats():
    report = check_activation("sigmoid")
    for c in report.checks:
        assert isinstance(c.max_abs_err, float) and np.isfinite(c.max_abs_err)
