"""Losses and metrics, built on optax's losses.

Each loss is ``loss(outputs, targets) -> scalar`` (the mean over the batch)
and carries its hand-written gradient, used by the manual backward pass and,
for ``softmax_cross_entropy`` and ``l2_loss``, attached with ``jax.custom_jvp``
so that ``jax.grad`` of the loss uses it too (as the activations do):

- ``loss.formula(outputs, targets)``: the same loss with no hand-written rule
  (optax's function), which the checks differentiate with ``jax.grad``;
- ``loss.output_grad(outputs, targets)``: ∂L/∂outputs;
- ``loss.fused_with``: the output activation whose backward step the loss's
  fused form replaces, and ``loss.fused_grad(y, targets)``: ∂L/∂z where
  y = activation(z) is the network's output. For cross-entropy after a
  softmax (or log-softmax) this is the course's δ = y − t (divided by the
  batch size N, as the loss is a mean).

Targets for the classification losses are integer labels of shape (N,) or
one-hot rows of shape (N, C).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from .activations import log_softmax

Array = jax.Array

__all__ = ["softmax_cross_entropy", "cross_entropy", "l2_loss", "accuracy", "one_hot_like"]


def one_hot_like(outputs: Array, targets: Array) -> Array:
    """Targets as one-hot rows matching ``outputs`` (N, C): integer labels are encoded."""
    if targets.ndim == outputs.ndim:
        return targets.astype(outputs.dtype)
    return jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)


def _batch_size(outputs: Array) -> int:
    return outputs.shape[0] if outputs.ndim > 1 else 1


def _attach(loss: Callable, output_grad: Callable, fused_with: str | None = None,
            fused_grad: Callable | None = None, target_grad: Callable | None = None,
            formula: Callable | None = None) -> Callable:
    """Give ``loss`` its hand-written gradients; with ``target_grad``, also wire them in.

    With ``target_grad`` (∂L/∂targets) the loss is wrapped in ``jax.custom_jvp``
    with the tangent L̇ = Σ ∂L/∂y · ẏ + Σ ∂L/∂t · ṫ (the second term only for
    floating targets: integer labels have no tangent), so ``jax.grad``, ``jax.jvp``
    and higher derivatives go through the hand-written rule.
    """
    if target_grad is not None:
        formula = loss
        loss = jax.custom_jvp(formula)

        @loss.defjvp
        def _jvp(primals, tangents):
            outputs, targets = primals
            d_outputs, d_targets = tangents
            value = formula(outputs, targets)  # raises on bad shapes before any gradient
            tangent = jnp.sum(output_grad(outputs, targets) * d_outputs)
            if jnp.issubdtype(targets.dtype, jnp.inexact):
                tangent = tangent + jnp.sum(target_grad(outputs, targets) * d_targets)
            return value, tangent.astype(value.dtype)

    loss.formula = formula or loss
    loss.output_grad = output_grad
    loss.fused_with = fused_with
    loss.fused_grad = fused_grad
    return loss


def softmax_cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean cross-entropy of softmax(logits) against the targets.

    L = −(1/N) Σₙ Σᵢ tₙᵢ log σᵢ(zₙ), via optax's
    ``softmax_cross_entropy_with_integer_labels`` (integer labels) or
    ``softmax_cross_entropy`` (one-hot rows). Log-softmax outputs are valid
    logits too (log-softmax is idempotent), so this is the loss for nets with
    linear or log-softmax outputs.

    Gradient, written by hand and used by ``jax.grad``: ∂L/∂z = (σ(z) − t)/N
    (and ∂L/∂t = −log σ(z)/N for floating targets).

    Shapes: logits (N, C), targets (N,) integers or (N, C).
    """
    if targets.ndim == logits.ndim:
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def _softmax_ce_output_grad(logits, targets):
    # ∂L/∂z = (σ(z) − t) / N
    return (jax.nn.softmax(logits) - one_hot_like(logits, targets)) / _batch_size(logits)


def _softmax_ce_fused_grad(log_probs, targets):
    # The net ends in log-softmax, y = log σ(z): ∂L/∂z = (eʸ − t) / N.
    return (jnp.exp(log_probs) - one_hot_like(log_probs, targets)) / _batch_size(log_probs)


def _softmax_ce_target_grad(logits, targets):
    # ∂L/∂t = −log σ(z) / N; jaxnet's log-softmax saturates at finfo.min where log σ lies
    # below the dtype's range (float16), so this stays finite
    return -log_softmax(logits) / _batch_size(logits)


softmax_cross_entropy = _attach(softmax_cross_entropy, _softmax_ce_output_grad, "log_softmax",
                                _softmax_ce_fused_grad, _softmax_ce_target_grad)


def cross_entropy(probs: Array, targets: Array) -> Array:
    """Mean cross-entropy of probabilities (a softmax output) against the targets.

    L = −(1/N) Σₙ Σᵢ tₙᵢ log pₙᵢ, computed as optax's softmax cross-entropy of
    log p (exact, since softmax(log p) = p for rows that sum to 1); p is
    clipped at the dtype's smallest normal number so that log p stays finite.
    Shapes: probs (N, C), targets (N,) integers or (N, C).
    """
    return softmax_cross_entropy(_log_clipped(probs), targets)


def _log_clipped(probs):
    return jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))


def _ce_output_grad(probs, targets):
    # ∂L/∂p = −t / (N p)
    tiny = jnp.finfo(probs.dtype).tiny
    return -one_hot_like(probs, targets) / jnp.maximum(probs, tiny) / _batch_size(probs)


def _ce_fused_grad(probs, targets):
    # The net ends in softmax, p = σ(z): ∂L/∂z = (p − t) / N, the course's δ = y − t.
    return (probs - one_hot_like(probs, targets)) / _batch_size(probs)


def _cross_entropy_formula(probs, targets):
    return softmax_cross_entropy.formula(_log_clipped(probs), targets)


# jax.grad of cross_entropy goes through log p and then softmax_cross_entropy's rule.
cross_entropy = _attach(cross_entropy, _ce_output_grad, "softmax", _ce_fused_grad,
                        formula=_cross_entropy_formula)


def l2_loss(outputs: Array, targets: Array) -> Array:
    """The course's L2 loss: L = Σ (y − t)² / 2 / N (sum over outputs, mean over the batch).

    Built on ``optax.l2_loss`` (which is ½(y − t)² elementwise). Gradient,
    written by hand and used by ``jax.grad``: ∂L/∂y = (y − t)/N = −∂L/∂t.
    Shapes: outputs and targets (N, ...), the same shape.
    """
    if outputs.shape != targets.shape:
        raise ValueError(f"l2_loss needs outputs and targets of one shape, got "
                         f"{outputs.shape} and {targets.shape}")
    return jnp.sum(optax.l2_loss(outputs, targets)) / _batch_size(outputs)


def _l2_output_grad(outputs, targets):
    # ∂L/∂y = (y − t) / N
    return (outputs - targets) / _batch_size(outputs)


def _l2_target_grad(outputs, targets):
    # ∂L/∂t = −(y − t) / N
    return -_l2_output_grad(outputs, targets)


l2_loss = _attach(l2_loss, _l2_output_grad, "identity", _l2_output_grad, _l2_target_grad)


def accuracy(outputs: Array, targets: Array) -> Array:
    """Fraction of rows whose arg-max output equals the label (labels (N,) or one-hot (N, C))."""
    labels = jnp.argmax(targets, -1) if targets.ndim == outputs.ndim else targets
    return jnp.mean(jnp.argmax(outputs, -1) == labels)
