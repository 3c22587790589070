"""Check an activation's hand-written derivative against ``jax.grad`` and finite differences.

:func:`check_activation` takes any activation, jaxnet's or a user's own, with
its derivative written by hand, and returns an :class:`ActivationReport`
(max absolute and relative error per check). By default it raises
:class:`ActivationCheckError` when a check fails.

Checks (float64 where JAX allows it, else float32):

- ``derivative_vs_grad``: the hand-written f′ against ``jax.grad`` of the
  plain forward formula, on a grid from −10 to 10 plus extremes (±50 … ±3·10⁴);
- ``derivative_vs_finite_differences``: f′ against central differences
  (f(a + h) − f(a − h)) / 2h, h = 10⁻⁶·max(1, |a|) in float64, at the points
  where the function is smooth (left and right differences agree);
- ``custom_rule``: when ``fn`` has a custom rule (jaxnet's activations do),
  ``jax.grad(fn)`` equals f′: the rule is wired in;
- ``finite_<dtype>``: f and f′ are finite for every finite grid point in
  float16, bfloat16, float32 (and float64), and keep the input's dtype;
- ``monotonic``, ``continuous``, ``differentiable``: where claimed.
  Monotonic: f never decreases on a fine grid. Continuous: no jump
  |f(a + ε) − f(a − ε)| larger than 10·ε·(1 + |f′(a)|) + tolerance.
  Differentiable: left and right difference quotients agree everywhere.

Vector activations (softmax, log-softmax) take a derivative as a JVP
``(a, t) -> J(a)·t``; pass ``elementwise=False`` for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from . import activations as acts

__all__ = ["CheckResult", "ActivationReport", "ActivationCheckError", "check_activation"]

_EXTREMES = [0.0, 1e-7, -1e-7, 50.0, -50.0, 100.0, -100.0, 1e3, -1e3, 1e4, -1e4, 3e4, -3e4]

# Tolerances for derivative_vs_grad: both sides are the same math evaluated in
# different orders, so they agree to a few ulps; the absolute part covers
# values that cancel to ~0 (1 − tanh² at large |a| is 0 in floating point
# while 4/(eᵃ+e⁻ᵃ)² is a tiny positive number).
_GRAD_TOL = {np.dtype("float64"): (1e-9, 1e-12), np.dtype("float32"): (1e-4, 1e-6)}
# Central differences with h = 1e-6·max(1, |a|) in float64 have rounding error
# ~ε/h ≈ 2e-10 and truncation error ~h²·|f'''| (smooth points) or ~h·|Δf''|
# (points where f is C¹ but not C², e.g. elu at 0): both well below 1e-6.
_FD_TOL = {np.dtype("float64"): (1e-6, 1e-7), np.dtype("float32"): (2e-2, 2e-3)}


class ActivationCheckError(AssertionError):
    """An activation's derivative or claimed property failed a check."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    max_abs_err: float
    max_rel_err: float
    detail: str = ""


@dataclass
class ActivationReport:
    """The outcome of :func:`check_activation`: one :class:`CheckResult` per check."""

    name: str
    dtype: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def __str__(self) -> str:
        head = f"check_activation({self.name}) in {self.dtype}: " + \
            ("all checks passed" if self.passed else "FAILED")
        rows = [f"  {'ok ' if c.passed else 'FAIL'} {c.name:36s} max abs {c.max_abs_err:9.2e}"
                f"  max rel {c.max_rel_err:9.2e}  {c.detail}" for c in self.checks]
        return "\n".join([head, *rows])

    def raise_if_failed(self) -> ActivationReport:
        if not self.passed:
            raise ActivationCheckError(str(self))
        return self


def _compare(name, got, want, rtol, atol, mask=None, detail="") -> CheckResult:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if mask is not None:
        got, want = got[mask], want[mask]
    if got.size == 0:
        return CheckResult(name, True, 0.0, 0.0, detail or "no points")
    with np.errstate(over="ignore", invalid="ignore"):
        abs_err = np.abs(got - want)
        rel_err = abs_err / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
    ok = bool(np.all(np.isfinite(got)) and np.all(abs_err <= atol + rtol * np.abs(want)))
    worst = int(np.argmax(abs_err - rtol * np.abs(want)))
    if not ok:
        detail = (detail + " " if detail else "") + f"worst at index {worst}: "
        detail += f"got {got[worst]:.6g}, want {want[worst]:.6g}"
    return CheckResult(name, ok, float(abs_err.max()), float(np.max(np.where(
        abs_err <= atol, 0.0, rel_err))), detail)


def _x64_context():
    try:
        return jax.enable_x64(True)
    except (AttributeError, TypeError):  # older JAX
        return contextlib.nullcontext()


def check_activation(
    fn: Callable | str | acts.Activation,
    derivative: Callable | None = None,
    *,
    formula: Callable | None = None,
    name: str | None = None,
    monotonic: bool | None = None,
    continuous: bool | None = None,
    differentiable: bool | None = None,
    elementwise: bool | None = None,
    grid: np.ndarray | None = None,
    raise_on_failure: bool = True,
) -> ActivationReport:
    """Check a hand-written derivative and the claimed properties of an activation.

    Arguments:
      fn: the activation: a registered name (``"tanh"``), an
        :class:`~jaxnet.activations.Activation` record, or a function
        ``f(a) -> array`` (elementwise) / ``f(a) -> array`` over the last axis.
      derivative: f′ as a function of the input (elementwise), or the JVP
        ``(a, t) -> J(a)·t`` (vector activations). Taken from the record for
        jaxnet's own activations.
      formula: the plain forward formula to differentiate with ``jax.grad``
        (defaults to ``fn``; jaxnet's records give their formula without the
        custom rule).
      monotonic, continuous, differentiable: properties claimed; ``None``
        means "do not check" for a user's function, the registry's claims for
        jaxnet's own.
      grid: points to check (default: −10…10 in 2001 steps plus extremes).
      raise_on_failure: raise :class:`ActivationCheckError` if any check fails.

    Returns:
      An :class:`ActivationReport`; ``report.passed`` and ``str(report)``.
    """
    if isinstance(fn, str):
        fn = acts.get(fn)
    if isinstance(fn, acts.Activation):
        record = fn
        fn, formula = record.fn, formula or record.formula
        derivative = derivative or record.derivative
        name = name or record.name
        monotonic = record.monotonic if monotonic is None else monotonic
        continuous = record.continuous if continuous is None else continuous
        differentiable = record.differentiable if differentiable is None else differentiable
        elementwise = record.elementwise if elementwise is None else elementwise
    if derivative is None:
        raise ValueError("check_activation needs the hand-written derivative to check")
    name = name or getattr(fn, "__name__", "activation")
    formula = formula or fn
    elementwise = True if elementwise is None else elementwise

    with _x64_context():
        dtype = jnp.zeros(()).astype(jnp.float64).dtype
        if elementwise:
            report = _check_elementwise(fn, derivative, formula, name, dtype, monotonic,
                                        continuous, differentiable, grid)
        else:
            report = _check_vector(fn, derivative, formula, name, dtype)
    if raise_on_failure:
        report.raise_if_failed()
    return report


def _grid(grid, dtype):
    if grid is None:
        grid = np.concatenate([np.linspace(-10, 10, 2001), _EXTREMES])
    return jnp.asarray(np.asarray(grid, np.float64), dtype)


def _check_elementwise(fn, derivative, formula, name, dtype, monotonic, continuous,
                       differentiable, grid) -> ActivationReport:
    report = ActivationReport(name, str(np.dtype(dtype)))
    x = _grid(grid, dtype)
    d = jax.jit(jax.vmap(derivative))(x)
    g_formula = jax.jit(jax.vmap(jax.grad(formula)))(x)
    rtol, atol = _GRAD_TOL.get(np.dtype(dtype), _GRAD_TOL[np.dtype("float32")])
    report.checks.append(_compare("derivative_vs_grad", d, g_formula, rtol, atol))
    if fn is not formula:
        g_fn = jax.jit(jax.vmap(jax.grad(fn)))(x)
        report.checks.append(_compare("custom_rule", g_fn, d, rtol, atol,
                                      detail="jax.grad(fn) vs hand-written derivative"))

    # Finite differences where the function is smooth.
    f = jax.jit(jax.vmap(formula))
    h = 1e-6 * jnp.maximum(1.0, jnp.abs(x))
    fx, fp, fm = f(x), f(x + h), f(x - h)
    central, right, left = (fp - fm) / (2 * h), (fp - fx) / h, (fx - fm) / h
    frtol, fatol = _FD_TOL.get(np.dtype(dtype), _FD_TOL[np.dtype("float32")])
    scale = np.abs(np.asarray(central)) + 1
    smooth = np.abs(np.asarray(right) - np.asarray(left)) <= 1e-3 * scale
    report.checks.append(_compare("derivative_vs_finite_differences", d, central, frtol, fatol,
                                  mask=smooth,
                                  detail=f"{int((~smooth).sum())} kink point(s) skipped"))
    if differentiable:
        kinks = np.asarray(x)[~smooth]
        report.checks.append(CheckResult(
            "differentiable", bool(kinks.size == 0), float(np.max(np.abs(
                np.asarray(right) - np.asarray(left)))), 0.0,
            "" if kinks.size == 0 else f"left and right derivatives differ at {kinks[:5]}"))
    if continuous:
        eps = 1e-9 * jnp.maximum(1.0, jnp.abs(x))
        jump = np.abs(np.asarray(f(x + eps) - f(x - eps)))
        bound = 10 * np.asarray(eps) * (1 + np.abs(np.asarray(d))) + 1e-9 * (1 + np.abs(
            np.asarray(fx)))
        bad = jump > bound
        report.checks.append(CheckResult(
            "continuous", not bad.any(), float(jump.max()), 0.0,
            "" if not bad.any() else f"jumps at {np.asarray(x)[bad][:5]}"))
    if monotonic:
        fine = jnp.sort(jnp.concatenate([jnp.linspace(-20, 20, 40001, dtype=dtype), x]))
        fy = np.asarray(f(fine))
        drops = np.diff(fy)
        ok = bool(np.all(drops >= -1e-12 * (1 + np.abs(fy[1:]))))
        report.checks.append(CheckResult("monotonic", ok, float(max(-drops.min(), 0.0)), 0.0,
                                         "" if ok else "the function decreases somewhere"))
    report.checks.extend(_finite_checks(fn, derivative, np.asarray(x, np.float64)))
    return report


def _low_precision_dtypes():
    return [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]


def _finite_checks(fn, derivative, x64, vector=False):
    results = []
    def evaluate(x):
        if vector:
            d = derivative(x, jnp.ones_like(x))
            g = jax.grad(lambda v: jnp.sum(fn(v)[..., 0]).astype(jnp.float32))(x)
        else:
            d = jax.vmap(derivative)(x)
            g = jax.vmap(jax.grad(fn))(x)
        return {"value": fn(x), "derivative": d, "grad": g}

    evaluate = jax.jit(evaluate)
    for dt in _low_precision_dtypes():
        info = jnp.finfo(dt)
        x = jnp.asarray(np.clip(x64, float(info.min), float(info.max)), dt)
        arrays = evaluate(x)
        bad = [k for k, v in arrays.items() if not bool(jnp.all(jnp.isfinite(v)))]
        wrong_dtype = [k for k, v in arrays.items() if v.dtype != jnp.dtype(dt)]
        ok = not bad and not wrong_dtype
        detail = ""
        if bad:
            detail += f"non-finite {', '.join(bad)}; "
        if wrong_dtype:
            detail += f"dtype changed in {', '.join(wrong_dtype)}"
        results.append(CheckResult(f"finite_{jnp.dtype(dt).name}", ok, 0.0, 0.0, detail))
    return results


def _check_vector(fn, jvp, formula, name, dtype) -> ActivationReport:
    report = ActivationReport(name, str(np.dtype(dtype)))
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(size=(64, 7)) * 3,
                        np.array([[1000.0, 0, -1000, 1, 2, 3, 4], [-0.21, 0.47, 1.72, 0, 0, 0, 0]]),
                        rng.normal(size=(4, 7)) * 1e4])
    t = rng.normal(size=a.shape)
    a_, t_ = jnp.asarray(a, dtype), jnp.asarray(t, dtype)
    d = jvp(a_, t_)
    _, want = jax.jvp(formula, (a_,), (t_,))
    rtol, atol = _GRAD_TOL.get(np.dtype(dtype), _GRAD_TOL[np.dtype("float32")])
    report.checks.append(_compare("derivative_vs_grad", d, want, rtol, atol,
                                  detail="JVP vs jax.jvp of the formula"))
    if fn is not formula:
        _, got = jax.jvp(fn, (a_,), (t_,))
        report.checks.append(_compare("custom_rule", got, d, rtol, atol))
    h = 1e-6
    fd = (formula(a_ + h * t_) - formula(a_ - h * t_)) / (2 * h)
    moderate = np.abs(a).max(-1) < 100  # at ±1e4 a step of 1e-6 is below float64's resolution
    report.checks.append(_compare("derivative_vs_finite_differences", d, fd, 1e-5, 1e-7,
                                  mask=np.broadcast_to(moderate[:, None], a.shape)))
    report.checks.extend(_finite_checks(fn, jvp, a, vector=True))
    return report
