"""Rematerialisation (``remat=`` on serial and mlp): same function, same gradients, and the
backward pass recomputes the forward segments instead of storing them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet
from jaxnet import Dense, Relu, Tanh, serial

POLICIES = [True, jax.checkpoint_policies.dots_saveable,
            jax.checkpoint_policies.nothing_saveable]


def _net_and_data(remat, remat_every=None, depth=6):
    net = jaxnet.mlp([16] * depth, 3, "tanh", remat=remat, remat_every=remat_every)
    _, params = net.init(jax.random.key(0), (-1, 5))
    x = jax.random.normal(jax.random.key(1), (7, 5))
    y = jnp.arange(7) % 3
    return net, params, x, y


def _loss(net, x, y):
    return lambda p: jaxnet.softmax_cross_entropy(net.apply(p, x), y)


@pytest.mark.parametrize("remat, remat_every", [(True, None), (True, 1), (POLICIES[1], 4),
                                                (POLICIES[2], None)])
def test_remat_keeps_outputs_params_and_gradients(remat, remat_every):
    plain, params, x, y = _net_and_data(False)
    net, params_r, _, _ = _net_and_data(remat, remat_every)
    assert jax.tree.structure(params) == jax.tree.structure(params_r)
    np.testing.assert_allclose(net.apply(params, x), plain.apply(params, x), rtol=1e-12)
    g_plain = jax.jit(jax.grad(_loss(plain, x, y)))(params)
    g_remat = jax.jit(jax.grad(_loss(net, x, y)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
                 g_remat, g_plain)


def _lowered(net, params, x, y):
    return jax.jit(jax.grad(_loss(net, x, y))).lower(params).as_text()


def test_remat_recomputes_the_forward_pass_in_the_backward_pass():
    """The gradient program handed to XLA runs extra forward matmuls behind CSE barriers."""
    plain, params, x, y = _net_and_data(False, depth=8)
    net, _, _, _ = _net_and_data(True, depth=8)
    hlo_plain, hlo_remat = _lowered(plain, params, x, y), _lowered(net, params, x, y)
    assert hlo_remat.count("optimization_barrier") > hlo_plain.count("optimization_barrier")
    assert hlo_remat.count("dot_general") > hlo_plain.count("dot_general")


def test_remat_every_sets_the_segments():
    """17 children: ⌈√17⌉ = 5 per segment by default → 4 checkpoints; remat_every=2 → 9."""
    def n_checkpoints(**kw):
        net, params, x, y = _net_and_data(True, depth=8, **kw)
        jaxpr = jax.make_jaxpr(_loss(net, x, y))(params)
        return sum(eqn.primitive.name.startswith(("checkpoint", "remat")) for eqn in jaxpr.eqns)

    assert n_checkpoints() == 4
    assert n_checkpoints(remat_every=2) == 9


def test_remat_with_rng_and_stax_children():
    from jax.example_libraries import stax
    net = serial(Dense(4), stax.Relu, jaxnet.Dropout(0.5), Dense(2), remat=True, remat_every=2)
    _, params = net.init(jax.random.key(0), (-1, 3))
    x = jnp.ones((5, 3))
    plain = serial(Dense(4), stax.Relu, jaxnet.Dropout(0.5), Dense(2))
    rng = jax.random.key(3)
    np.testing.assert_allclose(net.apply(params, x, rng=rng, mode="train"),
                               plain.apply(params, x, rng=rng, mode="train"))


def test_manual_backward_pass_is_unchanged_by_remat():
    """remat only wraps apply: fwd/bwd (the manual path) give the same gradients."""
    net = serial(Dense(6), Tanh, Dense(4), Relu, Dense(2), remat=True, remat_every=2)
    _, params = net.init(jax.random.key(0), (-1, 3))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    out, res = net.fwd(params, x)
    g = jnp.ones_like(out)
    grads, gx = net.bwd(params, res, g)
    auto, vjp = jax.vjp(net.apply, params, x)
    auto_grads, auto_gx = vjp(g)
    np.testing.assert_allclose(out, auto)
    np.testing.assert_allclose(gx, auto_gx, rtol=1e-10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads, auto_grads)


@pytest.mark.parametrize("bad", [dict(remat="yes"), dict(remat=True, remat_every=0),
                                 dict(remat=True, remat_every=1.5)])
def test_bad_remat_arguments_raise(bad):
    with pytest.raises(ValueError, match="remat"):
        serial(Dense(2), Relu, **bad)
