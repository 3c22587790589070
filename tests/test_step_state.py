"""What the compiled train step carries (issue 13): a net that draws no randomness trains
without the key and the step count inside the compiled call, and gets the same result as the
whole-state step; a net with Dropout keeps both."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import train

LOSS = jn.softmax_cross_entropy
X = jax.random.normal(jax.random.key(1), (4, 8, 6), jnp.float32)  # 4 batches of 8 rows
Y = jnp.arange(32).reshape(4, 8) % 3

NETS = {"mlp": jn.mlp([8], 3, "tanh"), "remat": jn.mlp([8, 8], 3, "relu", remat=True),
        "batch_norm": jn.mlp([8], 3, "relu", batch_norm=True),
        "dropout": jn.mlp([8], 3, "relu", dropout=0.5)}


def state_of(net, opt):
    return train.init_state(net, opt, 0, (-1, 6), dtype=jnp.float32)


@pytest.mark.parametrize("grad", ["auto", "manual"])
def test_only_a_net_with_dropout_draws_randomness(grad):
    opt = optax.sgd(0.1)
    drawn = {name: train.draws_randomness(net, LOSS, state_of(net, opt), X[0], Y[0], grad)
             for name, net in NETS.items()}
    assert drawn == {"mlp": False, "remat": False, "batch_norm": False, "dropout": True}


@pytest.mark.parametrize("name", list(NETS))
def test_the_step_and_epoch_give_what_the_whole_state_step_gives(name):
    net, opt = NETS[name], optax.adam(1e-2)
    whole = jax.jit(train.train_step_fn(net, LOSS, opt))  # key and count inside the call
    step, epoch = train.make_train_step(net, LOSS, opt), train.make_epoch(net, LOSS, opt)
    want, got = state_of(net, opt), state_of(net, opt)
    key = np.asarray(got.key)
    for x, y in zip(X, Y):
        want, want_loss = whole(want, x, y)
        got, got_loss = step(got, x, y)
        np.testing.assert_array_equal(got_loss, want_loss)
    scanned, losses = epoch(state_of(net, opt), X, Y)
    for s in (got, scanned):
        for a, b in zip(jax.tree_util.tree_leaves((s.params, s.opt_state, s.model_state)),
                        jax.tree_util.tree_leaves((want.params, want.opt_state,
                                                   want.model_state))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert int(s.step) == 4 and np.array_equal(s.key, key)  # counted; key passed on
    assert losses.shape == (4,)
    if name != "dropout":  # the count is kept on the host: no device operation per step
        assert type(got.step) is np.int32


def test_a_lean_step_continues_from_a_scanned_epoch_and_compiles_once():
    net, opt = NETS["mlp"], optax.adam(1e-2)
    step = train.make_train_step(net, LOSS, opt)
    state, _ = train.make_epoch(net, LOSS, opt)(state_of(net, opt), X, Y)  # a device count
    for x, y in zip(X, Y):
        state, _ = step(state, x, y)
    assert int(state.step) == 8 and step._cache_size() == 1


@pytest.mark.parametrize("name", ["mlp", "batch_norm", "dropout"])
def test_lower_gives_the_program_the_step_runs(name):
    net, opt = NETS[name], optax.adam(1e-2)
    state = state_of(net, opt)
    lowered = train.make_train_step(net, LOSS, opt).lower(state, X[0], Y[0])
    carried = (state if name == "dropout" else
               (state.params, state.opt_state, state.model_state))  # the key: dropout only
    assert len(jax.tree_util.tree_leaves(lowered.args_info)) == len(
        jax.tree_util.tree_leaves(carried)) + 2
    assert lowered.compile().memory_analysis() is not None
