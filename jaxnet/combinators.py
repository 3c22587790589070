"""Combinators: compose layers into one network function.

Every combinator returns a :class:`~jaxnet.layers.Layer`, so combinators nest.
Parameters of a combinator are a dict keyed by readable, unique names built
from each child's kind and its count among children of that kind:
``serial(Dense(8), Relu, Dense(2))`` has params ``{"dense_0": {...},
"dense_1": {...}}``; parameter-free children add no key.

Backward rules compose: serial runs its children's rules in reverse order,
FanOut sums the gradients of its copies, FanInSum hands the same gradient to
every input, FanInConcat splits it, residual adds the skip path's gradient.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from . import activations as acts
from .layers import (
    Dense,
    Dropout,
    Layer,
    Params,
    ShapeError,
    _strip,
    elementwise,
    empty_params,
    layer_bwd,
    layer_fwd,
)

__all__ = ["serial", "parallel", "FanOut", "FanInSum", "FanInConcat", "residual", "mlp"]


def _child_names(layers: Sequence[Any]) -> list[str]:
    counts: Counter = Counter()
    names = []
    for layer in layers:
        kind = layer.kind if isinstance(layer, Layer) else "layer"
        names.append(f"{kind}_{counts[kind]}")
        counts[kind] += 1
    return names


def _has_params(params: Params) -> bool:
    return len(jax.tree_util.tree_leaves(params)) > 0


def _split_rng(rng, n):
    return list(jax.random.split(rng, n)) if rng is not None else [None] * n


class _Children:
    """The named children of a combinator and the bookkeeping they share."""

    def __init__(self, layers: Sequence[Any], owner: str):
        if not layers:
            raise ValueError(f"{owner} needs at least one layer")
        for layer in layers:
            if not (isinstance(layer, tuple) and len(layer) == 2 and all(map(callable, layer))):
                raise TypeError(f"{owner}: expected layers as (init_fun, apply_fun) pairs, "
                                f"got {layer!r}")
        self.layers = tuple(layers)
        self.names = _child_names(layers)
        self.owner = owner

    def named(self):
        return tuple(zip(self.names, self.layers))

    def params_of(self, params: Params, name: str, layer: Any) -> Params:
        if not isinstance(params, dict):
            raise TypeError(f"{self.owner}: params must be a dict keyed by layer name "
                            f"({', '.join(self.names)}), got {type(params).__name__}")
        return params.get(name, empty_params(layer))

    def check_keys(self, params: Params) -> None:
        if isinstance(params, dict):
            unknown = set(params) - set(self.names)
            if unknown:
                raise ValueError(f"{self.owner}: params have keys {sorted(unknown)} that name no "
                                 f"layer; layers are {self.names}")

    def init_one(self, name, layer, rng, shape):
        try:
            return layer[0](rng, shape)
        except ShapeError as e:
            raise e.within(name) from None

    def call(self, name, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShapeError as e:
            raise e.within(name) from None


def _child_kwargs(kwargs: dict, name: str, rng) -> dict:
    path = kwargs.get("_path", "")
    return {**kwargs, "rng": rng, "_path": f"{path}/{name}" if path else name}


def _remat_segments(n: int, remat: Any, remat_every: int | None) -> list[tuple[int, int]]:
    if remat_every is not None and (not isinstance(remat_every, int) or remat_every <= 0):
        raise ValueError(f"serial: remat_every must be a positive integer, got {remat_every!r}")
    if not (remat is False or remat is None or remat is True or callable(remat)):
        raise ValueError(f"serial: remat must be a bool or a jax.checkpoint policy, got {remat!r}")
    every = remat_every or max(1, math.ceil(math.sqrt(n)))
    return [(lo, min(lo + every, n)) for lo in range(0, n, every)]


def serial(*layers: Any, remat: bool | Callable = False, remat_every: int | None = None) -> Layer:
    """Compose layers in sequence: f = f_L ∘ … ∘ f_1.

    Works with jaxnet layers and stax layers alike. ``rng`` passed to apply is
    split into one key per child, as stax does.

    ``remat`` (rematerialisation, for deep nets): apply runs the children in
    segments of ``remat_every`` children (default ⌈√n⌉), each under
    ``jax.checkpoint``, so autodiff keeps only each segment's input and
    recomputes the rest during the backward pass: activation memory drops from
    O(n) to O(√n) for one extra forward pass. ``remat=True`` saves nothing
    inside a segment; a ``jax.checkpoint_policies`` policy (e.g.
    ``dots_saveable``) chooses what to keep. Params and outputs are unchanged.
    Only ``apply`` (the ``jax.grad`` path) is rematerialised: the manual
    backward pass (``fwd``/``bwd``) keeps all its residuals.
    """
    ch = _Children(layers, "serial")
    segments = _remat_segments(len(ch.layers), remat, remat_every)
    policy = remat if callable(remat) else None

    def init(rng, input_shape):
        params = {}
        for name, layer in ch.named():
            rng, sub = jax.random.split(rng)
            input_shape, p = ch.init_one(name, layer, sub, input_shape)
            if _has_params(p):
                params[name] = p
        return input_shape, params

    def apply(params, inputs, **kwargs):
        ch.check_keys(params)
        rngs = _split_rng(kwargs.pop("rng", None), len(ch.layers))
        named, plain = ch.named(), _strip(kwargs)

        def run(lo, hi, params, x):
            for (name, layer), r in zip(named[lo:hi], rngs[lo:hi], strict=True):
                p = ch.params_of(params, name, layer)
                x = ch.call(name, layer[1], p, x, rng=r, **plain)
            return x

        if not remat:
            return run(0, len(named), params, inputs)
        for lo, hi in segments:
            inputs = jax.checkpoint(partial(run, lo, hi), policy=policy)(params, inputs)
        return inputs

    def fwd(params, inputs, **kwargs):
        ch.check_keys(params)
        rngs = _split_rng(kwargs.pop("rng", None), len(ch.layers))
        residuals = []
        for (name, layer), r in zip(ch.named(), rngs):
            p = ch.params_of(params, name, layer)
            inputs, res = ch.call(name, layer_fwd, layer, p, inputs,
                                  **_child_kwargs(kwargs, name, r))
            residuals.append(res)
        return inputs, residuals

    def bwd(params, residuals, g):
        grads = {}
        for (name, layer), res in reversed(list(zip(ch.named(), residuals))):
            p = ch.params_of(params, name, layer)
            pg, g = layer_bwd(layer, p, res, g)
            if name in params:
                grads[name] = pg
        return {k: grads[k] for k in params}, g

    return Layer(init, apply, kind="serial", label="serial", fwd=fwd, bwd=bwd,
                 children=ch.named())


def parallel(*layers: Any) -> Layer:
    """Apply layers side by side to a tuple of inputs: (x₁, …, x_n) ↦ (f₁(x₁), …, f_n(x_n)).

    Usually placed between :func:`FanOut` and a fan-in (:data:`FanInSum`,
    :func:`FanInConcat`).
    """
    ch = _Children(layers, "parallel")
    n = len(ch.layers)

    def check_arity(what, got):
        if not isinstance(got, (tuple, list)) or len(got) != n:
            raise ShapeError(f"parallel of {n} layers expects a tuple of {n} inputs, got {what} "
                             f"{got!r}")

    def init(rng, input_shapes):
        check_arity("input shapes", input_shapes)
        params, shapes = {}, []
        for (name, layer), r, shape in zip(ch.named(), jax.random.split(rng, n), input_shapes):
            out, p = ch.init_one(name, layer, r, shape)
            shapes.append(out)
            if _has_params(p):
                params[name] = p
        return tuple(shapes), params

    def apply(params, inputs, **kwargs):
        ch.check_keys(params)
        check_arity("inputs of shapes", tuple(getattr(x, "shape", x) for x in inputs)
                    if isinstance(inputs, (tuple, list)) else inputs)
        rngs = _split_rng(kwargs.pop("rng", None), n)
        return tuple(ch.call(name, layer[1], ch.params_of(params, name, layer), x, rng=r,
                             **_strip(kwargs))
                     for (name, layer), x, r in zip(ch.named(), inputs, rngs))

    def fwd(params, inputs, **kwargs):
        ch.check_keys(params)
        rngs = _split_rng(kwargs.pop("rng", None), n)
        outs = [ch.call(name, layer_fwd, layer, ch.params_of(params, name, layer), x,
                        **_child_kwargs(kwargs, name, r))
                for (name, layer), x, r in zip(ch.named(), inputs, rngs)]
        return tuple(o for o, _ in outs), [res for _, res in outs]

    def bwd(params, residuals, gs):
        grads, gxs = {}, []
        for (name, layer), res, g in zip(ch.named(), residuals, gs):
            pg, gx = layer_bwd(layer, ch.params_of(params, name, layer), res, g)
            gxs.append(gx)
            if name in params:
                grads[name] = pg
        return grads, tuple(gxs)

    return Layer(init, apply, kind="parallel", label="parallel", fwd=fwd, bwd=bwd,
                 children=ch.named())


def FanOut(num: int) -> Layer:
    """Copy the input ``num`` times: x ↦ (x, …, x). Backward: the copies' gradients add."""
    if not isinstance(num, int) or num <= 0:
        raise ValueError(f"FanOut needs a positive number of copies, got {num!r}")

    def init(rng, input_shape):
        return (tuple(input_shape),) * num, {}

    def apply(params, inputs, **kwargs):
        return (inputs,) * num

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), None

    def bwd(params, _, gs):
        total = gs[0]
        for g in gs[1:]:
            total = total + g
        return {}, total

    return Layer(init, apply, kind="fan_out", label=f"FanOut({num})", fwd=fwd, bwd=bwd,
                 config={"num": num})


def _check_fan_in(label, shapes, skip_axis=None):
    if not isinstance(shapes, (tuple, list)) or len(shapes) < 1:
        raise ShapeError(f"{label} expects a tuple of inputs, got {shapes!r}")
    first = tuple(shapes[0])
    for other in shapes[1:]:
        other = tuple(other)
        a, b = list(first), list(other)
        if skip_axis is not None and len(a) == len(b) and -len(a) <= skip_axis < len(a):
            a[skip_axis] = b[skip_axis] = None
        if a != b:
            raise ShapeError(f"{label} got inputs of mismatched shapes {first} and {other}")


def _fan_in_sum_init(rng, input_shapes):
    _check_fan_in("FanInSum", input_shapes)
    return tuple(input_shapes[0]), {}


def _fan_in_sum_apply(params, inputs, **kwargs):
    _check_fan_in("FanInSum", [x.shape for x in inputs])
    total = inputs[0]
    for x in inputs[1:]:
        total = total + x
    return total


def _fan_in_sum_fwd(params, inputs, **kwargs):
    return _fan_in_sum_apply(params, inputs), len(inputs)


def _fan_in_sum_bwd(params, n, g):
    return {}, (g,) * n


FanInSum = Layer(_fan_in_sum_init, _fan_in_sum_apply, kind="fan_in_sum", label="FanInSum",
                 fwd=_fan_in_sum_fwd, bwd=_fan_in_sum_bwd)


def FanInConcat(axis: int = -1) -> Layer:
    """Concatenate a tuple of inputs along ``axis``. Backward: split the gradient back."""

    def init(rng, input_shapes):
        _check_fan_in(f"FanInConcat(axis={axis})", input_shapes, axis)
        first = list(input_shapes[0])
        first[axis] = sum(s[axis] for s in input_shapes)
        return tuple(first), {}

    def apply(params, inputs, **kwargs):
        _check_fan_in(f"FanInConcat(axis={axis})", [x.shape for x in inputs], axis)
        return jnp.concatenate(inputs, axis)

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), [x.shape[axis] for x in inputs]

    def bwd(params, sizes, g):
        cuts, total = [], 0
        for s in sizes[:-1]:
            total += s
            cuts.append(total)
        return {}, tuple(jnp.split(g, cuts, axis))

    return Layer(init, apply, kind="fan_in_concat", label=f"FanInConcat({axis})", fwd=fwd,
                 bwd=bwd, config={"axis": axis})


def residual(*layers: Any) -> Layer:
    """Residual block: y = x + f(x) with f = serial(*layers).

    Params are those of ``f`` (a dict keyed like :func:`serial`'s). ``f`` must
    keep the shape of its input. Backward: ∂L/∂x = g + f's backward rule of g.
    """
    body = serial(*layers)

    def init(rng, input_shape):
        out_shape, params = body[0](rng, input_shape)
        if tuple(out_shape) != tuple(input_shape):
            raise ShapeError(f"residual body maps shape {tuple(input_shape)} to "
                             f"{tuple(out_shape)}; a residual block must keep the shape")
        return tuple(input_shape), params

    def apply(params, inputs, **kwargs):
        return inputs + body[1](params, inputs, **kwargs)

    def fwd(params, inputs, **kwargs):
        out, res = body.fwd(params, inputs, **kwargs)
        return inputs + out, res

    def bwd(params, res, g):
        grads, gx = body.bwd(params, res, g)
        return grads, g + gx

    return Layer(init, apply, kind="residual", label="residual", fwd=fwd, bwd=bwd,
                 children=body.children)


def mlp(hidden_widths: Sequence[int], out_dim: int, activation: str = "relu",
        output_activation: str | None = None, *, dropout: float = 0.0,
        remat: bool | Callable = False, remat_every: int | None = None) -> Layer:
    """A deep multilayer perceptron.

    serial(Dense(h₁), f, Dense(h₂), f, …, Dense(out_dim), g) with f the hidden
    ``activation`` and g the ``output_activation`` (``None`` or ``"identity"``:
    linear outputs, e.g. logits). Its depth is ``len(hidden_widths)``, its
    width ``max(hidden_widths + [out_dim])``. ``dropout``: the probability of
    dropping a hidden unit; > 0 puts a :func:`Dropout` after every hidden f
    (apply then needs ``rng=`` in training, see :func:`Dropout`).
    ``remat``/``remat_every``: see :func:`serial` (rematerialise the
    ``jax.grad`` path of deep nets).

    >>> net = mlp([50, 50], 10, "relu", "softmax", dropout=0.1)
    """
    widths = list(hidden_widths)
    for w in widths + [out_dim]:
        if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
            raise ValueError(f"mlp widths must be positive integers, got {w!r} in "
                             f"hidden_widths={widths}, out_dim={out_dim!r}")
    acts.get(activation)
    if output_activation is not None:
        acts.get(output_activation)
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"mlp dropout is the probability of dropping a unit and must be in "
                         f"[0, 1), got {dropout!r}")
    layers: list[Any] = []
    for w in widths:
        layers += [Dense(w), elementwise(activation)] + ([Dropout(dropout)] if dropout else [])
    layers.append(Dense(out_dim))
    if output_activation not in (None, "identity"):
        layers.append(elementwise(output_activation))
    return serial(*layers, remat=remat, remat_every=remat_every)
