"""jaxnet.checkpoint: orbax checkpoints of a fit, atomic, strict, and resumable bit for bit."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet
from jaxnet import checkpoint, train

LOSS = jaxnet.softmax_cross_entropy


def blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 3, (3, 4))[y] + rng.normal(0, 1, (n, 4))
    return x.astype(np.float32), y.astype(np.int32)


TRAIN, VAL = blobs(48, 0), blobs(16, 1)


def setup(width=6, opt=None, dtype=jnp.float32):
    net = jaxnet.serial(jaxnet.Dense(width, dtype=dtype), jaxnet.Tanh, jaxnet.Dense(3, dtype=dtype))
    opt = opt or optax.adam(1e-2)
    return net, opt, train.init_state(net, opt, 0, (-1, 4))


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(la, lb):
        assert np.asarray(u).dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def run(net, opt, start, epochs, **kw):
    return train.fit(net, LOSS, opt, start, TRAIN, VAL, epochs=epochs, batch_size=8, patience=3,
                     **kw)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A run of 2 epochs checkpointed after each epoch, and the net that made it."""
    directory = str(tmp_path_factory.mktemp("ckpt"))
    net, opt, state = setup()
    seen = []

    def save(progress):
        seen.append(progress)
        checkpoint.save_checkpoint(directory, progress, {"run": "a"})

    result = run(net, opt, state, 2, on_epoch_end=save)
    return directory, net, opt, result, seen


def test_round_trip_restores_every_array_and_counter(two_epochs):
    directory, net, opt, result, _ = two_epochs
    assert checkpoint.latest_epoch(directory) == 2
    template = setup()[2]
    progress, meta = checkpoint.restore_checkpoint(directory, template)
    assert meta == {"run": "a"}
    saved = result.progress
    leaves_equal(progress.state, saved.state)
    leaves_equal(progress.best_params, saved.best_params)
    assert progress.epoch == 2 and progress.history == saved.history
    assert (progress.best_val_loss, progress.best_epoch, progress.bad_epochs) == \
        (saved.best_val_loss, saved.best_epoch, saved.bad_epochs)
    older, _ = checkpoint.restore_checkpoint(directory, template, epoch=1)
    assert older.epoch == 1 and int(older.state.step) == 6


@pytest.mark.parametrize("scan_epoch", [False, True])
def test_resuming_gives_bitwise_the_uninterrupted_run(tmp_path, scan_epoch):
    net, opt, state = setup()
    whole = run(net, opt, state, 4, scan_epoch=scan_epoch)
    first = run(net, opt, state, 2, scan_epoch=scan_epoch)
    checkpoint.save_checkpoint(str(tmp_path), first.progress)
    progress, _ = checkpoint.restore_checkpoint(str(tmp_path), setup()[2])
    rest = run(net, opt, progress, 4, scan_epoch=scan_epoch)
    leaves_equal(rest.state, whole.state)
    leaves_equal(rest.progress.best_params, whole.progress.best_params)
    for k, v in whole.history.items():
        if k != "seconds":
            assert rest.history[k] == v, k
    assert rest.stop_reason == whole.stop_reason and rest.epochs_run == whole.epochs_run


def test_a_checkpoint_for_another_width_is_refused_naming_the_path_and_shapes(two_epochs):
    directory = two_epochs[0]
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"'params/dense_0/b' has shape \(6,\).*expects shape \(7,\)"):
        checkpoint.restore_checkpoint(directory, setup(width=7)[2])


def test_a_checkpoint_with_another_dtype_is_refused(two_epochs):
    directory = two_epochs[0]
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"'params/dense_0/b' has shape \(6,\), dtype float32 in the "
                             r"checkpoint but the run expects shape \(6,\), dtype float64"):
        checkpoint.restore_checkpoint(directory, setup(dtype=jnp.float64)[2])


def test_a_checkpoint_of_another_optimizer_is_refused(two_epochs):
    directory = two_epochs[0]
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"no array at 'opt_state/0/trace/dense_0/b'.*different net or"):
        checkpoint.restore_checkpoint(directory, setup(opt=optax.sgd(0.1, momentum=0.9))[2])
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"has an array at 'opt_state/0/count' that the run does not have"):
        checkpoint.restore_checkpoint(directory, setup(opt=optax.sgd(0.1))[2])


def test_a_damaged_checkpoint_is_refused_with_a_clear_error(tmp_path, two_epochs):
    checkpoint.save_checkpoint(str(tmp_path), two_epochs[4][0])
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "1" / "state") for f in fs
                  if f not in ("commit_success.txt",)]
    assert data_files
    for path in data_files:
        with open(path, "wb") as f:
            f.write(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read the checkpoint"):
        checkpoint.restore_checkpoint(str(tmp_path), setup()[2])


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch,
                                                                     two_epochs):
    from orbax.checkpoint._src.path import atomicity

    seen = two_epochs[4]
    checkpoint.save_checkpoint(str(tmp_path), seen[0])

    async def crash(*args, **kwargs):  # the process dies before the final rename
        raise OSError("simulated crash during save")

    monkeypatch.setattr(atomicity.async_path, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save_checkpoint(str(tmp_path), seen[1])
    monkeypatch.undo()
    assert any("tmp" in name for name in os.listdir(tmp_path))  # the half-written epoch 2
    assert checkpoint.latest_epoch(str(tmp_path)) == 1
    progress, _ = checkpoint.restore_checkpoint(str(tmp_path), setup()[2])
    assert progress.epoch == 1
    leaves_equal(progress.state, seen[0].state)


def test_a_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
        checkpoint.restore_checkpoint(str(tmp_path / "nowhere"), setup()[2])
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.restore_checkpoint(str(tmp_path), setup()[2])
    assert checkpoint.latest_epoch(str(tmp_path / "nowhere")) is None


def test_only_the_newest_checkpoints_are_kept(tmp_path, two_epochs):
    result = two_epochs[3]
    for epoch in (1, 2, 3):
        checkpoint.save_checkpoint(str(tmp_path), result.progress._replace(epoch=epoch), keep=2)
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 3]
