"""The layer protocol: the :class:`Layer` record and the functions that run any layer.

A layer is stax's pair of pure functions, and unpacks as one
(``init_fun, apply_fun = layer``, so it works inside ``jax.example_libraries.stax``):

- ``init(rng, input_shape) -> (output_shape, params)``; shapes include the
  batch axis first (it may be ``-1``); params are a plain dict of arrays (``{}``
  for parameter-free layers);
- ``apply(params, inputs, **kwargs) -> outputs``; the keyword arguments are only
  what the caller passes (``rng=``, ``mode=``, and e.g. ``mask=`` for attention).

jaxnet's record adds the layer's **hand-written backward rule**, next to its formula:

- ``fwd(params, inputs, **kwargs) -> (outputs, residuals)`` runs the layer and
  keeps only what the backward formula needs;
- ``bwd(params, residuals, g) -> (param_grads, input_grad)`` maps g = ∂L/∂outputs
  to ∂L/∂params (the tree and dtypes of ``params``) and ∂L/∂inputs (``None`` for
  integer inputs). :func:`jaxnet.check_layer` checks a rule against ``jax.vjp``.

**Model state** (running statistics, counters) is opt-in, as in Haiku's
``transform_with_state`` and Equinox's ``nn.State``. A *stateful* leaf also has

- ``state_init(input_shape) -> state`` (a dict of arrays);
- ``apply_state(params, state, inputs, **kwargs) -> (outputs, new_state)``;
- ``fwd_state(params, state, inputs, **kwargs) -> (outputs, residuals, new_state)``.

Every layer answers :meth:`Layer.init_with_state` and :meth:`Layer.apply_with_state`;
a stateless net's state is ``{}`` (no leaves). State is keyed by the same names as
params (``{"batch_norm_0": {"mean": ..., "var": ...}}``). The plain ``apply`` of a
stateful net raises :class:`StatefulLayerError` naming the stateful layer.

**Structure** is asked of the record, never read from strings: ``children``
(``((name, layer), ...)``), ``rebuild(layers)`` (the same combinator over new
children), ``output_child`` (the index of the child whose output is the
layer's output, unchanged in value, or ``None``) and ``sequential`` (the children
run one after another). Combinators are composites:
their ``composite`` field holds the four functions that walk the children with an
explicit :class:`Context` (see :class:`Composite`).

The record is immutable, compares by value (the constructor and its arguments)
where it has them and by identity otherwise, and copies and pickles by rebuilding
from its constructor call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax

Array = jax.Array
Shape = tuple[int, ...]
Params = Any
State = Any

__all__ = ["Layer", "Composite", "Context", "ShapeError", "NoBackwardRuleError",
           "StatefulLayerError", "is_layer", "label_of", "init_with_state", "apply_with_state",
           "layer_fwd", "layer_bwd", "output_leaf", "first_stateful", "recorded", "singleton",
           "expect_params", "stateful_error"]


class ShapeError(ValueError):
    """A shape that does not fit a layer. The message names the layer (its path
    inside the net, e.g. ``serial/dense_1``) and both shapes."""

    def __init__(self, message: str, path: tuple[str, ...] = ()):
        self.message, self.path = message, path
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{'/'.join(self.path)}: {self.message}" if self.path else self.message

    def within(self, name: str) -> ShapeError:
        return type(self)(self.message, (name,) + self.path)


class NoBackwardRuleError(TypeError):
    """A layer without a hand-written backward rule met the manual backward pass."""


class StatefulLayerError(TypeError):
    """A stateful layer (BatchNorm) was run without its state."""


class Context(NamedTuple):
    """What the manual pass hands down a net besides the user's keyword arguments.

    Attributes:
      path: the names from the root to this layer (for errors and reports).
      fallback: ``None`` (a layer without a backward rule is an error), or a list
        to which the paths of layers that used ``jax.vjp`` instead are appended.
      skip_output: the backward pass starts at the input of the net's output
        activation (the loss's fused gradient ∂L/∂z): the composite hands this to
        its ``output_child``, and that activation passes g through.
    """

    path: tuple[str, ...] = ()
    fallback: list | None = None
    skip_output: bool = False

    def child(self, name: str, is_output: bool = False) -> Context:
        return Context(self.path + ((name,) if name else ()), self.fallback,
                       self.skip_output and is_output)


class Composite(NamedTuple):
    """How a combinator walks its children, with explicit state and :class:`Context`.

    - ``init(rng, input_shape) -> (output_shape, params, state)``;
    - ``apply(params, state, inputs, kwargs) -> (outputs, new_state)``;
    - ``forward(params, state, inputs, kwargs, ctx) -> (outputs, residuals, new_state)``;
    - ``backward(params, residuals, g, ctx) -> (param_grads, input_grad)``.
    """

    init: Callable
    apply: Callable
    forward: Callable
    backward: Callable




@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Layer:
    """A layer: stax's ``(init, apply)`` plus its backward rule, state and structure.

    Attributes:
      init, apply: the two stax functions (``init_fun, apply_fun = layer``).
      fwd, bwd: the hand-written backward rule (module docstring); ``None`` when
        the layer has none.
      kind: snake-case base of the parameter key (``"dense"`` → ``dense_0``).
      label: readable name for tables and errors (``"Dense(10)"``).
      name: the parameter key chosen by the user (``Dense(10, name="head")``), or
        ``None`` for ``kind_<count>``.
      config: the constructor's arguments (read-only).
      state_init, apply_state, fwd_state: a stateful leaf's functions.
      children, rebuild, output_child, composite: a combinator's structure;
        ``sequential``: its children run one after another, each on the previous one's
        output (serial, a residual's body), so adjacent linear children can be fused.
      recipe: ``(constructor, args, kwargs)``, what copies and pickles rebuild from.
    """

    init: Callable
    apply: Callable
    fwd: Callable | None = None
    bwd: Callable | None = None
    kind: str = "layer"
    label: str = ""
    name: str | None = None
    config: Mapping = dataclasses.field(default_factory=dict)
    state_init: Callable | None = None
    apply_state: Callable | None = None
    fwd_state: Callable | None = None
    children: tuple = ()
    rebuild: Callable | None = None
    output_child: int | None = None
    sequential: bool = False
    composite: Composite | None = None
    recipe: tuple | None = None

    def __post_init__(self):
        if not (callable(self.init) and callable(self.apply)):
            raise TypeError("a Layer needs callable init and apply functions")
        if (self.fwd is None) != (self.bwd is None):
            raise TypeError(f"{self.label or self.kind}: give both fwd and bwd, or neither")
        if self.name is not None and (not isinstance(self.name, str) or not self.name
                                      or "/" in self.name):
            raise ValueError(f"a layer name is a non-empty string without '/', got "
                             f"{self.name!r}")
        set_ = functools.partial(object.__setattr__, self)
        set_("label", self.label or self.kind)
        set_("config", MappingProxyType(dict(self.config)))
        set_("children", tuple((str(n), c) for n, c in self.children))

    # stax's pair
    def __iter__(self):
        return iter((self.init, self.apply))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        return (self.init, self.apply)[i]

    def __repr__(self) -> str:
        return f"<Layer {self.label}{'' if self.name is None else ' name=' + repr(self.name)}>"

    # equality by value where the constructor call is known, else by identity
    def _key(self):
        return (self.recipe, self.name) if self.recipe is not None else None

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, Layer) or self._key() is None:
            return False
        try:
            return bool(self._key() == other._key())
        except Exception:  # arguments that do not compare (arrays): not equal
            return False

    def __hash__(self):
        if self.recipe is None:
            return id(self)
        return hash((self.recipe[0], self.label, self.name))

    # copies and pickles rebuild the layer from its constructor call
    def __reduce__(self):
        if self.recipe is None:
            return super().__reduce__()
        return (_rebuilt, (self.recipe, self.name))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self  # immutable: a copy is the layer itself

    # structure and state
    @property
    def stateful(self) -> bool:
        """Whether this layer, or a layer inside it, keeps model state."""
        if self.state_init is not None:
            return True
        return any(getattr(c, "stateful", False) for _, c in self.children)

    def named(self, name: str) -> Layer:
        """The same layer with its parameter key set to ``name``."""
        return dataclasses.replace(self, name=name)

    def init_with_state(self, rng: Array, input_shape: Shape) -> tuple[Shape, Params, State]:
        """``(output_shape, params, state)``; a stateless layer's state is ``{}``."""
        return init_with_state(self, rng, input_shape)

    def apply_with_state(self, params: Params, state: State, inputs: Any,
                         **kwargs) -> tuple[Any, State]:
        """``(outputs, new_state)``: ``mode="train"`` updates the state, ``"eval"`` reads it."""
        return apply_with_state(self, params, state, inputs, kwargs)


def _rebuilt(recipe: tuple, name: str | None) -> Layer:
    factory, args, kwargs = recipe
    layer = factory(*args, **kwargs)
    return layer if name is None or layer.name == name else layer.named(name)


def recorded(factory: Callable[..., Layer]) -> Callable[..., Layer]:
    """Decorate a layer constructor so that its layers remember the call (``recipe``):
    they then compare by value, copy and pickle (the constructor must be importable).
    The decorated constructor takes ``name=`` (the layer's parameter key) whether or not
    the plain one does."""

    takes_name = "name" in inspect.signature(factory).parameters

    @functools.wraps(factory)
    def make(*args, name: str | None = None, **kwargs) -> Layer:
        layer = factory(*args, **kwargs, **({"name": name} if takes_name else {}))
        return dataclasses.replace(layer, recipe=(make, args, kwargs),
                                   name=layer.name if name is None else name)

    return make


def _module_attribute(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def singleton(layer: Layer, module: str, name: str) -> Layer:
    """A module-level layer (``Relu``, ``Flatten``) that unpickles as itself."""
    return dataclasses.replace(layer, recipe=(_module_attribute, (module, name), {}))


def is_layer(x: Any) -> bool:
    """A jaxnet :class:`Layer` or a stax pair ``(init_fun, apply_fun)``."""
    if isinstance(x, Layer):
        return True
    return isinstance(x, tuple) and len(x) == 2 and all(map(callable, x))


def label_of(layer: Any) -> str:
    """Readable name of any layer, jaxnet's or a foreign stax pair."""
    if isinstance(layer, Layer):
        return layer.label
    fn = layer[1]
    return getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__))


def _init_fn(layer):
    return layer.init if isinstance(layer, Layer) else layer[0]


def _apply_fn(layer):
    return layer.apply if isinstance(layer, Layer) else layer[1]


def first_stateful(layer: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], Layer] | None:
    """The path and record of the first stateful leaf inside ``layer`` (``None`` if none)."""
    if not isinstance(layer, Layer):
        return None
    if layer.state_init is not None:
        return path, layer
    for name, child in layer.children:
        found = first_stateful(child, path + ((name,) if name else ()))
        if found is not None:
            return found
    return None


def stateful_error(path: tuple[str, ...], leaf: Layer) -> StatefulLayerError:
    """The error for running the stateful leaf at ``path`` without its state."""
    where = "/".join(path) or leaf.label
    return StatefulLayerError(
        f"{where}: {leaf.label} keeps model state (running statistics): use "
        f"init_with_state(rng, shape) -> (shape, params, state) and "
        f"apply_with_state(params, state, inputs, mode=...) -> (outputs, state)")


def init_with_state(layer: Any, rng: Array, input_shape: Shape) -> tuple[Shape, Params, State]:
    """``(output_shape, params, state)`` of any layer (a stax pair's state is ``{}``)."""
    if isinstance(layer, Layer):
        if layer.composite is not None:
            return layer.composite.init(rng, input_shape)
        out, params = layer.init(rng, input_shape)
        state = layer.state_init(tuple(input_shape)) if layer.state_init is not None else {}
        return out, params, state
    out, params = layer[0](rng, input_shape)
    return out, params, {}


def apply_with_state(layer: Any, params: Params, state: State, inputs: Any,
                     kwargs: Mapping) -> tuple[Any, State]:
    """``(outputs, new_state)`` of any layer; stateless layers return ``state`` unchanged."""
    if isinstance(layer, Layer):
        if layer.composite is not None:
            return layer.composite.apply(params, state, inputs, kwargs)
        if layer.apply_state is not None:
            return layer.apply_state(params, state, inputs, **kwargs)
    return _apply_fn(layer)(params, inputs, **kwargs), state


def layer_fwd(layer: Any, params: Params, inputs: Any, kwargs: Mapping | None = None,
              ctx: Context = Context(), state: State = None) -> tuple[Any, Any, State]:
    """Run ``layer``'s forward pass keeping its residuals for :func:`layer_bwd`.

    Returns ``(outputs, residuals, new_state)``. A layer without a backward rule
    raises :class:`NoBackwardRuleError` naming its path, unless ``ctx.fallback`` is a
    list: then ``jax.vjp`` stands in for the rule and the path is appended there.
    """
    kwargs = dict(kwargs or {})
    state = {} if state is None else state
    if isinstance(layer, Layer):
        if layer.composite is not None:
            return layer.composite.forward(params, state, inputs, kwargs, ctx)
        if layer.fwd_state is not None:
            return layer.fwd_state(params, state, inputs, **kwargs)
        if layer.fwd is not None:
            out, res = layer.fwd(params, inputs, **kwargs)
            return out, res, state
    where = "/".join(ctx.path) or label_of(layer)
    if ctx.fallback is None:
        raise NoBackwardRuleError(
            f"{where}: layer {label_of(layer)} has no hand-written backward rule; "
            "give it fwd/bwd (jaxnet.Layer) or opt in to the autodiff fallback "
            "(manual_value_and_grad(..., autodiff_fallback=True))")
    ctx.fallback.append(where)
    if isinstance(layer, Layer) and layer.apply_state is not None:
        outputs, vjp, new_state = jax.vjp(
            lambda p, x: layer.apply_state(p, state, x, **kwargs), params, inputs, has_aux=True)
        return outputs, _VjpResiduals(vjp), new_state
    outputs, vjp = jax.vjp(lambda p, x: _apply_fn(layer)(p, x, **kwargs), params, inputs)
    return outputs, _VjpResiduals(vjp), state


class _VjpResiduals(NamedTuple):
    vjp: Callable


def layer_bwd(layer: Any, params: Params, residuals: Any, g: Any,
              ctx: Context = Context()) -> tuple[Params, Any]:
    """Backward rule of ``layer`` (or the ``jax.vjp`` fallback that :func:`layer_fwd` chose).

    With ``ctx.skip_output`` on a leaf, ``g`` already is the gradient at the leaf's
    input (the loss's fused form), so it passes through.
    """
    if isinstance(residuals, _VjpResiduals):
        return residuals.vjp(g)
    if isinstance(layer, Layer) and layer.composite is not None:
        return layer.composite.backward(params, residuals, g, ctx)
    if ctx.skip_output:
        return {}, g
    return layer.bwd(params, residuals, g)


def output_leaf(layer: Any) -> Any:
    """The leaf layer whose output is ``layer``'s output unchanged in value, following
    ``output_child`` through combinators and wrappers (``None`` where a combinator's
    output is computed from several children, as a residual's sum is)."""
    while isinstance(layer, Layer) and layer.composite is not None:
        if layer.output_child is None:
            return None
        layer = layer.children[layer.output_child][1]
    return layer


def expect_params(label: str, params: Any, shapes: Mapping[str, tuple]) -> None:
    """Check that ``params`` has exactly the keys of ``shapes`` with those shapes.

    Raises :class:`ShapeError` naming the layer, the parameter and both shapes
    (combinators prefix the layer's path), instead of a bare ``KeyError``.
    """
    if not isinstance(params, Mapping):
        raise ShapeError(f"{label} expects params as a dict with keys {sorted(shapes)}, got "
                         f"{type(params).__name__}")
    want = {k: tuple(v) for k, v in shapes.items()}
    for key, shape in want.items():
        if key not in params:
            raise ShapeError(f"{label} has no parameter '{key}' in its params (expected shape "
                             f"{shape}; the params have keys {sorted(params)})")
        got = tuple(getattr(params[key], "shape", ()))
        if got != shape:
            raise ShapeError(f"{label}: parameter '{key}' has shape {got}, expected {shape}")
    extra = sorted(set(params) - set(want))
    if extra:
        raise ShapeError(f"{label}: params have keys {extra} that it does not use (its "
                         f"parameters are {sorted(want)})")
