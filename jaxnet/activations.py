"""Activation functions with hand-written derivatives.

Each activation is a plain function on arrays whose derivative is written by
hand (the course's table, ../shared/seed) and attached with ``jax.custom_jvp``,
so ``jax.grad``, ``jax.jvp``, ``jax.vmap``, ``jax.jit`` and higher derivatives
all go through the hand-written rule.

The hand-written derivative of every activation is public: ``sigmoid.derivative``
is the function ``a -> σ(a)(1 − σ(a))``, and :func:`get` returns the whole
:class:`Activation` record (forward, derivative, properties) by name.

Numerics: every function and derivative here is finite for every finite input
in float16, bfloat16, float32 and float64, and returns the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

Array = jax.Array

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "get",
    "find",
    "register",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "softplus",
    "silu",
    "identity",
    "softmax",
    "log_softmax",
]


class Activation(NamedTuple):
    """Everything jaxnet knows about one activation.

    Attributes:
      name: the registry name (``"sigmoid"``).
      fn: the activation with its hand-written derivative attached.
      derivative: ``f'(a)`` written by hand, as a function of the input ``a``.
        For ``softmax``/``log_softmax`` this is the Jacobian-vector product
        ``(a, t) -> J(a) t`` instead (the Jacobian is never built).
      output_derivative: ``f'`` as a function of the output ``y = f(a)`` where
        that is cheaper (sigmoid: ``y(1 − y)``, tanh: ``1 − y²``); ``None``
        otherwise. The manual backward pass keeps ``y`` instead of ``a`` then.
        For the vector activations: ``(y, g) -> J(y)ᵀ g``.
      formula: the reference forward formula with no jaxnet rule (``jax.nn``'s
        function where it has one), which ``jax.grad`` differentiates in the
        checks. (leaky_relu's is jaxnet's own: ``jax.nn.leaky_relu'(0)`` is 1,
        jaxnet takes the left slope at the kink, as for relu.)
      monotonic, continuous, differentiable: the properties the seed lists,
        as claimed for this function (relu has a kink at 0).
      elementwise: ``False`` for softmax/log_softmax, which mix a whole axis.
      output_range: the open/closed range of the output, for documentation.
    """

    name: str
    fn: Callable[..., Array]
    derivative: Callable[..., Array]
    output_derivative: Callable[..., Array] | None
    formula: Callable[..., Array]
    monotonic: bool
    continuous: bool
    differentiable: bool
    elementwise: bool
    output_range: str


def _as_float(x: ArrayLike) -> Array:
    """``x`` as an array of a floating dtype (integers go to the default float)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _elementwise(formula, derivative, output_derivative=None):
    """Wrap ``formula`` with ``jax.custom_jvp`` whose tangent is ``f'(a)·t``.

    The tangent uses ``output_derivative(y)`` when given (it reuses the
    primal output and saves recomputing, e.g., an exponential).
    """
    fn = jax.custom_jvp(formula)

    @fn.defjvp
    def _jvp(primals, tangents):
        (a,), (t,) = primals, tangents
        y = fn(a)
        slope = output_derivative(y) if output_derivative else derivative(a)
        return y, slope * t

    return fn


def _with_rule(formula, tangent):
    """``jax.custom_jvp`` of ``formula(a, param)`` with tangent ``tangent(a, y, t, param)``.

    ``param`` (a slope, ``alpha``, an axis) is static and not differentiated.
    """
    fn = jax.custom_jvp(formula, nondiff_argnums=(1,))

    @fn.defjvp
    def _jvp(param, primals, tangents):
        (a,), (t,) = primals, tangents
        y = fn(a, param)
        return y, tangent(a, y, t, param)

    return fn


def _with_param_rule(formula, d_input, d_param):
    """``jax.custom_jvp`` of ``formula(a, p)`` differentiable in both: ȳ = f_a·ȧ + f_p·ṗ.

    ``d_input(a, p)`` = ∂f/∂a and ``d_param(a, p)`` = ∂f/∂p are written by hand; ``p``
    (elu's α, leaky relu's slope) may be a Python number, or an array that broadcasts
    against ``a`` (a learnable per-channel slope). A constant ``p`` costs nothing: its
    symbolic-zero tangent skips the second term.
    """
    fn = jax.custom_jvp(formula)

    def _jvp(primals, tangents):
        (a, p), (ta, tp) = primals, tangents
        y = fn(a, p)
        terms = []
        if not isinstance(ta, jax.custom_derivatives.SymbolicZero):
            terms.append(d_input(a, p) * ta)
        if not isinstance(tp, jax.custom_derivatives.SymbolicZero):
            terms.append(d_param(a, p) * tp)
        if not terms:
            return y, jnp.zeros_like(y)
        t = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return y, jnp.broadcast_to(t, y.shape).astype(y.dtype)

    fn.defjvp(_jvp, symbolic_zeros=True)
    return fn


def _register(name, public, core, derivative, output_derivative, formula, *,
              monotonic=True, continuous=True, differentiable=True,
              elementwise=True, output_range="(-inf, inf)"):
    public.derivative = derivative
    public.output_derivative = output_derivative
    public.formula = formula
    ACTIVATIONS[name] = Activation(
        name, public, derivative, output_derivative, formula, monotonic,
        continuous, differentiable, elementwise, output_range)
    return public


ACTIVATIONS: dict[str, Activation] = {}


# --- sigmoid ---------------------------------------------------------------

def _sigmoid_formula(a):
    # 1/(1+e^(−a)): e^(−a) overflows to inf for a ≪ 0 and 1/inf = 0, no NaN.
    return 1 / (1 + jnp.exp(-a))


def sigmoid_derivative(a: ArrayLike) -> Array:
    """σ'(a) = σ(a)(1 − σ(a))."""
    s = _sigmoid_formula(_as_float(a))
    return s * (1 - s)


def _sigmoid_output_derivative(y):
    return y * (1 - y)


_sigmoid = _elementwise(_sigmoid_formula, sigmoid_derivative, _sigmoid_output_derivative)


def sigmoid(a: ArrayLike) -> Array:
    """Logistic sigmoid σ(a) = 1 / (1 + e^(−a)), range (0, 1).

    Derivative (hand-written, ``sigmoid.derivative``): σ(a)(1 − σ(a)).
    Shape and dtype of the output equal those of ``a``.

    >>> float(sigmoid(0.0))
    0.5
    """
    return _sigmoid(_as_float(a))


_register("sigmoid", sigmoid, _sigmoid, sigmoid_derivative, _sigmoid_output_derivative,
          jax.nn.sigmoid, output_range="(0, 1)")


# --- tanh ------------------------------------------------------------------

def _tanh_formula(a):
    return jnp.tanh(a)


def tanh_derivative(a: ArrayLike) -> Array:
    """tanh'(a) = 4 / (eᵃ + e⁻ᵃ)².

    Evaluated as 4e / (1 + e)² with e = e^(−2|a|) (multiply top and bottom by
    e^(−2|a|)), which never overflows: for large |a| it underflows to 0.
    """
    a = _as_float(a)
    e = jnp.exp(-2 * jnp.abs(a))
    return 4 * e / (1 + e) ** 2


def _tanh_output_derivative(y):
    # 4/(eᵃ+e⁻ᵃ)² = 1 − tanh²(a)
    return 1 - y * y


_tanh = _elementwise(_tanh_formula, tanh_derivative, _tanh_output_derivative)


def tanh(a: ArrayLike) -> Array:
    """Hyperbolic tangent tanh(a) = (eᵃ − e⁻ᵃ) / (eᵃ + e⁻ᵃ), range (−1, 1).

    Derivative (hand-written, ``tanh.derivative``): 4 / (eᵃ + e⁻ᵃ)² = 1 − tanh²(a).
    """
    return _tanh(_as_float(a))


_register("tanh", tanh, _tanh, tanh_derivative, _tanh_output_derivative, _tanh_formula,
          output_range="(-1, 1)")


# --- relu ------------------------------------------------------------------

def _relu_formula(a):
    return jnp.maximum(a, 0)


def relu_derivative(a: ArrayLike) -> Array:
    """relu'(a) = 0 if a ≤ 0, 1 if a > 0 (relu'(0) = 0, the course's convention)."""
    a = _as_float(a)
    return (a > 0).astype(a.dtype)


def _relu_output_derivative(y):
    # y > 0 exactly when a > 0, so the output is enough.
    return (y > 0).astype(y.dtype)


_relu = _elementwise(_relu_formula, relu_derivative, _relu_output_derivative)


def relu(a: ArrayLike) -> Array:
    """Rectified linear unit relu(a) = max(0, a), range [0, ∞).

    Derivative (hand-written, ``relu.derivative``): 1 if a > 0 else 0; at the
    kink a = 0 it is 0.
    """
    return _relu(_as_float(a))


_register("relu", relu, _relu, relu_derivative, _relu_output_derivative, jax.nn.relu,
          differentiable=False, output_range="[0, inf)")


# --- leaky relu ------------------------------------------------------------

def _leaky_relu_formula(a, negative_slope=0.01):
    return jnp.where(a > 0, a, negative_slope * a)


def leaky_relu_derivative(a: ArrayLike, negative_slope: ArrayLike = 0.01) -> Array:
    """leaky_relu'(a) = 1 if a > 0 else ``negative_slope`` (the slope at 0)."""
    a = _as_float(a)
    return jnp.where(a > 0, jnp.ones_like(a), jnp.asarray(negative_slope).astype(a.dtype))


def leaky_relu_slope_derivative(a: ArrayLike, negative_slope: ArrayLike = 0.01) -> Array:
    """∂ leaky_relu(a) / ∂ negative_slope = 0 if a > 0 else a (a learnable slope: PReLU)."""
    a = _as_float(a)
    return jnp.where(a > 0, jnp.zeros_like(a), a)


_leaky_relu = _with_param_rule(_leaky_relu_formula, leaky_relu_derivative,
                               leaky_relu_slope_derivative)


def leaky_relu(a: ArrayLike, negative_slope: ArrayLike = 0.01) -> Array:
    """Leaky relu: a if a > 0 else ``negative_slope``·a.

    Derivatives (hand-written): ∂/∂a = 1 if a > 0 else ``negative_slope``;
    ∂/∂slope = 0 if a > 0 else a, so ``jax.grad`` learns a slope (PReLU) as
    ``jax.nn.leaky_relu`` does.
    """
    return _leaky_relu(_as_float(a), negative_slope)


_register("leaky_relu", leaky_relu, _leaky_relu, leaky_relu_derivative, None,
          _leaky_relu_formula, differentiable=False)


# --- elu -------------------------------------------------------------------

def _elu_formula(a, alpha=1.0):
    # expm1 of the clamped input: the branch not taken never overflows.
    return jnp.where(a > 0, a, alpha * jnp.expm1(jnp.where(a > 0, 0, a)))


def elu_derivative(a: ArrayLike, alpha: ArrayLike = 1.0) -> Array:
    """elu'(a) = 1 if a > 0 else α·eᵃ."""
    a = _as_float(a)
    alpha = jnp.asarray(alpha).astype(a.dtype)
    return jnp.where(a > 0, jnp.ones_like(a), alpha * jnp.exp(jnp.where(a > 0, 0, a)))


def elu_alpha_derivative(a: ArrayLike, alpha: ArrayLike = 1.0) -> Array:
    """∂ elu(a) / ∂α = 0 if a > 0 else eᵃ − 1."""
    a = _as_float(a)
    return jnp.where(a > 0, jnp.zeros_like(a), jnp.expm1(jnp.where(a > 0, 0, a)))


_elu = _with_param_rule(_elu_formula, elu_derivative, elu_alpha_derivative)


def elu(a: ArrayLike, alpha: ArrayLike = 1.0) -> Array:
    """Exponential linear unit: a if a > 0 else α(eᵃ − 1), range (−α, ∞).

    Derivatives (hand-written): ∂/∂a = 1 if a > 0 else α·eᵃ (continuous at 0 for
    α = 1); ∂/∂α = 0 if a > 0 else eᵃ − 1 (``jax.grad`` learns α, as with ``jax.nn.elu``).
    """
    return _elu(_as_float(a), alpha)


_register("elu", elu, _elu, elu_derivative, None, jax.nn.elu, output_range="(-alpha, inf)")


# --- gelu ------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_C = 0.044715


def _gelu_tanh(a):
    """tanh(u), u = √(2/π)(c + 0.044715c³) at c = a clipped to [−10, 10]: ±1 beyond, where
    tanh(u(a)) is ±1 to every dtype's precision and c³ cannot overflow float16. The forward
    formula and the derivative compute it alike, so XLA computes it once for both."""
    c = jnp.clip(a, -10, 10)
    return jnp.tanh(_SQRT_2_OVER_PI * (c + _GELU_C * c ** 3)), c


def _gelu_formula(a, approximate=True):
    if approximate:
        return 0.5 * a * (1 + _gelu_tanh(a)[0])
    # a·Φ(a) with Φ(a) = ½·erfc(−a/√2): no cancellation in the left tail, where
    # 1 + erf(a/√2) would lose every digit (relative error 7e-4 at a = −4 in float32)
    return 0.5 * a * lax.erfc(-a / math.sqrt(2))


def gelu_derivative(a: ArrayLike, approximate: bool = True) -> Array:
    """gelu'(a).

    Exact form (``approximate=False``), gelu(a) = a·Φ(a):
    gelu'(a) = Φ(a) + a·φ(a) with φ(a) = e^(−a²/2)/√(2π).

    Tanh form, gelu(a) = ½a(1 + tanh u), u = √(2/π)(a + 0.044715a³):
    gelu'(a) = ½(1 + tanh u) + ½a(1 − tanh² u)·√(2/π)(1 + 3·0.044715a²).

    The exact form computes Φ(a) as ½·erfc(−a/√2), accurate relative to its
    size in the left tail (gelu'(−12) ≈ −2.4e-31 in float32); where a² overflows
    (float16, |a| > 255) φ(a) is 0 and so is a·φ(a). The tanh form is evaluated at
    a clipped to [−10, 10]: beyond that its derivative is 1 (a > 0) or 0 to every
    dtype's precision, and a³ would overflow float16.
    """
    a = _as_float(a)
    if not approximate:
        phi = jnp.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        return (0.5 * lax.erfc(-a / math.sqrt(2)) + a * phi).astype(a.dtype)
    th, c = _gelu_tanh(a)
    d = 0.5 * (1 + th) + 0.5 * c * (1 - th * th) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * c * c)
    d = jnp.where(a > 10, jnp.ones_like(a), jnp.where(a < -10, jnp.zeros_like(a), d))
    return d.astype(a.dtype)


_gelu = _with_rule(_gelu_formula, lambda a, y, t, approximate: gelu_derivative(a, approximate) * t)


def gelu(a: ArrayLike, approximate: bool = True) -> Array:
    """Gaussian error linear unit gelu(a) = a·Φ(a) (tanh form by default, as ``jax.nn.gelu``).

    Derivative (hand-written): see :func:`gelu_derivative`. Not monotonic: it
    dips to about −0.17 near a = −0.75.
    """
    return _gelu(_as_float(a), approximate)


_register("gelu", gelu, _gelu, gelu_derivative, None, jax.nn.gelu,
          monotonic=False, output_range="(-0.17, inf)")


# --- softplus --------------------------------------------------------------

def _softplus_formula(a):
    # log(1 + eᵃ) = max(a, 0) + log1p(e^(−|a|)): no overflow.
    return jnp.maximum(a, 0) + jnp.log1p(jnp.exp(-jnp.abs(a)))


def softplus_derivative(a: ArrayLike) -> Array:
    """softplus'(a) = σ(a) = 1 / (1 + e^(−a))."""
    return _sigmoid_formula(_as_float(a))


_softplus = _elementwise(_softplus_formula, softplus_derivative)


def softplus(a: ArrayLike) -> Array:
    """Softplus log(1 + eᵃ), range (0, ∞). Derivative (hand-written): σ(a)."""
    return _softplus(_as_float(a))


_register("softplus", softplus, _softplus, softplus_derivative, None, jax.nn.softplus,
          output_range="(0, inf)")


# --- silu ------------------------------------------------------------------

def _silu_formula(a):
    return a * _sigmoid_formula(a)


def silu_derivative(a: ArrayLike) -> Array:
    """silu'(a) = σ(a)(1 + a(1 − σ(a)))."""
    a = _as_float(a)
    s = _sigmoid_formula(a)
    return s * (1 + a * (1 - s))


_silu = _elementwise(_silu_formula, silu_derivative)


def silu(a: ArrayLike) -> Array:
    """Sigmoid linear unit (swish) silu(a) = a·σ(a).

    Derivative (hand-written): σ(a)(1 + a(1 − σ(a))). Not monotonic: minimum ≈ −0.28 at a ≈ −1.28.
    """
    return _silu(_as_float(a))


_register("silu", silu, _silu, silu_derivative, None, jax.nn.silu, monotonic=False,
          output_range="(-0.28, inf)")


# --- identity --------------------------------------------------------------

def _identity_formula(a):
    return a


def identity_derivative(a: ArrayLike) -> Array:
    """identity'(a) = 1."""
    return jnp.ones_like(_as_float(a))


_identity = _elementwise(_identity_formula, identity_derivative)


def identity(a: ArrayLike) -> Array:
    """The identity a ↦ a (a linear 'activation'). Derivative: 1."""
    return _identity(_as_float(a))


_register("identity", identity, _identity, identity_derivative, None, _identity_formula)


# --- softmax and log-softmax -------------------------------------------------

def _softmax_formula(a, axis=-1):
    e = jnp.exp(a - lax.stop_gradient(jnp.max(a, axis, keepdims=True)))
    return e / jnp.sum(e, axis, keepdims=True)


def softmax_jvp(y: Array, t: Array, axis: int | tuple[int, ...] = -1) -> Array:
    """Jacobian-vector product of softmax at output ``y = softmax(a)``.

    ∂σᵢ/∂aⱼ = σᵢ(δᵢⱼ − σⱼ), so (J t)ᵢ = σᵢ(tᵢ − Σⱼ σⱼ tⱼ). The Jacobian is
    symmetric, so the same formula gives Jᵀg. Never builds the n×n matrix.
    """
    return y * (t - jnp.sum(y * t, axis, keepdims=True))


def softmax_derivative(a: ArrayLike, t: ArrayLike, axis: int | tuple[int, ...] = -1) -> Array:
    """Softmax's derivative σᵢ(a)(δᵢⱼ − σⱼ(a)) applied to a tangent ``t``, as a JVP."""
    a = _as_float(a)
    return softmax_jvp(_softmax_formula(a, axis), jnp.asarray(t, a.dtype), axis)


_softmax = _with_rule(_softmax_formula, lambda a, y, t, axis: softmax_jvp(y, t, axis))


def softmax(a: ArrayLike, axis: int | tuple[int, ...] = -1) -> Array:
    """Softmax σᵢ(a) = e^(aᵢ) / Σⱼ e^(aⱼ) along ``axis``: outputs in (0, 1) that sum to 1.

    Computed as e^(aᵢ − max a) / Σⱼ e^(aⱼ − max a) so that no exponential
    overflows. Derivative (hand-written): ∂σᵢ/∂aⱼ = σᵢ(δᵢⱼ − σⱼ), applied as a
    Jacobian-vector product (:func:`softmax_jvp`).

    >>> [round(float(v), 1) for v in softmax(jnp.array([-0.21, 0.47, 1.72]))]
    [0.1, 0.2, 0.7]
    """
    a = _as_float(a)
    return a if a.size == 0 else _softmax(a, axis)


def _log_softmax_formula(a, axis=-1):
    shifted = a - lax.stop_gradient(jnp.max(a, axis, keepdims=True))
    out = shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis, keepdims=True))
    # aᵢ − max a can lie below the dtype's range (float16: a spread over 65504), where the
    # rounded result is −inf; saturate at the most negative finite value instead (σᵢ = e^out
    # is 0 there either way).
    return jnp.maximum(out, jnp.finfo(out.dtype).min)


def log_softmax_jvp(y: Array, t: Array, axis: int | tuple[int, ...] = -1) -> Array:
    """JVP of log-softmax at output ``y``: ∂ log σᵢ/∂aⱼ = δᵢⱼ − σⱼ, so (J t)ᵢ = tᵢ − Σⱼ σⱼ tⱼ."""
    return t - jnp.sum(jnp.exp(y) * t, axis, keepdims=True)


def log_softmax_vjp(y: Array, g: Array, axis: int | tuple[int, ...] = -1) -> Array:
    """Transposed product of log-softmax at output ``y``: (Jᵀg)ⱼ = gⱼ − σⱼ Σᵢ gᵢ."""
    return g - jnp.exp(y) * jnp.sum(g, axis, keepdims=True)


def log_softmax_derivative(a: ArrayLike, t: ArrayLike, axis: int | tuple[int, ...] = -1) -> Array:
    """Log-softmax's derivative δᵢⱼ − σⱼ(a) applied to a tangent ``t``, as a JVP."""
    a = _as_float(a)
    return log_softmax_jvp(_log_softmax_formula(a, axis), jnp.asarray(t, a.dtype), axis)


_log_softmax = _with_rule(_log_softmax_formula, lambda a, y, t, axis: log_softmax_jvp(y, t, axis))


def log_softmax(a: ArrayLike, axis: int | tuple[int, ...] = -1) -> Array:
    """Log-softmax log σᵢ(a) = aᵢ − log Σⱼ e^(aⱼ), range (−∞, 0).

    Derivative (hand-written): ∂/∂aⱼ log σᵢ = δᵢⱼ − σⱼ, applied as a JVP.
    """
    a = _as_float(a)
    return a if a.size == 0 else _log_softmax(a, axis)


_register("softmax", softmax, _softmax, softmax_derivative, softmax_jvp, jax.nn.softmax,
          monotonic=False, elementwise=False, output_range="(0, 1)")
_register("log_softmax", log_softmax, _log_softmax, log_softmax_derivative, log_softmax_vjp,
          jax.nn.log_softmax, monotonic=False, elementwise=False,
          output_range="(-inf, 0)")


def get(name: str) -> Activation:
    """The :class:`Activation` record called ``name``; ``ValueError`` if there is none."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None


def find(fn: Callable) -> Activation | None:
    """The registered :class:`Activation` whose public function is ``fn`` (``None`` if none)."""
    for record in ACTIVATIONS.values():
        if record.fn is fn:
            return record
    return None


def register(name: str, formula: Callable[[Array], Array], derivative: Callable[[Array], Array],
             *, output_derivative: Callable[[Array], Array] | None = None,
             reference: Callable[[Array], Array] | None = None, monotonic: bool = True,
             continuous: bool = True, differentiable: bool = True,
             output_range: str = "(-inf, inf)", check: bool = True) -> Callable[..., Array]:
    """Register your own elementwise activation f with its hand-written derivative f′.

    ``formula(a)`` is f, ``derivative(a)`` is f′(a) written by hand (and optionally
    ``output_derivative(y)``, f′ from the output y = f(a)); ``reference`` is the formula
    the checks differentiate with ``jax.grad`` (default: ``formula``). Returns the public
    function, f with f′ attached by ``jax.custom_jvp`` (so ``jax.grad`` uses it), with
    ``.derivative``; the name then works everywhere a built-in's does (``mlp(..., name)``,
    ``elementwise(name)``, the manual pass). With ``check`` (the default),
    :func:`jaxnet.check_activation` runs first and a failing derivative is refused with
    its report (:class:`jaxnet.ActivationCheckError`), so nothing wrong is registered.
    """
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"an activation name is an identifier, got {name!r}")
    if name in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is already registered")
    if not (callable(formula) and callable(derivative)):
        raise TypeError("register needs the formula f(a) and its derivative f'(a) as functions")
    core = _elementwise(formula, derivative, output_derivative)

    def public(a: ArrayLike) -> Array:
        return core(_as_float(a))

    public.__name__ = public.__qualname__ = name
    public.__doc__ = f"The registered activation {name!r} (derivative written by hand)."
    _register(name, public, core, derivative, output_derivative, reference or formula,
              monotonic=monotonic, continuous=continuous, differentiable=differentiable,
              output_range=output_range)
    if check:
        from .checks import check_activation  # checks builds on this module: import on use

        try:
            check_activation(name)
        except Exception:
            del ACTIVATIONS[name]
            raise
    return public
