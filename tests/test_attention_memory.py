"""The memory-efficient attention backward (``MultiHeadAttention(backward="recompute")``):
its gradients equal plain autodiff's (``jax.value_and_grad`` of softmax attention written with
``jax.nn.softmax``, no jaxnet rule) in float32, and XLA's memory analysis of its jitted
loss-and-gradient is at most a quarter of plain autodiff's (issue 13, part 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet
from jaxnet.protocol import Layer

HEADS, HEAD_DIM = 4, 64


def causal_attention(backward, block_size=128):
    """The layer with ``causal=True`` fixed (manual_value_and_grad passes only rng and mode)."""
    att = jaxnet.MultiHeadAttention(HEADS, HEAD_DIM, backward=backward, block_size=block_size)
    return Layer(att.init, lambda p, x, **kw: att.apply(p, x, causal=True),
                 fwd=lambda p, x, **kw: att.fwd(p, x, causal=True), bwd=att.bwd)


def plain(params, x):
    """Causal self-attention by its formula: projections, −∞ above the diagonal, jax.nn.softmax."""
    b, t, _ = x.shape
    q, k, v = ((x @ params[n]["w"] + params[n]["b"]).reshape(b, t, HEADS, HEAD_DIM)
               for n in ("query", "key", "value"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, -1)
    return o @ params["out"]["w"] + params["out"]["b"]


def problem(t, block_size=128):
    net = causal_attention("recompute", block_size)
    shape = (1, t, HEADS * HEAD_DIM)
    _, params = net.init(jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), shape)
    y = 0.1 * jax.random.normal(jax.random.key(2), shape)
    manual = jaxnet.manual_value_and_grad(net, jaxnet.l2_loss)
    auto = jax.value_and_grad(lambda p, x, y: jaxnet.l2_loss.formula(plain(p, x), y))
    return manual, auto, (params, x, y)


@pytest.mark.parametrize("block_size", [64, 96])  # 96 does not divide T: a padded last block
def test_recompute_gradients_equal_plain_autodiff_in_float32(block_size):
    manual, auto, args = problem(384, block_size)
    (loss_m, grads_m), (loss_a, grads_a) = jax.jit(manual)(*args), jax.jit(auto)(*args)
    np.testing.assert_allclose(loss_m, loss_a, rtol=1e-5)
    top = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads_a))
    for (path, gm), ga in zip(jax.tree_util.tree_flatten_with_path(grads_m)[0],
                              jax.tree_util.tree_leaves(grads_a)):
        # the key bias's exact gradient is 0 (a constant added to a row of scores): its
        # float32 noise is measured against the largest gradient
        scale = max(float(jnp.max(jnp.abs(ga))), 1e-3 * top)
        err = float(jnp.max(jnp.abs(gm - ga))) / scale
        assert err < 2e-4, (jax.tree_util.keystr(path), err)


def test_recompute_peak_memory_is_at_most_a_quarter_of_plain_autodiff():
    manual, auto, args = problem(2048)

    def peak(fn):
        m = jax.jit(fn).lower(*args).compile().memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)

    # plain autodiff keeps the (1, 4, 2048, 2048) probabilities (64 MiB) and more; at T = 1024
    # the recompute rule's blocks of 128 queries still make 0.27× (benchmarks/results)
    assert peak(manual) <= 0.25 * peak(auto), (peak(manual), peak(auto))
