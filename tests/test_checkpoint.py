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


def largest_file(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
             if "ocdbt.process_" not in d and f != "commit_success.txt"]
    return max(files, key=os.path.getsize)


def flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "a flipped byte in the largest state file": (lambda e: flip_byte(largest_file(e / "state")),
                                                 "is damaged"),
    "a flipped byte in the best params": (lambda e: flip_byte(largest_file(e / "best" / "d")),
                                          "is damaged"),
    "a deleted _METADATA": (lambda e: os.remove(e / "state" / "_METADATA"),
                            "the file state/_METADATA is missing"),
    "a zeroed array metadata file": (
        lambda e: (e / "state" / "array_metadatas" / "process_0").write_bytes(b"\0" * 100),
        "state/array_metadatas/process_0 is not the JSON"),
    "a truncated data file": (lambda e: open(largest_file(e / "state" / "d"), "r+b").truncate(9),
                              "is damaged"),
    "a flipped byte in the JSON part": (lambda e: flip_byte(e / "meta" / "metadata"),
                                        "its JSON part"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_it_and_older_epochs_still_restore(
        case, tmp_path, two_epochs, capfd):
    import shutil

    shutil.copytree(two_epochs[0], tmp_path / "c")
    damage, message = DAMAGE[case]
    damage(tmp_path / "c" / "2")
    template = setup()[2]
    with pytest.raises(checkpoint.DamagedCheckpointError) as e:
        checkpoint.restore_checkpoint(str(tmp_path / "c"), template)
    text = str(e.value)
    assert message in text and "epoch 2" in text and "\n" not in text and len(text) < 400
    assert e.value.epoch == 2
    progress, _, skipped = checkpoint.restore_newest_intact(str(tmp_path / "c"), template)
    assert progress.epoch == 1 and [s.epoch for s in skipped] == [2]
    out, err = capfd.readouterr()
    assert "Event loop is closed" not in err and "Traceback" not in err, err


def test_arrays_that_orbax_reads_but_differ_from_their_checksum_are_refused(tmp_path, two_epochs):
    """The checksum, not orbax, catches an array whose bytes changed but still decode (a
    state folder from another epoch stands in for silently altered data)."""
    import shutil

    directory = tmp_path / "c"
    shutil.copytree(two_epochs[0], directory)
    shutil.rmtree(directory / "2" / "state")
    shutil.copytree(directory / "1" / "state", directory / "2" / "state")
    with pytest.raises(checkpoint.DamagedCheckpointError,
                       match=r"2: the checkpoint of epoch 2 is damaged: array '[a-z_/0-9]+' does "
                             r"not match the checksum"):
        checkpoint.restore_checkpoint(str(directory), setup()[2])


def test_re_saving_an_epoch_swaps_it_in_and_a_crash_between_renames_loses_nothing(
        tmp_path, two_epochs, monkeypatch):
    seen = two_epochs[4]
    directory = str(tmp_path)
    checkpoint.save_checkpoint(directory, seen[1])
    moved = seen[0]._replace(epoch=2)  # other arrays under the same epoch
    checkpoint.save_checkpoint(directory, moved)
    progress, _ = checkpoint.restore_checkpoint(directory, setup()[2])
    leaves_equal(progress.state, seen[0].state)
    assert sorted(os.listdir(directory)) == ["2"]  # no staging left behind
    # where renameat2 cannot swap: two renames; a crash between them is repaired next time
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_on_second(a, b):  # the second of the swap's renames: new copy into place
        if ".jaxnet-staging" in str(a) and str(b) == os.path.join(directory, "2"):
            raise KeyboardInterrupt("killed between the renames")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(directory, seen[1])
    monkeypatch.setattr(os, "rename", real_rename)
    assert not os.path.exists(os.path.join(directory, "2"))  # the window the crash hit
    assert checkpoint.latest_epoch(directory) == 2
    progress, _ = checkpoint.restore_checkpoint(directory, setup()[2])
    leaves_equal(progress.state, seen[1].state)  # the new copy, which was complete


def test_one_writer_per_directory_and_stale_locks_are_taken_over(tmp_path, two_epochs):
    import json
    import subprocess
    import sys

    directory = str(tmp_path)
    with checkpoint.DirectoryLock(directory):
        with pytest.raises(checkpoint.CheckpointError, match=r"is in use by another run \(pid "
                                                             rf"{os.getpid()} on "):
            checkpoint.DirectoryLock(directory).acquire()
        checkpoint.save_checkpoint(directory, two_epochs[4][0])  # the owner may write
    assert not os.path.exists(os.path.join(directory, checkpoint.LOCK_FILE))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket
    with open(os.path.join(directory, checkpoint.LOCK_FILE), "w") as f:
        json.dump({"pid": int(dead), "host": socket.gethostname()}, f)
    with checkpoint.DirectoryLock(directory) as lock:
        assert lock.stale_owner["pid"] == int(dead)
    with open(os.path.join(directory, checkpoint.LOCK_FILE), "w") as f:
        json.dump({"pid": 1, "host": "another-host"}, f)  # alive elsewhere, as far as we know
    with pytest.raises(checkpoint.CheckpointError, match="locked by another run"):
        checkpoint.save_checkpoint(directory, two_epochs[4][1])


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
