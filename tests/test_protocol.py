"""The layer protocol: the record, structure by methods, names, explicit context and state,
check_layer, and the errors a research user hit (issues 10 and 11)."""

import copy
import dataclasses
import pathlib
import pickle
import re
from functools import partial

import chex
import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fast import normal, numpy_init
from jax.example_libraries import stax

import jaxnet as jn
from jaxnet import activations as acts
from jaxnet import train

KEY = jax.random.key(0)


# --- the record ---------------------------------------------------------------------

NETS = [jn.Dense(3), jn.Relu, jn.Flatten, jn.mlp([4, 4], 2, "tanh", "log_softmax", dropout=0.1),
        jn.serial(jn.Dense(4, name="stem"), jn.residual(jn.LayerNorm(), jn.Dense(4)),
                  jn.FanOut(2), jn.parallel(jn.Dense(2), jn.Dense(2)), jn.FanInSum),
        jn.mixed_precision(jn.mlp([4], 2)), jn.serial(jn.Dense(4), jn.BatchNorm(), jn.Relu)]


@pytest.mark.parametrize("net", NETS, ids=lambda n: n.label)
def test_a_layer_copies_and_pickles_and_still_works(net):
    x = jnp.ones((2, 3))
    _, params, state = numpy_init(net, (-1, 3), with_state=True)
    want = net.apply_with_state(params, state, x, rng=KEY, mode="eval")[0]
    for other in (copy.copy(net), copy.deepcopy(net), pickle.loads(pickle.dumps(net)),
                  cloudpickle.loads(cloudpickle.dumps(net))):
        assert other == net and hash(other) == hash(net)
        chex.assert_trees_all_close(other.apply_with_state(params, state, x, rng=KEY,
                                                           mode="eval")[0], want)


def test_singletons_unpickle_as_themselves():
    assert pickle.loads(pickle.dumps(jn.Relu)) is jn.Relu
    assert pickle.loads(pickle.dumps(jn.FanInSum)) is jn.FanInSum


def test_equality_is_by_value_not_the_tuple_of_functions():
    d = jn.Dense(3)
    assert d != (d.init, d.apply)            # a tuple's equality said True
    assert d == jn.Dense(3) and hash(d) == hash(jn.Dense(3))
    assert d != jn.Dense(4) and d != jn.Dense(3, name="head")
    init, apply = d                             # still stax's pair
    assert (init, apply) == (d.init, d.apply) == (d[0], d[1]) and len(d) == 2


def test_a_layer_cannot_be_mutated():
    d = jn.Dense(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.fwd = None
    with pytest.raises(TypeError):
        d.config["out_dim"] = 4


def test_layers_work_inside_stax_and_stax_layers_inside_jaxnet():
    init, apply = stax.serial(jn.Dense(4), jn.Relu, stax.Dense(2))
    out, params = init(KEY, (-1, 3))
    assert out == (-1, 2) and apply(params, jnp.ones((5, 3))).shape == (5, 2)
    net = jn.serial(stax.Dense(4), jn.Relu, jn.Dense(2))
    _, params = net.init(KEY, (-1, 3))
    assert net.apply(params, jnp.ones((5, 3))).shape == (5, 2)


def test_no_module_outside_the_combinators_switches_on_kind_strings():
    root = pathlib.Path(jn.__file__).parent
    for path in root.glob("*.py"):
        if path.name == "combinators.py":
            continue
        found = re.findall(r"\.kind\s*(?:==|!=|in\b)", path.read_text())
        assert not found, f"{path.name} finds structure by kind strings: {found}"


# --- names --------------------------------------------------------------------------

def test_name_is_the_parameter_key_and_inserting_a_layer_keeps_it():
    before = jn.serial(jn.Dense(4, name="encoder"), jn.Relu, jn.Dense(2, name="head"))
    after = jn.serial(jn.Dense(4, name="encoder"), jn.Relu, jn.Dense(4), jn.Relu,
                      jn.Dense(2, name="head"))
    _, p1 = before.init(KEY, (-1, 3))
    _, p2 = after.init(KEY, (-1, 3))
    assert sorted(p1) == ["encoder", "head"] and sorted(p2) == ["dense_0", "encoder", "head"]
    assert jn.serial(jn.Dense(2), name="block").name == "block"
    assert jn.Relu.named("act").name == "act"


def test_two_children_with_one_name_are_an_error_naming_both():
    with pytest.raises(ValueError, match=r"children 0 \(Dense\(4\)\) and 2 \(Dense\(2\)\) both "
                                         r"have the name 'x'"):
        jn.serial(jn.Dense(4, name="x"), jn.Relu, jn.Dense(2, name="x"))
    with pytest.raises(ValueError, match="both have the name 'dense_0'"):
        jn.serial(jn.Dense(4), jn.Dense(2, name="dense_0"))


# --- structure: the fused output gradient through wrappers --------------------------------

def _grads_agree(net, loss, x, y):
    _, params = numpy_init(net, (-1, x.shape[-1]))
    f = jn.manual_value_and_grad(net, loss)

    @jax.jit  # the manual pass and jax.grad as one program, not op by op
    def both(params, x, y):
        return f(params, x, y), jax.value_and_grad(
            lambda p: loss.formula(net.apply(p, x), y))(params)

    (value, grads), (ref_value, ref) = both(params, x, y)
    chex.assert_trees_all_close(value, ref_value, rtol=1e-10)
    chex.assert_trees_all_close(grads, ref, rtol=1e-6, atol=1e-8)
    return f


def test_the_fused_gradient_is_found_through_mixed_precision_and_nested_serials():
    x, y = normal((8, 5)), jnp.arange(8) % 3
    wrapped = jn.mixed_precision(jn.mlp([6], 3, "tanh", "log_softmax"), "float32")
    assert jn.manual_value_and_grad(
        jn.mixed_precision(jn.mlp([6], 3, "tanh", "log_softmax")), jn.softmax_cross_entropy).fused
    assert _grads_agree(wrapped, jn.softmax_cross_entropy, x, y).fused
    nested = jn.serial(jn.Dense(6), jn.serial(jn.Tanh, jn.serial(jn.Dense(3), jn.LogSoftmax)))
    assert _grads_agree(nested, jn.softmax_cross_entropy, x, y).fused
    # a residual's output is a sum, not its last child's: the unfused path, still right
    tail = jn.serial(jn.Dense(3), jn.residual(jn.Dense(3), jn.LogSoftmax))
    assert not _grads_agree(tail, jn.softmax_cross_entropy, x, y).fused


# --- the call context -----------------------------------------------------------------

def test_apply_and_fwd_receive_only_what_the_user_passes():
    seen = []

    def init(rng, shape):
        return shape, {}

    def apply(params, x, **kwargs):
        seen.append(sorted(kwargs))
        return 2 * x

    def fwd(params, x, **kwargs):
        seen.append(sorted(kwargs))
        return 2 * x, None

    def bwd(params, res, g):
        return {}, 2 * g

    net = jn.serial(jn.Dense(3), jn.Layer(init, apply, fwd, bwd, kind="double"))
    _, params = net.init(KEY, (-1, 3))
    net.apply(params, jnp.ones((2, 3)), mode="eval")
    jn.manual_value_and_grad(net, jn.l2_loss)(params, jnp.ones((2, 3)), jnp.ones((2, 3)),
                                             mode="eval")
    assert all(kw == ["mode", "rng"] for kw in seen), seen


# --- check_layer ------------------------------------------------------------------------

# Three float input shapes, shared: check_layer draws its inputs with jax.random, one compiled
# program per shape and dtype (0.2-0.5 s each); the layers' checks do not depend on the sizes.
# Sizes stay unequal where it matters: Dense(3) on 4 features (not square), time steps (5)
# unlike channels (4), an odd length for Conv1D's stride 2 and the pools' leftover step.
BUILT_IN = [
    (jn.Dense(3), (-1, 4), {}), (jn.Sigmoid, (-1, 4), {}), (jn.Softmax, (-1, 4), {}),
    (jn.LogSoftmax, (-1, 4), {}), (jn.Activation("elu", alpha=0.5), (-1, 4), {}),
    (jn.Flatten, (-1, 5, 4), {}), (jn.Dropout(0.3), (-1, 4), {"rng": KEY}),
    (jn.LayerNorm(), (-1, 4), {}), (jn.BatchNorm(), (-1, 4), {}),
    (jn.BatchNorm(), (-1, 4, 4, 2), {"mode": "eval"}), (jn.Conv2D(3, 2), (-1, 4, 4, 2), {}),
    (jn.Conv1D(4, 3, strides=2), (-1, 5, 4), {}), (jn.ConvTranspose(2, (3,)), (-1, 5, 4), {}),
    (jn.MaxPool((2,)), (-1, 5, 4), {}), (jn.AvgPool((2, 2), (2, 2)), (-1, 4, 4, 2), {}),
    (jn.SumPool((2,)), (-1, 5, 4), {}), (jn.GlobalAvgPool, (-1, 5, 4), {}),
    (jn.GroupNorm(2), (-1, 5, 4), {}), (jn.RMSNorm(), (-1, 4), {}),
    (jn.PositionalEmbedding(8), (-1, 5, 4), {}),
    (jn.MultiHeadAttention(2, 2), (-1, 5, 4), {"causal": True}),
    # the recompute backward and TransformerBlock (its pieces' rules composed) are checked
    # against jax.vjp in tests/test_attention.py and the random nets of test_backprop_layers
    (jn.serial(jn.FanOut(2), jn.parallel(jn.Dense(3), jn.Dense(3)), jn.FanInConcat()),
     (-1, 4), {}),
]


@pytest.mark.parametrize("layer,shape,kwargs", BUILT_IN, ids=[b[0].label for b in BUILT_IN])
def test_every_built_in_layer_passes_check_layer(layer, shape, kwargs):
    assert jn.check_layer(layer, shape, kwargs=kwargs).passed


def test_mixed_precision_passes_check_layer_in_its_compute_dtype():
    # float32 compute: a float64 check would compare float32 arithmetic with rtol 1e-10
    net = jn.mixed_precision(jn.mlp([4], 2), "float32")
    assert jn.check_layer(net, (-1, 4), dtypes=("float32",)).passed


def test_embedding_passes_check_layer_with_integer_inputs():
    assert jn.check_layer(jn.Embedding(7, 3), (-1, 5), int_inputs=7).passed


def _scaled(factor, extra_key=False):
    """A custom layer y = 3x whose backward rule is off by ``factor`` (or adds a key)."""
    def init(rng, shape):
        return shape, {"a": jnp.ones(shape[-1:])}

    def apply(params, x, **kwargs):
        return 3 * x * params["a"]

    def fwd(params, x, **kwargs):
        return apply(params, x), x

    def bwd(params, x, g):
        grads = {"a": jnp.sum(3 * x * g, 0)}
        if extra_key:
            grads["b"] = grads["a"]
        return grads, factor * 3 * g * params["a"]

    return jn.Layer(init, apply, fwd, bwd, kind="scaled")


def test_check_layer_catches_a_wrong_rule_and_a_wrong_gradient_tree():
    assert jn.check_layer(_scaled(1.0), (-1, 4)).passed
    with pytest.raises(jn.LayerCheckError, match=r"FAIL input_grad float32"):
        jn.check_layer(_scaled(1.01), (-1, 4), dtypes=("float32",))  # what is asserted
    report = jn.check_layer(_scaled(1.0, extra_key=True), (-1, 4), dtypes=("float32",),
                            raise_on_failure=False)
    assert not report.passed
    assert any("param_grads float32[b]" in c.name for c in report.failures())


# --- model state --------------------------------------------------------------------

def bn_net():
    return jn.serial(jn.Conv1D(4, 3), jn.BatchNorm(), jn.Relu, jn.Flatten, jn.Dense(3))


def test_a_stateless_net_has_empty_state_and_a_stateful_one_needs_it():
    _, _, state = jn.mlp([4], 2).init_with_state(KEY, (-1, 3))
    assert state == {} and not jn.mlp([4], 2).stateful
    net = bn_net()
    _, params, state = net.init_with_state(KEY, (-1, 6, 2))
    assert jax.tree.map(jnp.shape, state) == {"batch_norm_0": {"mean": (4,), "var": (4,)}}
    with pytest.raises(jn.StatefulLayerError, match="batch_norm_0: BatchNorm keeps model state"):
        net.apply(params, jnp.ones((2, 6, 2)))


def test_batch_norm_state_train_updates_eval_reads_and_manual_matches_jax_grad():
    net = bn_net()
    # numpy draws (tests/_fast.py), the running statistics too: mean ≠ 0, var ≠ 1
    _, params, state = numpy_init(net, (-1, 6, 2), with_state=True)
    x, y = normal((8, 6, 2)), jnp.arange(8) % 3
    f = jn.manual_value_and_grad(net, jn.softmax_cross_entropy)

    @partial(jax.jit, static_argnames="mode")  # one program per mode, not op by op
    def both(params, state, mode):
        def objective(p):
            out, new = net.apply_with_state(p, state, x, mode=mode)
            return jn.softmax_cross_entropy(out, y), new

        return (f(params, x, y, state=state, mode=mode),
                jax.value_and_grad(objective, has_aux=True)(params))

    for mode in ("train", "eval"):
        ((value, new_state), grads), ((ref_value, ref_state), ref) = both(params, state, mode)
        chex.assert_trees_all_close((value, new_state, grads), (ref_value, ref_state, ref),
                                    rtol=1e-10, atol=1e-12)
    ((_, trained), _), _ = both(params, state, "train")
    for k in ("mean", "var"):                                   # train updates the statistics
        assert not np.allclose(trained["batch_norm_0"][k], state["batch_norm_0"][k])
    ((_, read), _), _ = both(params, trained, "eval")
    chex.assert_trees_all_equal(read, trained)                  # eval reads them


def test_batch_norm_autodiff_equals_jax_derivatives_of_its_formula():
    # jax.grad through BatchNorm's train mode runs its hand-written JVP (x̂ and s kept); it
    # must equal JAX's derivatives of the formula written out, to second order (a
    # Hessian-vector product of Σ y²·w), with the state's new statistics alike. float64,
    # rtol 1e-10: the same derivatives, summed in other orders
    layer = jn.BatchNorm(momentum=0.8)
    _, params, state = numpy_init(layer, (-1, 3, 4), with_state=True)
    x, t, w = normal((5, 3, 4), 1), normal((5, 3, 4), 2), normal((5, 3, 4), 3)

    def formula(params, x):
        mean = jnp.mean(x, (0, 1))
        var = jnp.mean((x - mean) ** 2, (0, 1))
        new = {"mean": 0.8 * state["mean"] + 0.2 * mean, "var": 0.8 * state["var"] + 0.2 * var}
        return (x - mean) / jnp.sqrt(var + 1e-5) * params["scale"] + params["bias"], new

    def layer_fn(params, x):
        return layer.apply_with_state(params, state, x, mode="train")

    @jax.jit
    def derivatives(params, x):
        out = []
        for f in (layer_fn, formula):
            (y, new), vjp = jax.vjp(f, params, x)
            tangent = jax.jvp(lambda x, f=f: f(params, x)[0], (x,), (t,))[1]
            hvp = jax.jvp(jax.grad(lambda x, f=f: jnp.sum(f(params, x)[0] ** 2 * w)), (x,),
                          (t,))[1]
            out.append((y, new, vjp((w, jax.tree.map(jnp.zeros_like, new))), tangent, hvp))
        return out

    got, want = derivatives(params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-10)


def test_eval_output_of_an_example_does_not_depend_on_its_batch():
    net = bn_net()
    _, params, state = numpy_init(net, (-1, 6, 2), with_state=True)  # tests/_fast.py
    state = jax.tree.map(lambda a: np.asarray(a) + 0.3, state)
    x = normal((8, 6, 2))
    apply = jax.jit(partial(net.apply_with_state, mode="eval"))  # one program per batch size
    alone = apply(params, state, x[:1])[0]
    among = apply(params, state, x)[0][:1]
    chex.assert_trees_all_close(alone, among, rtol=1e-12)


@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_fit_trains_a_batch_norm_net_and_keeps_the_best_state(grad, tmp_path):
    from jaxnet import checkpoint

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6, 2)).astype(np.float32)
    y = (x[:, :, 0].sum(1) > 0).astype(np.int32)
    net, opt = bn_net(), optax.adam(1e-2)
    state = train.init_state(net, opt, 0, (-1, 6, 2), dtype=jnp.float32)
    result = train.fit(net, jn.softmax_cross_entropy, opt, state, (x[:64], y[:64]),
                       (x[64:], y[64:]), epochs=6, batch_size=16, patience=3, grad=grad)
    final = result.state
    assert max(result.history["val_accuracy"]) > 0.7
    chex.assert_trees_all_equal(final.model_state, result.progress.best_state)
    # a fresh evaluation with the running statistics gives the recorded validation loss
    scores = train.evaluate(train.make_eval_step(net, jn.softmax_cross_entropy), final.params,
                            x[64:], y[64:], model_state=final.model_state)
    best = result.history["val_loss"][result.best_epoch - 1]
    np.testing.assert_allclose(scores["loss"], best, rtol=1e-5)
    checkpoint.save_checkpoint(str(tmp_path), result.progress)
    restored, _ = checkpoint.restore_checkpoint(str(tmp_path), state)
    chex.assert_trees_all_equal((restored.best_params, restored.best_state),
                                (result.progress.best_params, result.progress.best_state))


def test_manual_gradients_have_their_params_dtypes_under_make_epoch():
    net = jn.serial(jn.Dense(8), jn.LayerNorm(), jn.Relu, jn.Dense(3))
    opt = optax.adam(1e-3)
    _, params = numpy_init(net, (-1, 4), dtype=np.float32)  # made and cast in numpy
    params["dense_0"] = jax.device_put(
        jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), params["dense_0"]))
    state = train.TrainState(params, opt.init(params), jnp.zeros((), jnp.int32),
                             jax.random.PRNGKey(0))
    x, y = np.ones((2, 4, 4), np.float32), np.zeros((2, 4), np.int32)
    f = jn.manual_value_and_grad(net, jn.softmax_cross_entropy)
    _, grads = jax.jit(f)(params, x[0], y[0])  # one program, not op by op
    assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda p: p.dtype, params)
    new, losses = train.make_epoch(net, jn.softmax_cross_entropy, opt, "manual")(state, x, y)
    assert new.params["dense_0"]["w"].dtype == jnp.bfloat16 and losses.shape == (2,)


# --- activations as functions; register ---------------------------------------------------

def test_mlp_takes_an_activation_function_with_its_hand_derivative():
    def softsign(a):
        return a / (1 + jnp.abs(a))

    softsign.derivative = lambda a: 1 / (1 + jnp.abs(a)) ** 2
    net = jn.mlp([4], 2, softsign)
    x, y = jnp.ones((2, 3)), jnp.ones((2, 2))
    _grads_agree(net, jn.l2_loss, x, y)
    hidden = jn.mlp([4], 2, jn.tanh).children[1][1]  # a built-in function: its registered layer
    assert hidden.label == "Tanh" and hidden.config == jn.Tanh.config


def test_register_checks_the_derivative_before_registering():
    def tanh_plus(a):  # a leaky tanh: 0.5 tanh(a) + 0.1 a
        return 0.5 * jnp.tanh(a) + 0.1 * a

    with pytest.raises(jn.ActivationCheckError):   # wrong: f' = 0.5 (1 - tanh²) + 0.1
        acts.register("bad_tanh_plus", tanh_plus, lambda a: 0.5 * (1 - jnp.tanh(a) ** 2))
    assert "bad_tanh_plus" not in acts.ACTIVATIONS
    fn = acts.register("tanh_plus", tanh_plus, lambda a: 0.5 * (1 - jnp.tanh(a) ** 2) + 0.1)
    try:
        np.testing.assert_allclose(jax.grad(fn)(0.0), 0.6)
        assert jn.mlp([3], 1, "tanh_plus").children[1][1].label == "tanh_plus"
    finally:
        del acts.ACTIVATIONS["tanh_plus"]


# --- errors that say what is wrong (issue 10) --------------------------------------------

def test_dense_refuses_params_of_another_width():
    _, wide = numpy_init(jn.Dense(32), (-1, 8))
    with pytest.raises(jn.ShapeError, match=r"Dense\(16\): parameter 'w' has shape \(8, 32\), "
                                            r"expected \(8, 16\)"):
        jn.Dense(16).apply(wide, jnp.ones((2, 8)))


def test_missing_params_and_wrong_keys_name_the_path():
    net = jn.mlp([4], 2)
    _, params = numpy_init(net, (-1, 3))
    with pytest.raises(jn.ShapeError, match=r"dense_1: Dense\(2\) has no parameter 'w'"):
        net.apply({"dense_0": params["dense_0"]}, jnp.ones((2, 3)))
    renamed = {**params, "dense_0": {"W": params["dense_0"]["w"], "b": params["dense_0"]["b"]}}
    with pytest.raises(jn.ShapeError, match=r"dense_0: Dense\(4\) has no parameter 'w'.*'W'"):
        net.apply(renamed, jnp.ones((2, 3)))
    block = jn.serial(jn.Dense(4), jn.residual(jn.Dense(4), jn.Relu))
    _, p = numpy_init(block, (-1, 3))
    _, other = numpy_init(jn.Dense(5), (-1, 4))
    with pytest.raises(jn.ShapeError, match=r"residual_0/dense_0: Dense\(4\): parameter 'w' "
                                            r"has shape \(4, 5\), expected \(4, 4\)"):
        block.apply({**p, "residual_0": {"dense_0": other}}, jnp.ones((2, 3)))


def test_fan_in_sum_broadcasts_as_stax_does():
    x, b = jnp.ones((2, 3)), jnp.arange(3.0)
    assert jn.FanInSum.init(KEY, ((-1, 3), (3,)))[0] == (-1, 3)
    chex.assert_trees_all_close(jn.FanInSum.apply({}, (x, b)), x + b)
    y, res = jn.FanInSum.fwd({}, (x, b))
    _, (gx, gb) = jn.FanInSum.bwd({}, res, jnp.ones((2, 3)))
    assert gx.shape == (2, 3) and gb.shape == (3,) and np.all(gb == 2)


def test_fit_says_what_it_expects():
    net, opt = jn.mlp([4], 3), optax.sgd(0.1)
    state = train.init_state(net, opt, 0, (-1, 2))
    x, y = np.ones((8, 2), np.float32), np.arange(8) % 3
    with pytest.raises(TypeError, match=r"fit's train must be an \(inputs, targets\) pair"):
        train.fit(net, jn.softmax_cross_entropy, opt, state, iter([(x, y)]), epochs=1)
    progress = train.FitProgress(state, 0, {}, None, np.inf, 0, 0)
    with pytest.raises(TypeError, match=r"restore_checkpoint returns \(progress, meta\)"):
        train.fit(net, jn.softmax_cross_entropy, opt, (progress, {}), (x, y), epochs=1)
    with pytest.raises(ValueError, match=r"train label 5 \(row 2\) is out of range for a net "
                                         r"with 3 outputs"):
        train.fit(net, jn.softmax_cross_entropy, opt, state, (x, np.array([0, 1, 5] + [0] * 5)),
                  epochs=1, batch_size=4)
    with pytest.raises(TypeError, match=r"loss must take two positional arguments.*"
                                        r"\(outputs\)"):
        train.make_train_step(net, lambda outputs: jnp.sum(outputs), opt)
