"""Mixed precision: params float32, compute bfloat16/float16, outputs and loss float32; every
activation trains and stays finite in bfloat16, on both gradient paths; float16 needs and gets
dynamic loss scaling."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fast import normal, numpy_init

import jaxnet
from jaxnet.precision import (
    DynamicLossScale,
    Policy,
    all_finite,
    cast_floating,
    get_policy,
    loss_scaled_value_and_grad,
    mixed_precision,
)

ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "softplus", "silu"]


def _blobs(n=128, d=8, classes=3, seed=0):
    """Linearly separable-ish Gaussian blobs (float32 inputs, integer labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)) * 3
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.standard_normal((n, d))
    return jax.device_put((x.astype(np.float32), y))  # converted in numpy: nothing compiled


def _dtypes(tree):
    return {jnp.dtype(x.dtype).name for x in jax.tree.leaves(tree)}


def test_named_policies():
    assert get_policy("float32") == Policy()
    p = get_policy("bfloat16")
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (jnp.float32, jnp.bfloat16,
                                                                jnp.float32)
    assert get_policy("float16").needs_loss_scaling and not p.needs_loss_scaling
    with pytest.raises(ValueError, match="unknown precision policy 'half'"):
        get_policy("half")
    with pytest.raises(ValueError, match="floating"):
        get_policy(Policy(jnp.float32, jnp.int32, jnp.float32))


def test_cast_floating_leaves_integers_alone():
    tree = {"w": jnp.ones(2), "step": jnp.asarray(3), "name": "x"}
    out = cast_floating(tree, jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["step"].dtype == tree["step"].dtype
    assert out["name"] == "x"


def test_policy_stores_params_in_float32_computes_in_bfloat16_returns_float32():
    net = mixed_precision(jaxnet.mlp([16], 3), "bfloat16")
    _, params = net.init(jax.random.key(0), (-1, 8))  # tests run with float64 on
    assert _dtypes(params) == {"float32"}
    x, _ = _blobs()
    jaxpr = str(jax.make_jaxpr(net.apply)(params, x))
    out = jax.jit(net.apply)(params, x)
    assert "bf16[128,16]" in jaxpr  # the hidden activations are bfloat16
    assert out.dtype == jnp.float32
    plain = jaxnet.mlp([16], 3)
    np.testing.assert_allclose(out, jax.jit(plain.apply)(params, x), rtol=0.05, atol=0.05)


def test_manual_backward_rule_follows_the_policy():
    net = mixed_precision(jaxnet.mlp([16, 16], 3, "tanh"), "bfloat16")
    _, params = numpy_init(net, (-1, 8))  # the init's dtypes (float32), drawn in numpy
    x, _ = _blobs(16)

    @jax.jit
    def both(params, x):
        out, res = net.fwd(params, x)
        g = jnp.ones_like(out) / out.size
        _, vjp = jax.vjp(net.apply, params, x)
        return out, net.bwd(params, res, g), vjp(g)

    out, (grads, gx), (auto_grads, auto_gx) = both(params, x)
    assert out.dtype == jnp.float32 and _dtypes(grads) == {"float32"} and gx.dtype == x.dtype
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0.05, atol=1e-3), grads,
                 auto_grads)
    np.testing.assert_allclose(gx, auto_gx, rtol=0.05, atol=1e-3)


def _train(net, params, x, y, steps, grad="auto", lr=1e-2):
    """Adam steps with jax.grad (``"auto"``), the hand-written backward pass (``"manual"``),
    or ``"both"``: each step computes both, checks both are finite and updates with the
    manual one; returns the largest relative difference between the two as well."""
    opt = optax.adam(lr)

    def auto_grad(p):
        return jax.value_and_grad(lambda p: jaxnet.softmax_cross_entropy(net.apply(p, x), y))(p)

    def manual_grad(p):
        out, res = net.fwd(p, x)
        g = jax.grad(lambda o: jaxnet.softmax_cross_entropy(o, y))(out)
        return jaxnet.softmax_cross_entropy(out, y), net.bwd(p, res, g)[0]

    @jax.jit  # one program per activation, not op by op
    def step(p, o):
        loss, g = (auto_grad if grad == "auto" else manual_grad)(p)
        finite, rel = all_finite(g), jnp.zeros(())
        if grad == "both":
            _, ga = auto_grad(p)
            finite = finite & all_finite(ga)
            rel = jnp.max(jnp.stack([
                jnp.linalg.norm(a - m) / (jnp.linalg.norm(a) + 1e-12)
                for a, m in zip(jax.tree.leaves(ga), jax.tree.leaves(g), strict=True)]))
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss, finite, rel

    opt_state, losses, rels = opt.init(params), [], []
    for _ in range(steps):
        params, opt_state, loss, finite, rel = step(params, opt_state)
        assert bool(finite), "non-finite gradient"
        losses.append(float(loss))
        rels.append(float(rel))
    return (params, losses, rels) if grad == "both" else (params, losses)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_trains_in_bfloat16_on_both_gradient_paths(activation):
    """jax.grad and the hand-written backward pass stay finite at every step and agree to
    bfloat16 precision (at the start; later, as the gradients shrink, rounding dominates their
    difference); training with the hand-written gradients fits the data."""
    net = mixed_precision(jaxnet.mlp([32], 3, activation), "bfloat16")
    _, params = net.init(jax.random.key(1), (-1, 8))
    x, y = _blobs()
    params, losses, rels = _train(net, params, x, y, steps=30, grad="both")
    assert all(np.isfinite(losses)) and all_finite(params)
    assert _dtypes(params) == {"float32"}
    assert rels[0] < 0.03 and max(rels) < 0.25, f"auto vs manual gradients (relative): {rels}"
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    acc = jaxnet.accuracy(net.apply(params, x), y)
    assert acc > 0.9


def test_bfloat16_training_tracks_float32_training():
    x, y = _blobs(seed=3)
    results = {}
    for name in ["float32", "bfloat16"]:
        net = mixed_precision(jaxnet.mlp([32], 3, "gelu"), name)
        _, params = net.init(jax.random.key(2), (-1, 8))
        results[name] = _train(net, params, x, y, steps=60)[1]
    assert abs(results["bfloat16"][-1] - results["float32"][-1]) < 0.05
    np.testing.assert_allclose(results["bfloat16"][:5], results["float32"][:5], rtol=0.05)


# --- float16 and loss scaling -------------------------------------------------------

def _tiny_loss(net, x, y):
    """A loss whose gradients (≈1e-8) underflow float16 (smallest subnormal 6e-8)."""
    return lambda p: 1e-6 * jaxnet.softmax_cross_entropy(net.apply(p, x), y)


def test_float16_gradients_underflow_without_loss_scaling_and_not_with_it():
    x, y = _blobs(64)
    net16 = mixed_precision(jaxnet.mlp([32], 3), "float16")
    net32 = mixed_precision(jaxnet.mlp([32], 3), "float32")
    _, params = net16.init(jax.random.key(0), (-1, 8))
    exact = jax.jit(jax.grad(_tiny_loss(net32, x, y)))(params)
    plain = jax.jit(jax.grad(_tiny_loss(net16, x, y)))(params)
    assert float(jnp.abs(plain["dense_0"]["w"]).max()) == 0.0  # all underflowed
    scale = DynamicLossScale.create(2.0 ** 15)
    loss, scaled, finite, _ = jax.jit(loss_scaled_value_and_grad(_tiny_loss(net16, x, y)))(
        scale, params)
    assert bool(finite) and loss.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(exact), strict=True):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * float(jnp.abs(b).max()))


def test_loss_scale_halves_on_overflow_and_grows_after_period():
    s = DynamicLossScale.create(8.0, period=3, min_scale=2.0)
    s = s.adjust(jnp.asarray(False))
    assert float(s.scale) == 4.0 and int(s.good_steps) == 0
    for _ in range(2):
        s = s.adjust(jnp.asarray(True))
    assert float(s.scale) == 4.0 and int(s.good_steps) == 2
    s = s.adjust(jnp.asarray(True))
    assert float(s.scale) == 8.0 and int(s.good_steps) == 0
    for _ in range(5):
        s = s.adjust(jnp.asarray(False))
    assert float(s.scale) == 2.0  # never below min_scale
    with pytest.raises(ValueError, match="period"):
        DynamicLossScale.create(period=0)
    with pytest.raises(ValueError, match="min_scale"):
        DynamicLossScale.create(0.5, min_scale=1.0)


def test_float16_training_with_dynamic_loss_scaling_skips_overflowing_steps():
    x, y = _blobs()
    net = mixed_precision(jaxnet.mlp([32, 32], 3, "tanh"), "float16")
    _, params = net.init(jax.random.key(0), (-1, 8))
    opt = optax.adam(1e-2)
    vg = loss_scaled_value_and_grad(
        lambda p: jaxnet.softmax_cross_entropy(net.apply(p, x), y))

    @jax.jit
    def step(params, opt_state, scale):
        loss, grads, finite, scale = vg(scale, params)
        updates, new_opt = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        return keep(new_params, params), keep(new_opt, opt_state), scale, loss, finite

    # 2^24 overflows float16 (max 65504) in the first backward pass: the step is skipped.
    scale = DynamicLossScale.create(2.0 ** 24, period=10)
    opt_state, losses, skipped = opt.init(params), [], 0
    p0 = params
    for i in range(60):
        params, opt_state, scale, loss, finite = step(params, opt_state, scale)
        if i == 0:
            assert not bool(finite)
            jax.tree.map(np.testing.assert_array_equal, params, p0)
        skipped += not bool(finite)
        losses.append(float(loss))
    assert float(scale.scale) < 2.0 ** 24
    assert skipped < 20 and all_finite(params)
    assert losses[-1] < 0.5 * losses[0]
    assert jaxnet.accuracy(net.apply(params, x), y) > 0.9


@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_mixed_precision_net_trains_with_make_train_step(grad):
    from jaxnet import train
    net = mixed_precision(jaxnet.mlp([32], 3, "relu"), "bfloat16")
    opt = optax.adam(1e-2)
    state = train.init_state(net, opt, jax.random.key(0), (-1, 8))
    step = train.make_train_step(net, jaxnet.softmax_cross_entropy, opt, grad)
    x, y = _blobs()
    losses = []
    for _ in range(25):
        state, loss = step(state, x, y)
        losses.append(float(loss))
    assert _dtypes(state.params) == {"float32"} and np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]


def test_manual_gradients_and_summary_of_a_wrapped_net_with_a_fused_output():
    """The wrapper is not mistaken for the serial it wraps: the manual pass takes the
    unfused path through it (and agrees with jax.grad), summary sees the inner layers."""
    net = jaxnet.mixed_precision(jaxnet.mlp([8], 3, "relu", "log_softmax"), "float32")
    _, params = numpy_init(net, (-1, 4))
    x, t = normal((5, 4), 1), jnp.arange(5) % 3
    f = jaxnet.manual_value_and_grad(net, jaxnet.softmax_cross_entropy)

    @jax.jit  # the manual pass and jax.grad as one program, not op by op
    def both(params, x, t):
        return f(params, x, t), jax.value_and_grad(
            lambda p: jaxnet.softmax_cross_entropy(net.apply(p, x), t))(params)

    (value, grads), (want_value, want) = both(params, x, t)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-7)
    s = jaxnet.summary(net, (-1, 4))
    assert (s.depth, s.width, s.param_count) == (1, 8, 4 * 8 + 8 + 8 * 3 + 3)
