"""Shared checks for a leaf layer's hand-written backward rule against ``jax.vjp`` of its apply.

``check_bwd`` runs ``fwd`` then ``bwd`` on a random cotangent and compares the parameter and
input gradients with ``jax.vjp`` of ``apply`` (float64: rtol 1e-10; float32: rtol 1e-4, the
two being correct evaluations of one formula in different orders), and checks that the
gradient trees have the params' structure, shapes and dtypes. The absolute tolerance of each
array scales with its largest entry: entries that cancel to near 0 carry the rounding error
of the large terms they summed.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

RTOL = {jnp.dtype(jnp.float64): dict(rtol=1e-10, atol=1e-12),
        jnp.dtype(jnp.float32): dict(rtol=1e-4, atol=1e-5)}


def assert_close(got, want, rtol, atol):
    """Leaf by leaf: |got − want| ≤ atol·max(1, max|want|) + rtol·|want|."""
    chex.assert_trees_all_equal_structs(got, want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = max(1.0, float(np.max(np.abs(b)))) if np.size(b) else 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol * scale)


def cast(tree, dtype):
    """Every floating leaf of ``tree`` in ``dtype`` (integer leaves unchanged)."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def abstract_init(layer, input_shape):
    """``layer.init`` traced abstractly (nothing compiled): (output shape, params as
    ``jax.ShapeDtypeStruct``s)."""
    box = []

    def init():
        out_shape, params = layer.init(jax.random.key(0), input_shape)
        box.append(tuple(out_shape))
        return params

    params = jax.eval_shape(init)
    return box[0], params


def random_params(layer, input_shape, seed=0, dtype=np.float64):
    """Params of ``layer`` for ``input_shape`` (its init traced abstractly, not compiled) filled
    with standard normal draws: the tests' main cost is compiling small programs."""
    out_shape, shapes = abstract_init(layer, input_shape)
    rng = np.random.default_rng(seed)
    return out_shape, jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), dtype), shapes)


def assert_grads_like(grads, params):
    chex.assert_trees_all_equal_structs(grads, params)
    for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)):
        assert g.shape == p.shape and g.dtype == p.dtype, (g.shape, g.dtype, p.shape, p.dtype)


def check_bwd(layer, params, inputs, dtype=jnp.float64, seed=3, reference=None, **kwargs):
    """``layer.bwd`` after ``layer.fwd`` equals ``jax.vjp`` of ``layer.apply``; returns grads.

    ``reference(params, inputs)``, if given, is an independent formula that apply's outputs
    must equal. Everything runs in one jitted program (one compilation per case: compiling
    is the tests' main cost)."""
    params, inputs = cast(params, dtype), cast(inputs, dtype)
    float_inputs = all(jnp.issubdtype(a.dtype, jnp.floating)
                       for a in jax.tree_util.tree_leaves(inputs))
    out_shape = jax.eval_shape(lambda p, x: layer.apply(p, x, **kwargs), params, inputs)
    g = jax.random.normal(jax.random.key(seed), out_shape.shape, dtype)

    @jax.jit
    def both(params, inputs, g):
        out, residuals = layer.fwd(params, inputs, **kwargs)
        manual = layer.bwd(params, residuals, g)
        if float_inputs:
            want_out, vjp = jax.vjp(lambda p, x: layer.apply(p, x, **kwargs), params, inputs)
            auto = vjp(g)
        else:
            want_out, vjp = jax.vjp(lambda p: layer.apply(p, inputs, **kwargs), params)
            auto = (vjp(g)[0], None)
        ref = want_out if reference is None else reference(params, inputs)
        return out, want_out, ref, manual, auto

    out, want_out, ref, (grads, gx), (want_grads, want_gx) = both(params, inputs, g)
    tol = RTOL[jnp.dtype(dtype)]
    assert_close(out, want_out, **tol)
    assert_close(want_out, ref, **tol)
    assert_grads_like(grads, params)
    if float_inputs:
        chex.assert_trees_all_equal_structs(gx, inputs)
        for a, b in zip(jax.tree_util.tree_leaves(gx), jax.tree_util.tree_leaves(inputs)):
            assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(gx, want_gx, **tol)
    else:
        assert gx is None
    assert_close(grads, want_grads, **tol)
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves((grads, gx)))
    return grads, gx
