"""Check a layer's hand-written backward rule against ``jax.vjp``: :func:`check_layer`.

The layer counterpart of :func:`jaxnet.check_activation`. For each dtype (float32 and
float64 by default) it draws params (the layer's init, cast to the dtype), inputs and a
cotangent g at random and checks:

- ``param_grads``: the rule's ∂L/∂params against ``jax.vjp`` of the layer's apply, leaf
  by leaf, with the same tree (the same keys) and exactly the params' dtypes;
- ``input_grad``: ∂L/∂inputs against ``jax.vjp``, with the inputs' shape and dtype
  (``None`` for integer inputs, which have no gradient);
- ``outputs``: ``fwd``'s outputs equal ``apply``'s;
- ``state`` (stateful layers): the new state has the structure, shapes and dtypes of the
  state, and equals what ``apply_with_state`` returns.

Tolerances: float64 rtol 1e-10, float32 rtol 1e-4; the absolute part is the same
fraction of the largest entry among all the gradients checked together (sums of many
float32 products cancel to values far below their terms, and some gradients are exactly 0
in exact arithmetic: attention's key bias). The rule and ``jax.vjp`` compute the same sums
in a different order, so they agree to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checks import CheckResult, _x64_context
from .protocol import Context, apply_with_state, init_with_state, label_of, layer_bwd, layer_fwd

__all__ = ["LayerReport", "LayerCheckError", "check_layer"]

_RTOL = {"float32": 1e-4, "float64": 1e-10}
_BATCH = 8  # what an unknown batch size (-1) becomes: enough rows for batch statistics


class LayerCheckError(AssertionError):
    """A layer's backward rule, gradient tree or state failed :func:`check_layer`."""


@dataclass
class LayerReport:
    """The outcome of :func:`check_layer`: one :class:`~jaxnet.checks.CheckResult` per check
    and dtype (named ``"param_grads[dense_0/w] float32"`` and so on)."""

    label: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def __str__(self) -> str:
        head = f"check_layer({self.label}): " + ("all checks passed" if self.passed else "FAILED")
        rows = [f"  {'ok ' if c.passed else 'FAIL'} {c.name:44s} max abs {c.max_abs_err:9.2e}"
                f"  max rel {c.max_rel_err:9.2e}  {c.detail}" for c in self.checks]
        return "\n".join([head, *rows])

    def raise_if_failed(self) -> LayerReport:
        if not self.passed:
            raise LayerCheckError(str(self))
        return self


def _paths(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _scale(*trees: Any) -> float:
    return max([float(np.max(np.abs(np.asarray(a, np.float64))))
                for t in trees for a in jax.tree_util.tree_leaves(t) if np.size(a)] + [1e-30])


def _close(name: str, got: Any, want: Any, dtype: str, scale: float | None = None) -> CheckResult:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return CheckResult(name, False, np.inf, np.inf, f"shape {got.shape}, expected {want.shape}")
    if got.size == 0:
        return CheckResult(name, True, 0.0, 0.0)
    rtol = _RTOL[dtype]
    atol = rtol * (_scale(want) if scale is None else scale)
    err = np.abs(got - want)
    ok = bool(np.all(np.isfinite(got)) and np.all(err <= atol + rtol * np.abs(want)))
    rel = float(np.max(err / np.maximum(np.abs(want), atol)))
    detail = ""
    if not ok:
        i = np.unravel_index(int(np.argmax(err - rtol * np.abs(want))), err.shape)
        detail = f"worst at {tuple(int(j) for j in i)}: got {got[i]:.6g}, want {want[i]:.6g}"
    return CheckResult(name, ok, float(err.max()), rel, detail)


def _structure(name: str, got: Any, want: Any, what: str) -> list[CheckResult]:
    """The trees must have the same paths, shapes and dtypes."""
    g, w = _paths(got), _paths(want)
    results = []
    for path in sorted(set(g) | set(w)):
        if path not in g:
            results.append(CheckResult(f"{name}[{path}]", False, np.inf, np.inf,
                                       f"missing from the {what}"))
        elif path not in w:
            results.append(CheckResult(f"{name}[{path}]", False, np.inf, np.inf,
                                       f"the {what} has a leaf here that the params do not"))
        elif (np.shape(g[path]) != np.shape(w[path])
              or jnp.result_type(g[path]) != jnp.result_type(w[path])):
            results.append(CheckResult(
                f"{name}[{path}]", False, np.inf, np.inf,
                f"shape {np.shape(g[path])} dtype {jnp.result_type(g[path])}, expected "
                f"{np.shape(w[path])} {jnp.result_type(w[path])}"))
    return results


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _inputs(key, shapes, dtype, int_inputs):
    if isinstance(shapes, list | tuple) and shapes and isinstance(shapes[0], list | tuple):
        keys = jax.random.split(key, len(shapes))
        return tuple(_inputs(k, s, dtype, int_inputs) for k, s in zip(keys, shapes))
    shape = tuple(_BATCH if d == -1 else d for d in shapes)
    if int_inputs:
        return jax.random.randint(key, shape, 0, int_inputs)
    return jax.random.normal(key, shape, dtype)


def _check_one(layer, input_shape, dtype, kwargs, seed, int_inputs) -> list[CheckResult]:
    k_init, k_x, k_g = jax.random.split(jax.random.key(seed), 3)
    concrete = jax.tree_util.tree_map(lambda d: _BATCH if d == -1 else d, input_shape)
    _, params, state = init_with_state(layer, k_init, concrete)
    params, state = _cast(params, dtype), _cast(state, dtype)
    x = _inputs(k_x, input_shape, dtype, int_inputs)

    @jax.jit  # one compiled program instead of hundreds of op-by-op dispatches
    def both_ways(params, state, x, k_g):
        out, res, new_state = layer_fwd(layer, params, x, kwargs, Context(), state)
        ref_out, vjp, ref_state = jax.vjp(
            lambda p, a: apply_with_state(layer, p, state, a, kwargs), params, x, has_aux=True)
        leaves = jax.tree_util.tree_leaves(ref_out)
        keys = jax.random.split(k_g, max(len(leaves), 1))
        g = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(ref_out), [
            jax.random.normal(k, np.shape(o), jnp.result_type(o)) for k, o in zip(keys, leaves)])
        pg, gx = layer_bwd(layer, params, res, g)
        return out, new_state, ref_out, ref_state, pg, gx, vjp(g)

    out, new_state, ref_out, ref_state, pg, gx, (ref_pg, ref_gx) = both_ways(params, state, x,
                                                                             k_g)
    name = jnp.dtype(dtype).name
    scale = _scale(ref_pg, ref_gx if not int_inputs else None)
    results = _structure(f"param_grads {name}", pg, params, "gradient tree")
    got, want = _paths(pg), _paths(ref_pg)
    for path in sorted(set(got) & set(want)):
        results.append(_close(f"param_grads[{path}] {name}", got[path], want[path], name,
                              scale))
    if int_inputs:
        ok = gx is None
        results.append(CheckResult(f"input_grad {name}", ok, 0.0, 0.0,
                                   "" if ok else "integer inputs have no gradient: return None"))
    else:
        results += _structure(f"input_grad {name}", gx, x, "input gradient")
        gx_paths, ref_paths = _paths(gx), _paths(ref_gx)
        for path in sorted(set(gx_paths) & set(ref_paths)):
            results.append(_close(f"input_grad[{path}] {name}".replace("[]", ""),
                                  gx_paths[path], ref_paths[path], name, scale))
    for path, (o, r) in {p: (o, _paths(ref_out)[p]) for p, o in _paths(out).items()}.items():
        results.append(_close(f"outputs[{path}] {name}".replace("[]", ""), o, r, name))
    if jax.tree_util.tree_leaves(state):
        results += _structure(f"state {name}", new_state, state, "new state")
        ref_paths = _paths(ref_state)
        for path, s in _paths(new_state).items():
            if path in ref_paths:
                results.append(_close(f"state[{path}] {name}", s, ref_paths[path], name))
    return results


def check_layer(layer: Any, input_shape: Any, *, kwargs: Mapping | None = None,
                dtypes: Sequence[str] = ("float32", "float64"), seed: int = 0,
                int_inputs: int | None = None, raise_on_failure: bool = True) -> LayerReport:
    """Check ``layer``'s hand-written ``bwd`` against ``jax.vjp`` of its apply.

    **Arguments**

    - ``layer``: a jaxnet layer (a leaf or a whole net) with ``fwd``/``bwd`` rules.
    - ``input_shape``: the inputs' shape, batch first (``-1`` becomes 8); a tuple of
      shapes for layers that take a tuple of inputs.
    - ``kwargs``: keyword arguments for apply (``{"mode": "eval"}``, ``{"causal": True}``).
    - ``dtypes``: the float dtypes to check in (float64 under ``jax.enable_x64``).
    - ``int_inputs``: draw integer inputs in ``[0, int_inputs)`` (an embedding's vocabulary).
    - ``raise_on_failure``: raise :class:`LayerCheckError` with the report.

    **Returns** a :class:`LayerReport`; each failing check names the leaf path (e.g.
    ``param_grads[dense_0/w] float32``) and its worst element.
    """
    report = LayerReport(label_of(layer))
    for dtype in dtypes:
        if jnp.dtype(dtype).name not in _RTOL:
            raise ValueError(f"check_layer checks float32 and float64, got {dtype!r}")
        context = (_x64_context() if jnp.dtype(dtype) == jnp.float64
                   else contextlib.nullcontext())
        with context:
            report.checks += _check_one(layer, input_shape, jnp.dtype(dtype), dict(kwargs or {}),
                                        seed, int_inputs)
    if raise_on_failure:
        report.raise_if_failed()
    return report

