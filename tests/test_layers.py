"""Layers and combinators: the stax contract, names, interop, optax, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.example_libraries import stax

import jaxnet
from jaxnet import (
    Dense,
    Dropout,
    FanInConcat,
    FanInSum,
    FanOut,
    Flatten,
    LayerNorm,
    parallel,
    residual,
    serial,
)

KEY = jax.random.key(0)

ACTIVATION_LAYERS = [jaxnet.Sigmoid, jaxnet.Tanh, jaxnet.Relu, jaxnet.Softmax, jaxnet.LogSoftmax,
                     jaxnet.LeakyRelu, jaxnet.Elu, jaxnet.Gelu, jaxnet.Softplus, jaxnet.Silu,
                     jaxnet.Identity]

# (layer, input shape) pairs: every layer and combinator.
CASES = [(layer, (3, 5)) for layer in ACTIVATION_LAYERS] + [
    (Dense(4), (3, 5)),
    (Dense(4), (2, 3, 5)),
    (Flatten, (3, 2, 4)),
    (Dropout(0.3), (3, 5)),
    (LayerNorm(), (3, 5)),
    (serial(Dense(6), jaxnet.Relu, Dense(2)), (3, 5)),
    (serial(FanOut(2), parallel(Dense(3), Dense(4)), FanInConcat()), (3, 5)),
    (serial(FanOut(3), parallel(Dense(4), jaxnet.Tanh, Dense(4)), FanInSum), (3, 4)),
    (residual(Dense(5), jaxnet.Relu, Dense(5)), (3, 5)),
    (jaxnet.mlp([8, 8], 3, "tanh", "softmax"), (3, 5)),
]
IDS = [jaxnet.layers.label_of(layer) + str(shape) for layer, shape in CASES]


def run(layer, shape, **kwargs):
    out_shape, params = layer[0](KEY, shape)
    x = jax.random.normal(jax.random.key(1), shape)
    return out_shape, params, x, layer[1](params, x, rng=jax.random.key(2), **kwargs)


@pytest.mark.parametrize("layer,shape", CASES, ids=IDS)
def test_init_output_shape_equals_apply_output_shape(layer, shape):
    out_shape, _, _, y = run(layer, shape)
    assert tuple(y.shape) == tuple(out_shape)


@pytest.mark.parametrize("layer,shape", CASES, ids=IDS)
def test_batch_axis_may_be_unknown_at_init(layer, shape):
    out_shape, _ = layer[0](KEY, (-1,) + shape[1:])
    assert out_shape[0] == -1


@pytest.mark.parametrize("layer,shape", CASES, ids=IDS)
def test_params_are_plain_dicts_of_arrays(layer, shape):
    _, params, _, _ = run(layer, shape)
    assert isinstance(params, dict)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert isinstance(leaf, jax.Array), path
        assert all(isinstance(k, jax.tree_util.DictKey) for k in path), path


@pytest.mark.parametrize("layer,shape", CASES, ids=IDS)
def test_layer_unpacks_like_stax(layer, shape):
    init_fun, apply_fun = layer
    assert callable(init_fun) and callable(apply_fun)
    assert layer.init is init_fun and layer.apply is apply_fun


def test_readable_unique_names():
    net = serial(Dense(8), jaxnet.Relu, Dense(8), jaxnet.Relu, LayerNorm(), Dense(2),
                 residual(Dense(2), jaxnet.Tanh, Dense(2)))
    _, params = net.init(KEY, (-1, 3))
    assert list(params) == ["dense_0", "dense_1", "layer_norm_0", "dense_2", "residual_0"]
    assert set(params["dense_0"]) == {"w", "b"}
    assert list(params["residual_0"]) == ["dense_0", "dense_1"]
    assert params["dense_0"]["w"].shape == (3, 8)


def test_parameter_free_layers_add_nothing():
    _, params = serial(jaxnet.Relu, Flatten, Dropout(0.5), jaxnet.Softmax).init(KEY, (-1, 4))
    assert params == {}


def test_dense_math():
    _, p = Dense(3)[0](KEY, (-1, 2))
    x = jnp.array([[1.0, 2.0]])
    chex.assert_trees_all_close(Dense(3)[1](p, x), x @ p["w"] + p["b"])
    _, p0 = Dense(3, b_init=jax.nn.initializers.ones)[0](KEY, (-1, 2))
    chex.assert_trees_all_equal(p0["b"], jnp.ones(3))


def test_jaxnet_layers_inside_stax_serial():
    init, apply = stax.serial(Dense(6), jaxnet.Relu, Dense(2), jaxnet.LogSoftmax)
    out_shape, params = init(KEY, (-1, 4))
    y = apply(params, jnp.ones((5, 4)))
    assert out_shape == (-1, 2) and y.shape == (5, 2)
    chex.assert_trees_all_close(jnp.sum(jnp.exp(y), -1), jnp.ones(5), rtol=1e-6)


def test_stax_layers_inside_jaxnet_serial():
    net = serial(stax.Dense(6), stax.Relu, Dense(3), stax.LogSoftmax)
    out_shape, params = net.init(KEY, (-1, 4))
    assert out_shape == (-1, 3)
    assert list(params) == ["layer_0", "dense_0"]  # stax.Relu and LogSoftmax have () params
    y = net.apply(params, jnp.ones((5, 4)))
    assert y.shape == (5, 3)
    g = jax.grad(lambda p: jnp.sum(net.apply(p, jnp.ones((5, 4)))))(params)
    chex.assert_trees_all_equal_structs(g, params)


def test_params_go_straight_into_optax():
    net = jaxnet.mlp([16], 3)
    _, params = net.init(KEY, (-1, 4))
    opt = optax.adam(1e-2)
    state = opt.init(params)
    x, labels = jnp.ones((8, 4)), jnp.arange(8) % 3

    def loss(p):
        return jaxnet.softmax_cross_entropy(net.apply(p, x), labels)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    before = loss(params)
    for _ in range(5):
        params, state = step(params, state)
    assert float(loss(params)) < float(before)
    assert list(params) == ["dense_0", "dense_1"]


class TestJitVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_apply_same_with_and_without_jit(self):
        net = serial(Dense(8), LayerNorm(), jaxnet.Gelu, residual(Dense(8), jaxnet.Tanh),
                     Dense(3), jaxnet.Softmax)
        _, params = net.init(KEY, (-1, 5))
        x = jax.random.normal(KEY, (4, 5))
        y = self.variant(net.apply)(params, x)
        chex.assert_shape(y, (4, 3))
        chex.assert_trees_all_close(y, jax.jit(net.apply)(params, x), rtol=1e-6)


def test_dropout_rate_is_the_drop_probability():
    x = jnp.ones((200, 500))
    y = Dropout(0.25)[1]({}, x, rng=KEY)
    dropped = float(jnp.mean(y == 0))
    assert dropped == pytest.approx(0.25, abs=0.01)
    assert float(jnp.max(y)) == pytest.approx(1 / 0.75)
    assert float(jnp.mean(y)) == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps E[y] = x


def test_dropout_eval_mode_and_keys():
    layer = Dropout(0.5)
    x = jnp.arange(10.0)
    chex.assert_trees_all_equal(layer[1]({}, x, mode="eval"), x)
    chex.assert_trees_all_equal(Dropout(0.5, mode="eval")[1]({}, x), x)
    a, b = layer[1]({}, x, rng=KEY), layer[1]({}, x, rng=KEY)
    chex.assert_trees_all_equal(a, b)
    with pytest.raises(ValueError, match="PRNG key"):
        layer[1]({}, x)


def test_serial_splits_rng_per_layer():
    net = serial(Dropout(0.5), Dropout(0.5))
    x = jnp.ones((1000,))
    y = net.apply({}, x, rng=KEY)
    assert float(jnp.mean(y == 0)) == pytest.approx(0.75, abs=0.05)


def test_layer_norm_normalises():
    _, p = LayerNorm()[0](KEY, (-1, 6))
    y = LayerNorm()[1](p, jax.random.normal(KEY, (4, 6)) * 5 + 3)
    chex.assert_trees_all_close(jnp.mean(y, -1), jnp.zeros(4), atol=1e-6)
    chex.assert_trees_all_close(jnp.std(y, -1), jnp.ones(4), atol=1e-4)


def test_fan_in_concat_and_parallel():
    net = serial(FanOut(2), parallel(Dense(2), Dense(3)), FanInConcat(axis=-1))
    out_shape, params = net.init(KEY, (-1, 4))
    assert out_shape == (-1, 5)
    assert list(params) == ["parallel_0"]
    assert list(params["parallel_0"]) == ["dense_0", "dense_1"]


def test_residual_adds_the_input():
    net = residual(Dense(3, W_init=jax.nn.initializers.zeros))
    _, p = net.init(KEY, (-1, 3))
    x = jnp.arange(6.0).reshape(2, 3)
    chex.assert_trees_all_equal(net.apply(p, x), x)


def test_mlp_structure():
    net = jaxnet.mlp([50, 50], 10, "relu", "softmax")
    labels = [child.label for _, child in net.children]
    assert labels == ["Dense(50)", "Relu", "Dense(50)", "Relu", "Dense(10)", "Softmax"]
    assert [c.label for _, c in jaxnet.mlp([4], 2).children] == ["Dense(4)", "Relu", "Dense(2)"]
    dropped = jaxnet.mlp([4, 4], 2, dropout=0.25)
    assert [c.label for _, c in dropped.children] == [
        "Dense(4)", "Relu", "Dropout(0.25)", "Dense(4)", "Relu", "Dropout(0.25)", "Dense(2)"]
    _, params = dropped.init(KEY, (-1, 3))
    x = jnp.ones((5, 3))
    chex.assert_trees_all_equal(dropped.apply(params, x, mode="eval"),
                                jaxnet.mlp([4, 4], 2).apply(params, x))


# --- bad input ---------------------------------------------------------------

def test_dense_wrong_feature_size_names_layer_and_both_shapes():
    net = serial(Dense(8), jaxnet.Relu, Dense(3))
    _, params = net.init(KEY, (-1, 4))
    with pytest.raises(jaxnet.ShapeError) as err:
        net.apply(params, jnp.ones((2, 5)))
    msg = str(err.value)
    assert "dense_0" in msg and "Dense(8)" in msg and "(..., 4)" in msg and "(2, 5)" in msg
    with pytest.raises(jaxnet.ShapeError, match="dense_0"):
        jax.jit(net.apply)(params, jnp.ones((2, 5)))  # at trace time


def test_nested_error_path():
    net = serial(Dense(4), residual(Dense(3)))
    with pytest.raises(jaxnet.ShapeError, match=r"residual_0: residual body maps shape \(-1, 4\) "
                                                r"to \(-1, 3\)"):
        net.init(KEY, (-1, 2))


def test_fan_in_mismatch_names_both_shapes():
    net = serial(FanOut(2), parallel(Dense(2), Dense(3)), FanInSum)
    with pytest.raises(jaxnet.ShapeError, match=r"fan_in_sum_0: FanInSum got inputs of "
                                                r"shapes \(-1, 2\), \(-1, 3\) that do not "
                                                r"broadcast"):
        net.init(KEY, (-1, 4))
    with pytest.raises(jaxnet.ShapeError, match="mismatched shapes"):
        serial(FanOut(2), parallel(Dense(2), Flatten), FanInConcat(0)).init(KEY, (-1, 4, 4))


def test_flatten_of_a_scalar():
    with pytest.raises(jaxnet.ShapeError, match=r"Flatten needs a batch axis.*\(\)"):
        Flatten[0](KEY, ())
    with pytest.raises(jaxnet.ShapeError, match="flatten_0"):
        serial(Flatten).apply({}, jnp.float32(1.0))


@pytest.mark.parametrize("width", [0, -3, 2.5, True])
def test_bad_widths(width):
    with pytest.raises(ValueError, match="positive integer"):
        Dense(width)
    with pytest.raises(ValueError, match="positive integers"):
        jaxnet.mlp([8, width], 2)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_dropout_rate(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(rate)
    with pytest.raises(ValueError, match=r"mlp dropout .*\[0, 1\)"):
        jaxnet.mlp([8], 2, dropout=rate)


def test_unknown_activation_in_mlp():
    with pytest.raises(ValueError, match="unknown activation 'relux'"):
        jaxnet.mlp([8], 2, activation="relux")
    with pytest.raises(ValueError, match="unknown activation"):
        jaxnet.mlp([8], 2, output_activation="softmaxx")


def test_params_with_unknown_keys_are_refused():
    net = serial(Dense(2))
    _, params = net.init(KEY, (-1, 3))
    with pytest.raises(ValueError, match="name no layer"):
        net.apply({**params, "dense_9": params["dense_0"]}, jnp.ones((1, 3)))


def test_not_a_layer():
    with pytest.raises(TypeError, match="init_fun, apply_fun"):
        serial(Dense(2), "relu")


def test_elementwise_accepts_a_users_function():
    layer = jaxnet.elementwise(lambda a: a ** 3, derivative=lambda a: 3 * a ** 2)
    _, p = layer.init(KEY, (-1, 2))
    chex.assert_trees_all_close(layer.apply(p, jnp.array([2.0, -1.0])), jnp.array([8.0, -1.0]))
    y, res = layer.fwd(p, jnp.array([2.0]))
    _, gx = layer.bwd(p, res, jnp.array([1.0]))
    chex.assert_trees_all_close(gx, jnp.array([12.0]))
    assert np.isclose(float(jaxnet.Activation("leaky_relu", negative_slope=0.2).apply(
        {}, jnp.array(-1.0))), -0.2)
