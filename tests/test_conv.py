"""Conv, Conv1D, Conv2D, ConvTranspose: shapes, the forward formula against a direct sum, the
hand-written backward rule against jax.vjp, and bad configuration."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layer_grads import abstract_init, check_bwd, random_params

import jaxnet
from jaxnet.conv import Conv, Conv1D, Conv2D, ConvTranspose

KEY = jax.random.key(0)

# (layer, input shape, explicit pads the layer must use): 1-d and 2-d, strides, dilation,
# every padding kind, groups (depthwise included).
CONVS = [
    (Conv(4, (3,)), (2, 7, 3), ((1, 1),)),
    (Conv(4, (4,), strides=(2,)), (2, 9, 3), ((1, 2),)),
    (Conv(4, (3,), strides=(2,), padding="VALID", dilation=(2,)), (2, 11, 3), ((0, 0),)),
    (Conv(5, (2,), padding=((2, 0),)), (1, 6, 2), ((2, 0),)),
    (Conv(6, (3, 2), strides=(2, 3), padding=((1, 2), (0, 1)), dilation=(1, 2),
          feature_group_count=3), (2, 9, 8, 6), ((1, 2), (0, 1))),
    (Conv(8, (3, 3), strides=(2, 2), feature_group_count=4), (1, 8, 7, 4),  # depthwise ×2
     ((0, 1), (1, 1))),
    # K·C_in ≤ C_out: computed as patches·W on CPUs (jaxnet.conv._by_patches)
    (Conv(6, (3,), strides=(2,)), (2, 9, 1), ((1, 1),)),
    (Conv(8, (2, 2), strides=(2, 1), padding="SAME", dilation=(1, 2)), (2, 7, 6, 2),
     ((0, 1), (1, 1))),
]
BY_PATCHES = [6, 7, 3]  # the indices in CONVS of the convolutions computed by patches
TRANSPOSES = [
    (ConvTranspose(4, (3,), strides=(2,)), (2, 5, 3)),
    (ConvTranspose(4, (3, 2), strides=(2, 3), padding="VALID", dilation=(2, 1)), (2, 4, 3, 3)),
    (ConvTranspose(2, (3, 3), strides=(1, 2), padding=((1, 0), (2, 2))), (1, 4, 4, 2)),
]
ALL = [(layer, shape) for layer, shape, _ in CONVS] + TRANSPOSES
IDS = [f"{layer.label}{shape}-{i}" for i, (layer, shape) in enumerate(ALL)]


def setup(layer, shape):
    out_shape, params = random_params(layer, shape)
    return out_shape, params, jnp.asarray(np.random.default_rng(1).standard_normal(shape))


def direct_conv(x, w, strides, pads, dilation, groups):
    """y[n, o, c] = Σₖ Σᵢ x_pad[n, s·o + d·k, i]·W[k, i, c], one kernel offset at a time."""
    n = x.ndim - 2
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
    ks = w.shape[:n]
    outs = [(x.shape[1 + j] - (dilation[j] * (ks[j] - 1) + 1)) // strides[j] + 1
            for j in range(n)]
    y = 0.0
    for k in itertools.product(*map(range, ks)):
        index = (slice(None),) + tuple(
            slice(d * kj, d * kj + s * (o - 1) + 1, s)
            for kj, s, d, o in zip(k, strides, dilation, outs)) + (slice(None),)
        patch = x[index]                                   # (N, *O, C_in)
        patch = patch.reshape(*patch.shape[:-1], groups, -1)
        wk = w[k].reshape(w.shape[-2], groups, -1)         # (C_in/G, G, C_out/G)
        y = y + jnp.einsum("...gi,igo->...go", patch, wk).reshape(*patch.shape[:-2], -1)
    return y


@pytest.mark.parametrize("layer,shape", ALL, ids=IDS)
def test_apply_shape_equals_init_shape(layer, shape):
    out_shape, params = abstract_init(layer, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    assert jax.eval_shape(layer.apply, params, x).shape == out_shape
    unknown_batch = abstract_init(layer, (-1,) + shape[1:])[0]
    assert unknown_batch == (-1,) + out_shape[1:]
    assert set(params) == {"w", "b"}


def test_init_uses_the_initialisers():
    _, params = Conv(4, (3, 2), b_init=jax.nn.initializers.ones).init(KEY, (-1, 5, 5, 2))
    assert params["w"].shape == (3, 2, 2, 4) and params["w"].dtype == jnp.float64
    chex.assert_trees_all_equal(params["b"], jnp.ones(4))
    fan_in, fan_out = 3 * 2 * 2, 3 * 2 * 4  # Glorot normal over the (*K, I, O) kernel
    assert 0.3 < float(jnp.std(params["w"])) / np.sqrt(2 / (fan_in + fan_out)) < 1.7


@pytest.mark.parametrize("layer,shape,pads", CONVS, ids=IDS[:len(CONVS)])
def test_conv_equals_direct_sum_and_backward_rule_equals_vjp(layer, shape, pads):
    _, params, x = setup(layer, shape)
    c = layer.config
    check_bwd(layer, params, x, jnp.float64, reference=lambda p, x: direct_conv(
        x, p["w"], c["strides"], pads, c["dilation"], c["feature_group_count"]) + p["b"])


@pytest.mark.parametrize("layer,shape", TRANSPOSES, ids=IDS[len(CONVS):])
def test_conv_transpose_equals_lax_and_backward_rule_equals_vjp(layer, shape):
    _, params, x = setup(layer, shape)
    c = layer.config
    spec = {3: ("NWC", "WIO", "NWC"), 4: ("NHWC", "HWIO", "NHWC")}[x.ndim]
    check_bwd(layer, params, x, jnp.float64, reference=lambda p, x: jax.lax.conv_transpose(
        x, p["w"], c["strides"], c["padding"], rhs_dilation=c["dilation"],
        dimension_numbers=spec) + p["b"])


def test_same_padding_keeps_ceil_of_input_over_stride():
    for size, s in [(7, 1), (7, 2), (8, 3)]:
        out, _ = abstract_init(Conv(2, (3,), strides=(s,)), (1, size, 1))
        assert out[1] == -(-size // s)
        out, _ = abstract_init(ConvTranspose(2, (3,), strides=(s,)), (1, size, 1))
        assert out[1] == size * s


@pytest.mark.parametrize("i", BY_PATCHES)
def test_patches_path_equals_jax_derivatives_of_the_xla_convolution(i):
    # On CPUs these convolutions run as patches·W (forward, the manual kernel gradient, and
    # jax.grad through it); the reference is lax.conv_general_dilated's own derivatives
    layer, shape, pads = CONVS[i]
    assert jaxnet.conv._by_patches(random_params(layer, shape)[1]["w"], (1,) * (len(shape) - 2),
                                   1)
    out_shape, params, x = setup(layer, shape)
    c = layer.config
    spec = {3: ("NWC", "WIO", "NWC"), 4: ("NHWC", "HWIO", "NHWC")}[x.ndim]
    g = jnp.asarray(np.random.default_rng(2).standard_normal(out_shape))

    @jax.jit
    def run(params, x, g):
        xla = lambda p, x: jax.lax.conv_general_dilated(  # noqa: E731
            x, p["w"], c["strides"], pads, rhs_dilation=c["dilation"],
            dimension_numbers=spec) + p["b"]
        manual = layer.bwd(params, layer.fwd(params, x)[1], g)
        auto = jax.vjp(layer.apply, params, x)[1](g)
        return (layer.apply(params, x), manual, auto), (xla(params, x),) + (
            jax.vjp(xla, params, x)[1](g),) * 2

    got, want = run(params, x, g)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)  # float64, summed reordered


@pytest.mark.parametrize("i", [4, 9])  # grouped, strided, dilated 2-d; transposed 2-d
def test_backward_rule_equals_vjp_float32(i):
    layer, shape = ALL[i]
    _, params, x = setup(layer, shape)
    check_bwd(layer, params, x, jnp.float32)


def test_backward_rule_under_jit():
    layer = Conv(4, (3,), strides=(2,), dilation=(2,), feature_group_count=2)
    _, params, x = setup(layer, (2, 9, 4))
    g = jnp.ones((2, 5, 4))
    step = jax.jit(lambda p, x: layer.bwd(p, layer.fwd(p, x)[1], g))
    chex.assert_trees_all_close(step(params, x), layer.bwd(params, x, g), rtol=1e-12)


def test_conveniences_are_conv():
    c1 = Conv1D(5, 3, strides=2, dilation=2)
    assert c1.config["filter_shape"] == (3,) and c1.config["strides"] == (2,)
    c2 = Conv2D(5, 3, strides=(1, 2))
    assert c2.config["filter_shape"] == (3, 3) and c2.config["strides"] == (1, 2)
    out, params = abstract_init(c2, (-1, 8, 8, 3))
    assert out == (-1, 8, 4, 5) and params["w"].shape == (3, 3, 3, 5)


def test_names_inside_serial_and_mnist1d_cnn_size():
    net = jaxnet.serial(Conv1D(25, 5, 2), jaxnet.Relu, Conv1D(25, 3, 2), jaxnet.Relu,
                        Conv1D(25, 3, 2), jaxnet.Relu, jaxnet.Flatten, jaxnet.Dense(10))
    out, params = abstract_init(net, (-1, 40, 1))
    assert out == (-1, 10) and sorted(params) == ["conv_0", "conv_1", "conv_2", "dense_0"]
    count = sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert count == 125 + 25 + 2 * (1875 + 25) + 125 * 10 + 10  # the paper's ~5,200
    named = jaxnet.serial(Conv(2, (3,), name="stem"), Conv(2, (3,)))
    assert sorted(abstract_init(named, (-1, 8, 1))[1]) == ["conv_0", "stem"]  # name= is the key


# --- bad input ---------------------------------------------------------------

def test_wrong_channels_name_layer_and_both_shapes():
    net = jaxnet.serial(Conv(4, (3, 3)))
    _, params = random_params(net, (-1, 6, 6, 3))
    with pytest.raises(jaxnet.ShapeError) as err:
        net.apply(params, jnp.ones((2, 6, 6, 5)))
    msg = str(err.value)
    assert "conv_0" in msg and "Conv(4, (3, 3))" in msg and "(N, ?, ?, 3)" in msg
    assert "(2, 6, 6, 5)" in msg
    with pytest.raises(jaxnet.ShapeError, match=r"got \(2, 6, 3\)"):
        net.apply(params, jnp.ones((2, 6, 3)))
    with pytest.raises(jaxnet.ShapeError, match=r"\(N, \?, C\), got \(6, 3\)"):
        Conv(4, (3,)).init(KEY, (6, 3))


@pytest.mark.parametrize("make,match", [
    (lambda: Conv(0, (3,)), "out_chan must be a positive integer"),
    (lambda: Conv(4, ()), "filter_shape"),
    (lambda: Conv(4, (0, 3)), "filter_shape"),
    (lambda: Conv(4, (3,), strides=(0,)), "strides"),
    (lambda: Conv(4, (3, 3), strides=(1,)), "strides must be 2"),
    (lambda: Conv(4, (3,), padding="FULL"), "padding must be 'SAME', 'VALID'"),
    (lambda: Conv(4, (3,), padding=((1, -1),)), "non-negative"),
    (lambda: Conv(4, (3,), feature_group_count=3), "dividing out_chan=4"),
    (lambda: Conv(4, (3,), name="Bad Name"), "snake_case"),
])
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_configuration_at_init():
    with pytest.raises(ValueError, match="must divide the input's 3 channels"):
        Conv(4, (3,), feature_group_count=2).init(KEY, (1, 8, 3))
    with pytest.raises(ValueError, match=r"larger than the padded input; input shape \(1, 4, 1\)"):
        Conv(4, (3,), padding="VALID", dilation=(2,)).init(KEY, (1, 4, 1))
    with pytest.raises(jaxnet.ShapeError, match="known positive spatial"):
        Conv(4, (3,)).init(KEY, (1, -1, 2))


def test_integer_like_config_values_are_accepted():
    layer = Conv(np.int64(3).item(), [np.int64(2)], strides=[np.int64(1)])
    assert layer.config["filter_shape"] == (2,)
