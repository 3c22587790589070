"""Embedding and PositionalEmbedding: shapes, the lookup, the hand-written scatter-add backward
against jax.vjp, out-of-vocabulary tokens eagerly and under jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layer_grads import abstract_init, check_bwd, random_params

import jaxnet
from jaxnet.embedding import Embedding, PositionalEmbedding

KEY = jax.random.key(0)


def tokens(shape, vocab, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape))


@pytest.mark.parametrize("shape", [(4, 6), (7,), (2, 3, 2)])
def test_embedding_shapes_and_lookup(shape):
    layer = Embedding(5, 3)
    out_shape, params = layer.init(KEY, shape)
    assert out_shape == shape + (3,) and params["table"].shape == (5, 3)
    assert abstract_init(layer, (-1,) + shape[1:])[0] == (-1,) + shape[1:] + (3,)
    x = tokens(shape, 5)
    y = layer.apply(params, x)
    assert y.shape == out_shape
    np.testing.assert_array_equal(y, np.asarray(params["table"])[np.asarray(x)])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_embedding_backward_is_a_scatter_add_equal_to_vjp(dtype):
    layer = Embedding(6, 4)
    _, params = random_params(layer, (5, 7))
    x = tokens((5, 7), 4)  # repeated ids (their gradients add) and unused rows (zero)
    grads, gx = check_bwd(layer, params, x, dtype)
    assert gx is None
    assert not np.any(grads["table"][4:])


def test_embedding_backward_by_hand():
    layer = Embedding(3, 2)
    params = {"table": jnp.zeros((3, 2))}
    x = jnp.array([[2, 0, 2]])
    _, ids = layer.fwd(params, x)
    g = jnp.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    grads, gx = layer.bwd(params, ids, g)
    chex.assert_trees_all_equal(grads["table"], jnp.array([[3.0, 4.0], [0, 0], [6.0, 8.0]]))


def test_out_of_vocabulary_is_an_error_when_concrete_and_nan_under_jit():
    layer = Embedding(4, 2)
    _, params = layer.init(KEY, (1, 3))
    for bad in (4, -1):
        with pytest.raises(ValueError, match=rf"Embedding\(4, 2\): token {bad} is outside the "
                                             r"vocabulary \[0, 4\)"):
            layer.apply(params, jnp.array([[0, bad, 1]]))
    x = jnp.array([[0, 4, -1, 3]])
    y = jax.jit(layer.apply)(params, x)
    assert np.all(np.isnan(y[0, 1:3])) and np.all(np.isfinite(y[0, [0, 3]]))

    @jax.jit
    def grads(params, x):
        _, ids = layer.fwd(params, x)
        return layer.bwd(params, ids, jnp.ones(x.shape + (2,)))[0]["table"]

    chex.assert_trees_all_equal(grads(params, x), jnp.array([[1.0, 1], [0, 0], [0, 0], [1, 1]]))


def test_embedding_refuses_float_inputs_and_bad_config():
    layer = Embedding(4, 2)
    _, params = layer.init(KEY, (1, 3))
    with pytest.raises(TypeError, match="integer token ids, got float"):
        layer.apply(params, jnp.ones((1, 3)))
    for make in (lambda: Embedding(0, 2), lambda: Embedding(4, -1), lambda: Embedding(4, 2.0)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            make()
    with pytest.raises(jaxnet.ShapeError, match=r"table of shape \(4, 2\), got \(4, 3\)"):
        layer.apply({"table": jnp.ones((4, 3))}, jnp.array([1]))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_positional_embedding(dtype):
    layer = PositionalEmbedding(10)
    out_shape, params = layer.init(KEY, (-1, 6, 4))
    assert out_shape == (-1, 6, 4) and params["table"].shape == (10, 4)
    _, params = random_params(layer, (3, 6, 4))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 6, 4)))
    grads, _ = check_bwd(layer, params, x, dtype,
                         reference=lambda p, x: x + p["table"][None, :6])
    assert not np.any(grads["table"][6:])


def test_positional_embedding_shapes():
    layer = PositionalEmbedding(4)
    with pytest.raises(jaxnet.ShapeError, match=r"PositionalEmbedding\(4\) expects inputs of "
                                                r"shape \(B, T ≤ 4, d\), got \(2, 5, 3\)"):
        layer.init(KEY, (2, 5, 3))
    _, params = layer.init(KEY, (2, 4, 3))
    with pytest.raises(jaxnet.ShapeError, match=r"\(B, T ≤ 4, 3\), got \(2, 3, 2\)"):
        layer.apply(params, jnp.ones((2, 3, 2)))
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        PositionalEmbedding(0)


def test_token_and_position_embeddings_in_serial():
    net = jaxnet.serial(Embedding(7, 4), PositionalEmbedding(5), jaxnet.Dense(7))
    out, params = abstract_init(net, (-1, 5))
    assert out == (-1, 5, 7)
    assert sorted(params) == ["dense_0", "embedding_0", "positional_embedding_0"]
