"""Losses and metrics, built on optax's losses.

Each loss is ``loss(outputs, targets) -> scalar``, the **mean over every leading
position** of the outputs, and carries its hand-written gradient, used by the
manual backward pass and attached with ``jax.custom_jvp`` so that ``jax.grad``
of the loss uses it too (as the activations do):

- ``loss.formula(outputs, targets, ...)``: the same loss with no hand-written rule
  (optax's function), which the checks differentiate with ``jax.grad``;
- ``loss.output_grad(outputs, targets, ...)``: ∂L/∂outputs;
- ``loss.fused_with``: the output activation whose backward step the loss's
  fused form replaces, and ``loss.fused_grad(y, targets, ...)``: ∂L/∂z where
  y = activation(z) is the network's output. For cross-entropy after a
  softmax (or log-softmax) this is the course's δ = y − t (divided by the
  number of positions N, as the loss is a mean).

Shapes and reductions (``P`` is any number of leading axes, e.g. (batch,) or
(batch, time)):

========================  =====================  ==========================  ==================
loss                      outputs                targets                     reduction
========================  =====================  ==========================  ==================
softmax_cross_entropy     logits (P..., C)       labels (P...) int, or       mean over P
cross_entropy             probs (P..., C)        one-hot / soft (P..., C)    mean over P
l2_loss                   (N, ...)               (N, ...), the same shape    sum over ..., mean
                                                                             over N (axis 0)
accuracy                  (P..., C)              as cross-entropy            mean over P
========================  =====================  ==========================  ==================

``axis=`` names the class axis (default last). ``where=`` (a boolean mask of the
**labels'** shape P) leaves positions out: the mean runs over the positions
where it is True, in the value and the gradient, e.g. the padding of a batch of
sequences. (optax's ``where=`` masks *classes* of one row instead; jaxnet's
masks *positions*.) A mask with no True position gives 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from .activations import log_softmax

Array = jax.Array

__all__ = ["softmax_cross_entropy", "cross_entropy", "l2_loss", "accuracy", "one_hot_like"]


# --- shapes, masks and means ---------------------------------------------------------

def _class_last(name: str, outputs: Array, targets: Array, axis: int) -> tuple[Array, Array]:
    """Move the class axis of ``outputs`` (and of one-hot ``targets``) last; check shapes."""
    outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
    if outputs.ndim < 1:
        raise ValueError(f"{name}: outputs need a class axis, got a scalar")
    if not -outputs.ndim <= axis < outputs.ndim:
        raise ValueError(f"{name}: axis={axis} is out of range for outputs of shape "
                         f"{outputs.shape}")
    if targets.ndim == outputs.ndim:  # one-hot or soft targets, classes on the same axis
        if targets.shape != outputs.shape:
            raise ValueError(f"{name}: one-hot targets of shape {targets.shape} do not match "
                             f"outputs of shape {outputs.shape} (the class axis must have "
                             f"the same width)")
        return jnp.moveaxis(outputs, axis, -1), jnp.moveaxis(targets, axis, -1)
    outputs = jnp.moveaxis(outputs, axis, -1)
    if targets.shape != outputs.shape[:-1]:
        raise ValueError(f"{name}: integer labels of shape {targets.shape} do not match outputs "
                         f"of shape {outputs.shape} with classes on axis {axis}: labels need "
                         f"the outputs' shape without the class axis, {outputs.shape[:-1]}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"{name}: targets of shape {targets.shape} have one axis fewer than the "
                         f"outputs, so they must be integer labels, got dtype {targets.dtype}")
    return outputs, targets


def _check_where(name: str, where: Array | None, positions: tuple[int, ...]) -> Array | None:
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.shape != positions:
        raise ValueError(f"{name}: where= masks positions and needs the labels' shape "
                         f"{positions}, got {where.shape}")
    return where.astype(bool)


def _weights(where: Array | None, positions: tuple[int, ...], dtype) -> Array:
    """w such that the loss is Σ w·ℓ over positions: 1/N, or where/Σ where (0 if none)."""
    if where is None:
        return jnp.asarray(1 / max(1, math.prod(positions)), dtype)
    w = where.astype(dtype)
    return w / jnp.maximum(jnp.sum(w), 1)


def _weighted_sum(per_position: Array, where: Array | None) -> Array:
    w = _weights(where, per_position.shape, per_position.dtype)
    return jnp.sum(w * per_position)


def one_hot_like(outputs: Array, targets: Array) -> Array:
    """Targets as one-hot rows matching ``outputs`` (P..., C): integer labels are encoded."""
    if targets.ndim == outputs.ndim:
        return targets.astype(outputs.dtype)
    return jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)


def _with_rule(formula: Callable, output_grad: Callable, target_grad: Callable | None):
    """``jax.custom_jvp`` of ``formula(outputs, targets, where)`` with the hand-written tangent
    L̇ = Σ ∂L/∂y · ẏ + Σ ∂L/∂t · ṫ (the second term only for floating targets: integer
    labels have no tangent; ``where`` is a boolean mask and has none either)."""
    loss = jax.custom_jvp(formula)

    @loss.defjvp
    def _jvp(primals, tangents):
        outputs, targets, where = primals
        d_outputs, d_targets, _ = tangents
        value = formula(outputs, targets, where)
        tangent = jnp.sum(output_grad(outputs, targets, where) * d_outputs)
        if target_grad is not None and jnp.issubdtype(targets.dtype, jnp.inexact):
            tangent = tangent + jnp.sum(target_grad(outputs, targets, where) * d_targets)
        return value, tangent.astype(value.dtype)

    return loss


def _classification(name: str, core: Callable, formula: Callable, output_grad: Callable,
                    fused_with: str, fused_grad: Callable) -> Callable:
    """The public loss over any leading axes, with ``where=`` and ``axis=``, and its parts.

    ``core``, ``formula``, ``output_grad``, ``fused_grad`` take (outputs, targets, where)
    with the classes on the last axis; the public functions move ``axis`` there and
    the gradients back.
    """

    def prepare(outputs, targets, where, axis):
        outputs, targets = _class_last(name, outputs, targets, axis)
        return outputs, targets, _check_where(name, where, outputs.shape[:-1])

    def loss(outputs: Array, targets: Array, *, where: Array | None = None,
             axis: int = -1) -> Array:
        return core(*prepare(outputs, targets, where, axis))

    def public_formula(outputs, targets, *, where=None, axis=-1):
        return formula(*prepare(outputs, targets, where, axis))

    def gradient(rule):
        def grad(outputs, targets, *, where=None, axis=-1):
            return jnp.moveaxis(rule(*prepare(outputs, targets, where, axis)), -1, axis)
        return grad

    loss.formula = public_formula
    loss.output_grad = gradient(output_grad)
    loss.fused_with = fused_with
    loss.fused_grad = gradient(fused_grad)
    return loss


# --- softmax cross-entropy -------------------------------------------------------------

def _sce_formula(logits, targets, where):
    if targets.ndim == logits.ndim:
        per = optax.softmax_cross_entropy(logits, targets)
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return _weighted_sum(per, where)


def _sce_output_grad(logits, targets, where):
    # ∂L/∂z = (σ(z) − t)·w, w = 1/N (or the mask over its count)
    w = _weights(where, logits.shape[:-1], logits.dtype)
    return (jax.nn.softmax(logits) - one_hot_like(logits, targets)) * w[..., None]


def _sce_fused_grad(log_probs, targets, where):
    # The net ends in log-softmax, y = log σ(z): ∂L/∂z = (eʸ − t)·w.
    w = _weights(where, log_probs.shape[:-1], log_probs.dtype)
    return (jnp.exp(log_probs) - one_hot_like(log_probs, targets)) * w[..., None]


def _sce_target_grad(logits, targets, where):
    # ∂L/∂t = −log σ(z)·w; jaxnet's log-softmax saturates at finfo.min where log σ lies
    # below the dtype's range (float16), so this stays finite
    w = _weights(where, logits.shape[:-1], logits.dtype)
    return -log_softmax(logits) * w[..., None]


softmax_cross_entropy = _classification(
    "softmax_cross_entropy",
    _with_rule(_sce_formula, _sce_output_grad, _sce_target_grad),
    _sce_formula, _sce_output_grad, "log_softmax", _sce_fused_grad)
softmax_cross_entropy.__name__ = softmax_cross_entropy.__qualname__ = "softmax_cross_entropy"
softmax_cross_entropy.__doc__ = """Mean cross-entropy of softmax(logits) against the targets.

    L = −Σₚ wₚ Σᵢ tₚᵢ log σᵢ(zₚ) with wₚ = 1/N over the N leading positions p (or
    ``where``ₚ / Σ ``where``), via optax's ``softmax_cross_entropy_with_integer_labels``
    (integer labels) or ``softmax_cross_entropy`` (one-hot or soft targets).
    Log-softmax outputs are valid logits too (log-softmax is idempotent), so this
    is the loss for nets with linear or log-softmax outputs.

    Gradient, written by hand and used by ``jax.grad``: ∂L/∂z = (σ(z) − t)·w
    (and ∂L/∂t = −log σ(z)·w for floating targets).

    **Arguments**: ``logits`` (P..., C); ``targets`` (P...) integer labels or
    (P..., C) one-hot/soft; ``where`` (P...) boolean, positions to count (see the
    module docstring: it masks positions, not optax's classes); ``axis`` the class
    axis of ``logits`` (and of one-hot targets). **Returns** a scalar.
    """


# --- cross-entropy of probabilities --------------------------------------------------

def _log_clipped(probs):
    return jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))


def _ce_core(probs, targets, where):
    # jax.grad goes through log p and then softmax cross-entropy's rule (softmax(log p) = p)
    return softmax_cross_entropy(_log_clipped(probs), targets, where=where)


def _ce_formula(probs, targets, where):
    return _sce_formula(_log_clipped(probs), targets, where)


def _ce_output_grad(probs, targets, where):
    # ∂L/∂p = −t·w / p
    w = _weights(where, probs.shape[:-1], probs.dtype)
    tiny = jnp.finfo(probs.dtype).tiny
    return -one_hot_like(probs, targets) / jnp.maximum(probs, tiny) * w[..., None]


def _ce_fused_grad(probs, targets, where):
    # The net ends in softmax, p = σ(z): ∂L/∂z = (p − t)·w, the course's δ = y − t.
    w = _weights(where, probs.shape[:-1], probs.dtype)
    return (probs - one_hot_like(probs, targets)) * w[..., None]


cross_entropy = _classification("cross_entropy", _ce_core, _ce_formula, _ce_output_grad,
                                "softmax", _ce_fused_grad)
cross_entropy.__name__ = cross_entropy.__qualname__ = "cross_entropy"
cross_entropy.__doc__ = """Mean cross-entropy of probabilities (a softmax output) and targets.

    L = −Σₚ wₚ Σᵢ tₚᵢ log pₚᵢ, computed as softmax cross-entropy of log p (exact,
    since softmax(log p) = p for rows that sum to 1); p is clipped at the dtype's
    smallest normal number so that log p stays finite. Hand-written gradients:
    ∂L/∂p = −t·w/p, and fused with a softmax output ∂L/∂z = (p − t)·w.
    Shapes, ``where`` and ``axis`` as :func:`softmax_cross_entropy`.
    """


# --- L2 ----------------------------------------------------------------------------

def _batch(outputs: Array) -> int:
    return outputs.shape[0] if outputs.ndim >= 1 else 1


def _l2_formula(outputs, targets, where=None):
    return jnp.sum(optax.l2_loss(outputs, targets)) / _batch(outputs)


def _l2_output_grad(outputs, targets, where=None):
    # ∂L/∂y = (y − t) / N
    return (outputs - targets) / _batch(outputs)


def _l2_target_grad(outputs, targets, where=None):
    # ∂L/∂t = −(y − t) / N
    return -_l2_output_grad(outputs, targets)


_l2 = _with_rule(_l2_formula, _l2_output_grad, _l2_target_grad)


def _l2_check(outputs, targets):
    outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
    if outputs.shape != targets.shape:
        raise ValueError(f"l2_loss needs outputs and targets of one shape, got "
                         f"{outputs.shape} and {targets.shape}")
    return outputs, targets


def l2_loss(outputs: Array, targets: Array) -> Array:
    """The course's L2 loss: L = Σ (y − t)² / 2 / N, N = the size of axis 0 (the batch).

    Summed over every axis but the first and averaged over the first, whatever
    the rank: a batch of shape (N,) and the same data shaped (N, 1) give the same
    loss. Built on ``optax.l2_loss`` (½(y − t)² elementwise). Gradient, written by
    hand and used by ``jax.grad``: ∂L/∂y = (y − t)/N = −∂L/∂t.
    Shapes: outputs and targets (N, ...), the same shape; a scalar is a batch of one.
    """
    return _l2(*_l2_check(outputs, targets), None)


def _l2_public(rule):
    def f(outputs, targets):
        return rule(*_l2_check(outputs, targets))
    return f


l2_loss.formula = _l2_public(_l2_formula)
l2_loss.output_grad = _l2_public(_l2_output_grad)
l2_loss.fused_with = "identity"
l2_loss.fused_grad = l2_loss.output_grad


# --- accuracy ------------------------------------------------------------------------

def accuracy(outputs: Array, targets: Array, *, where: Array | None = None,
             axis: int = -1) -> Array:
    """Fraction of positions whose arg-max output equals the label.

    Targets are integer labels (P...) or one-hot rows (P..., C) of the outputs'
    width; ``where`` and ``axis`` as :func:`softmax_cross_entropy`.
    """
    outputs, targets = _class_last("accuracy", outputs, targets, axis)
    where = _check_where("accuracy", where, outputs.shape[:-1])
    labels = jnp.argmax(targets, -1) if targets.ndim == outputs.ndim else targets
    hits = (jnp.argmax(outputs, -1) == labels).astype(jnp.result_type(float))
    return _weighted_sum(hits, where)
