"""GroupNorm and RMSNorm: shapes, the formula against numpy, the hand-written backward rule
against jax.vjp, bad configuration."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layer_grads import abstract_init, check_bwd, random_params

import jaxnet
from jaxnet.norms import GroupNorm, RMSNorm

KEY = jax.random.key(0)

CASES = [
    (GroupNorm(2), (3, 5, 4)),        # (N, T, C), 2 groups of 2 channels
    (GroupNorm(3), (2, 4, 3, 6)),     # (N, H, W, C)
    (GroupNorm(1), (2, 6)),           # LayerNorm over the channels
    (GroupNorm(4), (2, 3, 4)),        # instance norm
    (RMSNorm(), (3, 5)),
    (RMSNorm(1e-3), (2, 3, 4)),
]
IDS = [f"{layer.label}{shape}" for layer, shape in CASES]


def numpy_group_norm(x, scale, bias, groups, eps):
    x = np.asarray(x)
    y = np.empty_like(x)
    size = x.shape[-1] // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            cells = x[n, ..., g * size:(g + 1) * size]
            y[n, ..., g * size:(g + 1) * size] = (cells - cells.mean()) / np.sqrt(cells.var()
                                                                                  + eps)
    return y * np.asarray(scale) + np.asarray(bias)


def numpy_rms_norm(x, scale, eps):
    x = np.asarray(x)
    return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * np.asarray(scale)


def reference(layer):
    eps = layer.config["epsilon"]
    if layer.kind == "group_norm":
        return lambda p, x: numpy_group_norm(x, p["scale"], p["bias"],
                                             layer.config["num_groups"], eps)
    return lambda p, x: numpy_rms_norm(x, p["scale"], eps)


def inputs(shape, seed=1):
    return jnp.asarray(2 + 3 * np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("layer,shape", CASES, ids=IDS)
def test_shapes_params_and_formula(layer, shape):
    out_shape, params = layer.init(KEY, shape)
    assert out_shape == shape and abstract_init(layer, (-1,) + shape[1:])[0] == (-1,) + shape[1:]
    assert set(params) == ({"scale", "bias"} if layer.kind == "group_norm" else {"scale"})
    chex.assert_trees_all_equal(params["scale"], jnp.ones(shape[-1]))
    _, params = random_params(layer, shape)
    x = inputs(shape)
    np.testing.assert_allclose(layer.apply(params, x), reference(layer)(params, x), rtol=1e-10)


@pytest.mark.parametrize("layer,shape", CASES, ids=IDS)
def test_backward_rule_equals_vjp_float64(layer, shape):
    _, params = random_params(layer, shape)
    check_bwd(layer, params, inputs(shape), jnp.float64)


@pytest.mark.parametrize("i", [1, 5])
def test_backward_rule_equals_vjp_float32(i):
    layer, shape = CASES[i]
    _, params = random_params(layer, shape)
    check_bwd(layer, params, inputs(shape), jnp.float32)


def test_group_norm_of_one_group_is_layer_norm_of_the_flattened_example():
    x = inputs((2, 3, 4))
    _, p = GroupNorm(1).init(KEY, x.shape)
    _, q = jaxnet.LayerNorm().init(KEY, (2, 12))
    chex.assert_trees_all_close(GroupNorm(1).apply(p, x).reshape(2, 12),
                                jaxnet.LayerNorm().apply(q, x.reshape(2, 12)), rtol=1e-10)


def test_rms_norm_of_a_constant_row_is_its_sign():
    x = jnp.full((1, 8), -3.0)
    _, p = RMSNorm(epsilon=1e-12).init(KEY, x.shape)
    chex.assert_trees_all_close(RMSNorm(epsilon=1e-12).apply(p, x), -jnp.ones((1, 8)),
                                rtol=1e-10)


def test_inside_serial():
    net = jaxnet.serial(jaxnet.Dense(8), GroupNorm(4), RMSNorm())
    out, params = abstract_init(net, (-1, 5, 3))
    assert out == (-1, 5, 8) and sorted(params) == ["dense_0", "group_norm_0", "rms_norm_0"]


# --- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: GroupNorm(0), "positive integer"),
    (lambda: GroupNorm(2.0), "positive integer"),
    (lambda: GroupNorm(2, epsilon=0.0), "epsilon must be positive"),
    (lambda: RMSNorm(-1e-6), "epsilon must be positive"),
])
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="num_groups=3 must divide the 4 channels"):
        GroupNorm(3).init(KEY, (2, 5, 4))


def test_wrong_shapes_name_layer_and_both_shapes():
    net = jaxnet.serial(GroupNorm(2), RMSNorm())
    _, params = net.init(KEY, (-1, 3, 4))
    with pytest.raises(jaxnet.ShapeError, match=r"group_norm_0: GroupNorm\(2\) expects inputs "
                                                r"of shape \(N, \.\.\., 4\), got \(2, 3, 6\)"):
        net.apply(params, jnp.ones((2, 3, 6)))
    with pytest.raises(jaxnet.ShapeError, match=r"RMSNorm expects inputs of shape \(\.\.\., 4\), "
                                                r"got \(2, 5\)"):
        RMSNorm().apply(params["rms_norm_0"], jnp.ones((2, 5)))
    with pytest.raises(jaxnet.ShapeError, match=r"got \(4,\)"):
        GroupNorm(2).init(KEY, (4,))
