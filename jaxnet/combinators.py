"""Combinators: compose layers into one network function.

Every combinator returns a :class:`~jaxnet.Layer` whose structure is asked of the
record (``children``, ``rebuild``, ``output_child``), so combinators nest and the
code that walks a net (summary, collapse, precision, the manual pass) never looks
at kind strings. Parameters (and model state) of a combinator are a dict keyed by
readable, unique names: a child's ``name=`` if it has one, else its kind and its
count among unnamed children of that kind: ``serial(Dense(8), Relu, Dense(2))``
has params ``{"dense_0": {...}, "dense_1": {...}}``; parameter-free children add no
key. Two children with one name are an error naming both.

Backward rules compose: serial runs its children's rules in reverse order,
FanOut sums the gradients of its copies, FanInSum hands the gradient to every
input (summed over the axes it broadcast), FanInConcat splits it, residual adds
the skip path's gradient.
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
from .layers import Dense, Dropout, elementwise
from .norms import BatchNorm
from .protocol import (
    Composite,
    Context,
    Layer,
    Params,
    ShapeError,
    apply_with_state,
    first_stateful,
    init_with_state,
    is_layer,
    label_of,
    layer_bwd,
    layer_fwd,
    recorded,
    singleton,
    stateful_error,
)

__all__ = ["serial", "parallel", "FanOut", "FanInSum", "FanInConcat", "residual", "mlp",
           "composite"]


def _has_leaves(tree: Any) -> bool:
    return len(jax.tree_util.tree_leaves(tree)) > 0


def _split_rng(rng, n):
    return list(jax.random.split(rng, n)) if rng is not None else [None] * n


def _empty_params(layer: Any) -> Params:
    """Parameters of a parameter-free layer: ``{}`` for jaxnet's, ``()`` for stax's."""
    return {} if isinstance(layer, Layer) else ()


class _Children:
    """The named children of a combinator and the bookkeeping they share."""

    def __init__(self, layers: Sequence[Any], owner: str):
        if not layers:
            raise ValueError(f"{owner} needs at least one layer")
        for layer in layers:
            if not is_layer(layer):
                raise TypeError(f"{owner}: expected layers as (init_fun, apply_fun) pairs, "
                                f"got {layer!r}")
        self.layers = tuple(layers)
        self.owner = owner
        self.names = self._names()

    def _names(self) -> list[str]:
        counts: Counter = Counter()
        names, seen = [], {}
        for i, layer in enumerate(self.layers):
            name = getattr(layer, "name", None)
            if name is None:
                kind = layer.kind if isinstance(layer, Layer) else "layer"
                name = f"{kind}_{counts[kind]}"
                counts[kind] += 1
            if name in seen:
                j = seen[name]
                raise ValueError(f"{self.owner}: children {j} ({label_of(self.layers[j])}) and "
                                 f"{i} ({label_of(layer)}) both have the name {name!r}; names "
                                 f"key the params and must be unique")
            seen[name] = i
            names.append(name)
        return names

    def named(self):
        return tuple(zip(self.names, self.layers))

    def params_of(self, params: Params, name: str, layer: Any) -> Params:
        if not isinstance(params, dict):
            raise TypeError(f"{self.owner}: params must be a dict keyed by layer name "
                            f"({', '.join(self.names)}), got {type(params).__name__}")
        return params.get(name, _empty_params(layer))

    def check_keys(self, params: Params, what: str = "params") -> None:
        if isinstance(params, dict):
            unknown = set(params) - set(self.names)
            if unknown:
                raise ShapeError(f"{self.owner}: {what} have keys {sorted(unknown)} that name no "
                                 f"layer; layers are {self.names}")

    def call(self, name, fn, *args, **kwargs):
        """``fn(*args)``, with a :class:`ShapeError` from inside prefixed by ``name``."""
        try:
            return fn(*args, **kwargs)
        except ShapeError as e:
            if not name:
                raise
            raise e.within(name) from None


def composite(kind: str, label: str, ch: _Children, walk: Composite, *,
              rebuild: Callable[..., Layer], output_child: int | None,
              config: dict | None = None, name: str | None = None,
              sequential: bool = False) -> Layer:
    """A combinator's :class:`Layer` from its walking functions.

    The stax pair and the stateless ``fwd``/``bwd`` are derived from ``walk``: a
    stateless net runs with state ``{}``; the plain ``apply`` of a stateful net raises
    :class:`~jaxnet.protocol.StatefulLayerError` naming the stateful layer.
    """
    found = None
    for child_name, child in ch.named():
        inner = first_stateful(child, (child_name,) if child_name else ())
        if inner is not None:
            found = inner
            break

    def refuse():
        raise stateful_error(*found)

    def init(rng, input_shape):
        out, params, _ = walk.init(rng, input_shape)
        return out, params

    def apply(params, inputs, **kwargs):
        if found is not None:
            refuse()
        return walk.apply(params, {}, inputs, kwargs)[0]

    def fwd(params, inputs, **kwargs):
        if found is not None:
            refuse()
        out, res, _ = walk.forward(params, {}, inputs, kwargs, Context())
        return out, res

    def bwd(params, residuals, g):
        return walk.backward(params, residuals, g, Context())

    return Layer(init, apply, fwd, bwd, kind=kind, label=label, name=name, config=config or {},
                 children=ch.named(), rebuild=rebuild, output_child=output_child,
                 sequential=sequential, composite=walk)


def _remat_segments(n: int, remat: Any, remat_every: int | None) -> list[tuple[int, int]]:
    if remat_every is not None and (not isinstance(remat_every, int) or remat_every <= 0):
        raise ValueError(f"serial: remat_every must be a positive integer, got {remat_every!r}")
    if not (remat is False or remat is None or remat is True or callable(remat)):
        raise ValueError(f"serial: remat must be a bool or a jax.checkpoint policy, got {remat!r}")
    every = remat_every or max(1, math.ceil(math.sqrt(n)))
    return [(lo, min(lo + every, n)) for lo in range(0, n, every)]


def _collect(tree: dict, name: str, value: Any) -> None:
    if _has_leaves(value):
        tree[name] = value


@recorded
def serial(*layers: Any, remat: bool | Callable = False, remat_every: int | None = None,
           name: str | None = None) -> Layer:
    """Compose layers in sequence: f = f_L ∘ … ∘ f_1.

    Works with jaxnet layers and stax layers alike. ``rng`` passed to apply is
    split into one key per child, as stax does; other keyword arguments reach
    every child. Model state, if a child keeps any, is threaded through in order.

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
    named = ch.named()
    segments = _remat_segments(len(named), remat, remat_every)
    policy = remat if callable(remat) else None

    def init(rng, input_shape):
        params, state = {}, {}
        for child_name, layer in named:
            rng, sub = jax.random.split(rng)
            input_shape, p, s = ch.call(child_name, init_with_state, layer, sub, input_shape)
            _collect(params, child_name, p)
            _collect(state, child_name, s)
        return input_shape, params, state

    def apply(params, state, inputs, kwargs):
        ch.check_keys(params)
        ch.check_keys(state, "state")
        kwargs = dict(kwargs)
        rngs = _split_rng(kwargs.pop("rng", None), len(named))

        def run(lo, hi, params, state, x):
            new_state = {}
            for (child_name, layer), r in zip(named[lo:hi], rngs[lo:hi], strict=True):
                p = ch.params_of(params, child_name, layer)
                x, s = ch.call(child_name, apply_with_state, layer, p,
                               state.get(child_name, {}), x, {**kwargs, "rng": r})
                _collect(new_state, child_name, s)
            return x, new_state

        if not remat:
            return run(0, len(named), params, state, inputs)
        new_state = {}
        for lo, hi in segments:
            inputs, s = jax.checkpoint(partial(run, lo, hi), policy=policy)(params, state, inputs)
            new_state.update(s)
        return inputs, new_state

    def forward(params, state, inputs, kwargs, ctx):
        ch.check_keys(params)
        ch.check_keys(state, "state")
        kwargs = dict(kwargs)
        rngs = _split_rng(kwargs.pop("rng", None), len(named))
        residuals, new_state = [], {}
        for (child_name, layer), r in zip(named, rngs):
            p = ch.params_of(params, child_name, layer)
            inputs, res, s = ch.call(child_name, layer_fwd, layer, p, inputs,
                                     {**kwargs, "rng": r}, ctx.child(child_name),
                                     state.get(child_name, {}))
            residuals.append(res)
            _collect(new_state, child_name, s)
        return inputs, residuals, new_state

    def backward(params, residuals, g, ctx):
        grads = {}
        last = len(named) - 1
        for i in range(last, -1, -1):
            child_name, layer = named[i]
            p = ch.params_of(params, child_name, layer)
            pg, g = ch.call(child_name, layer_bwd, layer, p, residuals[i], g,
                            ctx.child(child_name, is_output=i == last))
            if child_name in params:
                grads[child_name] = pg
        return {k: grads[k] for k in params}, g

    return composite("serial", "serial", ch, Composite(init, apply, forward, backward),
                     rebuild=lambda new: serial(*new, remat=remat, remat_every=remat_every,
                                                name=name),
                     output_child=len(named) - 1, name=name, sequential=True,
                     config={"remat": remat, "remat_every": remat_every})


@recorded
def parallel(*layers: Any, name: str | None = None) -> Layer:
    """Apply layers side by side to a tuple of inputs: (x₁, …, x_n) ↦ (f₁(x₁), …, f_n(x_n)).

    Usually placed between :func:`FanOut` and a fan-in (:data:`FanInSum`,
    :func:`FanInConcat`).
    """
    ch = _Children(layers, "parallel")
    named = ch.named()
    n = len(named)

    def check_arity(what, got):
        if not isinstance(got, (tuple, list)) or len(got) != n:
            raise ShapeError(f"parallel of {n} layers expects a tuple of {n} inputs, got {what} "
                             f"{got!r}")

    def check_inputs(inputs):
        check_arity("inputs of shapes", tuple(getattr(x, "shape", x) for x in inputs)
                    if isinstance(inputs, (tuple, list)) else inputs)

    def init(rng, input_shapes):
        check_arity("input shapes", input_shapes)
        params, state, shapes = {}, {}, []
        for (child_name, layer), r, shape in zip(named, jax.random.split(rng, n), input_shapes):
            out, p, s = ch.call(child_name, init_with_state, layer, r, shape)
            shapes.append(out)
            _collect(params, child_name, p)
            _collect(state, child_name, s)
        return tuple(shapes), params, state

    def apply(params, state, inputs, kwargs):
        ch.check_keys(params)
        check_inputs(inputs)
        kwargs = dict(kwargs)
        rngs = _split_rng(kwargs.pop("rng", None), n)
        outs, new_state = [], {}
        for (child_name, layer), x, r in zip(named, inputs, rngs):
            y, s = ch.call(child_name, apply_with_state, layer,
                           ch.params_of(params, child_name, layer), state.get(child_name, {}),
                           x, {**kwargs, "rng": r})
            outs.append(y)
            _collect(new_state, child_name, s)
        return tuple(outs), new_state

    def forward(params, state, inputs, kwargs, ctx):
        ch.check_keys(params)
        check_inputs(inputs)
        kwargs = dict(kwargs)
        rngs = _split_rng(kwargs.pop("rng", None), n)
        outs, residuals, new_state = [], [], {}
        for (child_name, layer), x, r in zip(named, inputs, rngs):
            y, res, s = ch.call(child_name, layer_fwd, layer,
                                ch.params_of(params, child_name, layer), x,
                                {**kwargs, "rng": r}, ctx.child(child_name),
                                state.get(child_name, {}))
            outs.append(y)
            residuals.append(res)
            _collect(new_state, child_name, s)
        return tuple(outs), residuals, new_state

    def backward(params, residuals, gs, ctx):
        grads, gxs = {}, []
        for (child_name, layer), res, g in zip(named, residuals, gs):
            pg, gx = ch.call(child_name, layer_bwd, layer,
                             ch.params_of(params, child_name, layer), res, g,
                             ctx.child(child_name))
            gxs.append(gx)
            if child_name in params:
                grads[child_name] = pg
        return grads, tuple(gxs)

    return composite("parallel", "parallel", ch, Composite(init, apply, forward, backward),
                     rebuild=lambda new: parallel(*new, name=name), output_child=None, name=name)


@recorded
def FanOut(num: int, name: str | None = None) -> Layer:
    """Copy the input ``num`` times: x ↦ (x, …, x). Backward: the copies' gradients add."""
    if not isinstance(num, int) or isinstance(num, bool) or num <= 0:
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

    return Layer(init, apply, fwd, bwd, kind="fan_out", label=f"FanOut({num})", name=name,
                 config={"num": num})


def _fan_in_shapes(label, shapes):
    if not isinstance(shapes, (tuple, list)) or len(shapes) < 1:
        raise ShapeError(f"{label} expects a tuple of inputs, got {shapes!r}")
    return [tuple(s) for s in shapes]


def _broadcast_shape(shapes):
    """The broadcast of the shapes (NumPy's rules; -1, an unknown batch size, matches any)."""
    try:
        return jnp.broadcast_shapes(*[tuple(1 if d == -1 else d for d in s) for s in shapes])
    except ValueError:
        raise ShapeError(f"FanInSum got inputs of shapes {', '.join(map(str, shapes))} that do "
                         f"not broadcast together") from None


def _fan_in_sum_init(rng, input_shapes):
    shapes = _fan_in_shapes("FanInSum", input_shapes)
    out = _broadcast_shape(shapes)
    batch_unknown = any(len(s) == len(out) and s and s[0] == -1 for s in shapes)
    return (tuple((-1,) + tuple(out[1:])) if batch_unknown and out[0] == 1 else tuple(out)), {}


def _fan_in_sum_apply(params, inputs, **kwargs):
    _broadcast_shape(_fan_in_shapes("FanInSum", [x.shape for x in inputs]))
    total = inputs[0]
    for x in inputs[1:]:
        total = total + x
    return total


def _fan_in_sum_fwd(params, inputs, **kwargs):
    return _fan_in_sum_apply(params, inputs), tuple(x.shape for x in inputs)


def _unbroadcast(g, shape):
    """Sum ``g`` over the axes that broadcasting added or stretched to reach its shape."""
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape)
                                      if d == 1 and g.shape[lead + i] != 1)
    return jnp.sum(g, axes).reshape(shape) if axes else g


def _fan_in_sum_bwd(params, shapes, g):
    # y = Σ xₖ (broadcast): ∂L/∂xₖ = g summed over the axes xₖ was broadcast along
    return {}, tuple(_unbroadcast(g, s) for s in shapes)


FanInSum = singleton(Layer(_fan_in_sum_init, _fan_in_sum_apply, _fan_in_sum_fwd,
                           _fan_in_sum_bwd, kind="fan_in_sum", label="FanInSum"),
                     __name__, "FanInSum")
# FanInSum: sum a tuple of inputs, broadcasting as NumPy does: y = Σₖ xₖ.


def _check_concat(label, shapes, axis):
    shapes = _fan_in_shapes(label, shapes)
    first = shapes[0]
    for other in shapes[1:]:
        a, b = list(first), list(other)
        if len(a) == len(b) and -len(a) <= axis < len(a):
            a[axis] = b[axis] = None
        if a != b:
            raise ShapeError(f"{label} got inputs of mismatched shapes {first} and {other}")


@recorded
def FanInConcat(axis: int = -1, name: str | None = None) -> Layer:
    """Concatenate a tuple of inputs along ``axis``. Backward: split the gradient back."""
    label = f"FanInConcat(axis={axis})"

    def init(rng, input_shapes):
        _check_concat(label, input_shapes, axis)
        first = list(input_shapes[0])
        first[axis] = sum(s[axis] for s in input_shapes)
        return tuple(first), {}

    def apply(params, inputs, **kwargs):
        _check_concat(label, [x.shape for x in inputs], axis)
        return jnp.concatenate(inputs, axis)

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), [x.shape[axis] for x in inputs]

    def bwd(params, sizes, g):
        cuts, total = [], 0
        for s in sizes[:-1]:
            total += s
            cuts.append(total)
        return {}, tuple(jnp.split(g, cuts, axis))

    return Layer(init, apply, fwd, bwd, kind="fan_in_concat", label=f"FanInConcat({axis})",
                 name=name, config={"axis": axis})


@recorded
def residual(*layers: Any, name: str | None = None) -> Layer:
    """Residual block: y = x + f(x) with f = serial(*layers).

    Params (and state) are those of ``f`` (a dict keyed like :func:`serial`'s). ``f``
    must keep the shape of its input. Backward: ∂L/∂x = g + f's backward rule of g.
    Its output is a sum, so no child produces it (``output_child`` is ``None``).
    """
    body = serial(*layers)
    walk = body.composite

    def check(in_shape, out_shape):
        if tuple(out_shape) != tuple(in_shape):
            raise ShapeError(f"residual body maps shape {tuple(in_shape)} to "
                             f"{tuple(out_shape)}; a residual block must keep the shape")

    def init(rng, input_shape):
        out_shape, params, state = walk.init(rng, input_shape)
        check(input_shape, out_shape)
        return tuple(input_shape), params, state

    def apply(params, state, inputs, kwargs):
        out, state = walk.apply(params, state, inputs, kwargs)
        check(inputs.shape, out.shape)
        return inputs + out, state

    def forward(params, state, inputs, kwargs, ctx):
        out, res, state = walk.forward(params, state, inputs, kwargs, ctx)
        check(inputs.shape, out.shape)
        return inputs + out, res, state

    def backward(params, res, g, ctx):
        grads, gx = walk.backward(params, res, g, ctx._replace(skip_output=False))
        return grads, g + gx

    ch = _Children(layers, "residual")
    return composite("residual", "residual", ch, Composite(init, apply, forward, backward),
                     rebuild=lambda new: residual(*new, name=name), output_child=None, name=name,
                     sequential=True)


def _activation_layer(activation: str | Callable) -> Layer:
    """An activation layer from a registered name or a function (with an optional
    ``.derivative`` written by hand, as :func:`jaxnet.activations.register` attaches)."""
    if isinstance(activation, str):
        acts.get(activation)
        return elementwise(activation)
    if not callable(activation):
        raise ValueError(f"an activation is a registered name or a function, got {activation!r}")
    record = acts.find(activation)
    if record is not None:
        return elementwise(record.name)
    return elementwise(activation, getattr(activation, "derivative", None))


@recorded
def mlp(hidden_widths: Sequence[int], out_dim: int, activation: str | Callable = "relu",
        output_activation: str | Callable | None = None, *, dropout: float = 0.0,
        batch_norm: bool = False, remat: bool | Callable = False,
        remat_every: int | None = None, name: str | None = None) -> Layer:
    """A deep multilayer perceptron.

    serial(Dense(h₁), f, Dense(h₂), f, …, Dense(out_dim), g) with f the hidden
    ``activation`` and g the ``output_activation`` (``None`` or ``"identity"``:
    linear outputs, e.g. logits). Activations are registered names or functions
    (a function's ``.derivative``, if it has one, is its backward rule). Its depth
    is ``len(hidden_widths)``, its width ``max(hidden_widths + [out_dim])``.
    ``dropout``: the probability of dropping a hidden unit; > 0 puts a
    :func:`Dropout` after every hidden f (apply then needs ``rng=`` in training).
    ``batch_norm``: a :func:`~jaxnet.BatchNorm` after every hidden Dense, before f (the
    net then keeps model state). ``remat``/``remat_every``: see :func:`serial`.

    >>> net = mlp([50, 50], 10, "relu", "softmax", dropout=0.1)
    """
    widths = list(hidden_widths)
    for w in widths + [out_dim]:
        if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
            raise ValueError(f"mlp widths must be positive integers, got {w!r} in "
                             f"hidden_widths={widths}, out_dim={out_dim!r}")
    hidden = _activation_layer(activation)
    output = None if output_activation in (None, "identity") else \
        _activation_layer(output_activation)
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"mlp dropout is the probability of dropping a unit and must be in "
                         f"[0, 1), got {dropout!r}")
    layers: list[Any] = []
    for w in widths:
        layers += [Dense(w)] + ([BatchNorm()] if batch_norm else []) + [hidden]
        layers += [Dropout(dropout)] if dropout else []
    layers.append(Dense(out_dim))
    if output is not None:
        layers.append(output)
    return serial(*layers, remat=remat, remat_every=remat_every, name=name)
