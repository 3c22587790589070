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

from .layers import Layer, Params, empty_params, label_of, layer_bwd, layer_fwd

Array = jax.Array
Loss = Callable[[Any, Any], Array]

__all__ = ["manual_value_and_grad", "AutodiffFallbackWarning"]


class AutodiffFallbackWarning(UserWarning):
    """Some layers of the net had no hand-written backward rule and used ``jax.vjp``."""


def _is_activation(layer: Any, name: str) -> bool:
    """``layer`` is the activation layer ``name`` over the last axis (no other options)."""
    if not isinstance(layer, Layer) or layer.config.get("activation") != name:
        return False
    extra = {k: v for k, v in layer.config.items() if k != "activation"}
    return extra in ({}, {"axis": -1})


def _ends_with(layer: Any, name: str | None) -> bool:
    """The net's output is activation ``name`` applied last (possibly inside nested serials)."""
    if name is None:
        return False
    if _is_activation(layer, name):
        return True
    if isinstance(layer, Layer) and layer.kind == "serial" and layer.children:
        return _ends_with(layer.children[-1][1], name)
    return False


def _bwd_skipping_last(layer: Any, params: Params, residuals: Any, g: Any) -> tuple[Params, Any]:
    """Backward pass of a net that ends in the fused activation, starting from δ at its input.

    The last activation's own backward step is skipped: ``g`` already is ∂L/∂z
    (the loss's fused gradient). Otherwise this is ``serial``'s rule: the
    children's rules in reverse order.
    """
    if layer.kind != "serial":  # the activation itself
        return {}, g
    grads = {}
    children = list(zip(layer.children, residuals))
    for i, ((name, child), res) in enumerate(reversed(children)):
        p = params.get(name, empty_params(child))
        rule = _bwd_skipping_last if i == 0 else layer_bwd
        pg, g = rule(child, p, res, g)
        if name in params:
            grads[name] = pg
    return {k: grads[k] for k in params}, g


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


def _check_params(net: Any, params: Params, inputs: Any) -> None:
    """``params`` must have the paths and shapes ``net.init`` gives for these inputs."""
    input_shape = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), inputs)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    expected = jax.eval_shape(lambda k: net[0](k, input_shape)[1], key)
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    where = f"the net {label_of(net)} on inputs of shape {_shape_str(inputs)}"
    for path, shape in want.items():
        if path not in have:
            raise ValueError(f"params{path} is missing: {where} has a parameter there of "
                             f"shape {shape}")
        if have[path] != shape:
            raise ValueError(f"params{path} has shape {have[path]}, but {where} expects "
                             f"{shape}")
    for path, shape in have.items():
        if path not in want:
            raise ValueError(f"params{path} (shape {shape}) is not a parameter of {where}; "
                             f"its parameters are {sorted(want)}")


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


def manual_value_and_grad(net: Any, loss: Loss, *,
                          autodiff_fallback: bool = False) -> Callable[..., tuple[Array, Params]]:
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
      naming them, and ``f.fallback_paths`` lists their paths. Without it such a layer raises
      :class:`~jaxnet.NoBackwardRuleError` naming its path.

    **Returns**

    ``f(params, inputs, targets, *, rng=None, mode=None) -> (loss_value, grads)``
    equal to ``jax.value_and_grad(lambda p: loss(net.apply(p, inputs, rng=rng,
    mode=mode), targets))(params)``: ``grads`` has the tree of ``params``.
    ``rng``/``mode`` go to the layers as they do in ``net.apply`` (the same key
    gives the same dropout mask). ``f`` works under ``jax.jit`` (make ``mode``
    static) and ``jax.vmap``.

    Bad input raises ``ValueError`` before any computation: params whose paths
    or shapes differ from ``net.init``'s (naming the first such path), targets
    whose batch size (axis 0) differs from the inputs', a loss that does not
    return a scalar.
    """
    if not (isinstance(net, tuple) and len(net) == 2 and all(map(callable, net))):
        raise TypeError(f"manual_value_and_grad needs a layer, an (init, apply) pair; got {net!r}")
    if not callable(loss):
        raise TypeError(f"manual_value_and_grad needs a loss function, got {loss!r}")
    fused_with = getattr(loss, "fused_with", None)
    fused = getattr(loss, "fused_grad", None) is not None and _ends_with(net, fused_with)
    output_grad = getattr(loss, "output_grad", None)
    checked: set = set()

    def check(params, inputs, targets, kwargs) -> None:
        """Validate once per signature (shapes, dtypes, tree); runs at trace time under jit."""
        leaves, tree = jax.tree_util.tree_flatten((params, inputs, targets, kwargs))
        signature = (tree, tuple((np.shape(x), str(_dtype(x))) if hasattr(x, "shape")
                                 or isinstance(x, (int, float, complex)) else x for x in leaves))
        if signature in checked:
            return
        _check_params(net, params, inputs)
        found: list[str] = []
        fb = found if autodiff_fallback else None
        arrays = {k: v for k, v in kwargs.items() if k == "rng"}
        static = {k: v for k, v in kwargs.items() if k != "rng"}
        abstract = jax.tree_util.tree_map(_struct, (params, inputs, arrays))
        outputs = jax.eval_shape(
            lambda p, x, a: layer_fwd(net, p, x, _fallback=fb, **a, **static)[0], *abstract)
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

    def f(params: Params, inputs: Any, targets: Any, *, rng: Array | None = None,
          mode: str | None = None) -> tuple[Array, Params]:
        kwargs = {k: v for k, v in (("rng", rng), ("mode", mode)) if v is not None}
        check(params, inputs, targets, kwargs)
        fallback: list[str] | None = [] if autodiff_fallback else None
        outputs, residuals = layer_fwd(net, params, inputs, _fallback=fallback, **kwargs)
        if fused:
            value = loss(outputs, targets)
            grads, _ = _bwd_skipping_last(net, params, residuals, loss.fused_grad(outputs, targets))
            return value, grads
        if output_grad is not None:
            value, g = loss(outputs, targets), output_grad(outputs, targets)
        else:
            value, g = jax.value_and_grad(loss)(outputs, targets)
        grads, _ = layer_bwd(net, params, residuals, g)
        return value, grads

    f.fallback_paths = ()
    f.net, f.loss, f.fused = net, loss, fused
    f.__doc__ = (f"Loss and gradients of {label_of(net)} by manual backpropagation "
                 f"(see jaxnet.manual_value_and_grad).")
    return f
