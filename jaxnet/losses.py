"""Losses and metrics, built on optax's losses.

Each loss is ``loss(outputs, targets) -> scalar`` (the mean over the batch)
and carries its hand-written gradient for the manual backward pass:

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
            fused_grad: Callable | None = None) -> Callable:
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


_attach(softmax_cross_entropy, _softmax_ce_output_grad, "log_softmax", _softmax_ce_fused_grad)


def cross_entropy(probs: Array, targets: Array) -> Array:
    """Mean cross-entropy of probabilities (a softmax output) against the targets.

    L = −(1/N) Σₙ Σᵢ tₙᵢ log pₙᵢ, computed as optax's softmax cross-entropy of
    log p (exact, since softmax(log p) = p for rows that sum to 1); p is
    clipped at the dtype's smallest normal number so that log p stays finite.
    Shapes: probs (N, C), targets (N,) integers or (N, C).
    """
    tiny = jnp.finfo(probs.dtype).tiny
    return softmax_cross_entropy(jnp.log(jnp.maximum(probs, tiny)), targets)


def _ce_output_grad(probs, targets):
    # ∂L/∂p = −t / (N p)
    tiny = jnp.finfo(probs.dtype).tiny
    return -one_hot_like(probs, targets) / jnp.maximum(probs, tiny) / _batch_size(probs)


def _ce_fused_grad(probs, targets):
    # The net ends in softmax, p = σ(z): ∂L/∂z = (p − t) / N, the course's δ = y − t.
    return (probs - one_hot_like(probs, targets)) / _batch_size(probs)


_attach(cross_entropy, _ce_output_grad, "softmax", _ce_fused_grad)


def l2_loss(outputs: Array, targets: Array) -> Array:
    """The course's L2 loss: L = Σ (y − t)² / 2 / N (sum over outputs, mean over the batch).

    Built on ``optax.l2_loss`` (which is ½(y − t)² elementwise).
    Shapes: outputs and targets (N, ...), the same shape.
    """
    if outputs.shape != targets.shape:
        raise ValueError(f"l2_loss needs outputs and targets of one shape, got "
                         f"{outputs.shape} and {targets.shape}")
    return jnp.sum(optax.l2_loss(outputs, targets)) / _batch_size(outputs)


def _l2_output_grad(outputs, targets):
    # ∂L/∂y = (y − t) / N
    return (outputs - targets) / _batch_size(outputs)


_attach(l2_loss, _l2_output_grad, "identity", _l2_output_grad)


def accuracy(outputs: Array, targets: Array) -> Array:
    """Fraction of rows whose arg-max output equals the label (labels (N,) or one-hot (N, C))."""
    labels = jnp.argmax(targets, -1) if targets.ndim == outputs.ndim else targets
    return jnp.mean(jnp.argmax(outputs, -1) == labels)
