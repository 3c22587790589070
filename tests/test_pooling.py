"""MaxPool, AvgPool, SumPool, GlobalAvgPool: shapes, the forward formula against loops in numpy,
the hand-written backward rule against jax.vjp (ties included), bad configuration."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layer_grads import abstract_init, check_bwd

import jaxnet
from jaxnet.pooling import AvgPool, GlobalAvgPool, MaxPool, SumPool

KEY = jax.random.key(0)

# (layer, input shape, explicit pads): 1-d and 2-d, strides, every padding kind.
CASES = [
    (MaxPool((2,), (2,)), (2, 7, 3), ((0, 0),)),
    (MaxPool((3, 2), (2, 1), "SAME"), (2, 5, 4, 2), ((1, 1), (0, 1))),
    (MaxPool((3, 3), (2, 2), ((1, 2), (2, 0))), (1, 6, 5, 2), ((1, 2), (2, 0))),
    (AvgPool((3,), (2,), "SAME"), (2, 8, 2), ((0, 1),)),
    (AvgPool((3, 2), (1, 2), "SAME", count_include_pad=False), (2, 5, 5, 2), ((1, 1), (0, 1))),
    (AvgPool((2, 2), (2, 2)), (1, 6, 4, 3), ((0, 0), (0, 0))),
    (SumPool((2, 3), (1, 2), ((1, 0), (1, 1))), (2, 4, 5, 2), ((1, 0), (1, 1))),
]
IDS = [f"{layer.label}{shape}-{i}" for i, (layer, shape, _) in enumerate(CASES)]


def numpy_pool(x, layer, pads):
    """The pooling formula with explicit loops over output cells and window offsets."""
    c = layer.config
    window, strides = c["window_shape"], c["strides"]
    fill = -np.inf if layer.kind == "max_pool" else 0.0
    x = np.asarray(x)
    real = np.pad(np.ones(x.shape[1:-1]), pads)
    x = np.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), constant_values=fill)
    outs = [(p - w) // s + 1 for p, w, s in zip(x.shape[1:-1], window, strides)]
    y = np.zeros((x.shape[0], *outs, x.shape[-1]))
    for o in itertools.product(*map(range, outs)):
        cells = [tuple(s * oj + kj for oj, kj, s in zip(o, k, strides))
                 for k in itertools.product(*map(range, window))]
        values = np.stack([x[(slice(None),) + cell] for cell in cells])
        if layer.kind == "max_pool":
            y[(slice(None),) + o] = values.max(0)
        elif layer.kind == "sum_pool":
            y[(slice(None),) + o] = values.sum(0)
        else:
            count = np.prod(window) if c["count_include_pad"] else sum(real[c] for c in cells)
            y[(slice(None),) + o] = values.sum(0) / count
    return y


def inputs(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("layer,shape,pads", CASES, ids=IDS)
def test_shapes_and_formula(layer, shape, pads):
    out_shape, params = abstract_init(layer, shape)
    assert params == {}
    assert abstract_init(layer, (-1,) + shape[1:])[0] == (-1,) + out_shape[1:]
    x = inputs(shape)
    y = layer.apply({}, x)
    assert y.shape == out_shape
    np.testing.assert_allclose(y, numpy_pool(x, layer, pads), rtol=1e-12)


@pytest.mark.parametrize("layer,shape,pads", CASES, ids=IDS)
def test_backward_rule_equals_vjp_float64(layer, shape, pads):
    check_bwd(layer, {}, inputs(shape), jnp.float64)


@pytest.mark.parametrize("i", [2, 4])
def test_backward_rule_equals_vjp_float32(i):
    layer, shape, _ = CASES[i]
    check_bwd(layer, {}, inputs(shape), jnp.float32)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_max_pool_ties_go_to_the_first_maximum_like_jax_vjp(i):
    layer, shape, _ = CASES[i]
    x = jnp.round(inputs(shape))  # many windows with tied maxima (integers; zeros)
    check_bwd(layer, {}, x, jnp.float64)
    check_bwd(layer, {}, jnp.zeros(shape), jnp.float64)


def test_max_pool_routes_to_the_first_maximum_by_hand():
    layer = MaxPool((2, 2), (1, 1))
    x = jnp.array([[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]]).reshape(1, 2, 3, 1)
    y, res = layer.fwd({}, x)
    chex.assert_trees_all_equal(y.ravel(), jnp.array([3.0, 3.0]))
    _, dx = layer.bwd({}, res, jnp.array([1.0, 10.0]).reshape(1, 1, 2, 1))
    # window 0 = [[1, 3], [3, 0]] and window 1 = [[3, 3], [0, 2]]: in both the 3 at row 0,
    # column 1 is the first maximum (row-major) and takes all of δ.
    chex.assert_trees_all_equal(dx.reshape(2, 3), jnp.array([[0.0, 11.0, 0.0], [0, 0, 0]]))


def _reduce_window_max(layer, pads):
    """Max pooling by ``lax.reduce_window`` alone: XLA's own reverse-mode derivative
    (select-and-scatter), the independent reference for the layer's custom JVP."""
    c = layer.config
    return lambda x: jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1,) + c["window_shape"] + (1,), (1,) + c["strides"] + (1,),
        ((0, 0),) + tuple(pads) + ((0, 0),))


def numpy_max_pool_jvp(x, t, layer, pads):
    """ẏ[o] = ṫ at the first maximal cell of window o (row-major), by loops in numpy."""
    c = layer.config
    window, strides = c["window_shape"], c["strides"]
    full = ((0, 0),) + tuple(pads) + ((0, 0),)
    x, t = np.pad(np.asarray(x), full, constant_values=-np.inf), np.pad(np.asarray(t), full)
    outs = [(p - w) // s + 1 for p, w, s in zip(x.shape[1:-1], window, strides)]
    dy = np.zeros((x.shape[0], *outs, x.shape[-1]))
    for o in itertools.product(*map(range, outs)):
        cells = [(slice(None),) + tuple(s * oj + kj for oj, kj, s in zip(o, k, strides))
                 for k in itertools.product(*map(range, window))]
        first = np.argmax(np.stack([x[cell] for cell in cells]), axis=0)  # (N, C)
        picked = np.stack([t[cell] for cell in cells])
        dy[(slice(None),) + o] = np.take_along_axis(picked, first[None], 0)[0]
    return dy


@pytest.mark.parametrize("i", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_autodiff_follows_the_first_maximum(i, ties):
    # jax.grad and jax.jvp through MaxPool run its custom JVP, ẏ[o] = ẋ[s·o + k*(o)]:
    # reverse mode must equal lax.reduce_window's own derivative (select-and-scatter, which
    # also gives δ to the first maximum), forward mode the numpy loops, and a second
    # derivative (the Hessian-vector product of Σ y², y piecewise linear: 2·Jᵀ·J·ṫ) the two
    # combined. Ties are where a rule could differ: jnp.max's derivative splits them evenly,
    # and jax.jvp of lax.reduce_window picks some tied cells other than the first (seen on
    # case 1), so forward mode is checked against the loops, not against it. float64, rtol
    # 1e-12: the same selections; overlapping windows may add their shares in another order
    layer, shape, pads = CASES[i]
    x = jnp.round(inputs(shape)) if ties else inputs(shape)
    t = inputs(shape, seed=2)
    plain = _reduce_window_max(layer, pads)
    pool = lambda x: layer.apply({}, x)  # noqa: E731
    jvp_want = jnp.asarray(numpy_max_pool_jvp(x, t, layer, pads))

    @jax.jit
    def run(x, t, jvp_want):
        g = jax.random.normal(jax.random.key(4), jvp_want.shape, x.dtype)
        vjp_got, vjp_want = (jax.vjp(f, x)[1](g)[0] for f in (pool, plain))
        jvp_got = jax.jvp(pool, (x,), (t,))[1]
        hvp_got = jax.jvp(jax.grad(lambda x: jnp.sum(pool(x) ** 2)), (x,), (t,))[1]
        hvp_want = jax.vjp(plain, x)[1](2 * jvp_want)[0]
        return (vjp_got, jvp_got, hvp_got), (vjp_want, jvp_want, hvp_want)

    got, want = run(x, t, jvp_want)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)


def test_avg_pool_padding_modes():
    x = jnp.ones((1, 3, 1))
    with_pad = AvgPool((3,), padding="SAME").apply({}, x).ravel()
    without = AvgPool((3,), padding="SAME", count_include_pad=False).apply({}, x).ravel()
    chex.assert_trees_all_close(with_pad, jnp.array([2 / 3, 1.0, 2 / 3]))
    chex.assert_trees_all_close(without, jnp.ones(3))


def test_global_avg_pool():
    x = inputs((2, 3, 4, 5))
    assert abstract_init(GlobalAvgPool, (-1, 3, 4, 5))[0] == (-1, 5)
    chex.assert_trees_all_close(GlobalAvgPool.apply({}, x), jnp.mean(x, (1, 2)), rtol=1e-12)
    check_bwd(GlobalAvgPool, {}, x, jnp.float64)
    check_bwd(GlobalAvgPool, {}, inputs((2, 6, 3)), jnp.float32)


def test_conv_net_names():
    net = jaxnet.serial(MaxPool((2,)), AvgPool((2,)), SumPool((2,)), GlobalAvgPool)
    out, params = abstract_init(net, (-1, 8, 3))
    assert out == (-1, 3) and params == {}


# --- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: MaxPool(()), "window_shape must be a non-empty tuple"),
    (lambda: MaxPool(2), "window_shape"),
    (lambda: AvgPool((2, 0)), "window_shape"),
    (lambda: SumPool((2,), (0,)), "strides must be 1 positive"),
    (lambda: MaxPool((2, 2), (1,)), "strides must be 2"),
    (lambda: MaxPool((2,), padding="FULL"), "padding must be 'SAME', 'VALID'"),
    (lambda: MaxPool((2,), padding=((2, 0),)), "wholly in the padding"),
])
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_window_larger_than_the_padded_input():
    with pytest.raises(ValueError, match=r"window \(5,\) is larger than the padded input"):
        MaxPool((5,)).init(KEY, (1, 4, 2))
    with pytest.raises(ValueError, match="larger than the padded input"):
        AvgPool((3, 3)).apply({}, jnp.ones((1, 2, 5, 1)))
    MaxPool((5,), padding="SAME").init(KEY, (1, 4, 2))  # SAME pads enough


def test_wrong_rank_names_layer_and_both_shapes():
    net = jaxnet.serial(jaxnet.Dense(2), MaxPool((2, 2)))
    _, params = net.init(KEY, (-1, 4, 4, 3))
    with pytest.raises(jaxnet.ShapeError) as err:
        net.apply(params, jnp.ones((4, 3)))
    msg = str(err.value)
    assert "max_pool_0" in msg and "MaxPool((2, 2))" in msg and "(N, ?, ?, C)" in msg
    assert "(4, 2)" in msg
    with pytest.raises(jaxnet.ShapeError, match=r"GlobalAvgPool .*got \(4, 3\)"):
        GlobalAvgPool.init(KEY, (4, 3))
