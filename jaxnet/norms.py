"""Normalisation layers beside ``LayerNorm`` (in :mod:`jaxnet.layers`): GroupNorm, RMSNorm and
BatchNorm, each with its hand-written backward rule.

GroupNorm and RMSNorm normalise each example on its own (no batch statistics, no state);
BatchNorm normalises each channel over the batch and keeps running statistics as model state
(:mod:`jaxnet.protocol`). All end with a learned per-channel affine map; the channel axis is
last.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.nn import initializers

from .layers import Initializer, Layer, ShapeError, StatefulLayerError, standardized_tangent
from .protocol import recorded

Array = jax.Array

__all__ = ["GroupNorm", "RMSNorm", "BatchNorm"]


def _check_epsilon(label, epsilon):
    if not epsilon > 0:
        raise ValueError(f"{label} epsilon must be positive, got {epsilon!r}")


@recorded
def GroupNorm(num_groups: int, epsilon: float = 1e-5,
              scale_init: Initializer = initializers.ones,
              bias_init: Initializer = initializers.zeros) -> Layer:
    """Group normalisation (Wu & He, 2018) of channels-last inputs.

    The C channels split into G = ``num_groups`` groups of C/G consecutive channels; for each
    example and group, μ and σ² are the mean and variance over the group's channels and every
    axis between the batch and the channels (the spatial or time axes):

        x̂ = (x − μ) / √(σ² + ε),   y = x̂·scale + bias   (scale, bias per channel).

    G = 1 is LayerNorm over (*spatial, C); G = C is instance normalisation.

    **Arguments**: ``num_groups`` (must divide the channels), ``epsilon`` ε,
    ``scale_init``/``bias_init`` (``jax.nn.initializers``; ones and zeros).

    **Shapes**: ``(N, ..., C)`` → the same; params ``{"scale": (C,), "bias": (C,)}``.

    **Backward rule**, with ĝ = g·scale, s = 1/√(σ² + ε) and means over each group's cells:
    ∂L/∂x = s(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ∂L/∂scale = Σ g·x̂, ∂L/∂bias = Σ g (sums over every
    axis but the channels).
    """
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0:
        raise ValueError(f"GroupNorm num_groups must be a positive integer, got {num_groups!r}")
    _check_epsilon("GroupNorm", epsilon)
    label = f"GroupNorm({num_groups})"

    def check(shape, channels=None):
        shape = tuple(shape)
        if len(shape) < 2 or (channels is not None and shape[-1] != channels):
            want = f"(N, ..., {channels if channels is not None else 'C'})"
            raise ShapeError(f"{label} expects inputs of shape {want}, got {shape}")
        if shape[-1] % num_groups:
            raise ValueError(f"{label}: num_groups={num_groups} must divide the {shape[-1]} "
                             f"channels (input shape {shape})")

    def init(rng, input_shape):
        check(input_shape)
        c = input_shape[-1]
        k1, k2 = jax.random.split(rng)
        return tuple(input_shape), {"scale": scale_init(k1, (c,)), "bias": bias_init(k2, (c,))}

    def normalise(params, x):
        check(x.shape, params["scale"].shape[0])
        r = x.reshape(*x.shape[:-1], num_groups, x.shape[-1] // num_groups)
        axes = tuple(range(1, r.ndim - 2)) + (r.ndim - 1,)
        mean = jnp.mean(r, axes, keepdims=True)
        var = jnp.mean(jnp.square(r - mean), axes, keepdims=True)
        s = jax.lax.rsqrt(var + jnp.asarray(epsilon, r.dtype))
        return (r - mean) * s, s, axes

    def apply(params, inputs, **kwargs):
        xhat, _, _ = normalise(params, inputs)
        return xhat.reshape(inputs.shape) * params["scale"] + params["bias"]

    def fwd(params, inputs, **kwargs):
        xhat, s, _ = normalise(params, inputs)
        return xhat.reshape(inputs.shape) * params["scale"] + params["bias"], (xhat, s)

    def bwd(params, residuals, g):
        xhat, s = residuals
        axes = tuple(range(1, xhat.ndim - 2)) + (xhat.ndim - 1,)
        c = g.shape[-1]
        gh = (g * params["scale"]).reshape(xhat.shape)
        dx = standardized_tangent(xhat, s, gh, axes)
        grads = {"scale": jnp.sum((g * xhat.reshape(g.shape)).reshape(-1, c), 0),
                 "bias": jnp.sum(g.reshape(-1, c), 0)}
        return grads, dx.reshape(g.shape)

    return Layer(init, apply, kind="group_norm", label=label, fwd=fwd, bwd=bwd,
                 config={"num_groups": num_groups, "epsilon": epsilon})


@recorded
def RMSNorm(epsilon: float = 1e-6, scale_init: Initializer = initializers.ones) -> Layer:
    """Root-mean-square normalisation (Zhang & Sennrich, 2019) over the last axis.

        r = 1/√(mean(x²) + ε),   x̂ = x·r,   y = x̂·scale

    (LayerNorm without the centring and the bias; ε = 1e-6 as in Flax).

    **Shapes**: ``(..., d)`` → the same; params ``{"scale": (d,)}``.

    **Backward rule**, with ĝ = g·scale: ∂L/∂x = r(ĝ − x̂·mean(ĝ·x̂)) (means over the last axis),
    ∂L/∂scale = Σ g·x̂ (summed over every other axis).
    """
    _check_epsilon("RMSNorm", epsilon)

    def init(rng, input_shape):
        if len(input_shape) < 1 or input_shape[-1] <= 0:
            raise ShapeError(f"RMSNorm needs a positive feature axis last, got input shape "
                             f"{tuple(input_shape)}")
        return tuple(input_shape), {"scale": scale_init(rng, (input_shape[-1],))}

    def normalise(params, x):
        d = params["scale"].shape[0]
        if x.ndim < 1 or x.shape[-1] != d:
            raise ShapeError(f"RMSNorm expects inputs of shape (..., {d}), got {tuple(x.shape)}")
        r = jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True)
                          + jnp.asarray(epsilon, x.dtype))
        return x * r, r

    def apply(params, inputs, **kwargs):
        return normalise(params, inputs)[0] * params["scale"]

    def fwd(params, inputs, **kwargs):
        xhat, r = normalise(params, inputs)
        return xhat * params["scale"], (xhat, r)

    def bwd(params, residuals, g):
        xhat, r = residuals
        gh = g * params["scale"]
        dx = r * (gh - xhat * jnp.mean(gh * xhat, -1, keepdims=True))
        return {"scale": jnp.sum((g * xhat).reshape(-1, g.shape[-1]), 0)}, dx

    return Layer(init, apply, kind="rms_norm", label="RMSNorm", fwd=fwd, bwd=bwd,
                 config={"epsilon": epsilon})


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _batch_standardize(x: Array, epsilon: float) -> tuple[Array, Array, Array, Array]:
    """(x̂, s, μ, σ²) over every axis but the last: μ, σ² the batch mean and (biased)
    variance of each channel, s = 1/√(σ² + ε), x̂ = (x − μ)·s.

    Its JVP is BatchNorm's backward rule read forwards, ẋ̂ = s(ẋ − mean ẋ − x̂·mean(ẋ·x̂))
    (μ̇ = mean ẋ, σ̇² = 2·mean(x̂·ẋ)/s, ṡ = −s³σ̇²/2), so that ``jax.grad`` keeps x̂ and s and
    runs the rule's three passes instead of differentiating the mean, the variance and the
    rsqrt one by one.
    """
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    s = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * s, s, mean, var


@_batch_standardize.defjvp
def _batch_standardize_jvp(epsilon, primals, tangents):
    (x,), (t,) = primals, tangents
    xhat, s, mean, var = out = _batch_standardize(x, epsilon)
    axes = tuple(range(x.ndim - 1))
    t_mean, t_var = jnp.mean(t, axes), 2 * jnp.mean(t * xhat, axes) / s
    return out, (standardized_tangent(xhat, s, t, axes), -0.5 * s ** 3 * t_var, t_mean, t_var)


@recorded
def BatchNorm(momentum: float = 0.9, epsilon: float = 1e-5,
              scale_init: Initializer = initializers.ones,
              bias_init: Initializer = initializers.zeros, name: str | None = None) -> Layer:
    """Batch normalisation over every axis but the last (channels-last: batch and space).

    Train mode (``mode="train"``, the default): with μ, σ² the batch mean and (biased)
    variance of each channel, x̂ = (x − μ)/√(σ² + ε) and y = x̂·scale + bias; the running
    statistics become m ← momentum·m + (1 − momentum)·μ, v ← momentum·v + (1 − momentum)·σ².
    Eval mode (``mode="eval"``): x̂ = (x − m)/√(v + ε) with the running statistics, which
    are read, not changed, so an example's output does not depend on the rest of its batch.

    Params ``{"scale": (C,), "bias": (C,)}``; model state ``{"mean": (C,), "var": (C,)}``
    (zeros and ones at init). A stateful layer: run it with ``apply_with_state`` (its plain
    ``apply`` raises :class:`~jaxnet.StatefulLayerError`).

    Backward rule, with ĝ = g·scale, s = 1/√(σ² + ε) and means over the M = N·(spatial)
    positions of a channel: in train mode, through the batch statistics,
    ∂L/∂x = s(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)); in eval mode ∂L/∂x = ĝ·s;
    ∂L/∂scale = Σ g·x̂, ∂L/∂bias = Σ g. The state gets no gradient.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"BatchNorm momentum must be in [0, 1), got {momentum!r}")
    _check_epsilon("BatchNorm", epsilon)

    def channels(input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None or input_shape[-1] <= 0:
            raise ShapeError(f"BatchNorm needs a batch axis and a positive channel axis last, "
                             f"got input shape {tuple(input_shape)}")
        return input_shape[-1]

    def init(rng, input_shape):
        c = channels(input_shape)
        k1, k2 = jax.random.split(rng)
        return tuple(input_shape), {"scale": scale_init(k1, (c,)), "bias": bias_init(k2, (c,))}

    def state_init(input_shape):
        c = channels(input_shape)
        return {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))}

    def run(params, state, x, mode):
        mode = "train" if mode is None else mode
        if mode not in ("train", "eval"):
            raise ValueError(f"BatchNorm mode must be 'train' or 'eval', got {mode!r}")
        if x.ndim < 2 or x.shape[-1] != params["scale"].shape[0]:
            raise ShapeError(f"BatchNorm expects inputs of shape (N, ..., "
                             f"{params['scale'].shape[0]}), got {tuple(x.shape)}")
        if not (isinstance(state, dict) and {"mean", "var"} <= set(state)):
            raise StatefulLayerError(f"BatchNorm needs its model state {{'mean', 'var'}}, got "
                                     f"{sorted(state) if isinstance(state, dict) else state!r}"
                                     f" (from init_with_state)")
        if mode == "train":
            xhat, s, mean, var = _batch_standardize(x, epsilon)
            keep = jnp.asarray(momentum, state["mean"].dtype)
            new_state = {
                "mean": keep * state["mean"] + (1 - keep) * jax.lax.stop_gradient(mean),
                "var": keep * state["var"] + (1 - keep) * jax.lax.stop_gradient(var)}
        else:
            mean, var = state["mean"].astype(x.dtype), state["var"].astype(x.dtype)
            new_state = state
            s = jax.lax.rsqrt(var + epsilon)
            xhat = (x - mean) * s
        return xhat * params["scale"] + params["bias"], (xhat, s, mode == "train"), new_state

    def apply(params, inputs, **kwargs):
        raise StatefulLayerError("BatchNorm keeps model state (running statistics): use "
                                 "init_with_state and apply_with_state(params, state, x, "
                                 "mode=...)")

    def apply_state(params, state, inputs, *, mode=None, **kwargs):
        y, _, new_state = run(params, state, inputs, mode)
        return y, new_state

    def fwd_state(params, state, inputs, *, mode=None, **kwargs):
        return run(params, state, inputs, mode)

    def fwd(params, inputs, **kwargs):
        apply(params, inputs)

    def bwd(params, residuals, g):
        xhat, s, batch_stats = residuals
        axes = tuple(range(g.ndim - 1))
        gh = g * params["scale"]
        if batch_stats:
            dx = standardized_tangent(xhat, s, gh, axes)
        else:
            dx = gh * s
        return {"scale": jnp.sum(g * xhat, axes), "bias": jnp.sum(g, axes)}, dx

    return Layer(init, apply, fwd, bwd, kind="batch_norm", label="BatchNorm", name=name,
                 config={"momentum": momentum, "epsilon": epsilon}, state_init=state_init,
                 apply_state=apply_state, fwd_state=fwd_state)
