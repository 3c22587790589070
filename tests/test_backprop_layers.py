"""The manual pass equals jax.value_and_grad on random nets that mix convolution, pooling,
BatchNorm (with its state), embeddings, attention, residual blocks, Dense layers and a
mixed-precision wrapper (float64 rtol 1e-10, float32 rtol 1e-4)."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
from _fast import numpy_init
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnet as jn
from jaxnet.precision import Policy

ACTS = ["relu", "tanh", "gelu", "silu", "sigmoid"]


@st.composite
def sequence_nets(draw):
    """A net on sequences (B, T, ·) ending in class logits; tokens or real-valued inputs."""
    act = st.sampled_from(ACTS)
    d = draw(st.sampled_from([4, 6]))
    T = length = draw(st.sampled_from([4, 6, 8]))  # T: the length after the layers so far
    tokens = draw(st.booleans())
    vocab = 7
    layers = ([jn.Embedding(vocab, d)] if tokens
              else [jn.Conv1D(d, draw(st.sampled_from([1, 3]))), jn.Activation(draw(act))])
    for _ in range(draw(st.integers(1, 4))):
        block = draw(st.sampled_from(["conv", "norm", "pool", "attention", "residual", "dense"]))
        if block == "conv":
            layers += [jn.Conv1D(d, 3, padding=draw(st.sampled_from(["SAME", "VALID"]))
                                 if T > 4 else "SAME"), jn.Activation(draw(act))]
            if layers[-2].config["padding"] == "VALID":
                T -= 2
        elif block == "norm":
            layers.append(draw(st.sampled_from([jn.BatchNorm(), jn.LayerNorm(), jn.RMSNorm(),
                                                jn.GroupNorm(2)])))
        elif block == "pool" and T >= 4:
            layers.append(draw(st.sampled_from([jn.MaxPool((2,), (2,)), jn.AvgPool((2,), (2,))])))
            T //= 2
        elif block == "attention":
            layers.append(jn.residual(jn.LayerNorm(), jn.MultiHeadAttention(
                2, d // 2, backward=draw(st.sampled_from(["store", "recompute"])),
                block_size=2)))
        elif block in ("residual", "dense"):
            layers.append(jn.residual(jn.Dense(d), jn.Activation(draw(act))))
    head = draw(st.sampled_from(["flatten", "global"]))
    layers += ([jn.Flatten] if head == "flatten" else [jn.GlobalAvgPool]) + [jn.Dense(3)]
    if draw(st.booleans()):
        layers.append(jn.LogSoftmax)
    net = jn.serial(*layers)
    wrap = draw(st.booleans())
    batch = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    return net, wrap, tokens, (batch, length) if tokens else (batch, length, 2), vocab, seed


def check(case, dtype, rtol):
    net, wrap, tokens, shape, vocab, seed = case
    if wrap:  # the wrapper in the dtype under test: its structure, not its rounding
        net = jn.mixed_precision(net, Policy(dtype, dtype, dtype))
    # params, state and data drawn in numpy (tests/_fast.py): compiling jax.random
    # for every parameter took longer than the gradients under test
    _, params, state = numpy_init(net, (-1,) + shape[1:], seed, dtype, with_state=True)
    rng = np.random.default_rng([seed, 1])
    x = rng.integers(0, vocab, shape) if tokens else rng.standard_normal(shape).astype(dtype)
    x, y = jax.device_put((x, rng.integers(0, 3, shape[:1])))
    loss = jn.softmax_cross_entropy
    mode = "train"

    @jax.jit  # the manual pass and jax.grad as one program: one compile per case
    def both(params, state, x, y):
        def objective(p):
            out, new = net.apply_with_state(p, state, x, mode=mode)
            return loss(out, y), new

        manual = partial(jn.manual_value_and_grad(net, loss), mode=mode)
        if net.stateful:
            (value, new_state), grads = manual(params, x, y, state=state)
        else:
            (value, grads), new_state = manual(params, x, y), state
        return (value, new_state, grads), jax.value_and_grad(objective, has_aux=True)(params)

    (value, new_state, grads), ((ref_value, ref_state), ref) = both(params, state, x, y)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref))
    chex.assert_trees_all_close(value, ref_value, rtol=rtol)
    chex.assert_trees_all_close(new_state, ref_state, rtol=rtol, atol=rtol)
    chex.assert_trees_all_equal_dtypes(grads, params)
    chex.assert_trees_all_close(grads, ref, rtol=rtol, atol=rtol * scale)


# each example compiles one program of a few layers (1-4 s on two shared cores)
@settings(max_examples=3, deadline=None)
@given(sequence_nets())
def test_random_conv_attention_nets_agree_with_jax_grad_in_float64(case):
    check(case, jnp.float64, 1e-10)


@settings(max_examples=1, deadline=None)
@given(sequence_nets())
def test_random_conv_attention_nets_agree_with_jax_grad_in_float32(case):
    check(case, jnp.float32, 1e-4)


def test_a_net_starting_with_an_embedding_has_no_input_gradient():
    net = jn.serial(jn.Embedding(5, 4), jn.Flatten, jn.Dense(2))
    _, params = numpy_init(net, (-1, 3))
    x, y = jnp.array([[0, 1, 4], [2, 2, 3]]), jnp.array([0, 1])

    @jax.jit  # one program, not op by op
    def both(params, x, y):
        return (jn.manual_value_and_grad(net, jn.softmax_cross_entropy)(params, x, y),
                jax.grad(lambda p: jn.softmax_cross_entropy(net.apply(p, x), y))(params))

    (value, grads), ref = both(params, x, y)
    chex.assert_trees_all_close(grads, ref, rtol=1e-12)
    assert np.isfinite(float(value))
