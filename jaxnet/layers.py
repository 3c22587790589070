"""Layers: pairs of pure functions ``(init, apply)`` in stax's calling convention.

A layer unpacks as ``init_fun, apply_fun = layer``:

- ``init_fun(rng, input_shape) -> (output_shape, params)``; shapes include the
  batch axis first (it may be ``-1``);
- ``apply_fun(params, inputs, **kwargs) -> outputs``; ``rng=`` and ``mode=``
  are the keyword arguments jaxnet's layers read.

A jaxnet :class:`Layer` is such a pair (a ``tuple`` of length two, so it works
inside ``jax.example_libraries.stax.serial``) that also carries its hand-written
backward rule, next to its forward formula:

- ``fwd(params, inputs, **kwargs) -> (outputs, residuals)`` runs the layer and
  keeps only what its backward formula needs;
- ``bwd(params, residuals, g) -> (param_grads, input_grad)`` maps the gradient
  ``g = ∂L/∂outputs`` to ``∂L/∂params`` (same tree as ``params``) and
  ``∂L/∂inputs``.

Parameters are plain dicts of arrays; parameter-free layers have ``{}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from . import activations as acts

Array = jax.Array
Shape = tuple[int, ...]
Params = Any
Initializer = Callable[..., Array]

__all__ = [
    "Layer",
    "ShapeError",
    "NoBackwardRuleError",
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
    "Dropout",
    "LayerNorm",
    "layer_fwd",
    "layer_bwd",
]


class ShapeError(ValueError):
    """A shape that does not fit a layer. The message names the layer (its path
    inside the net, e.g. ``serial/dense_1``) and both shapes."""

    def __init__(self, message: str, path: tuple[str, ...] = ()):
        self.message, self.path = message, path
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{'/'.join(self.path)}: {self.message}" if self.path else self.message

    def within(self, name: str) -> ShapeError:
        return ShapeError(self.message, (name,) + self.path)


class NoBackwardRuleError(TypeError):
    """A layer without a hand-written backward rule met the manual backward pass."""


class Layer(tuple):
    """A layer: the pair ``(init, apply)`` plus jaxnet's metadata.

    Attributes:
      init, apply: the two stax functions (also ``layer[0]``, ``layer[1]``).
      kind: short snake-case name used for parameter keys (``"dense"``).
      label: readable name for tables and errors (``"Dense(10)"``).
      fwd, bwd: the hand-written backward rule (module docstring); ``None``
        when the layer has none.
      children: ``((name, layer), ...)`` for combinators, ``()`` for leaves.
      config: the constructor's arguments (``{"out_dim": 10}``).
    """

    kind: str
    label: str
    fwd: Callable | None
    bwd: Callable | None
    children: tuple[tuple[str, Layer], ...]
    config: dict

    def __new__(cls, init: Callable, apply: Callable, *, kind: str, label: str | None = None,
                fwd: Callable | None = None, bwd: Callable | None = None,
                children: Sequence[tuple[str, Any]] = (), config: dict | None = None):
        self = super().__new__(cls, (init, apply))
        self.kind, self.label = kind, label or kind
        self.fwd, self.bwd = fwd, bwd
        self.children, self.config = tuple(children), dict(config or {})
        return self

    @property
    def init(self) -> Callable:
        return self[0]

    @property
    def apply(self) -> Callable:
        return self[1]

    def __repr__(self) -> str:
        return f"<Layer {self.label}>"

    # tuple's equality and hash compare contents (the closures): keep identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__


def label_of(layer: Any) -> str:
    """Readable name of any layer, jaxnet's or a foreign stax pair."""
    if isinstance(layer, Layer):
        return layer.label
    fn = layer[1]
    return getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__))


def empty_params(layer: Any) -> Params:
    """Parameters of a parameter-free layer: ``{}`` for jaxnet's, ``()`` for stax's."""
    return {} if isinstance(layer, Layer) else ()


def _strip(kwargs: dict) -> dict:
    """The keyword arguments a plain ``apply`` sees (without jaxnet's internal ones)."""
    return {k: v for k, v in kwargs.items() if not k.startswith("_")}


def layer_fwd(layer: Any, params: Params, inputs: Any, **kwargs) -> tuple[Any, Any]:
    """Run ``layer``'s forward pass keeping its residuals for :func:`layer_bwd`.

    A layer without a backward rule raises :class:`NoBackwardRuleError`, unless
    ``_fallback`` is a list: then ``jax.vjp`` stands in for the rule and the
    layer's path is appended to that list so the caller can report it.
    """
    path = kwargs.get("_path", "")
    fwd = getattr(layer, "fwd", None)
    if fwd is not None:
        return fwd(params, inputs, **kwargs)
    fallback = kwargs.get("_fallback")
    if fallback is None:
        raise NoBackwardRuleError(
            f"{path or 'net'}: layer {label_of(layer)} has no hand-written backward rule; "
            "give it fwd/bwd (jaxnet.Layer) or opt in to the autodiff fallback "
            "(manual_value_and_grad(..., autodiff_fallback=True))")
    fallback.append(path or label_of(layer))
    plain = _strip(kwargs)
    outputs, vjp = jax.vjp(lambda p, x: layer[1](p, x, **plain), params, inputs)
    return outputs, vjp


def layer_bwd(layer: Any, params: Params, residuals: Any, g: Any) -> tuple[Params, Any]:
    """Backward rule of ``layer`` (or the ``jax.vjp`` fallback that :func:`layer_fwd` chose)."""
    bwd = getattr(layer, "bwd", None)
    if bwd is not None:
        return bwd(params, residuals, g)
    return residuals(g)


# --- Dense -----------------------------------------------------------------

_MIN_MACS_TO_COPY = 1 << 26


def _transpose_for_matmul(x2: Array, n_out: int) -> Array:
    """x₂ᵀ as its own row-major array on CPUs (a plain transpose elsewhere).

    XLA folds a transpose into the matmul that reads it; on CPUs the folded form xᵀ·δ
    (contracting the batch axis of both operands) misses the fast matmul path and runs
    10–20 % slower than copying xᵀ first (n_in·batch elements, cheap beside the matmul).
    The optimization barrier keeps the copy. Only for matmuls of 2²⁶ multiply-adds or more:
    in whole training steps on a 2-core CPU it made 784-2048-2048-2048-10 (batch 512) 8 %
    faster but 784-(256×16)-10 (batch 256) and 784-128-10 (batch 128) 6–9 % slower.
    """
    if x2.shape[0] * x2.shape[1] * n_out < _MIN_MACS_TO_COPY:
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
        terms.append((_transpose_for_matmul(x2, w.shape[-1]).T @ dw).reshape(y.shape))
    if not terms:
        return y, jnp.zeros_like(y)
    return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


dense_matmul.defjvp(_dense_matmul_jvp, symbolic_zeros=True)


def Dense(out_dim: int, W_init: Initializer = initializers.glorot_normal(),
          b_init: Initializer = initializers.zeros, dtype: Any = None) -> Layer:
    """Fully connected layer: y = x·W + b.

    Shapes: x (..., n_in) → y (..., out_dim); params ``{"w": (n_in, out_dim),
    "b": (out_dim,)}``. Initialisers come from ``jax.nn.initializers``
    (Glorot normal weights, zero bias by default).

    Backward rule: ∂L/∂wᵢⱼ = Σ xᵢ δⱼ (summed over the batch), ∂L/∂bⱼ = Σ δⱼ,
    ∂L/∂xᵢ = Σⱼ wᵢⱼ δⱼ, with δ = ∂L/∂y.
    """
    if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim <= 0:
        raise ValueError(f"Dense width must be a positive integer, got {out_dim!r}")
    label = f"Dense({out_dim})"

    def init(rng, input_shape):
        if len(input_shape) < 1 or input_shape[-1] is None or input_shape[-1] <= 0:
            raise ShapeError(f"{label} needs a positive feature axis last, got input shape "
                             f"{tuple(input_shape)}")
        k1, k2 = jax.random.split(rng)
        kw = {} if dtype is None else {"dtype": dtype}
        w = W_init(k1, (input_shape[-1], out_dim), **kw)
        b = b_init(k2, (out_dim,), **kw)
        return tuple(input_shape[:-1]) + (out_dim,), {"w": w, "b": b}

    def apply(params, inputs, **kwargs):
        w, b = params["w"], params["b"]
        if inputs.ndim < 1 or inputs.shape[-1] != w.shape[0]:
            raise ShapeError(f"{label} expects inputs of shape (..., {w.shape[0]}), "
                             f"got {tuple(inputs.shape)}")
        return dense_matmul(inputs, w) + b

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), inputs

    def bwd(params, x, g):
        x2 = x.reshape(-1, x.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        grads = {"w": _transpose_for_matmul(x2, g2.shape[-1]) @ g2,
                 "b": jnp.sum(g2, axis=0)}
        return grads, g @ params["w"].T

    return Layer(init, apply, kind="dense", label=label, fwd=fwd, bwd=bwd,
                 config={"out_dim": out_dim})


# --- activation layers -----------------------------------------------------

def _shape_preserving_init(rng, input_shape):
    return tuple(input_shape), {}


def elementwise(fn: Callable | str, derivative: Callable | None = None, **fn_kwargs) -> Layer:
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
        name, f, label = record.name, record.fn, _CAMEL.get(record.name, record.name)
        derivative, out_derivative = record.derivative, record.output_derivative
        vector = not record.elementwise
    else:
        name, f = getattr(fn, "__name__", "activation"), fn
        label, out_derivative, vector = name, None, False
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

    return Layer(_shape_preserving_init, apply, kind=name, label=label, fwd=fwd, bwd=bwd,
                 config={"activation": name, **fn_kwargs})


_CAMEL = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "leaky_relu": "LeakyRelu",
          "elu": "Elu", "gelu": "Gelu", "softplus": "Softplus", "silu": "Silu",
          "identity": "Identity", "softmax": "Softmax", "log_softmax": "LogSoftmax"}


def Activation(name: str, **kwargs) -> Layer:
    """Activation layer by name, e.g. ``Activation("leaky_relu", negative_slope=0.2)``."""
    return elementwise(name, **kwargs)


Sigmoid = elementwise("sigmoid")
Tanh = elementwise("tanh")
Relu = elementwise("relu")
LeakyRelu = elementwise("leaky_relu")
Elu = elementwise("elu")
Gelu = elementwise("gelu")
Softplus = elementwise("softplus")
Silu = elementwise("silu")
Identity = elementwise("identity")
Softmax = elementwise("softmax")
LogSoftmax = elementwise("log_softmax")


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


Flatten = Layer(_flatten_init, _flatten_apply, kind="flatten", label="Flatten",
                fwd=_flatten_fwd, bwd=_flatten_bwd)
Flatten.__doc__ = "Flatten every axis but the first: (n, d₁, …, d_k) → (n, d₁·…·d_k)."


# --- Dropout ---------------------------------------------------------------

def Dropout(rate: float, mode: str = "train") -> Layer:
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

    return Layer(_shape_preserving_init, apply, kind="dropout", label=f"Dropout({rate})",
                 fwd=fwd, bwd=bwd, config={"rate": rate, "mode": mode})


# --- LayerNorm -------------------------------------------------------------

def LayerNorm(epsilon: float = 1e-5, scale_init: Initializer = initializers.ones,
              bias_init: Initializer = initializers.zeros) -> Layer:
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
        if x.ndim < 1 or x.shape[-1] != params["scale"].shape[0]:
            d = params["scale"].shape[0]
            raise ShapeError(f"LayerNorm expects inputs of shape (..., {d}), got {tuple(x.shape)}")
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
        dx = s * (gh - jnp.mean(gh, -1, keepdims=True)
                  - xhat * jnp.mean(gh * xhat, -1, keepdims=True))
        grads = {"scale": jnp.sum((g * xhat).reshape(-1, d), 0),
                 "bias": jnp.sum(g.reshape(-1, d), 0)}
        return grads, dx

    return Layer(init, apply, kind="layer_norm", label="LayerNorm", fwd=fwd, bwd=bwd,
                 config={"epsilon": epsilon})
