"""jaxnet.train: the state, the compiled step and epoch, and fit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import monitoring

import jaxnet
from jaxnet import train

LOSS = jaxnet.softmax_cross_entropy

# Every XLA compilation in this process, for the no-recompilation tests.
_COMPILES: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _COMPILES.append(name)
    if name == "/jax/core/compile/backend_compile_duration" else None)


def blobs(n=60, classes=3, features=5, seed=0):
    """Gaussian blobs: an easy classification problem."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 3, (classes, features))
    x = centres[y] + rng.normal(0, 1, (n, features))
    return x, y.astype(np.int32)


def tiny_net():
    return jaxnet.mlp([8, 8], 3, "tanh")


def fresh(net=None, opt=None, seed=0, features=5):
    return train.init_state(net or tiny_net(), opt or optax.adam(1e-2), seed, (-1, features))


def assert_trees_equal(a, b):
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v),
                                      err_msg=jax.tree_util.keystr(path))


def assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
    for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


# --- the state -------------------------------------------------------------------

def test_init_state_is_a_pytree_of_params_opt_state_step_and_key():
    state = fresh()
    assert isinstance(state, train.TrainState)
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert state.key.dtype == jnp.uint32 and state.key.shape == (2,)
    assert set(state.params) == {"dense_0", "dense_1", "dense_2"}
    assert state.params["dense_0"]["w"].shape == (5, 8)
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 6 + 1 + 12 + 1 + 1  # params, adam count, mu, nu, step, key


def test_init_state_takes_typed_keys_raw_keys_and_int_seeds_alike():
    net, opt = tiny_net(), optax.sgd(0.1)
    a = train.init_state(net, opt, jax.random.key(3), (-1, 5))
    b = train.init_state(net, opt, jax.random.PRNGKey(3), (-1, 5))
    c = train.init_state(net, opt, 3, (-1, 5))
    assert_trees_equal(a, b)
    assert_trees_equal(a, c)


def test_init_state_refuses_something_that_is_not_an_optimizer():
    with pytest.raises(TypeError, match="GradientTransformation"):
        train.init_state(tiny_net(), "adam", 0, (-1, 5))


# --- the step -------------------------------------------------------------------

class StepTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_with_and_without_jit_gives_the_same_params(self):
        x, y = blobs()
        net, opt = tiny_net(), optax.sgd(0.1)
        step = self.variant(train.make_train_step(net, LOSS, opt, jit=False))
        s = fresh(net, opt)
        # the step by its definition: params − 0.1 ∇L(params)
        loss_ref, grads = jax.value_and_grad(lambda p: LOSS(net.apply(p, x), y))(s.params)
        want = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, s.params, grads)
        s, loss = step(s, x, y)
        assert_trees_close(s.params, want)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
        assert int(s.step) == 1


@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_step_lowers_the_loss_and_counts_steps(grad):
    x, y = blobs()
    net, opt = tiny_net(), optax.adam(1e-2)
    step = train.make_train_step(net, LOSS, opt, grad=grad)
    state = fresh(net, opt)
    state, first = step(state, x, y)
    for _ in range(30):
        state, loss = step(state, x, y)
    assert float(loss) < 0.5 * float(first)
    assert int(state.step) == 31


def test_manual_and_automatic_gradients_train_to_the_same_params():
    x, y = blobs()
    net, opt = jaxnet.mlp([8, 8], 3, "relu", "softmax"), optax.adam(1e-2)
    loss = jaxnet.cross_entropy
    auto = train.make_train_step(net, loss, opt, grad="auto")
    manual = train.make_train_step(net, loss, opt, grad="manual")
    sa, sm = fresh(net, opt), fresh(net, opt)
    for _ in range(5):
        sa, la = auto(sa, x, y)
        sm, lm = manual(sm, x, y)
    np.testing.assert_allclose(lm, la, rtol=1e-10)
    assert_trees_close(sm.params, sa.params, rtol=1e-8, atol=1e-10)


def test_step_donates_the_state_and_compiles_once():
    x, y = blobs()
    step = train.make_train_step(tiny_net(), LOSS, optax.adam(1e-2))
    old = fresh()
    new, _ = step(old, x, y)
    assert old.params["dense_0"]["w"].is_deleted()
    for _ in range(5):
        new, _ = step(new, x, y)
    assert step._cache_size() == 1


def test_step_refuses_an_unknown_gradient_mode():
    with pytest.raises(ValueError, match="'auto'.*'manual'"):
        train.make_train_step(tiny_net(), LOSS, optax.sgd(0.1), grad="numeric")


def test_dropout_gets_a_new_key_every_step_and_is_off_in_evaluation():
    x, y = blobs()
    net = jaxnet.serial(jaxnet.Dense(16), jaxnet.Relu, jaxnet.Dropout(0.5), jaxnet.Dense(3))
    opt = optax.sgd(0.0)  # params stay put: only the dropout mask changes the loss
    step = train.make_train_step(net, LOSS, opt)
    state = fresh(net, opt)
    losses = []
    for _ in range(3):
        state, loss = step(state, x, y)
        losses.append(float(loss))
    assert len(set(losses)) == 3
    ev = train.make_eval_step(net, LOSS)
    assert float(ev(state.params, x, y)["loss"]) == float(ev(state.params, x, y)["loss"])


# --- the epoch ------------------------------------------------------------------

def test_scanned_epoch_equals_the_python_loop_of_steps():
    x, y = blobs(64)
    xs, ys = x.reshape(4, 16, 5), y.reshape(4, 16)
    net, opt = tiny_net(), optax.adam(1e-2)
    step = train.make_train_step(net, LOSS, opt)
    epoch = train.make_epoch(net, LOSS, opt)
    s_loop, s_scan = fresh(net, opt), fresh(net, opt)
    loop_losses = []
    for xb, yb in zip(xs, ys):
        s_loop, loss = step(s_loop, xb, yb)
        loop_losses.append(loss)
    s_scan, scan_losses = epoch(s_scan, xs, ys)
    assert scan_losses.shape == (4,)
    np.testing.assert_allclose(scan_losses, np.stack(loop_losses), rtol=1e-12)
    assert_trees_close(s_scan, s_loop)


# --- fit --------------------------------------------------------------------------

def test_fit_scan_epoch_and_python_loop_agree_and_compile_only_in_the_first_epoch():
    x, y = blobs(70)  # 70 rows, batch 16: 4 batches, 6 rows left out (different ones each epoch)
    xv, yv = blobs(20, seed=1)
    net, opt = tiny_net(), optax.adam(1e-2)
    state = fresh(net, opt)
    runs, counts = [], {}
    for scan in (False, True):
        counts[scan] = []
        runs.append(train.fit(net, LOSS, opt, state, (x, y), (xv, yv), epochs=4, batch_size=16,
                              scan_epoch=scan,
                              on_epoch_end=lambda p, c=counts[scan]: c.append(len(_COMPILES))))
    assert not state.params["dense_0"]["w"].is_deleted()  # fit copies the caller's state
    assert_trees_close(runs[0].state, runs[1].state)
    for k in ("batch_loss", "train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(runs[0].history[k], runs[1].history[k], rtol=1e-10)
    assert runs[0].history["epoch"] == [1, 2, 3, 4]
    assert int(runs[0].state.step) == 4 * (70 // 16)
    for scan, c in counts.items():
        assert len(c) == 4
        assert c[1] == c[2] == c[3], f"compilations after each epoch (scan={scan}): {c}"


def test_each_epoch_shuffle_is_a_permutation_drawn_from_the_key():
    x = np.arange(12.0).reshape(12, 1)
    y = np.arange(12)
    key = jax.random.PRNGKey(0)
    new_key, xs, ys = train._shuffled_batches(key, x, y, 4)
    assert xs.shape == (3, 4, 1) and ys.shape == (3, 4)
    assert sorted(np.asarray(ys).ravel().tolist()) == list(range(12))
    np.testing.assert_array_equal(np.asarray(xs)[..., 0], np.asarray(ys))  # rows stay paired
    again = train._shuffled_batches(key, x, y, 4)
    np.testing.assert_array_equal(again[2], ys)
    assert not np.array_equal(train._shuffled_batches(new_key, x, y, 4)[2], ys)
    assert not np.array_equal(np.asarray(new_key), np.asarray(key))
    _, _, part = train._shuffled_batches(key, x, y, 5)  # 2 full batches, 2 rows left out
    assert part.shape == (2, 5) and len(set(np.asarray(part).ravel().tolist())) == 10


def test_early_stopping_stops_after_patience_and_restores_the_best_params():
    x, y = blobs(60)
    y_val = (y + 1) % 3  # the same inputs, labelled wrong: learning makes validation worse
    net, opt = tiny_net(), optax.adam(3e-2)
    seen = []
    result = train.fit(net, LOSS, opt, fresh(net, opt), (x, y), (x, y_val), epochs=20,
                       batch_size=20, patience=2, on_epoch_end=seen.append)
    assert result.stop_reason == "early_stopping"
    assert result.best_epoch == 1
    assert result.epochs_run == 3 and len(result.history["val_loss"]) == 3
    assert result.history["val_loss"][1] > result.history["val_loss"][0]
    assert_trees_equal(result.state.params, seen[0].state.params)
    assert int(result.state.step) == 3 * 3  # the optimizer state is the last epoch's


def test_fit_without_patience_runs_every_epoch():
    x, y = blobs(40)
    result = train.fit(tiny_net(), LOSS, optax.adam(1e-2), fresh(), (x, y), (x, y), epochs=3,
                       batch_size=10)
    assert result.stop_reason == "epochs" and result.epochs_run == 3
    assert result.best_epoch is not None
    assert set(result.history) == {"epoch", "batch_loss", "train_loss", "train_accuracy",
                                   "val_loss", "val_accuracy", "seconds"}


def test_fit_stops_at_a_nan_loss_naming_epoch_and_step_and_keeps_the_last_good_state():
    x = np.linspace(-1, 1, 40).reshape(20, 2)
    y = 3 * x[:, :1]
    net, opt = jaxnet.mlp([4], 1, "identity"), optax.sgd(50.0)  # diverges within a few steps
    result = train.fit(net, jaxnet.l2_loss, opt, train.init_state(net, opt, 0, (-1, 2)), (x, y),
                       epochs=50, batch_size=5, metrics={})
    assert result.stop_reason == "nan"
    epoch, step = result.nan_at
    assert result.epochs_run == epoch - 1
    assert (epoch - 1) * 4 < step <= epoch * 4
    assert int(result.state.step) == (epoch - 1) * 4
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(result.state))


def test_keyboard_interrupt_ends_fit_with_the_last_completed_epoch():
    x, y = blobs(40)

    def interrupt(progress):
        if progress.epoch == 2:
            raise KeyboardInterrupt

    result = train.fit(tiny_net(), LOSS, optax.adam(1e-2), fresh(), (x, y), epochs=5,
                       batch_size=10, on_epoch_end=interrupt)
    assert result.stop_reason == "interrupted" and result.epochs_run == 2
    assert int(result.progress.state.step) == 2 * 4


@pytest.mark.parametrize("kwargs, message", [
    ({"patience": 2}, "needs validation data"),
    ({"batch_size": 100}, "larger than the 60 training rows"),
    ({"batch_size": 0}, "batch_size"),
    ({"epochs": -1}, "epochs"),
    ({"patience": 0, "val": True}, "patience"),
])
def test_fit_refuses_bad_settings(kwargs, message):
    x, y = blobs()
    val = (x, y) if kwargs.pop("val", False) else None
    with pytest.raises(ValueError, match=message):
        train.fit(tiny_net(), LOSS, optax.adam(1e-2), fresh(), (x, y), val, **kwargs)


def test_evaluate_in_chunks_equals_one_pass():
    x, y = blobs(50)
    state = fresh()
    ev = train.make_eval_step(tiny_net(), LOSS, {"accuracy": jaxnet.accuracy})
    whole = train.evaluate(ev, state.params, x, y)
    chunked = train.evaluate(ev, state.params, x, y, batch_size=16)
    assert whole.keys() == chunked.keys() == {"loss", "accuracy"}
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], rel=1e-6)


# --- optimizers by name --------------------------------------------------------------

@pytest.mark.parametrize("name, schedule", [(name, "constant") for name in train.OPTIMIZERS]
                         + [("adam", s) for s in train.SCHEDULES if s != "constant"])
def test_optimizers_by_name_minimise_a_quadratic(name, schedule):
    opt = train.make_optimizer(name, 0.05, schedule, total_steps=40, steps_per_epoch=4)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = opt.init(params)
    for _ in range(20):
        grads = jax.tree_util.tree_map(lambda w: w, params)  # ∇ ½|w|² = w
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(jnp.sum(params["w"] ** 2)) < 14.0


@pytest.mark.parametrize("args, message", [
    (("adagrad", 0.1), "unknown optimizer 'adagrad'"),
    (("adam", 0.0), "positive"),
    (("adam", float("nan")), "positive"),
    (("adam", 0.1, "linear"), "unknown schedule"),
    (("adam", 0.1, "cosine"), "total_steps"),
])
def test_make_optimizer_refuses_bad_names_and_rates(args, message):
    with pytest.raises(ValueError, match=message):
        train.make_optimizer(*args)
