"""Dense's matmul (``layers.dense_matmul``): the same value and derivatives as ``x @ w`` in every
mode, with and without the copied xᵀ that large weight gradients use on CPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import Dense, layers


@pytest.fixture(params=["plain", "copied"])
def copy_mode(request, monkeypatch):
    if request.param == "copied":  # every matmul takes the copied-xᵀ path
        monkeypatch.setattr(layers, "_MIN_MACS_TO_COPY", 0)
    return request.param


def _f(mm):
    return lambda w, x: jnp.sum(jnp.sin(mm(x, w)))


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)])
def test_derivatives_equal_those_of_the_plain_matmul(copy_mode, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (4, 3))
    ours, plain = _f(layers.dense_matmul), _f(lambda x, w: x @ w)
    np.testing.assert_allclose(ours(w, x), plain(w, x), rtol=1e-12)
    for transform in (jax.grad, jax.jacfwd, jax.hessian):
        np.testing.assert_allclose(jax.jit(transform(ours))(w, x), transform(plain)(w, x),
                                   rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.grad(ours, 1)(w, x), jax.grad(plain, 1)(w, x), rtol=1e-10)
    _, tangent = jax.jvp(lambda w: layers.dense_matmul(x, w), (w,), (jnp.ones_like(w),))
    np.testing.assert_allclose(tangent, x @ jnp.ones_like(w), rtol=1e-12)
    batched = jax.vmap(layers.dense_matmul)(jnp.stack([x, 2 * x]), jnp.stack([w, w]))
    np.testing.assert_allclose(batched[1], 2 * (x @ w), rtol=1e-12)


def test_dense_backward_rule_matches_autodiff(copy_mode):
    layer = Dense(3)
    _, params = layer.init(jax.random.key(0), (-1, 4))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    g = jax.random.normal(jax.random.key(2), (6, 3))
    out, res = layer.fwd(params, x)
    grads, gx = jax.jit(layer.bwd)(params, res, g)
    _, vjp = jax.vjp(layer.apply, params, x)
    auto, auto_gx = vjp(g)
    np.testing.assert_allclose(grads["w"], auto["w"], rtol=1e-12)
    np.testing.assert_allclose(gx, auto_gx, rtol=1e-12)


def test_large_weight_gradient_reads_a_copied_transpose_on_cpu(copy_mode):
    """The copy shows in the program XLA compiles: a transposed (n_in, batch) buffer."""
    x, w = jnp.ones((8, 16), jnp.float32), jnp.ones((16, 4), jnp.float32)
    hlo = jax.jit(jax.grad(_f(layers.dense_matmul))).lower(w, x).compile().as_text()
    copied = "f32[16,8]" in hlo[hlo.index("ENTRY"):]
    assert copied == (copy_mode == "copied" and jax.default_backend() == "cpu")
