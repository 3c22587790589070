"""Manual backpropagation: the loss and its gradients from each layer's hand-written rule.

The course's backward pass, layer by layer, with no autodiff inside the net:

- forward: every layer runs ``fwd(params, x) -> (y, residuals)`` and keeps only
  what its backward formula needs (Dense keeps its input x, sigmoid and tanh
  keep their output y);
- backward: starting from δ = ∂L/∂y at the output, every layer maps δ back with
  its own ``bwd`` rule. For Dense followed by an activation f this is
  δⱼ = f′(zⱼ) Σₖ wⱼₖ δₖ and ∂L/∂wᵢⱼ = Σₙ xᵢ δⱼ (summed over the batch).

The gradient at the output comes from the loss: its fused hand-written form
when the net ends in the activation the loss pairs with (softmax or
log-softmax output with cross-entropy: δ = (y − t)/N at the pre-activation;
the L2 loss with a linear output: δ = (y − t)/N), else ``loss.output_grad``,
else ``jax.grad(loss)`` for the output gradient only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .protocol import (
    Context,
    Layer,
    Params,
    init_with_state,
    is_layer,
    label_of,
    layer_bwd,
    layer_fwd,
    output_leaf,
)

Array = jax.Array
Loss = Callable[[Any, Any], Array]

__all__ = ["manual_value_and_grad", "AutodiffFallbackWarning"]


class AutodiffFallbackWarning(UserWarning):
    """Some layers of the net had no hand-written backward rule and used ``jax.vjp``."""


def ends_with(net: Any, activation: str | None) -> bool:
    """The net's output is ``activation`` (over the last axis, no options) applied last,
    found through any combinator or wrapper that passes its output on unchanged
    (nested serials, mixed precision); not through a residual's sum."""
    leaf = output_leaf(net)
    if activation is None or not isinstance(leaf, Layer):
        return False
    if leaf.config.get("activation") != activation or leaf.composite is not None:
        return False
    extra = {k: v for k, v in leaf.config.items() if k != "activation"}
    return extra in ({}, {"axis": -1})


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), _dtype(x))


def _first_leaf(tree: Any) -> Any:
    leaves = jax.tree_util.tree_leaves(tree)
    return leaves[0] if leaves else None


def _shape_str(tree: Any) -> str:
    shapes = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), tree)
    return str(shapes)


def _check_tree(what: str, expected: Any, got: Any, where: str) -> None:
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
    for path, shape in want.items():
        if path not in have:
            raise ValueError(f"{what}{path} is missing: {where} has a {what} entry there of "
                             f"shape {shape}")
        if have[path] != shape:
            raise ValueError(f"{what}{path} has shape {have[path]}, but {where} expects "
                             f"{shape}")
    for path, shape in have.items():
        if path not in want:
            noun = "parameter" if what == "params" else "state entry"
            raise ValueError(f"{what}{path} (shape {shape}) is not a {noun} of {where}; its "
                             f"{what} are {sorted(want)}")


def _check_params(net: Any, params: Params, state: Any, inputs: Any) -> None:
    """``params`` (and ``state``) must have the paths and shapes ``net``'s init gives."""
    input_shape = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), inputs)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    want_params, want_state = jax.eval_shape(
        lambda k: init_with_state(net, k, input_shape)[1:], key)
    where = f"the net {label_of(net)} on inputs of shape {_shape_str(inputs)}"
    _check_tree("params", want_params, params, where)
    _check_tree("state", want_state, state, where)


def _check_batch(outputs: Any, inputs: Any, targets: Any) -> None:
    """Batched outputs (N, ...) need inputs and targets with the same N on axis 0."""
    out, x, t = _first_leaf(outputs), _first_leaf(inputs), _first_leaf(targets)
    if out is None or len(out.shape) < 2 or x is None or np.ndim(x) < 1:
        return  # a single unbatched example: nothing to compare
    n = np.shape(x)[0]
    if t is None or np.ndim(t) < 1 or np.shape(t)[0] != n:
        raise ValueError(f"targets of shape {_shape_str(targets)} do not match a batch of "
                         f"{n} inputs (inputs of shape {_shape_str(inputs)}): the batch axis "
                         f"(axis 0) must have the same size")


def _cast_like(grads: Params, params: Params) -> Params:
    """Gradients in exactly their params' dtypes (bfloat16 params get bfloat16 gradients,
    as from ``jax.grad``), so an optimizer's state keeps its dtypes."""
    return jax.tree_util.tree_map(
        lambda g, p: g.astype(p.dtype) if hasattr(p, "dtype") and hasattr(g, "dtype") else g,
        grads, params)


def manual_value_and_grad(net: Any, loss: Loss, *,
                          autodiff_fallback: bool = False) -> Callable[..., tuple[Any, Params]]:
    """Loss and gradients of ``net`` by manual backpropagation.

    **Arguments**

    - ``net``: a jaxnet layer or combinator (or any ``(init, apply)`` pair
      whose layers carry ``fwd``/``bwd`` rules).
    - ``loss``: ``loss(outputs, targets) -> scalar``. jaxnet's losses carry
      their hand-written output gradient (``loss.output_grad``) and fused form
      (``loss.fused_with``, ``loss.fused_grad``); for any other loss the
      output gradient ∂L/∂y comes from ``jax.grad(loss)``.
    - ``autodiff_fallback``: let layers without a hand-written backward rule
      (a user's own, a stax layer) use ``jax.vjp``. The first call (or trace)
      for each input signature then issues an :class:`AutodiffFallbackWarning`
      naming them, and ``f.fallback_paths`` lists their paths. Without it such a
      layer raises :class:`~jaxnet.NoBackwardRuleError` naming its path.

    **Returns**

    ``f(params, inputs, targets, *, rng=None, mode=None) -> (loss_value, grads)``
    equal to ``jax.value_and_grad(lambda p: loss(net.apply(p, inputs, rng=rng,
    mode=mode), targets))(params)``: ``grads`` has the tree and dtypes of ``params``.
    For a stateful net (BatchNorm) pass ``state=``: ``f`` then returns
    ``((loss_value, new_state), grads)``, what ``jax.value_and_grad(..., has_aux=True)``
    of ``apply_with_state`` returns. ``rng``/``mode`` go to the layers as in
    ``net.apply`` (the same key gives the same dropout mask). ``f`` works under
    ``jax.jit`` (make ``mode`` static) and ``jax.vmap``.

    ``f.fused`` tells whether the loss's fused gradient is used: the net's output
    (through serials and mixed precision) is the activation the loss pairs with.

    Bad input raises ``ValueError`` before any computation: params whose paths
    or shapes differ from ``net.init``'s (naming the first such path), targets
    whose batch size (axis 0) differs from the inputs', a loss that does not
    return a scalar.
    """
    if not is_layer(net):
        raise TypeError(f"manual_value_and_grad needs a layer, an (init, apply) pair; got {net!r}")
    if not callable(loss):
        raise TypeError(f"manual_value_and_grad needs a loss function, got {loss!r}")
    fused = getattr(loss, "fused_grad", None) is not None and ends_with(
        net, getattr(loss, "fused_with", None))
    output_grad = getattr(loss, "output_grad", None)
    stateful = getattr(net, "stateful", False)
    checked: set = set()

    def check(params, state, inputs, targets, kwargs) -> None:
        """Validate once per signature (shapes, dtypes, tree); runs at trace time under jit."""
        leaves, tree = jax.tree_util.tree_flatten((params, state, inputs, targets, kwargs))
        signature = (tree, tuple((np.shape(x), str(_dtype(x))) if hasattr(x, "shape")
                                 or isinstance(x, (int, float, complex)) else x for x in leaves))
        if signature in checked:
            return
        _check_params(net, params, state, inputs)
        found: list[str] = []
        ctx = Context(fallback=found if autodiff_fallback else None)
        arrays = {k: v for k, v in kwargs.items() if k == "rng"}
        static = {k: v for k, v in kwargs.items() if k != "rng"}
        abstract = jax.tree_util.tree_map(_struct, (params, state, inputs, arrays))
        outputs = jax.eval_shape(
            lambda p, s, x, a: layer_fwd(net, p, x, {**a, **static}, ctx, s)[0], *abstract)
        _check_batch(outputs, inputs, targets)
        value = jax.eval_shape(loss, outputs, jax.tree_util.tree_map(_struct, targets))
        if not (hasattr(value, "shape") and value.shape == ()):
            raise ValueError(f"the loss must return a scalar (the mean over the batch), got "
                             f"{_shape_str(value)} for outputs of shape {_shape_str(outputs)}")
        if found:
            warnings.warn(
                f"manual_value_and_grad: {len(found)} layer(s) without a hand-written backward "
                f"rule use the autodiff fallback (jax.vjp): {', '.join(found)}",
                AutodiffFallbackWarning, stacklevel=3)
        f.fallback_paths = tuple(found)
        checked.add(signature)

    def f(params: Params, inputs: Any, targets: Any, *, state: Any = None,
          rng: Array | None = None, mode: str | None = None) -> tuple[Any, Params]:
        if stateful and state is None:
            raise TypeError(f"{label_of(net)} keeps model state: pass state= (from "
                            f"init_with_state); f then returns ((loss, new_state), grads)")
        state = {} if state is None else state
        kwargs = {k: v for k, v in (("rng", rng), ("mode", mode)) if v is not None}
        check(params, state, inputs, targets, kwargs)
        ctx = Context(fallback=[] if autodiff_fallback else None)
        outputs, residuals, new_state = layer_fwd(net, params, inputs, kwargs, ctx, state)
        value = loss(outputs, targets)
        if fused:
            g = loss.fused_grad(outputs, targets)
            ctx = ctx._replace(skip_output=True)
        elif output_grad is not None:
            g = output_grad(outputs, targets)
        else:
            g = jax.grad(loss)(outputs, targets)
        grads, _ = layer_bwd(net, params, residuals, g, ctx)
        grads = _cast_like(grads, params)
        return ((value, new_state), grads) if stateful else (value, grads)

    f.fallback_paths = ()
    f.net, f.loss, f.fused = net, loss, fused
    f.__doc__ = (f"Loss and gradients of {label_of(net)} by manual backpropagation "
                 f"(see jaxnet.manual_value_and_grad).")
    return f
