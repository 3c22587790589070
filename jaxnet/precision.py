"""Mixed precision: a dtype policy for params, compute and outputs, and dynamic loss scaling.

A :class:`Policy` names three dtypes: params are *stored* in ``param_dtype`` (float32, so that
small Adam updates are not rounded away), the layers *compute* in ``compute_dtype`` (bfloat16
or float16: half the memory traffic, fast matmuls on accelerators), and outputs and the loss
come back in ``output_dtype`` (float32). :func:`mixed_precision` wraps a layer so that its
``apply`` and its hand-written ``fwd``/``bwd`` follow the policy: gradients reach the params
in float32.

float16 has a narrow exponent range (smallest normal 6·10⁻⁵), so small gradients underflow
to zero; **dynamic loss scaling** multiplies the loss by S before differentiating and divides
the gradients by S after: S halves (and the step is skipped) when a gradient is not finite,
and doubles after ``period`` finite steps in a row. optax has ``apply_if_finite`` but no loss
scale, so :class:`DynamicLossScale` is written here. bfloat16 keeps float32's exponent range
and needs no loss scaling.

>>> net = mixed_precision(mlp([256, 256], 10), "bfloat16")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .protocol import (
    Composite,
    Layer,
    apply_with_state,
    init_with_state,
    is_layer,
    label_of,
    layer_bwd,
    layer_fwd,
    recorded,
)

__all__ = ["Policy", "get_policy", "cast_floating", "mixed_precision", "DynamicLossScale",
           "all_finite", "loss_scaled_value_and_grad"]

DTypeLike = Any


class Policy(NamedTuple):
    """Which dtype params are stored in, layers compute in, and outputs are returned in."""

    param_dtype: DTypeLike = jnp.float32
    compute_dtype: DTypeLike = jnp.float32
    output_dtype: DTypeLike = jnp.float32

    def cast_to_param(self, tree):
        return cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return cast_floating(tree, self.output_dtype)

    @property
    def needs_loss_scaling(self) -> bool:
        """float16 compute underflows small gradients: train it with :class:`DynamicLossScale`."""
        return jnp.dtype(self.compute_dtype) == jnp.float16


_NAMED = {
    "float32": Policy(),
    "bfloat16": Policy(jnp.float32, jnp.bfloat16, jnp.float32),
    "float16": Policy(jnp.float32, jnp.float16, jnp.float32),
}


def get_policy(policy: str | Policy) -> Policy:
    """A policy by name: ``"float32"`` (everything float32), ``"bfloat16"`` or ``"float16"``
    (params and outputs float32, compute in the named half type)."""
    if isinstance(policy, Policy):
        for dt in policy:
            if not jnp.issubdtype(jnp.dtype(dt), jnp.floating):
                raise ValueError(f"precision policy dtypes must be floating, got {policy}")
        return policy
    if policy not in _NAMED:
        raise ValueError(f"unknown precision policy {policy!r}; choose one of "
                         f"{sorted(_NAMED)} or pass a jaxnet.precision.Policy")
    return _NAMED[policy]


def cast_floating(tree, dtype: DTypeLike):
    """Cast every floating-point array leaf of ``tree`` to ``dtype``; leave the rest alone."""
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, dtype)
        return x

    return jax.tree.map(cast, tree)


@recorded
def mixed_precision(layer: Any, policy: str | Policy = "bfloat16") -> Layer:
    """Run ``layer`` under a precision policy.

    init: params are created, then cast to ``param_dtype``. apply: params and inputs are cast
    to ``compute_dtype``, the layer runs, its outputs are cast to ``output_dtype``. The
    hand-written backward rule follows the same casts in reverse: g → ``compute_dtype``,
    the layer's ``bwd``, param gradients → ``param_dtype``, the input gradient → the inputs'
    dtype. ``jax.grad`` through apply gives the same casts automatically. Model state keeps
    its own dtypes (running statistics stay float32). The wrapper adds no level to the
    params (its one child has the empty name) and its output is its child's output, so the
    manual pass finds a fused loss gradient through it.
    """
    from .combinators import _Children, composite

    if not is_layer(layer):
        raise TypeError(f"mixed_precision needs a layer, got {layer!r}")
    pol = get_policy(policy)
    ch = _Children([layer], "mixed_precision")
    ch.names = [""]

    def keep_dtypes(new, old):
        return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)

    def init(rng, input_shape):
        out_shape, params, state = init_with_state(layer, rng, input_shape)
        return out_shape, pol.cast_to_param(params), state

    def apply(params, state, inputs, kwargs):
        out, new_state = apply_with_state(layer, pol.cast_to_compute(params), state,
                                          pol.cast_to_compute(inputs), kwargs)
        return pol.cast_to_output(out), keep_dtypes(new_state, state)

    def forward(params, state, inputs, kwargs, ctx):
        in_dtypes = jax.tree.map(lambda x: getattr(x, "dtype", None), inputs)
        out, res, new_state = layer_fwd(layer, pol.cast_to_compute(params),
                                        pol.cast_to_compute(inputs), kwargs,
                                        ctx.child("", is_output=True), state)
        return pol.cast_to_output(out), (res, in_dtypes), keep_dtypes(new_state, state)

    def backward(params, residuals, g, ctx):
        res, in_dtypes = residuals
        grads, gx = layer_bwd(layer, pol.cast_to_compute(params), res, pol.cast_to_compute(g),
                              ctx.child("", is_output=True))
        if gx is not None:  # integer inputs (an embedding) have no gradient
            gx = jax.tree.map(lambda x, dt: x if dt is None else x.astype(dt), gx, in_dtypes)
        return keep_dtypes(grads, params), gx

    name = jnp.dtype(pol.compute_dtype).name
    return composite("mixed_precision", f"mixed_precision({label_of(layer)}, {name})", ch,
                     Composite(init, apply, forward, backward),
                     rebuild=lambda new: mixed_precision(new[0], pol), output_child=0,
                     config={"policy": pol})


# --- dynamic loss scaling -----------------------------------------------------------

@partial(jax.tree_util.register_dataclass, data_fields=["scale", "good_steps"],
         meta_fields=["period", "factor", "min_scale"])
@dataclass(frozen=True)
class DynamicLossScale:
    """Loss scale S, a pytree: it lives in the train state and passes through ``jax.jit``.

    ``scale``: S (float32); ``good_steps``: finite steps since S last changed; ``period``:
    finite steps before S doubles; ``factor``: how much S grows or shrinks;
    ``min_scale``: S never drops below it.
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0

    @classmethod
    def create(cls, initial_scale: float = 2.0 ** 15, period: int = 2000,
               factor: float = 2.0, min_scale: float = 1.0) -> DynamicLossScale:
        if not initial_scale >= min_scale > 0:
            raise ValueError(f"loss scale needs initial_scale >= min_scale > 0, got "
                             f"{initial_scale=}, {min_scale=}")
        if not isinstance(period, int) or period < 1 or not factor > 1:
            raise ValueError(f"loss scale needs period >= 1 and factor > 1, got {period=}, "
                             f"{factor=}")
        return cls(jnp.asarray(initial_scale, jnp.float32), jnp.asarray(0, jnp.int32),
                   period, factor, min_scale)

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        """L · S (in the loss's dtype)."""
        return loss * self.scale.astype(loss.dtype)

    def unscale(self, grads):
        """g / S, computed in float32 and returned in each gradient's dtype."""
        inv = 1.0 / self.scale
        return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

    def adjust(self, finite: jax.Array) -> DynamicLossScale:
        """The next S: halve on a non-finite step, double after ``period`` finite steps."""
        grow = finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(finite, jnp.where(grow, self.scale * self.factor, self.scale),
                          jnp.maximum(self.scale / self.factor, self.min_scale))
        good = jnp.where(finite & ~grow, self.good_steps + 1, 0).astype(jnp.int32)
        return replace(self, scale=scale.astype(jnp.float32), good_steps=good)


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf of ``tree`` is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def loss_scaled_value_and_grad(fun: Callable, has_aux: bool = False) -> Callable:
    """``jax.value_and_grad`` with dynamic loss scaling.

    Returns ``f(loss_scale, params, *args) -> (value, grads, finite, new_loss_scale)``:
    ``grads`` = ∇(S·fun)/S, ``finite`` tells whether every gradient is finite (when it is
    not, skip the update, e.g. ``jax.tree.map(partial(jnp.where, finite), new, old)``), and
    ``new_loss_scale`` is S adjusted for the next step.
    """
    def scaled(params, loss_scale, *args):
        out = fun(params, *args)
        loss = out[0] if has_aux else out
        return loss_scale.scale_loss(loss), out

    def wrapped(loss_scale: DynamicLossScale, params, *args):
        (_, out), grads = jax.value_and_grad(scaled, has_aux=True)(params, loss_scale, *args)
        grads = loss_scale.unscale(grads)
        finite = all_finite(grads)
        return out, grads, finite, loss_scale.adjust(finite)

    return wrapped
