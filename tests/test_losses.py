"""The losses' hand-written gradients: jax.grad of a loss goes through them, and they agree
with jax.grad of the same loss without the rule (optax's function) and with finite
differences.

Each check compiles the computations it compares with jax.jit (one XLA program per case)
and compares the results in numpy: op-by-op (eager) dispatch compiles every primitive
of every shape and dtype on its own and made this file several times slower. The
eager path keeps its coverage in TestVariants (without_jit) and in the checks that
raise at trace time."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerances import TOL
from jax.test_util import check_grads

import jaxnet as jn

# The rule and the reference compute the same quantities in a different order, so they
# differ by rounding: a few ulp of the dtype (TOL), relative to the largest gradient entry.
DTYPES = list(TOL)
WIRED = [jn.softmax_cross_entropy, jn.l2_loss]  # the losses with a custom_jvp rule


@functools.cache
def jitted(f, transform=None, **kwargs):
    """jax.jit(transform(f, **kwargs)), one object per arguments, so that tests with the same
    shapes and dtypes share its compiled programs."""
    return jax.jit(f if transform is None else transform(f, **kwargs))


def finite(x):
    return bool(np.all(np.isfinite(np.asarray(x))))


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
    chex.assert_trees_all_close(jitted(loss, jax.grad)(outputs, targets),
                                jitted(loss.output_grad)(outputs, targets), rtol=1e-15, atol=0)
    assert "custom_jvp_call" in str(jax.make_jaxpr(loss)(outputs, targets))
    assert "custom_jvp_call" not in str(jax.make_jaxpr(loss.formula)(outputs, targets))


CASES = [(loss, targets) for loss in (jn.softmax_cross_entropy, jn.cross_entropy)
         for targets in ("labels", "one_hot", "soft")] + [(jn.l2_loss, "real")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss,targets", CASES, ids=lambda c: getattr(c, "__name__", c))
def test_gradient_matches_jax_grad_of_the_formula(loss, targets, dtype):
    outputs, t = problem(loss, dtype, targets)
    value, grad = jitted(loss, jax.value_and_grad)(outputs, t)
    ref_value, ref_grad = jitted(loss.formula, jax.value_and_grad)(outputs, t)
    assert grad.dtype == outputs.dtype and value.dtype == outputs.dtype
    assert finite(grad)
    scale = float(np.max(np.abs(np.asarray(ref_grad, np.float32))))
    tol = TOL[jnp.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(grad, np.float64), np.asarray(ref_grad, np.float64),
                               rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))
    np.testing.assert_array_equal(np.asarray(value), np.asarray(ref_value))


@pytest.mark.parametrize("loss", WIRED, ids=lambda f: f.__name__)
def test_target_gradient_matches_the_formula(loss):
    outputs, targets = problem(loss, jnp.float64, "soft")
    chex.assert_trees_all_close(jitted(loss, jax.grad, argnums=1)(outputs, targets),
                                jitted(loss.formula, jax.grad, argnums=1)(outputs, targets),
                                rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", WIRED, ids=lambda f: f.__name__)
def test_finite_differences_orders_one_and_two(loss):
    outputs, targets = problem(loss, jnp.float64, "soft")
    # check_grads differentiates jit(loss): each jvp, vjp and evaluation is one program
    check_grads(jitted(loss), (outputs, targets), order=2, modes=["fwd", "rev"],
                atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss", WIRED, ids=lambda f: f.__name__)
def test_hessian_matches_the_formula(loss):
    outputs, targets = problem(loss, jnp.float64, "labels")
    chex.assert_trees_all_close(jitted(loss, jax.hessian)(outputs, targets),
                                jitted(loss.formula, jax.hessian)(outputs, targets),
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


@jax.jit
def extreme_gradients(logits, labels, soft):
    return (jax.grad(jn.softmax_cross_entropy)(logits, labels),
            jax.grad(jn.softmax_cross_entropy, argnums=1)(logits, soft))


def test_finite_for_extreme_logits_in_every_dtype():
    for dtype in DTYPES:
        big = jnp.finfo(dtype).max
        logits = jnp.array([[big, -big, 0.0], [0.0, 0.0, 0.0]], dtype)
        soft = jnp.full((2, 3), 1 / 3, dtype)
        grad, target_grad = extreme_gradients(logits, jnp.array([1, 2]), soft)
        assert finite(grad), dtype
        assert finite(target_grad), dtype


def test_shape_mismatch_is_refused_under_grad_too():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4,\)"):
        jax.grad(jn.l2_loss)(jnp.ones((4, 3)), jnp.ones((4,)))


# --- found by optax's own tests and a sequence model (issue 10) ------------------------

def sequence_problem(rank, seed=0, classes=3):
    lead = {1: (), 2: (4,), 3: (2, 5)}[rank]
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = 2 * jax.random.normal(k1, lead + (classes,))
    labels = jax.random.randint(k2, lead, 0, classes)
    return logits, labels


@jax.jit
def mean_over_positions(logits, labels):
    """What test_cross_entropy_is_the_mean_over_every_leading_axis compares, as one program."""
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    want = jax.grad(lambda z: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels)))
    one_hot = jax.nn.one_hot(labels, logits.shape[-1])
    probs = jax.nn.softmax(logits)
    return dict(
        value=jn.softmax_cross_entropy(logits, labels), mean=jnp.mean(per),
        grad=jax.grad(jn.softmax_cross_entropy)(logits, labels), want=want(logits),
        grad_one_hot=jax.grad(jn.softmax_cross_entropy)(logits, one_hot),
        ce=jn.cross_entropy(probs, labels),
        ce_grad=jax.grad(jn.cross_entropy)(probs, labels),
        ce_formula_grad=jax.grad(jn.cross_entropy.formula)(probs, labels))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_cross_entropy_is_the_mean_over_every_leading_axis(rank):
    r = mean_over_positions(*sequence_problem(rank))
    np.testing.assert_allclose(r["value"], r["mean"], rtol=1e-12)
    # the hand-written gradient was shape[0] times too small a divisor: T times too large
    chex.assert_trees_all_close(r["grad"], r["want"], rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(r["grad_one_hot"], r["want"], rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(r["ce"], r["mean"], rtol=1e-12)
    chex.assert_trees_all_close(r["ce_grad"], r["ce_formula_grad"], rtol=1e-10)


@jax.jit
def masked(logits, labels, where):
    """What test_where_masks_positions_in_value_and_gradient compares, as one program."""
    nothing = jnp.zeros_like(where)
    return dict(
        value=jn.softmax_cross_entropy(logits, labels, where=where),
        per=optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        grad=jax.grad(lambda z: jn.softmax_cross_entropy(z, labels, where=where))(logits),
        formula_grad=jax.grad(
            lambda z: jn.softmax_cross_entropy.formula(z, labels, where=where))(logits),
        output_grad=jn.softmax_cross_entropy.output_grad(logits, labels, where=where),
        nothing=jn.softmax_cross_entropy(logits, labels, where=nothing),
        nothing_grad=jax.grad(
            lambda z: jn.softmax_cross_entropy(z, labels, where=nothing))(logits))


def test_where_masks_positions_in_value_and_gradient():
    logits, labels = sequence_problem(3)
    where = jnp.arange(10).reshape(2, 5) % 5 < 3       # the last two steps are padding
    r = masked(logits, labels, where)
    kept = np.asarray(r["per"])[np.asarray(where)]
    np.testing.assert_allclose(r["value"], np.mean(kept), rtol=1e-12)
    assert not np.any(np.asarray(r["grad"])[~np.asarray(where)])  # padding gets no gradient
    chex.assert_trees_all_close(r["grad"], r["formula_grad"], rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(r["output_grad"], r["grad"], rtol=1e-12, atol=1e-15)
    assert float(r["nothing"]) == 0.0
    assert finite(r["nothing_grad"])
    with pytest.raises(ValueError, match="labels' shape"):
        jn.softmax_cross_entropy(logits, labels, where=where[:, :3])


@jax.jit
def class_axis(logits, labels):
    """What test_axis_names_the_class_axis compares, as one program."""
    moved = jnp.moveaxis(logits, -1, 1)            # (batch, classes, time)
    return dict(
        moved=jn.softmax_cross_entropy(moved, labels, axis=1),
        last=jn.softmax_cross_entropy(logits, labels),
        moved_grad=jax.grad(lambda z: jn.softmax_cross_entropy(z, labels, axis=1))(moved),
        last_grad=jnp.moveaxis(jax.grad(jn.softmax_cross_entropy)(logits, labels), -1, 1),
        moved_accuracy=jn.accuracy(moved, labels, axis=1),
        last_accuracy=jn.accuracy(logits, labels))


def test_axis_names_the_class_axis():
    r = class_axis(*sequence_problem(3))
    np.testing.assert_allclose(r["moved"], r["last"], rtol=1e-12)
    chex.assert_trees_all_close(r["moved_grad"], r["last_grad"], rtol=1e-12)
    np.testing.assert_allclose(r["moved_accuracy"], r["last_accuracy"])


@jax.jit
def l2_any_rank(y, t):
    """What test_l2_loss_averages_over_the_first_axis_whatever_the_rank compares."""
    n = y.shape[0]
    return dict(
        value=jn.l2_loss(y, t), want=jnp.sum(optax.l2_loss(y, t)) / n,
        grad=jax.grad(jn.l2_loss)(y, t), want_grad=(y - t) / n,
        # (N,) and (N, 1) are the same data and the same loss
        flat=jn.l2_loss(y.reshape(n, -1)[:, 0], t.reshape(n, -1)[:, 0]),
        column=jn.l2_loss(y.reshape(n, -1)[:, :1], t.reshape(n, -1)[:, :1]))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_l2_loss_averages_over_the_first_axis_whatever_the_rank(rank):
    y = np.arange(24.0).reshape({1: (24,), 2: (6, 4), 3: (6, 2, 2)}[rank])
    r = l2_any_rank(y, np.ones_like(y))
    np.testing.assert_allclose(r["value"], r["want"], rtol=1e-12)
    chex.assert_trees_all_close(r["grad"], r["want_grad"], rtol=1e-12)
    np.testing.assert_allclose(r["flat"], r["column"])


def test_one_hot_targets_of_the_wrong_width_are_refused():
    logits, labels = sequence_problem(2)
    wrong = jax.nn.one_hot(labels, 5)
    for f in (jn.accuracy, jn.softmax_cross_entropy, jn.cross_entropy):
        with pytest.raises(ValueError, match="class axis must have the same width"):
            f(logits, wrong)
    with pytest.raises(ValueError, match="labels"):
        jn.accuracy(logits, labels[:2])
