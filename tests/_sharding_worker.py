"""Subprocess half of tests/test_sharding.py: sharded training on N fake CPU devices.

Run as ``python tests/_sharding_worker.py single-host N OUT.json TMPDIR full|layouts`` (N
forced host devices; ``layouts`` skips the checks that do not depend on the device count), or
``... multi-host PID NPROC PORT OUT.npz`` (one process of a loopback ``jax.distributed`` run),
or ``... reference OUT.npz`` (the same training in one process on one device). Writes its
measurements for the test to check. float32 throughout (no x64).
"""

import json
import os
import sys

MODE = sys.argv[1]
if MODE == "single-host":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[2])}"
else:
    os.environ["XLA_FLAGS"] = ""
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # as tests/conftest.py
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnet  # noqa: E402
from jaxnet import sharding, train  # noqa: E402

BATCH, STEPS = 16, 4


def problem():
    net = jaxnet.mlp([32, 32], 4, "tanh")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS, BATCH, 8)).astype(np.float32)
    y = rng.integers(0, 4, (STEPS, BATCH)).astype(np.int32)
    return net, optax.adam(1e-2), x, y


def fresh_state(net, opt):
    return train.init_state(net, opt, jax.random.key(0), (-1, 8))


def host(tree):
    """Every leaf as a NumPy array (replicated or sharded: all shards must be addressable)."""
    return jax.tree.map(np.asarray, tree)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def run_steps(step, state, xs, ys, put=lambda v: v):
    for x, y in zip(xs, ys, strict=True):
        state, _ = step(state, put(x), put(y))
    return state


def single_host(n_devices, out_path, tmp, full):
    assert jax.device_count() == n_devices, jax.devices()
    net, opt, xs, ys = problem()
    loss = jaxnet.softmax_cross_entropy
    reference = run_steps(train.make_train_step(net, loss, opt), fresh_state(net, opt), xs, ys)
    result = {"devices": jax.device_count()}

    # data parallel: batch split over 'data', params replicated
    mesh = sharding.make_mesh()
    step = train.make_train_step(net, loss, opt, mesh=mesh)
    state = sharding.shard_state(fresh_state(net, opt), mesh)
    hlo = step.lower(state, xs[0], ys[0]).compile().as_text()
    dp = run_steps(step, state, xs, ys, put=lambda v: sharding.shard_batch(mesh, v))
    result["dp"] = {"diff": max_diff(host(dp.params), host(reference.params)),
                    "all_reduce": "all-reduce" in hlo,
                    "w_spec": str(dp.params["dense_0"]["w"].sharding.spec),
                    "batch_spec": str(sharding.shard_batch(mesh, xs[0]).sharding.spec),
                    "batch_shard_rows": sharding.shard_batch(mesh, xs[0])
                    .addressable_shards[0].data.shape[0]}

    if full:  # the 8-device run checks the layouts; these run once, on 4 devices
        try:
            step(sharding.shard_state(fresh_state(net, opt), mesh), xs[0][:BATCH - 1],
                 ys[0][:BATCH - 1])
            result["bad_batch_error"] = None
        except ValueError as e:
            result["bad_batch_error"] = str(e)

        # manual backward pass, same mesh
        mstep = train.make_train_step(net, loss, opt, "manual", mesh=mesh)
        manual = run_steps(mstep, sharding.shard_state(fresh_state(net, opt), mesh), xs, ys)
        result["dp_manual_diff"] = max_diff(host(manual.params), host(reference.params))

        # BatchNorm on the mesh: its batch statistics are over the global batch (the
        # running statistics and params match one device's), with either backward pass.
        # SGD, not Adam: the bias before a BatchNorm has gradient 0 up to rounding, which
        # Adam's g/√v would turn into ±lr steps of either sign.
        bn_net, sgd = jaxnet.mlp([32], 4, "tanh", batch_norm=True), optax.sgd(0.1)
        bn_ref = run_steps(train.make_train_step(bn_net, loss, sgd),
                           fresh_state(bn_net, sgd), xs, ys)
        for grad in ("auto", "manual"):
            bn_step = train.make_train_step(bn_net, loss, sgd, grad, mesh=mesh)
            bn = run_steps(bn_step, sharding.shard_state(fresh_state(bn_net, sgd), mesh), xs, ys,
                           put=lambda v: sharding.shard_batch(mesh, v))
            result[f"bn_{grad}_diff"] = max(
                max_diff(host(bn.params), host(bn_ref.params)),
                max_diff(host(bn.model_state), host(bn_ref.model_state)))

    # tensor parallel: hidden Dense weights split over 'model'
    tp_mesh = sharding.make_mesh(model=2)
    rules = sharding.dense_rules(r"dense_[01]")
    tstep = train.make_train_step(net, loss, opt, mesh=tp_mesh, rules=rules)
    tp = run_steps(tstep, sharding.shard_state(fresh_state(net, opt), tp_mesh, rules), xs, ys)
    w = tp.params["dense_0"]["w"]
    result["tp"] = {"diff": max_diff(host(tp.params), host(reference.params)),
                    "mesh": dict(tp_mesh.shape),
                    "w_spec": str(w.sharding.spec),
                    "w_shard_shape": list(w.addressable_shards[0].data.shape),
                    "mu_spec": str(tp.opt_state[0].mu["dense_0"]["w"].sharding.spec),
                    "b_spec": str(tp.params["dense_0"]["b"].sharding.spec),
                    "out_w_spec": str(tp.params["dense_2"]["w"].sharding.spec)}

    if full:  # the 8-device run checks the layouts; these run once, on 4 devices
        # a whole epoch (lax.scan) on the mesh equals the per-step loop
        epoch = train.make_epoch(net, loss, opt, mesh=mesh)
        ep, _ = epoch(sharding.shard_state(fresh_state(net, opt), mesh), xs, ys)
        result["epoch_diff"] = max_diff(host(ep.params), host(reference.params))

        # fit on the mesh (per-step loop and scanned epochs) equals fit on one device
        data = (xs.reshape(-1, 8), ys.reshape(-1))
        fits = {}
        for scan in (False, True):
            for m in (None, tp_mesh):
                r = train.fit(net, loss, opt, fresh_state(net, opt), data, epochs=2,
                              batch_size=BATCH, scan_epoch=scan, metrics={}, mesh=m,
                              rules=rules if m else ())
                fits[(scan, m is not None)] = r.state.params
        result["fit_diff"] = max(max_diff(host(fits[(s, True)]), host(fits[(s, False)]))
                                 for s in (False, True))
        result["fit_w_spec"] = str(fits[(True, True)]["dense_0"]["w"].sharding.spec)

    # sharded checkpoint: save the tensor-parallel state, restore into two layouts
    path = sharding.save_sharded(os.path.join(tmp, "tp_state"), tp)
    same = sharding.restore_sharded(path, tp)
    replicated_target = sharding.shard_state(fresh_state(net, opt), mesh)
    other = sharding.restore_sharded(path, replicated_target)
    result["ckpt"] = {
        "same_diff": max_diff(host(same), host(tp)),
        "same_specs_equal": all(a.sharding == b.sharding for a, b in
                                zip(jax.tree.leaves(same), jax.tree.leaves(tp), strict=True)),
        "other_diff": max_diff(host(other), host(tp)),
        "other_w_spec": str(other.params["dense_0"]["w"].sharding.spec),
        "saved_files": sorted(os.listdir(path)),
    }
    # fit's checkpoints (jaxnet.checkpoint) of the sharded state: restored into the sharded
    # template they keep its layout, into a fresh one-device template they come back whole
    from jaxnet import checkpoint
    progress = train.FitProgress(tp, 1, {"loss": [1.0]}, tp.params, 1.0, 1, 0)
    checkpoint.save_checkpoint(os.path.join(tmp, "fit_ckpt"), progress)
    back, _ = checkpoint.restore_checkpoint(os.path.join(tmp, "fit_ckpt"), tp)
    whole, _ = checkpoint.restore_checkpoint(os.path.join(tmp, "fit_ckpt"),
                                             fresh_state(net, opt))
    result["ckpt"]["fit_ckpt_diff"] = max(max_diff(host(back.state), host(tp)),
                                          max_diff(host(whole.state), host(tp)),
                                          max_diff(host(back.best_params), host(tp.params)))
    result["ckpt"]["fit_ckpt_specs_equal"] = all(
        a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(back.state), jax.tree.leaves(tp), strict=True))
    result["ckpt"]["fit_ckpt_whole_devices"] = len(whole.state.params["dense_0"]["w"].devices())
    # training continues from the restored state exactly as from the original
    cont_a = run_steps(tstep, same, xs[:1], ys[:1])
    cont_b = run_steps(tstep, tp, xs[:1], ys[:1])
    result["ckpt"]["continue_diff"] = max_diff(host(cont_a.params), host(cont_b.params))
    with open(out_path, "w") as f:
        json.dump(result, f)


def fit_params(net, opt, xs, ys, mesh=None, own_rows=False, scan=True):
    """fit for 2 epochs with validation and early stopping; ``own_rows``: pass only this
    process's rows of the training and validation sets."""
    x, y = xs.reshape(-1, 8), ys.reshape(-1)
    rows = sharding.process_rows(len(x)) if own_rows else slice(None)
    val_rows = sharding.process_rows(BATCH) if own_rows else slice(None)
    data = (x[rows], y[rows])
    val = (xs[0][val_rows], ys[0][val_rows])
    r = train.fit(net, jaxnet.softmax_cross_entropy, opt, fresh_state(net, opt), data, val,
                  epochs=2, batch_size=BATCH, scan_epoch=scan, patience=5, mesh=mesh)
    return r.state.params, r.history["val_loss"]


def reference(out_path):
    net, opt, xs, ys = problem()
    step = train.make_train_step(net, jaxnet.softmax_cross_entropy, opt)
    state = run_steps(step, fresh_state(net, opt), xs, ys)
    fitted, val_loss = fit_params(net, opt, xs, ys)
    np.savez(out_path, *[np.asarray(v) for v in jax.tree.leaves(state.params)],
             *[np.asarray(v) for v in jax.tree.leaves(fitted)], np.asarray(val_loss))


def multi_host(pid, nproc, port, out_path):
    sharding.initialize_distributed(f"127.0.0.1:{port}", nproc, pid, initialization_timeout=60,
                                    heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
    assert jax.process_count() == nproc and jax.device_count() == nproc
    net, opt, xs, ys = problem()
    mesh = sharding.make_mesh()
    step = train.make_train_step(net, jaxnet.softmax_cross_entropy, opt, mesh=mesh)
    state = sharding.shard_state(fresh_state(net, opt), mesh)
    rows = sharding.process_rows(BATCH)
    for x, y in zip(xs, ys, strict=True):  # each process loads only its own rows
        state, _ = step(state, sharding.shard_batch(mesh, x[rows]),
                        sharding.shard_batch(mesh, y[rows]))
    # params are replicated: this process holds a full copy
    leaves = [np.asarray(v.addressable_data(0)) for v in jax.tree.leaves(state.params)]
    spec = jax.tree.leaves(state.params)[0].sharding
    assert isinstance(spec, NamedSharding) and spec.spec == P(), spec
    # fit: every process passes only its own rows of the training and validation data
    fitted = {}
    for scan in (True, False):
        params, val_loss = fit_params(net, opt, xs, ys, mesh, own_rows=True, scan=scan)
        fitted[scan] = [np.asarray(v.addressable_data(0)) for v in jax.tree.leaves(params)]
    assert all(np.array_equal(a, b) for a, b in zip(fitted[True], fitted[False], strict=True))
    np.savez(out_path, *leaves, *fitted[True], np.asarray(val_loss))
    jax.distributed.shutdown()


if __name__ == "__main__":
    if MODE == "single-host":
        single_host(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "full")
    elif MODE == "reference":
        reference(sys.argv[2])
    elif MODE == "multi-host":
        multi_host(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {MODE!r}")
