"""MultiHeadAttention (store and recompute backward rules) and TransformerBlock: shapes, the
formula against an independent one, the backward rules against jax.vjp, recompute against
store, the recompute rule's memory, keyword arguments through the combinators, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layer_grads import abstract_init, assert_close, cast, check_bwd, random_params

import jaxnet
from jaxnet.attention import MultiHeadAttention, TransformerBlock

KEY = jax.random.key(0)
B, T, D = 2, 5, 4
# key-padding mask: example 0 attends to its first 3 keys, example 1 to none (an empty row)
MASK = jnp.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
CROSS_MASK = jnp.array([[1, 0, 1], [0, 1, 1]], bool)


def normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def reference(params, inputs, num_heads, causal=False, mask=None):
    """Attention written out: per-head scores, a large negative score where not allowed,
    jax.nn.softmax, and 0 for rows with no allowed key. (−1e30 rather than −∞: e^(−1e30 − m)
    is exactly 0 beside an allowed key, and a row with none stays finite, so JAX's own
    derivatives of this formula have no NaN to mask.)"""
    x, c = inputs if isinstance(inputs, tuple) else (inputs, inputs)
    proj = {name: a @ params[name]["w"] + params[name]["b"]
            for name, a in (("query", x), ("key", c), ("value", c))}
    q, k, v = (proj[n].reshape(*proj[n].shape[:2], num_heads, -1)
               for n in ("query", "key", "value"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = jnp.ones(s.shape, bool)
    if causal:
        allowed &= jnp.tril(jnp.ones(s.shape[-2:], bool))
    if mask is not None:
        allowed &= mask[:, None, None, :]
    p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1)
    p = jnp.where(allowed.any(-1, keepdims=True), p, 0.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(x.shape[0], x.shape[1], -1)
    return o @ params["out"]["w"] + params["out"]["b"]


# (backward, input shapes, apply kwargs): self and cross, causal, masked (with an empty row).
CASES = [
    ("store", (B, T, D), {}),
    ("store", (B, T, D), {"mask": MASK}),
    ("recompute", (B, T, D), {"causal": True, "mask": MASK}),
    ("store", ((B, T, D), (B, 3, 6)), {"mask": CROSS_MASK}),
    ("recompute", ((B, T, D), (B, 3, 6)), {"causal": True, "mask": CROSS_MASK}),
]
IDS = [f"{bw}-{'cross' if isinstance(s[0], tuple) else 'self'}-{'+'.join(kw) or 'plain'}"
       for bw, s, kw in CASES]


def setup(backward, shapes, block_size=2):
    layer = MultiHeadAttention(2, 3, backward=backward, block_size=block_size)
    out_shape, params = random_params(layer, shapes)
    if isinstance(shapes[0], tuple):
        inputs = (normal(shapes[0], 1), normal(shapes[1], 2))
    else:
        inputs = normal(shapes, 1)
    return layer, out_shape, params, inputs


@pytest.mark.parametrize("backward,shapes,kwargs", CASES, ids=IDS)
def test_formula_and_backward_rule_equal_reference_and_vjp(backward, shapes, kwargs):
    layer, out_shape, params, inputs = setup(backward, shapes)   # block 2: T = 5 is ragged
    x_shape = shapes[0] if isinstance(shapes[0], tuple) else shapes
    assert out_shape == x_shape
    out = jax.eval_shape(lambda p, x: layer.apply(p, x, **kwargs), params, inputs)
    assert out.shape == out_shape
    check_bwd(layer, params, inputs, jnp.float64,
              reference=lambda p, x: reference(p, x, 2, **kwargs), **kwargs)


@pytest.mark.parametrize("backward,shapes,kwargs", CASES, ids=IDS)
def test_autodiff_equals_autodiff_of_the_reference(backward, shapes, kwargs):
    # jax.vjp and jax.jvp through the layer run the softmax's hand-written JVP
    # (ṗ = p ⊙ (ṡ − Σ pṡ)); they must equal JAX's derivatives of the reference formula
    # (jax.nn.softmax), also to second order (a Hessian-vector product of Σ y²). float64,
    # rtol 1e-10: the same derivative, summed in another order; atol 1e-10 for the key
    # bias's gradient, exactly 0 (softmax ignores a shift of a row's scores), which carries
    # ~1e-12 of rounding from the O(1–10) terms that cancel in it
    layer, _, params, inputs = setup(backward, shapes)
    tangents = jax.tree_util.tree_map(lambda a: normal(a.shape, 7), (params, inputs))
    fns = (lambda p, x: layer.apply(p, x, **kwargs), lambda p, x: reference(p, x, 2, **kwargs))

    @jax.jit
    def derivatives(primals, tangents):
        out = []
        for f in fns:
            y, vjp = jax.vjp(f, *primals)
            g = jax.random.normal(jax.random.key(5), y.shape, y.dtype)
            hvp = jax.jvp(jax.grad(lambda p, x, f=f: jnp.sum(f(p, x) ** 2), (0, 1)),
                          primals, tangents)[1]
            out.append((vjp(g), jax.jvp(f, primals, tangents)[1], hvp))
        return out

    got, want = derivatives((params, inputs), tangents)
    assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("i", [1])  # masked, an empty row (recompute: against store below)
def test_backward_rule_equals_vjp_float32(i):
    backward, shapes, kwargs = CASES[i]
    layer, _, params, inputs = setup(backward, shapes)
    check_bwd(layer, params, inputs, jnp.float32, **kwargs)


def test_a_row_with_no_key_outputs_the_out_bias():
    layer, _, params, x = setup("store", (B, T, D))
    y = jax.jit(lambda p, x: layer.apply(p, x, mask=MASK))(params, x)
    chex.assert_trees_all_close(y[1], jnp.broadcast_to(params["out"]["b"], (T, D)), rtol=1e-12)


def test_params_and_shapes():
    layer = MultiHeadAttention(2, 3, out_dim=7)
    out, params = abstract_init(layer, (-1, T, D))
    assert out == (-1, T, 7)
    assert {k: {n: a.shape for n, a in v.items()} for k, v in params.items()} == {
        "query": {"w": (4, 6), "b": (6,)}, "key": {"w": (4, 6), "b": (6,)},
        "value": {"w": (4, 6), "b": (6,)}, "out": {"w": (6, 7), "b": (7,)}}
    out, params = abstract_init(MultiHeadAttention(2), ((-1, T, 8), (-1, 9, 3)))
    assert out == (-1, T, 8) and params["key"]["w"].shape == (3, 8)  # head_dim = 8 / 2


def test_recompute_equals_store_at_t256_in_float32():
    grads = []
    for backward in ("store", "recompute"):
        layer = MultiHeadAttention(2, 8, backward=backward, block_size=64)
        _, params = layer.init(KEY, (1, 256, 16))
        params, x = cast(params, jnp.float32), normal((1, 256, 16), 1).astype(jnp.float32)
        g = normal((1, 256, 16), 2).astype(jnp.float32)

        @jax.jit
        def step(params, x, g, layer=layer):
            y, res = layer.fwd(params, x, causal=True)
            return y, layer.bwd(params, res, g)

        grads.append(step(params, x, g))
    assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_recompute_never_holds_the_whole_t_by_t_matrix():
    """XLA's temporaries of the jitted fwd + bwd at T = 1024, 1 head of 64: the store rule
    holds the 4 MiB float32 probabilities (and their gradient); recompute holds blocks of
    128 × 1024."""
    temp = {}
    for backward in ("store", "recompute"):
        layer = MultiHeadAttention(1, 64, backward=backward, block_size=128)
        params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                        abstract_init(layer, (1, 1024, 64))[1])
        x = jax.ShapeDtypeStruct((1, 1024, 64), jnp.float32)

        def step(params, x, layer=layer):
            y, res = layer.fwd(params, x, causal=True)
            return layer.bwd(params, res, y)

        temp[backward] = jax.jit(step).lower(params, x).compile().memory_analysis()
    store, recompute = (temp[b].temp_size_in_bytes for b in ("store", "recompute"))
    assert store > 4 * 2 ** 20          # the T×T matrix at least once
    assert recompute < store / 3, (store, recompute)


# --- keyword arguments through combinators; the transformer block ----------------------

def test_causal_and_mask_reach_the_attention_through_serial_and_residual():
    block = TransformerBlock(2, 2, 8)
    _, params = random_params(block, (B, T, D))
    x = normal((B, T, D), 1)
    mask = MASK.at[1, 0].set(True)

    @jax.jit
    def outputs(params, x):
        p0, p1 = params["residual_0"], params["residual_1"]
        ln = jaxnet.LayerNorm()
        h = x + reference(p0["attention_0"], ln.apply(p0["layer_norm_0"], x), 2, True, mask)
        m = jaxnet.gelu(ln.apply(p1["layer_norm_0"], h) @ p1["dense_0"]["w"]
                        + p1["dense_0"]["b"])
        return (block.apply(params, x, causal=True, mask=mask, rng=KEY, mode="train"),
                block.apply(params, x.at[:, -1].add(1.0), causal=True, mask=mask),
                block.apply(params, x, mask=mask),
                h + m @ p1["dense_1"]["w"] + p1["dense_1"]["b"])

    y, y_last_changed, y_not_causal, want = outputs(params, x)
    # causal: changing the last token leaves every earlier position unchanged
    chex.assert_trees_all_close(y[:, :-1], y_last_changed[:, :-1], rtol=1e-12)
    assert not np.allclose(y, y_not_causal)
    chex.assert_trees_all_close(y, want, rtol=1e-10)  # the block is its pieces composed
    check_bwd(block, params, x, jnp.float64, causal=True, mask=mask, rng=KEY)


def test_transformer_block_names():
    block = TransformerBlock(2, None, 16, dim=8, backward="recompute", block_size=4)
    out, params = abstract_init(jaxnet.serial(block, block), (-1, 6, 8))
    assert out == (-1, 6, 8) and sorted(params) == ["transformer_block_0", "transformer_block_1"]
    assert sorted(params["transformer_block_0"]["residual_0"]) == ["attention_0", "layer_norm_0"]
    assert sorted(params["transformer_block_0"]["residual_1"]) == ["dense_0", "dense_1",
                                                                   "layer_norm_0"]
    assert params["transformer_block_0"]["residual_0"]["attention_0"]["query"]["w"].shape == (
        8, 8)


# --- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: MultiHeadAttention(0, 4), "num_heads must be a positive integer"),
    (lambda: MultiHeadAttention(2, 0), "head_dim must be a positive integer or None"),
    (lambda: MultiHeadAttention(2, 4, backward="flash"), "'store' or 'recompute'"),
    (lambda: MultiHeadAttention(2, 4, block_size=0), "block_size"),
    (lambda: MultiHeadAttention(2, 4, name="Attn"), "snake_case"),
    (lambda: TransformerBlock(2, None, 8), "needs head_dim or dim"),
    (lambda: TransformerBlock(3, None, 8, dim=8), "num_heads=3 must divide dim=8"),
    (lambda: TransformerBlock(2, 4, 0), "mlp_dim must be a positive integer"),
])
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_heads_must_divide_the_width_without_head_dim():
    with pytest.raises(ValueError, match="num_heads=3 must divide the input width 8"):
        MultiHeadAttention(3).init(KEY, (2, 5, 8))


def test_wrong_shapes_name_layer_and_both_shapes():
    net = jaxnet.serial(MultiHeadAttention(2, 3))
    _, params = random_params(net, (B, T, D))
    with pytest.raises(jaxnet.ShapeError, match=r"attention_0: MultiHeadAttention\(2, 3\) "
                                                r"expects inputs of shape \(B, T, 4\), got "
                                                r"\(2, 5, 6\)"):
        net.apply(params, jnp.ones((B, T, 6)))
    with pytest.raises(jaxnet.ShapeError, match=r"mask of shape \(2, 5\) \(B, S\), got \(2, 4\)"):
        net.apply(params, jnp.ones((B, T, D)), mask=jnp.ones((B, 4), bool))
    with pytest.raises(jaxnet.ShapeError, match=r"\(B, T, d\), got \(5, 4\)"):
        net.apply(params, jnp.ones((T, D)))
    with pytest.raises(jaxnet.ShapeError, match="different batch sizes"):
        MultiHeadAttention(2, 3).apply(params["attention_0"],
                                       (jnp.ones((B, T, D)), jnp.ones((3, T, D))))
    with pytest.raises(jaxnet.ShapeError, match=r"TransformerBlock\(2, 2, 8\) expects inputs of "
                                                r"shape \(B, T, 4\), got \(2, 5, 6\)"):
        TransformerBlock(2, 2, 8).init(KEY, (B, T, 6))
