"""Activations: values, hand-written derivatives, transformations, numerics.

Most checks compile the computations they compare with jax.jit (one XLA program per
case, or one per dtype or shape shared by every activation's case) and compare the
results in numpy: op-by-op (eager) dispatch compiles every primitive of every shape
and dtype on its own and made this file several times slower. The eager path keeps
its coverage in test_jit_vmap_jvp (eager against jit, vmap and jvp for every
activation), TestVariants (without_jit), check_grads (eager: under jit it compiled a
program for each of its transformations and was slower) and the small seed examples."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import TOL  # per-dtype rtol/atol, with the reasoning
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxnet
from jaxnet import activations as acts

ELEMENTWISE = [n for n, a in acts.ACTIVATIONS.items() if a.elementwise]
VECTOR = [n for n, a in acts.ACTIVATIONS.items() if not a.elementwise]
ALL = list(acts.ACTIVATIONS)
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]

JAX_NN = {
    "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu, "elu": jax.nn.elu, "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus, "silu": jax.nn.silu, "identity": lambda a: a,
    "softmax": jax.nn.softmax, "log_softmax": jax.nn.log_softmax,
}
EXTREMES = np.array([-3e4, -1e4, -1e3, -100, -50, -10, -1, -1e-7, 0, 1e-7, 1, 10, 50, 100,
                     1e3, 1e4, 3e4])


def fn(name):
    return acts.get(name).fn


def finite(x):
    return bool(np.all(np.isfinite(np.asarray(x))))


def assert_close(got, want, dtype):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               **TOL[jnp.dtype(dtype)])


@functools.cache
def values_and_formulas(dtype):
    """{name: (f(x), jax.nn's f(x))} for every activation on one grid: one jitted program
    per dtype, shared by that dtype's cases."""
    x = jnp.asarray(np.linspace(-8, 8, 161).reshape(7, 23), dtype)
    return jax.jit(lambda x: {name: (fn(name)(x), JAX_NN[name](x)) for name in ALL})(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALL)
def test_value_equals_plain_formula(name, dtype):
    assert_close(*values_and_formulas(dtype)[name], dtype)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_first_derivative_equals_grad_of_formula(name):
    x = jnp.asarray(np.concatenate([np.linspace(-10, 10, 401), EXTREMES]))
    hand, via_rule, reference = jax.jit(lambda v: (
        jax.vmap(fn(name).derivative)(v),
        jax.vmap(jax.grad(fn(name)))(v),
        jax.vmap(jax.grad(acts.get(name).formula))(v)))(x)
    chex.assert_trees_all_close(hand, reference, rtol=1e-9, atol=1e-12)
    # The rule may use the output form (tanh: 1 − y²) of the same derivative.
    chex.assert_trees_all_close(via_rule, hand, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", VECTOR)
def test_vector_derivative_is_a_jvp_equal_to_jax(name):
    rng = np.random.default_rng(1)
    a, t = jnp.asarray(rng.normal(size=(5, 9)) * 4), jnp.asarray(rng.normal(size=(5, 9)))

    @jax.jit
    def run(a, t):
        return dict(
            want=jax.jvp(JAX_NN[name], (a,), (t,))[1], got=jax.jvp(fn(name), (a,), (t,))[1],
            derivative=fn(name).derivative(a, t),
            g_want=jax.grad(lambda v: jnp.sum(JAX_NN[name](v) * t))(a),
            g_got=jax.grad(lambda v: jnp.sum(fn(name)(v) * t))(a))

    r = run(a, t)
    chex.assert_trees_all_close(r["derivative"], r["want"], rtol=1e-10, atol=1e-13)
    chex.assert_trees_all_close(r["got"], r["want"], rtol=1e-10, atol=1e-13)
    chex.assert_trees_all_close(r["g_got"], r["g_want"], rtol=1e-10, atol=1e-13)


# Points away from the kinks at 0, where second derivatives exist.
SMOOTH = np.array([-3.1, -1.3, -0.4, 0.25, 0.9, 2.2, 4.7])


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_second_derivative_through_the_custom_rule(name):
    x = jnp.asarray(SMOOTH)
    second, fwd_rev, want = jax.jit(lambda v: (
        jax.vmap(jax.grad(jax.grad(fn(name))))(v),  # reverse over the custom jvp
        jax.vmap(jax.jacfwd(jax.grad(fn(name))))(v),  # forward over reverse
        jax.vmap(jax.grad(jax.grad(acts.get(name).formula)))(v)))(x)
    chex.assert_trees_all_close(second, want, rtol=1e-8, atol=1e-12)
    chex.assert_trees_all_close(fwd_rev, want, rtol=1e-8, atol=1e-12)


def test_hessian_of_softmax_matches_jax():
    a = jnp.array([0.3, -1.2, 2.0, 0.5])
    want = jax.jit(jax.hessian(lambda v: jax.nn.softmax(v)[1]))(a)
    chex.assert_trees_all_close(jax.jit(jax.hessian(lambda v: jaxnet.softmax(v)[1]))(a), want,
                                rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ALL)
def test_check_grads_orders_one_and_two(name):
    x = jnp.asarray(SMOOTH.reshape(1, -1) if name in VECTOR else SMOOTH)
    # eager: check_grads of jit(f) compiles a program for each of its transformations, and
    # was slower than the op-by-op programs, which the activations share
    check_grads(fn(name), (x,), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_jit_vmap_jvp(name):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)))
    f = fn(name)
    chex.assert_trees_all_close(jax.jit(f)(x), f(x), rtol=1e-12)
    chex.assert_trees_all_close(jax.vmap(f)(x), f(x), rtol=1e-12)
    y, t = jax.jvp(f, (x,), (jnp.ones_like(x),))
    chex.assert_trees_all_close(y, f(x), rtol=1e-12)
    chex.assert_shape(t, x.shape)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_grad_of_sum_is_the_derivative(self):
        x = jnp.linspace(-5.0, 5.0, 41)
        # every activation's gradient in one function: with_jit compiles one program
        grads = self.variant(lambda v: {name: jax.grad(lambda u, f=fn(name): jnp.sum(f(u)))(v)
                                        for name in ELEMENTWISE})(x)
        for name in ELEMENTWISE:
            chex.assert_trees_all_close(grads[name], fn(name).derivative(x),
                                        rtol=1e-12, atol=1e-14)


@functools.cache
def value_and_derivatives(name):
    """One jitted function per activation: f(x), ∇Σf(x) through the rule, the hand derivative."""
    f = fn(name)

    def run(x):
        g = jax.grad(lambda v: jnp.sum(f(v)).astype(jnp.float32))(x)
        d = f.derivative(x) if name in ELEMENTWISE else g
        return f(x), g, d

    return jax.jit(run)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(ALL), dtype=st.sampled_from(DTYPES))
def test_finite_and_dtype_preserving_for_any_finite_input(data, name, dtype):
    info = jnp.finfo(dtype)
    # A few shapes, so that the jitted check compiles once per (activation, dtype, shape).
    shape = data.draw(st.sampled_from([(1,), (7,), (3, 5), (2, 2, 4)]))
    values = st.one_of(
        st.floats(-float(info.max), float(info.max), allow_nan=False, allow_infinity=False,
                  width=32 if dtype != jnp.float64 else 64),
        st.sampled_from(list(EXTREMES)))
    x64 = data.draw(hnp.arrays(np.float64, shape, elements=values))
    x = jnp.asarray(np.clip(x64, float(info.min), float(info.max)), dtype)
    for out, what in zip(value_and_derivatives(name)(x), ["value", "grad", "derivative"]):
        assert out.dtype == x.dtype, (name, what, out.dtype)
        assert bool(jnp.all(jnp.isfinite(out))), (name, what, x, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_issue_extremes(dtype):
    s, sm, d, ls = jax.jit(lambda a, b, c: (
        jaxnet.sigmoid(a), jaxnet.softmax(b), jaxnet.tanh.derivative(c), jaxnet.log_softmax(b)))(
        jnp.array([-1e4, 1e4], dtype), jnp.array([1000, 0, -1000], dtype),
        jnp.array([-1e4, -30, 30, 1e4], dtype))
    np.testing.assert_array_equal(np.asarray(s, np.float64), [0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(sm, np.float64), [1.0, 0.0, 0.0])
    assert finite(d) and bool(np.all(np.asarray(d) >= 0)) and d.dtype == dtype
    assert finite(ls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_saturates_where_the_true_value_is_below_the_dtype(dtype):
    # a spread of the whole range: log σ₀ = a₀ − max a − log 2 lies below finfo.min, which
    # rounds to −inf; the output saturates at finfo.min, and its gradient stays finite.
    info = jnp.finfo(dtype)
    a = jnp.array([info.min / 2, info.max / 2 + info.max / 4], dtype)
    ls, g = jax.jit(lambda v: (jaxnet.log_softmax(v), jax.grad(
        lambda u: jnp.sum(jaxnet.log_softmax(u) * jnp.array([1, 2], dtype)))(v)))(a)
    ls = np.asarray(ls)
    assert float(ls[0]) == float(info.min) and float(ls[1]) == 0.0
    assert finite(g) and g.dtype == dtype


def test_seed_softmax_example():
    y = jaxnet.softmax(jnp.array([-0.21, 0.47, 1.72]))
    np.testing.assert_allclose(y, [0.1, 0.2, 0.7], atol=0.005)
    assert float(jnp.sum(y)) == pytest.approx(1.0)


def test_relu_derivative_at_zero_is_zero():
    assert float(jaxnet.relu.derivative(0.0)) == 0.0
    assert float(jax.grad(jaxnet.relu)(0.0)) == 0.0
    assert float(jax.grad(jaxnet.relu)(1e-30)) == 1.0


def test_tanh_derivative_is_the_seed_formula():
    a = jnp.linspace(-3.0, 3.0, 13)
    got, seed = jax.jit(lambda a: (
        jaxnet.tanh.derivative(a), 4 / (jnp.exp(a) + jnp.exp(-a)) ** 2))(a)
    chex.assert_trees_all_close(got, seed, rtol=1e-13)


def test_softmax_jvp_never_builds_the_jacobian():
    n = 512
    jaxpr = jax.make_jaxpr(lambda a, t: jax.jvp(jaxnet.softmax, (a,), (t,)))(
        jnp.zeros(n), jnp.zeros(n))
    jaxpr_grad = jax.make_jaxpr(jax.grad(lambda a: jaxnet.softmax(a)[0]))(jnp.zeros(n))
    for jp in (jaxpr, jaxpr_grad):
        shapes = [v.aval.shape for eqn in jp.eqns for v in eqn.outvars]
        assert (n, n) not in shapes


def test_parameters_of_leaky_relu_elu_gelu():
    x = jnp.linspace(-3.0, 3.0, 31)

    @jax.jit
    def run(x):
        return dict(
            leaky=jaxnet.leaky_relu(x, 0.2), leaky_want=jax.nn.leaky_relu(x, 0.2),
            elu=jaxnet.elu(x, 0.5), elu_want=jax.nn.elu(x, 0.5),
            gelu=jaxnet.gelu(x, approximate=False), gelu_want=jax.nn.gelu(x, False),
            g=jax.vmap(jax.grad(lambda v: jaxnet.gelu(v, False)))(x),
            g_want=jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, False)))(x))

    r = run(x)
    chex.assert_trees_all_close(r["leaky"], r["leaky_want"])
    chex.assert_trees_all_close(r["elu"], r["elu_want"])
    chex.assert_trees_all_close(r["gelu"], r["gelu_want"], rtol=1e-12)
    chex.assert_trees_all_close(r["g"], r["g_want"], rtol=1e-10)
    assert float(jax.grad(jaxnet.leaky_relu)(0.0)) == pytest.approx(0.01)


def test_integer_input_becomes_float():
    assert jnp.issubdtype(jaxnet.relu(jnp.arange(3)).dtype, jnp.floating)


def test_unknown_activation_name():
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        acts.get("swishy")


# --- found by jax.nn's own tests (issue 10) --------------------------------------------

@functools.cache
def every_activation_at(shape):
    """{name: (f(x), jax.nn's f(x), ∇Σw·f, ∇Σw·jax.nn's f)} for every activation: one jitted
    program per shape, shared by that shape's cases."""
    x = jax.random.normal(jax.random.key(3), shape) * 3
    w = jax.random.normal(jax.random.key(4), shape)  # a random cotangent, so softmax's is not 0

    def run(x, w):
        return {name: (fn(name)(x), JAX_NN[name](x),
                       jax.grad(lambda a, f=fn(name): jnp.sum(w * f(a)))(x),
                       jax.grad(lambda a, f=JAX_NN[name]: jnp.sum(w * f(a)))(x))
                for name in ALL}

    return jax.jit(run)(x, w)


@pytest.mark.parametrize("shape", [(9,), (3, 5), (2, 3, 4)], ids=lambda s: f"rank{len(s)}")
@pytest.mark.parametrize("name", ALL)
def test_every_rank_matches_jax_nn_in_value_and_gradient(name, shape):
    value, want, ours, theirs = every_activation_at(shape)[name]
    chex.assert_trees_all_close(value, want, rtol=1e-12, atol=1e-14)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,param,value", [("elu", "alpha", 0.7),
                                              ("leaky_relu", "negative_slope", 0.2)])
def test_gradient_with_respect_to_the_parameter_matches_jax_nn(name, param, value):
    x = jnp.asarray(np.linspace(-4, 4, 33))
    # a learnable per-channel parameter (PReLU): a vector that broadcasts over the batch
    xs, ps = x.reshape(11, 3), jnp.full((3,), value)

    @jax.jit
    def run(p, ps):
        return dict(
            ours=jax.grad(lambda p: jnp.sum(fn(name)(x, p)))(p),
            theirs=jax.grad(lambda p: jnp.sum(JAX_NN[name](x, p)))(p),
            ours_vector=jax.grad(lambda p: jnp.sum(fn(name)(xs, p) ** 2))(ps),
            theirs_vector=jax.grad(lambda p: jnp.sum(JAX_NN[name](xs, p) ** 2))(ps))

    r = run(value, ps)
    assert abs(float(r["ours"])) > 1  # it was silently 0
    np.testing.assert_allclose(r["ours"], r["theirs"], rtol=1e-12)
    chex.assert_trees_all_close(r["ours_vector"], r["theirs_vector"], rtol=1e-12)
    check_grads(lambda p: fn(name)(xs, p), (ps,), order=2, modes=["fwd", "rev"])


def test_exact_gelu_is_accurate_in_the_left_tail():
    # jax's nn_test: rtol 2e-5 against x·Φ(x) over [−12, 5] in float32; 1 + erf(x/√2) cancels
    from scipy.stats import norm

    xs = np.linspace(-12, 5, 1001)
    x32 = jnp.asarray(xs, jnp.float32)
    value, got = jax.jit(lambda a: (
        jaxnet.gelu(a, approximate=False),
        jax.vmap(jax.grad(lambda v: jaxnet.gelu(v, approximate=False)))(a)))(x32)
    np.testing.assert_allclose(np.asarray(value, np.float64),
                               xs * norm.cdf(xs), rtol=2e-5, atol=0)
    assert float(jaxnet.gelu(jnp.float32(-8), approximate=False)) < 0  # not −0.0
    # gelu'(x) = Φ(x) + x·φ(x) crosses 0 near −0.75, where only an absolute error makes sense
    want = norm.cdf(xs) + xs * norm.pdf(xs)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=1e-6)
    tail = xs < -5
    np.testing.assert_allclose(np.asarray(got, np.float64)[tail], want[tail], rtol=1e-4)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_of_an_empty_array_is_empty(name):
    for shape in [(0,), (3, 0), (0, 4)]:
        x = jnp.zeros(shape)
        ours, theirs, grad = jax.jit(lambda a: (
            fn(name)(a), JAX_NN[name](a), jax.grad(lambda v: jnp.sum(fn(name)(v)))(a)))(x)
        assert ours.shape == theirs.shape == shape
        assert grad.shape == shape
