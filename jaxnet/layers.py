"""Layers: jaxnet's leaf layers, each a :class:`~jaxnet.Layer` with its backward rule.

The contract every layer keeps (init, apply, fwd/bwd, state, names) is in
:mod:`jaxnet.protocol`. Each layer here states its forward formula and, next to it,
its hand-written backward rule ``bwd(params, residuals, g) -> (∂L/∂params, ∂L/∂inputs)``
with g = ∂L/∂outputs. Every constructor takes ``name=``, the layer's parameter key
inside a combinator (default: its kind and count, ``dense_0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from . import activations as acts
from .protocol import (
    Layer,
    NoBackwardRuleError,
    ShapeError,
    StatefulLayerError,
    expect_params,
    label_of,
    layer_bwd,
    layer_fwd,
    recorded,
    singleton,
)

Array = jax.Array
Shape = tuple[int, ...]
Params = Any
Initializer = Callable[..., Array]

__all__ = [
    "Layer",
    "ShapeError",
    "NoBackwardRuleError",
    "StatefulLayerError",
    "Dense",
    "elementwise",
    "Activation",
    "Sigmoid",
    "Tanh",
    "Relu",
    "LeakyRelu",
    "Elu",
    "Gelu",
    "Softplus",
    "Silu",
    "Identity",
    "Softmax",
    "LogSoftmax",
    "Flatten",
    "Reshape",
    "Dropout",
    "LayerNorm",
    "label_of",
    "layer_fwd",
    "layer_bwd",
]


# --- Dense -----------------------------------------------------------------

_MIN_MACS_TO_COPY = 1 << 26


def _transpose_for_matmul(x2: Array, n_out: int, leading_axes: int = 1) -> Array:
    """x₂ᵀ as its own row-major array on CPUs (a plain transpose elsewhere).

    XLA folds a transpose into the matmul that reads it; on CPUs the folded form xᵀ·δ
    (contracting the batch axis of both operands) misses the fast matmul path and runs
    10–20 % slower than copying xᵀ first (n_in·batch elements, cheap beside the matmul).
    The optimization barrier keeps the copy. Only for matmuls of 2²⁶ multiply-adds or more:
    in whole training steps on a 2-core CPU it made 784-2048-2048-2048-10 (batch 512) 8 %
    faster but 784-(256×16)-10 (batch 256) and 784-128-10 (batch 128) 6–9 % slower.
    Only for (batch, features) inputs (``leading_axes == 1``): in the transformer peer step
    (inputs (16, 256, 256), Dense → GELU → Dense blocks) the copy made the gradient 11 %
    slower than pure JAX's (882 against 782 ms); without it, 7 % faster (737 against 793).
    """
    if leading_axes != 1 or x2.shape[0] * x2.shape[1] * n_out < _MIN_MACS_TO_COPY:
        return x2.T
    return jax.lax.platform_dependent(
        x2, cpu=lambda a: jax.lax.optimization_barrier(a.T), default=lambda a: a.T)


@jax.custom_jvp
def dense_matmul(x: Array, w: Array) -> Array:
    """x·W with x (..., n_in), W (n_in, n_out): the same value and derivatives as ``x @ w``.

    Its JVP writes the ∂/∂W term as (x₂ᵀ)ᵀ·Ẇ with x₂ᵀ materialised, so that reverse mode
    computes the weight gradient ∂L/∂W = x₂ᵀ·δ as a row-major matmul (see
    ``_transpose_for_matmul``). Forward mode, ``vmap`` and higher derivatives work as for ``@``.
    """
    return x @ w


def _dense_matmul_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = x @ w
    terms = []
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        terms.append(dx @ w)
    if not isinstance(dw, jax.custom_derivatives.SymbolicZero):
        x2 = x.reshape(-1, x.shape[-1])
        terms.append((_transpose_for_matmul(x2, w.shape[-1], x.ndim - 1).T @ dw)
                     .reshape(y.shape))
    if not terms:
        return y, jnp.zeros_like(y)
    return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


dense_matmul.defjvp(_dense_matmul_jvp, symbolic_zeros=True)


@recorded
def Dense(out_dim: int, W_init: Initializer | None = None, b_init: Initializer | None = None,
          dtype: Any = None, name: str | None = None) -> Layer:
    """Fully connected layer: y = x·W + b.

    Shapes: x (..., n_in) → y (..., out_dim); params ``{"w": (n_in, out_dim),
    "b": (out_dim,)}``. Initialisers come from ``jax.nn.initializers``
    (Glorot normal weights, zero bias by default). apply checks the params against
    the layer's own width: params of another net are an error naming both shapes.

    Backward rule: ∂L/∂wᵢⱼ = Σ xᵢ δⱼ (summed over the batch), ∂L/∂bⱼ = Σ δⱼ,
    ∂L/∂xᵢ = Σⱼ wᵢⱼ δⱼ, with δ = ∂L/∂y.
    """
    if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim <= 0:
        raise ValueError(f"Dense width must be a positive integer, got {out_dim!r}")
    label = f"Dense({out_dim})"
    W_init = initializers.glorot_normal() if W_init is None else W_init
    b_init = initializers.zeros if b_init is None else b_init

    def init(rng, input_shape):
        if len(input_shape) < 1 or input_shape[-1] is None or input_shape[-1] <= 0:
            raise ShapeError(f"{label} needs a positive feature axis last, got input shape "
                             f"{tuple(input_shape)}")
        k1, k2 = jax.random.split(rng)
        kw = {} if dtype is None else {"dtype": dtype}
        w = W_init(k1, (input_shape[-1], out_dim), **kw)
        b = b_init(k2, (out_dim,), **kw)
        return tuple(input_shape[:-1]) + (out_dim,), {"w": w, "b": b}

    def check(params, inputs):
        w = params.get("w") if isinstance(params, dict) else None
        if getattr(w, "ndim", 0) == 2 and (inputs.ndim < 1 or inputs.shape[-1] != w.shape[0]):
            raise ShapeError(f"{label} expects inputs of shape (..., {w.shape[0]}), "
                             f"got {tuple(inputs.shape)}")
        n_in = inputs.shape[-1] if inputs.ndim else 0
        expect_params(label, params, {"w": (n_in, out_dim), "b": (out_dim,)})

    def apply(params, inputs, **kwargs):
        check(params, inputs)
        return dense_matmul(inputs, params["w"]) + params["b"]

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), inputs

    def bwd(params, x, g):
        x2 = x.reshape(-1, x.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        grads = {"w": _transpose_for_matmul(x2, g2.shape[-1], x.ndim - 1) @ g2,
                 "b": jnp.sum(g2, axis=0)}
        return grads, g @ params["w"].T

    return Layer(init, apply, fwd, bwd, kind="dense", label=label, name=name,
                 config={"out_dim": out_dim})


# --- activation layers -----------------------------------------------------

def _shape_preserving_init(rng, input_shape):
    return tuple(input_shape), {}


@recorded
def elementwise(fn: Callable | str, derivative: Callable | None = None, *,
                name: str | None = None, **fn_kwargs) -> Layer:
    """A parameter-free layer applying an activation: y = f(x).

    ``fn`` is a registered activation's name (``"relu"``) or a function. With
    a name, the layer's backward rule is the activation's hand-written
    derivative: g·f'(x), or g·f'(y) from the output where the activation has
    that form (sigmoid, tanh, relu keep their outputs, not their inputs);
    softmax and log-softmax apply their Jacobian-vector products. A plain
    function gets a backward rule only if ``derivative`` (f' of the input)
    is given.
    """
    if isinstance(fn, str):
        record = acts.get(fn)
        kind, f, label = record.name, record.fn, _CAMEL.get(record.name, record.name)
        derivative, out_derivative = record.derivative, record.output_derivative
        vector = not record.elementwise
    else:
        kind, f = getattr(fn, "__name__", "activation"), fn
        label, out_derivative, vector = kind, None, False
    if fn_kwargs:
        label += "(" + ", ".join(f"{k}={v!r}" for k, v in fn_kwargs.items()) + ")"

    def apply(params, inputs, **kwargs):
        return f(inputs, **fn_kwargs)

    fwd = bwd = None
    if out_derivative is not None:
        def fwd(params, inputs, **kwargs):
            y = apply(params, inputs)
            return y, y

        def bwd(params, y, g):
            if vector:
                return {}, out_derivative(y, g, **fn_kwargs)
            return {}, g * out_derivative(y)
    elif derivative is not None:
        def fwd(params, inputs, **kwargs):
            return apply(params, inputs), inputs

        def bwd(params, x, g):
            return {}, g * derivative(x, **fn_kwargs)

    return Layer(_shape_preserving_init, apply, fwd, bwd, kind=kind, label=label, name=name,
                 config={"activation": kind, **fn_kwargs})


_CAMEL = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "leaky_relu": "LeakyRelu",
          "elu": "Elu", "gelu": "Gelu", "softplus": "Softplus", "silu": "Silu",
          "identity": "Identity", "softmax": "Softmax", "log_softmax": "LogSoftmax"}


def Activation(activation: str, **kwargs) -> Layer:
    """Activation layer by name, e.g. ``Activation("leaky_relu", negative_slope=0.2)``."""
    return elementwise(activation, **kwargs)


def _activation_singleton(activation: str, constant: str) -> Layer:
    return singleton(elementwise(activation), __name__, constant)


Sigmoid = _activation_singleton("sigmoid", "Sigmoid")
Tanh = _activation_singleton("tanh", "Tanh")
Relu = _activation_singleton("relu", "Relu")
LeakyRelu = _activation_singleton("leaky_relu", "LeakyRelu")
Elu = _activation_singleton("elu", "Elu")
Gelu = _activation_singleton("gelu", "Gelu")
Softplus = _activation_singleton("softplus", "Softplus")
Silu = _activation_singleton("silu", "Silu")
Identity = _activation_singleton("identity", "Identity")
Softmax = _activation_singleton("softmax", "Softmax")
LogSoftmax = _activation_singleton("log_softmax", "LogSoftmax")


# --- Flatten ---------------------------------------------------------------

def _flatten_init(rng, input_shape):
    if len(input_shape) < 1:
        raise ShapeError("Flatten needs a batch axis, got a scalar input shape "
                         f"{tuple(input_shape)}")
    return (input_shape[0], math.prod(input_shape[1:])), {}


def _flatten_apply(params, inputs, **kwargs):
    if inputs.ndim < 1:
        raise ShapeError(f"Flatten needs a batch axis, got a scalar input of shape {inputs.shape}")
    return inputs.reshape(inputs.shape[0], -1)


def _flatten_fwd(params, inputs, **kwargs):
    return _flatten_apply(params, inputs), inputs.shape


def _flatten_bwd(params, shape, g):
    return {}, g.reshape(shape)


Flatten = singleton(Layer(_flatten_init, _flatten_apply, _flatten_fwd, _flatten_bwd,
                          kind="flatten", label="Flatten"), __name__, "Flatten")
# Flatten every axis but the first: (n, d₁, …, d_k) → (n, d₁·…·d_k); backward: reshape back.


# --- Reshape -----------------------------------------------------------------

@recorded
def Reshape(shape: tuple[int, ...], name: str | None = None) -> Layer:
    """Reshape each example: (n, d₁, …, d_k) → (n, *shape), e.g. a flat 64-pixel row to an
    8×8×1 image for a convolution (``Reshape((8, 8, 1))``). One entry may be -1.
    Backward: the gradient reshaped back to the input's shape."""
    shape = tuple(int(d) for d in shape)
    if sum(d == -1 for d in shape) > 1 or any(d == 0 or d < -1 for d in shape):
        raise ValueError(f"Reshape needs positive sizes and at most one -1, got {shape}")
    label = f"Reshape({shape})"

    def target(in_shape):
        size = math.prod(in_shape[1:])
        known = math.prod(d for d in shape if d != -1)
        if (size % known if -1 in shape else size != known):
            raise ShapeError(f"{label} cannot hold examples of shape {tuple(in_shape[1:])} "
                             f"({size} values)")
        return tuple(size // known if d == -1 else d for d in shape)

    def init(rng, input_shape):
        if len(input_shape) < 1:
            raise ShapeError(f"{label} needs a batch axis, got input shape {tuple(input_shape)}")
        return (input_shape[0],) + target(input_shape), {}

    def apply(params, inputs, **kwargs):
        return inputs.reshape((inputs.shape[0],) + target(inputs.shape))

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), inputs.shape

    def bwd(params, in_shape, g):
        return {}, g.reshape(in_shape)

    return Layer(init, apply, fwd, bwd, kind="reshape", label=label, name=name,
                 config={"shape": shape})


# --- Dropout ---------------------------------------------------------------

@recorded
def Dropout(rate: float, mode: str = "train", name: str | None = None) -> Layer:
    """Inverted dropout: each unit is dropped with probability ``rate``.

    y = x·m / (1 − rate) with m ~ Bernoulli(1 − rate), so E[y] = x.

    **``rate`` is the probability of dropping a unit.** stax's ``Dropout(rate)``
    takes the probability of *keeping* one: ``stax.Dropout(0.9)`` is
    ``jaxnet.Dropout(0.1)``.

    The key is passed to apply as ``rng=``; ``mode="eval"`` (at construction or
    as a keyword to apply) turns the layer into the identity.
    Backward rule: ∂L/∂x = g·m / (1 − rate), the same mask.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"Dropout rate is the probability of dropping a unit and must be in "
                         f"[0, 1), got {rate!r}")
    if mode not in ("train", "eval"):
        raise ValueError(f"Dropout mode must be 'train' or 'eval', got {mode!r}")

    def scale_mask(inputs, rng, run_mode):
        run_mode = run_mode or mode
        if run_mode not in ("train", "eval"):
            raise ValueError(f"Dropout mode must be 'train' or 'eval', got {run_mode!r}")
        if run_mode == "eval" or rate == 0:
            return None
        if rng is None:
            raise ValueError("Dropout in train mode needs a PRNG key: pass rng=... to apply, "
                             "or mode='eval'")
        keep = jax.random.bernoulli(rng, 1 - rate, inputs.shape)
        return jnp.where(keep, jnp.asarray(1 / (1 - rate), inputs.dtype),
                         jnp.zeros((), inputs.dtype))

    def apply(params, inputs, *, rng=None, mode=None, **kwargs):
        m = scale_mask(inputs, rng, mode)
        return inputs if m is None else inputs * m

    def fwd(params, inputs, *, rng=None, mode=None, **kwargs):
        m = scale_mask(inputs, rng, mode)
        return (inputs, None) if m is None else (inputs * m, m)

    def bwd(params, m, g):
        return {}, g if m is None else g * m

    return Layer(_shape_preserving_init, apply, fwd, bwd, kind="dropout",
                 label=f"Dropout({rate})", name=name, config={"rate": rate, "mode": mode})


# --- LayerNorm -------------------------------------------------------------

def standardized_tangent(xhat: Array, s: Array, t: Array, axes: int | tuple[int, ...]) -> Array:
    """s(t − mean t − x̂·mean(t·x̂)), means over ``axes``: the derivative of the standardisation
    x̂ = (x − μ)·s (μ, 1/s² − ε the mean and variance over ``axes``) applied to t. The map is
    self-adjoint, so it is both the JVP (t = ẋ) and the backward rule (t = ĝ = g·scale) of
    LayerNorm, GroupNorm and BatchNorm."""
    return s * (t - jnp.mean(t, axes, keepdims=True)
                - xhat * jnp.mean(t * xhat, axes, keepdims=True))


@recorded
def LayerNorm(epsilon: float = 1e-5, scale_init: Initializer = initializers.ones,
              bias_init: Initializer = initializers.zeros, name: str | None = None) -> Layer:
    """Layer normalisation over the last axis.

    x̂ = (x − μ) / √(σ² + ε) with μ, σ² the mean and variance of the last axis;
    y = x̂·scale + bias. Params ``{"scale": (d,), "bias": (d,)}``.

    Backward rule, with ĝ = g·scale and s = 1/√(σ² + ε):
    ∂L/∂x = s(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ∂L/∂scale = Σ g·x̂, ∂L/∂bias = Σ g.
    """
    if epsilon <= 0:
        raise ValueError(f"LayerNorm epsilon must be positive, got {epsilon!r}")

    def init(rng, input_shape):
        if len(input_shape) < 1 or input_shape[-1] <= 0:
            raise ShapeError(f"LayerNorm needs a positive feature axis last, got input shape "
                             f"{tuple(input_shape)}")
        d = input_shape[-1]
        k1, k2 = jax.random.split(rng)
        return tuple(input_shape), {"scale": scale_init(k1, (d,)), "bias": bias_init(k2, (d,))}

    def normalise(params, x):
        scale = params.get("scale") if isinstance(params, dict) else None
        if getattr(scale, "ndim", 0) == 1 and (x.ndim < 1 or x.shape[-1] != scale.shape[0]):
            d = scale.shape[0]
            raise ShapeError(f"LayerNorm expects inputs of shape (..., {d}), got {tuple(x.shape)}")
        d = x.shape[-1] if x.ndim else 0
        expect_params("LayerNorm", params, {"scale": (d,), "bias": (d,)})
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        s = jax.lax.rsqrt(var + epsilon)
        return (x - mean) * s, s

    def apply(params, inputs, **kwargs):
        xhat, _ = normalise(params, inputs)
        return xhat * params["scale"] + params["bias"]

    def fwd(params, inputs, **kwargs):
        xhat, s = normalise(params, inputs)
        return xhat * params["scale"] + params["bias"], (xhat, s)

    def bwd(params, residuals, g):
        xhat, s = residuals
        d = g.shape[-1]
        gh = g * params["scale"]
        dx = standardized_tangent(xhat, s, gh, -1)
        grads = {"scale": jnp.sum((g * xhat).reshape(-1, d), 0),
                 "bias": jnp.sum(g.reshape(-1, d), 0)}
        return grads, dx

    return Layer(init, apply, fwd, bwd, kind="layer_norm", label="LayerNorm", name=name,
                 config={"epsilon": epsilon})
