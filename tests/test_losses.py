"""The losses' hand-written gradients: jax.grad of a loss goes through them, and they agree
with jax.grad of the same loss without the rule (optax's function) and with finite
differences."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import TOL
from jax.test_util import check_grads

import jaxnet as jn

# The rule and the reference compute the same quantities in a different order, so they
# differ by rounding: a few ulp of the dtype (TOL), relative to the largest gradient entry.
DTYPES = list(TOL)
WIRED = [jn.softmax_cross_entropy, jn.l2_loss]  # the losses with a custom_jvp rule


def problem(loss, dtype, targets="labels", batch=6, classes=4, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    outputs = (3 * jax.random.normal(k1, (batch, classes))).astype(dtype)
    if loss is jn.l2_loss:
        return outputs, jax.random.normal(k2, (batch, classes)).astype(dtype)
    if loss is jn.cross_entropy:
        outputs = jax.nn.softmax(outputs.astype(jnp.float32)).astype(dtype)
    labels = jax.random.randint(k3, (batch,), 0, classes)
    if targets == "labels":
        return outputs, labels
    if targets == "one_hot":
        return outputs, jax.nn.one_hot(labels, classes, dtype=dtype)
    soft = jax.nn.softmax(jax.random.normal(k2, (batch, classes)))  # soft labels, rows sum to 1
    return outputs, soft.astype(dtype)


@pytest.mark.parametrize("loss", WIRED, ids=lambda f: f.__name__)
def test_the_rule_is_what_jax_grad_uses(loss):
    outputs, targets = problem(loss, jnp.float64)
    chex.assert_trees_all_close(jax.grad(loss)(outputs, targets),
                                loss.output_grad(outputs, targets), rtol=1e-15, atol=0)
    assert isinstance(loss, jax.custom_jvp) and not isinstance(loss.formula, jax.custom_jvp)


CASES = [(loss, targets) for loss in (jn.softmax_cross_entropy, jn.cross_entropy)
         for targets in ("labels", "one_hot", "soft")] + [(jn.l2_loss, "real")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss,targets", CASES, ids=lambda c: getattr(c, "__name__", c))
def test_gradient_matches_jax_grad_of_the_formula(loss, targets, dtype):
    outputs, t = problem(loss, dtype, targets)
    value, grad = jax.value_and_grad(loss)(outputs, t)
    ref_value, ref_grad = jax.value_and_grad(loss.formula)(outputs, t)
    assert grad.dtype == outputs.dtype and value.dtype == outputs.dtype
    assert bool(jnp.all(jnp.isfinite(grad)))
    scale = float(jnp.max(jnp.abs(ref_grad.astype(jnp.float32))))
    tol = TOL[jnp.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(grad, np.float64), np.asarray(ref_grad, np.float64),
                               rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))
    np.testing.assert_array_equal(np.asarray(value), np.asarray(ref_value))


@pytest.mark.parametrize("loss", WIRED, ids=lambda f: f.__name__)
def test_target_gradient_matches_the_formula(loss):
    outputs, targets = problem(loss, jnp.float64, "soft")
    chex.assert_trees_all_close(jax.grad(loss, argnums=1)(outputs, targets),
                                jax.grad(loss.formula, argnums=1)(outputs, targets),
                                rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", WIRED, ids=lambda f: f.__name__)
def test_finite_differences_orders_one_and_two(loss):
    outputs, targets = problem(loss, jnp.float64, "soft")
    check_grads(loss, (outputs, targets), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss", WIRED, ids=lambda f: f.__name__)
def test_hessian_matches_the_formula(loss):
    outputs, targets = problem(loss, jnp.float64, "labels")
    chex.assert_trees_all_close(jax.hessian(loss)(outputs, targets),
                                jax.hessian(loss.formula)(outputs, targets),
                                rtol=1e-10, atol=1e-13)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_under_jit_and_vmap(self):
        outputs, labels = problem(jn.softmax_cross_entropy, jnp.float64)
        per_row = self.variant(jax.vmap(jax.grad(jn.softmax_cross_entropy)))(outputs, labels)
        # a single row is a batch of one, so each row's gradient is N times its share
        chex.assert_trees_all_close(per_row / outputs.shape[0],
                                    jax.grad(jn.softmax_cross_entropy)(outputs, labels),
                                    rtol=1e-12, atol=1e-15)


def test_finite_for_extreme_logits_in_every_dtype():
    for dtype in DTYPES:
        big = jnp.finfo(dtype).max
        logits = jnp.array([[big, -big, 0.0], [0.0, 0.0, 0.0]], dtype)
        grad = jax.grad(jn.softmax_cross_entropy)(logits, jnp.array([1, 2]))
        assert bool(jnp.all(jnp.isfinite(grad))), dtype
        soft = jnp.full((2, 3), 1 / 3, dtype)
        target_grad = jax.grad(jn.softmax_cross_entropy, argnums=1)(logits, soft)
        assert bool(jnp.all(jnp.isfinite(target_grad))), dtype


def test_shape_mismatch_is_refused_under_grad_too():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4,\)"):
        jax.grad(jn.l2_loss)(jnp.ones((4, 3)), jnp.ones((4,)))
