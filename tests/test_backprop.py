"""Manual backpropagation agrees with jax.grad: losses, gradients, under jit and vmap."""

from __future__ import annotations

import importlib.util
import pathlib
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fast import normal, numpy_init
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.example_libraries import stax

import jaxnet as jn
from jaxnet.backprop import AutodiffFallbackWarning, manual_value_and_grad
from jaxnet.layers import Layer, layer_fwd

HIDDEN_ACTIVATIONS = sorted(jn.ACTIVATIONS)  # every activation, softmax and log-softmax too


def huber(outputs, targets):
    """A loss without a hand-written output gradient: jax.grad supplies ∂L/∂y."""
    return jnp.mean(jnp.sum(optax.huber_loss(outputs, targets), -1))


LOSSES = {"softmax_cross_entropy": jn.softmax_cross_entropy, "cross_entropy": jn.cross_entropy,
          "l2_loss": jn.l2_loss, "huber": huber}


# Both paths run jitted in most tests, as one program (jax.jit): one XLA
# compile per net is much cheaper than compiling every op on its own in eager mode.


def autodiff(net, loss, params, inputs, targets, **kwargs):
    """The reference: jax.grad through the loss's rule-free formula (optax's loss), so the
    loss's hand-written gradient is checked here too, not reused on both sides."""
    formula = getattr(loss, "formula", loss)
    return jax.value_and_grad(lambda p: formula(net.apply(p, inputs, **kwargs), targets))(params)


def assert_grads_close(manual, auto, rtol):
    """Same tree; every entry within rtol, entries that cancel to ~0 within rtol·max|∂L/∂θ|."""
    assert jax.tree_util.tree_structure(manual) == jax.tree_util.tree_structure(auto)
    manual, auto = jax.device_get((manual, auto))  # compare in numpy: no compiles per shape
    scale = max([float(np.max(np.abs(a))) for a in jax.tree_util.tree_leaves(auto)] + [1e-300])
    for (path, m), a in zip(jax.tree_util.tree_flatten_with_path(manual)[0],
                            jax.tree_util.tree_leaves(auto)):
        assert m.dtype == a.dtype and m.shape == a.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(m, a, rtol=rtol, atol=rtol * scale,
                                   err_msg=jax.tree_util.keystr(path))


# --- random networks ---------------------------------------------------------

@st.composite
def networks(draw):
    """A random net (depth 1-8 blocks, widths 1-64, any activation, mixed combinators),
    a loss for its head, and the input shape."""
    width = st.integers(1, 64)
    act = st.sampled_from(HIDDEN_ACTIVATIONS)
    flatten = draw(st.booleans())
    n_in = draw(width)
    if flatten:  # inputs (N, 2, k) flattened to (N, 2k)
        n_in = 2 * ((n_in + 1) // 2)
    layers, cur, dropout = ([jn.Flatten] if flatten else []), n_in, False
    for _ in range(draw(st.integers(1, 8))):
        block = draw(st.sampled_from(["dense", "dense", "residual", "concat", "sum", "norm",
                                      "dropout"]))
        if block == "dense":
            cur = draw(width)
            layers += [jn.Dense(cur), jn.Activation(draw(act))]
        elif block == "residual":
            layers.append(jn.residual(jn.Dense(draw(width)), jn.Activation(draw(act)),
                                      jn.Dense(cur)))
        elif block == "concat":
            w1, w2 = draw(width), draw(width)
            layers += [jn.FanOut(2), jn.parallel(jn.serial(jn.Dense(w1), jn.Activation(draw(act))),
                                                 jn.Dense(w2)), jn.FanInConcat()]
            cur = w1 + w2
        elif block == "sum":
            cur = draw(width)
            layers += [jn.FanOut(3), jn.parallel(jn.Dense(cur), jn.serial(
                jn.Dense(cur), jn.Activation(draw(act))), jn.Dense(cur)), jn.FanInSum]
        elif block == "norm":
            cur = draw(st.integers(2, 64))  # LayerNorm of one feature is the constant 0
            layers += [jn.Dense(cur), jn.LayerNorm(), jn.Activation(draw(act))]
        else:
            cur, dropout = draw(width), True
            layers += [jn.Dense(cur), jn.Activation(draw(act)),
                       jn.Dropout(draw(st.sampled_from([0.1, 0.5])))]
    loss_name = draw(st.sampled_from(sorted(LOSSES)))
    classes = draw(st.integers(2, 10))
    head = {"softmax_cross_entropy": draw(st.sampled_from([[], [jn.LogSoftmax]])),
            "cross_entropy": [jn.Softmax], "l2_loss": draw(st.sampled_from([[], [jn.Identity]])),
            "huber": []}[loss_name]
    net = jn.serial(*layers, jn.Dense(classes), *head)
    batch = draw(st.integers(1, 9))
    shape = (batch, 2, n_in // 2) if flatten else (batch, n_in)
    return net, loss_name, classes, shape, dropout, draw(st.integers(0, 2**31 - 1))


def make_problem(net, loss_name, classes, shape, seed, dtype):
    """Params, inputs and targets in ``dtype``, drawn in numpy (tests/_fast.py:
    compiling jax.random for every parameter took longer than the gradients under test)."""
    _, params = numpy_init(net, shape, seed, dtype)
    rng = np.random.default_rng([seed, 1])
    inputs = rng.standard_normal(shape).astype(dtype)
    if loss_name in ("l2_loss", "huber"):
        targets = rng.standard_normal((shape[0], classes)).astype(dtype)
    else:
        targets = rng.integers(0, classes, shape[0])
    return params, *jax.device_put((inputs, targets))


def both_ways(net, loss):
    """``(manual value and grads, jax.grad's value and grads)`` as one compiled program: one
    compile per case instead of two."""
    def both(params, inputs, targets, **kwargs):
        return (manual_value_and_grad(net, loss)(params, inputs, targets, **kwargs),
                autodiff(net, loss, params, inputs, targets, **kwargs))

    return jax.jit(both)


def check_random_network(case, dtype, rtol):
    net, loss_name, classes, shape, dropout, seed = case
    loss = LOSSES[loss_name]
    params, inputs, targets = make_problem(net, loss_name, classes, shape, seed, dtype)
    kwargs = {"rng": jax.random.key(seed + 1)} if dropout else {}
    (value, grads), (ref_value, ref_grads) = both_ways(net, loss)(params, inputs, targets,
                                                                  **kwargs)
    assert value.dtype == ref_value.dtype == dtype
    assert_grads_close(grads, ref_grads, rtol)
    return value, ref_value


# Each example compiles one program (the manual pass and jax.grad together): 0.3-2 s on two
# shared CPU cores. The example counts keep this file well under a minute
# (tests/test_backprop_layers.py draws more nets, with convolutions and attention).
@settings(max_examples=4, deadline=None)
@given(networks())
def test_random_networks_agree_with_jax_grad_in_float64(case):
    value, ref_value = check_random_network(case, jnp.float64, 1e-10)
    assert value == ref_value  # the same forward computation: exactly equal


@settings(max_examples=3, deadline=None)
@given(networks())
def test_random_networks_agree_with_jax_grad_in_float32(case):
    value, ref_value = check_random_network(case, jnp.float32, 1e-4)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)


# --- fixed small problems ------------------------------------------------------

def small_problem(batch=8, n_in=5, classes=3, seed=0):
    net = jn.serial(jn.Dense(7), jn.Tanh, jn.Dropout(0.5), jn.Dense(6), jn.Sigmoid,
                    jn.Dense(classes), jn.Softmax)
    params, inputs, targets = make_problem(net, "cross_entropy", classes, (batch, n_in), seed,
                                           jnp.float64)
    return net, params, inputs, targets


def test_every_builtin_layer_and_combinator_has_a_backward_rule():
    layers = [jn.Dense(3), jn.Flatten, jn.Dropout(0.2), jn.LayerNorm(), jn.FanOut(2), jn.FanInSum,
              jn.FanInConcat(), jn.serial(jn.Dense(2)), jn.parallel(jn.Dense(2)),
              jn.residual(jn.Dense(2)), jn.mlp([4], 2)]
    layers += [jn.Activation(name) for name in jn.ACTIVATIONS]
    for layer in layers:
        assert layer.fwd is not None and layer.bwd is not None, layer.label


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "softmax", "log_softmax"])
def test_forward_keeps_the_output_where_the_derivative_needs_only_the_output(name):
    x = jnp.linspace(-3, 3, 12).reshape(3, 4)
    y, residual = jn.Activation(name).fwd({}, x)
    assert residual is y


def test_dense_keeps_only_its_input():
    layer = jn.Dense(3)
    _, params = numpy_init(layer, (4, 2))
    x = jnp.ones((4, 2))
    _, residual = layer.fwd(params, x)
    assert residual is x


@pytest.mark.parametrize("loss, head, fused", [
    (jn.cross_entropy, [jn.Softmax], True),
    (jn.softmax_cross_entropy, [jn.LogSoftmax], True),
    (jn.softmax_cross_entropy, [], False),            # logits: loss.output_grad
    (jn.softmax_cross_entropy, [jn.Softmax], False),  # not a pair: softmax's own rule
    (jn.l2_loss, [jn.Identity], True),
    (jn.l2_loss, [], False),
    (huber, [], False),
])
def test_fused_output_pairs_are_detected_and_agree(loss, head, fused):
    net = jn.serial(jn.Dense(6), jn.Relu, jn.serial(jn.Dense(3), *head))
    _, params = numpy_init(net, (5, 4))
    inputs = normal((5, 4), 1)
    targets = normal((5, 3), 2) if loss in (jn.l2_loss, huber) else jnp.array([0, 1, 2, 1, 0])
    assert manual_value_and_grad(net, loss).fused is fused
    (value, grads), (ref_value, ref_grads) = both_ways(net, loss)(params, inputs, targets)
    assert value == ref_value
    assert_grads_close(grads, ref_grads, 1e-12)


def test_fused_pair_skips_the_output_activations_backward_rule():
    def refuse(*args):
        raise AssertionError("the fused softmax's backward rule must not run")

    softmax = Layer(jn.Softmax.init, jn.Softmax.apply, kind="softmax", fwd=jn.Softmax.fwd,
                    bwd=refuse, config={"activation": "softmax"})
    net = jn.serial(jn.Dense(3), softmax)
    _, params = numpy_init(net, (4, 2))
    inputs, targets = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
    value, grads = jax.jit(manual_value_and_grad(net, jn.cross_entropy))(params, inputs, targets)
    reference = jax.jit(partial(autodiff, jn.serial(jn.Dense(3), jn.Softmax), jn.cross_entropy))
    assert_grads_close(grads, reference(params, inputs, targets)[1], 1e-12)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_under_jit(jit):
    net, params, inputs, targets = small_problem()
    f = manual_value_and_grad(net, jn.cross_entropy)
    if jit:
        f = jax.jit(f)
    key = jax.random.key(3)
    value, grads = f(params, inputs, targets, rng=key)
    ref_value, ref_grads = jax.jit(partial(autodiff, net, jn.cross_entropy))(
        params, inputs, targets, rng=key)
    np.testing.assert_allclose(value, ref_value, rtol=1e-14)
    assert_grads_close(grads, ref_grads, 1e-10)


def test_jit_with_static_mode_and_one_hot_targets():
    net, params, inputs, labels = small_problem()
    targets = jax.device_put(np.eye(3)[np.asarray(labels)])  # one-hot, made in numpy
    f = jax.jit(manual_value_and_grad(net, jn.cross_entropy), static_argnames="mode")
    value, grads = f(params, inputs, targets, mode="eval")
    # the reference compiled with the same options: XLA's optimisation level can move a
    # result by an ulp, and this compares the forward values exactly
    ref_value, ref_grads = jax.jit(partial(autodiff, net, jn.cross_entropy, mode="eval"))(
        params, inputs, targets)
    assert value == ref_value
    assert_grads_close(grads, ref_grads, 1e-10)


def test_vmap_gives_per_example_gradients():
    net, params, inputs, targets = small_problem()
    f = manual_value_and_grad(net, jn.cross_entropy)

    def per_example(fn):
        return jax.jit(jax.vmap(lambda x, t: fn(x[None], t[None])))(inputs, targets)

    values, grads = per_example(lambda x, t: f(params, x, t, mode="eval"))
    ref_values, ref_grads = per_example(
        lambda x, t: autodiff(net, jn.cross_entropy, params, x, t, mode="eval"))
    assert jax.tree_util.tree_leaves(grads)[0].shape[0] == inputs.shape[0]
    np.testing.assert_allclose(values, ref_values, rtol=1e-14)
    assert_grads_close(grads, ref_grads, 1e-10)
    # the mean of the per-example gradients is the batch gradient
    _, batch_grads = jax.jit(partial(f, mode="eval"))(params, inputs, targets)
    assert_grads_close(jax.tree_util.tree_map(lambda g: np.mean(g, 0), grads), batch_grads, 1e-10)


def test_vmap_over_unbatched_examples_under_jit():
    net = jn.mlp([6], 3, "gelu")
    _, params = numpy_init(net, (4,))
    inputs = normal((5, 4), 1)
    targets = jnp.array([0, 2, 1, 1, 0])
    f = jax.jit(jax.vmap(manual_value_and_grad(net, jn.softmax_cross_entropy),
                          in_axes=(None, 0, 0)))
    ref = jax.jit(jax.vmap(lambda x, t: autodiff(net, jn.softmax_cross_entropy, params, x, t)))
    values, grads = f(params, inputs, targets)
    ref_values, ref_grads = ref(inputs, targets)
    np.testing.assert_allclose(values, ref_values, rtol=1e-14)
    assert_grads_close(grads, ref_grads, 1e-10)


def test_dropout_same_key_same_mask_in_both_paths():
    net, params, inputs, targets = small_problem()
    key = jax.random.key(7)
    outputs, applied = jax.jit(lambda p, x, k: (layer_fwd(net, p, x, {"rng": k})[0],
                                                 net.apply(p, x, rng=k)))(params, inputs, key)
    np.testing.assert_array_equal(outputs, applied)
    f = both_ways(net, jn.cross_entropy)
    (value, grads), (ref_value, ref_grads) = f(params, inputs, targets, rng=key)
    assert value == ref_value
    assert_grads_close(grads, ref_grads, 1e-10)
    # another key drops other units: the gradient changes (the key really is used)
    (other_value, _), _ = f(params, inputs, targets, rng=jax.random.key(8))
    assert other_value != value


def test_dropout_without_a_key_is_a_clear_error():
    net, params, inputs, targets = small_problem()
    with pytest.raises(ValueError, match="PRNG key"):
        manual_value_and_grad(net, jn.cross_entropy)(params, inputs, targets)


def test_training_with_manual_gradients_follows_the_autodiff_loss_curve():
    inputs = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    targets = (inputs[:, 0] * inputs[:, 1] > 0).astype(np.int32) + (inputs[:, 2] > 1)
    inputs, targets = jax.device_put((inputs, targets))
    net = jn.mlp([16, 16], 3, "tanh", "softmax")
    _, params = numpy_init(net, inputs.shape, dtype=np.float32)
    opt = optax.adam(1e-2)

    def curve(value_and_grad):
        def step(carry, _):
            p, s = carry
            value, grads = value_and_grad(p, inputs, targets)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value

        run = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=100)[1])
        return run(params)

    manual = curve(manual_value_and_grad(net, jn.cross_entropy))
    auto = curve(jax.value_and_grad(lambda p, x, t: jn.cross_entropy(net.apply(p, x), t)))
    assert manual.dtype == jnp.float32
    assert manual[-1] < 0.5 * manual[0]  # it learns
    np.testing.assert_allclose(manual, auto, rtol=1e-4)


# --- bad input -------------------------------------------------------------------

def recording_net():
    """A net whose first layer records whether it ever ran on concrete arrays."""
    ran_on = []
    dense = jn.Dense(3)

    def fwd(params, x, **kwargs):
        ran_on.append(isinstance(x, jax.core.Tracer))
        return dense.fwd(params, x)

    first = Layer(dense.init, dense.apply, kind="dense", fwd=fwd, bwd=dense.bwd)
    return jn.serial(first, jn.Relu, jn.Dense(2)), ran_on


def test_loss_that_is_not_a_scalar_is_an_error_before_computation():
    net, ran_on = recording_net()
    _, params = numpy_init(net, (4, 5))
    per_example = lambda y, t: jnp.sum((y - t) ** 2, -1)
    with pytest.raises(ValueError, match=r"scalar.*\(4,\)"):
        manual_value_and_grad(net, per_example)(params, jnp.ones((4, 5)), jnp.ones((4, 2)))
    assert ran_on and all(ran_on)  # traced for shapes only, never run


def test_targets_with_another_batch_size_are_an_error_before_computation():
    net, ran_on = recording_net()
    _, params = numpy_init(net, (4, 5))
    with pytest.raises(ValueError, match=r"batch of 4 inputs.*\(3,\)|\(3,\).*batch of 4"):
        manual_value_and_grad(net, jn.softmax_cross_entropy)(params, jnp.ones((4, 5)),
                                                             jnp.array([0, 1, 1]))
    assert all(ran_on)


@pytest.mark.parametrize("edit, message", [
    (lambda p: {**p, "dense_1": {**p["dense_1"], "w": jnp.ones((3, 5))}},
     r"params\['dense_1'\]\['w'\] has shape \(3, 5\).*expects \(3, 2\)"),
    (lambda p: {"dense_0": p["dense_0"]}, r"params\['dense_1'\]\['[bw]'\] is missing"),
    (lambda p: {**p, "dense_7": {"w": jnp.ones(2)}}, r"params\['dense_7'\]\['w'\].*not a param"),
    (lambda p: {**p, "dense_0": {"w": p["dense_0"]["w"]}}, r"params\['dense_0'\]\['b'\]"),
])
def test_params_that_do_not_match_the_net_are_an_error_naming_the_path(edit, message):
    net, ran_on = recording_net()
    _, params = numpy_init(net, (4, 5))
    with pytest.raises(ValueError, match=message):
        manual_value_and_grad(net, jn.softmax_cross_entropy)(edit(params), jnp.ones((4, 5)),
                                                             jnp.array([0, 1, 1, 0]))
    assert not ran_on


def test_errors_also_come_at_trace_time_under_jit():
    net, _ = recording_net()
    _, params = numpy_init(net, (4, 5))
    f = jax.jit(manual_value_and_grad(net, jn.softmax_cross_entropy))
    with pytest.raises(ValueError, match="batch"):
        f(params, jnp.ones((4, 5)), jnp.array([0, 1]))


# --- layers without a backward rule ---------------------------------------------------

def foreign_net():
    """jaxnet layers around a stax layer, which has no hand-written backward rule."""
    return jn.serial(jn.Dense(4), jn.Tanh, stax.serial(stax.Dense(3), stax.Relu), jn.Dense(2))


def test_layer_without_backward_rule_is_an_error_naming_it():
    net = foreign_net()
    _, params = numpy_init(net, (3, 5))
    with pytest.raises(jn.NoBackwardRuleError, match=r"layer_0.*no hand-written backward rule"):
        manual_value_and_grad(net, jn.l2_loss)(params, jnp.ones((3, 5)), jnp.ones((3, 2)))


def test_autodiff_fallback_is_opt_in_and_reported():
    net = foreign_net()
    _, params = numpy_init(net, (3, 5))
    inputs = normal((3, 5), 1)
    targets = normal((3, 2), 2)
    f = manual_value_and_grad(net, jn.l2_loss, autodiff_fallback=True)
    with pytest.warns(AutodiffFallbackWarning, match="layer_0"):
        value, grads = jax.jit(f)(params, inputs, targets)
    assert f.fallback_paths == ("layer_0",)
    ref_value, ref_grads = jax.jit(partial(autodiff, net, jn.l2_loss))(params, inputs, targets)
    assert value == ref_value
    assert_grads_close(grads, ref_grads, 1e-12)
    with warnings.catch_warnings():  # warned once per input signature, not every trace
        warnings.simplefilter("error")
        jax.eval_shape(f, params, inputs, targets)


# --- the example ---------------------------------------------------------------------

def test_example_trains_the_same_curve_both_ways():
    path = pathlib.Path(__file__).parent.parent / "examples" / "manual_backprop.py"
    spec = importlib.util.spec_from_file_location("manual_backprop_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--steps", "20", "--batch", "32"])
    assert out["manual"].shape == out["autodiff"].shape == (20,)
    assert out["manual"].dtype == np.float32
    np.testing.assert_allclose(out["manual"], out["autodiff"], rtol=1e-4)
    assert out["manual"][-1] < out["manual"][0]
