"""Sharded training: data-parallel and tensor-parallel steps on 4 and 8 (fake) CPU devices give
the single-device params; a 2-process loopback jax.distributed run ends with identical params
on both processes, equal to the one-process result; sharded checkpoints restore with their
shardings. The multi-device runs happen in fresh subprocesses (tests/_sharding_worker.py):
the device count is fixed when JAX starts."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jaxnet
from jaxnet import sharding

WORKER = os.path.join(os.path.dirname(__file__), "_sharding_worker.py")
TIMEOUT = 180
TOL = 1e-5  # float32, four Adam steps


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own (JAX_DISABLE_MOST_OPTIMIZATIONS stays)
    for k in ("JAXNET_COORDINATOR", "JAXNET_NUM_PROCESSES", "JAXNET_PROCESS_ID"):
        env.pop(k, None)
    return env


def _run(*args):
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True,
                          text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, f"worker {args} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module", params=[4, 8], ids=lambda n: f"{n}dev")
def run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"sharding{request.param}")
    out = tmp / "out.json"
    # checks that do not depend on the device count (manual gradients, scanned epochs, fit,
    # bad batch) run on 4 devices only, to keep the test short
    _run("single-host", request.param, out, tmp, "full" if request.param == 4 else "layouts")
    return json.loads(out.read_text())


def _needs_full(run):
    if "epoch_diff" not in run:
        pytest.skip("checked on 4 devices (does not depend on the device count)")


def test_data_parallel_step_equals_single_device_step(run):
    dp = run["dp"]
    assert dp["diff"] < TOL
    assert dp["all_reduce"], "the partitioned step must all-reduce the gradients"
    assert dp["w_spec"] == "P()"  # params replicated
    assert dp["batch_spec"] == "P('data', None)"
    assert dp["batch_shard_rows"] == 16 // run["devices"]


def test_manual_gradients_shard_the_same_way(run):
    _needs_full(run)
    assert run["dp_manual_diff"] < TOL


def test_batch_norm_statistics_are_over_the_global_batch(run):
    _needs_full(run)
    assert run["bn_auto_diff"] < TOL and run["bn_manual_diff"] < TOL


def test_tensor_parallel_step_shards_wide_dense_weights_by_name(run):
    tp = run["tp"]
    assert tp["mesh"] == {"data": run["devices"] // 2, "model": 2}
    assert tp["diff"] < TOL
    assert tp["w_spec"] == "P(None, 'model')" and tp["w_shard_shape"] == [8, 16]
    assert tp["b_spec"] == "P('model',)"
    assert tp["mu_spec"] == "P(None, 'model')"  # Adam's moments follow their params
    assert tp["out_w_spec"] == "P()"  # dense_2 matches no rule: replicated


def test_scanned_epoch_on_the_mesh_equals_the_steps(run):
    _needs_full(run)
    assert run["epoch_diff"] < TOL


def test_fit_on_the_mesh_equals_fit_on_one_device(run):
    _needs_full(run)
    assert run["fit_diff"] < TOL
    assert run["fit_w_spec"] == "P(None, 'model')"


def test_sharded_checkpoint_restores_values_and_shardings(run):
    ck = run["ckpt"]
    assert ck["same_diff"] == 0.0 and ck["same_specs_equal"]
    assert ck["other_diff"] == 0.0 and ck["other_w_spec"] == "P()"  # resharded on restore
    assert ck["continue_diff"] == 0.0
    assert "_sharding" in ck["saved_files"]
    # jaxnet.checkpoint (what fit and `jaxnet train` write) of the same sharded state
    assert ck["fit_ckpt_diff"] == 0.0 and ck["fit_ckpt_specs_equal"]
    assert ck["fit_ckpt_whole_devices"] == 1


def test_batch_that_does_not_split_over_the_data_axis_is_refused(run):
    _needs_full(run)
    assert "does not split over the" in run["bad_batch_error"]
    assert f"divisible by {run['devices']}" in run["bad_batch_error"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_loopback_run_matches_one_process(tmp_path):
    """Both processes end with identical params, equal to one process's: for steps on
    batches assembled from each process's rows, and for fit (scanned and looped epochs)."""
    port = _free_port()
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, "multi-host", str(i), "2", str(port), str(outs[i])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
        for i, p in enumerate(procs):
            _, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, f"process {i} failed:\n{err[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    ref = tmp_path / "ref.npz"
    _run("reference", ref)
    a, b, r = (np.load(f) for f in (*outs, ref))
    # 6 params after make_train_step steps, 6 after fit (each process passing only its own
    # rows of the training and validation sets), the validation losses of fit's epochs
    assert len(a.files) == len(r.files) == 13
    for k in r.files:
        np.testing.assert_array_equal(a[k], b[k])  # both processes hold the same params
        np.testing.assert_allclose(a[k], r[k], rtol=0, atol=TOL)


def _train_on_two_processes(*args: str) -> list[str]:
    """`jaxnet train --hidden 8 --batch-size 64 --quiet ARGS` on two loopback processes
    (jax.distributed from the JAXNET_* variables); each one's last line of output."""
    port = _free_port()
    procs = []
    try:
        for i in range(2):
            env = {**_env(), "JAXNET_COORDINATOR": f"127.0.0.1:{port}",
                   "JAXNET_NUM_PROCESSES": "2", "JAXNET_PROCESS_ID": str(i)}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "jaxnet", "train", "--hidden", "8", "--batch-size", "64",
                 "--quiet", *[a.format(i=i) for a in args]],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        outs = []
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, f"process {i} failed:\n{err[-4000:]}"
            outs.append(out.strip().splitlines()[-1])  # gloo prints its own lines first
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return outs


def _result(line: str) -> str:
    return line.split("(")[0]  # "test accuracy A  test loss L"


def test_jaxnet_train_runs_on_two_processes_from_environment_variables(tmp_path):
    """The same `jaxnet train` command on two loopback processes: each loads its own rows,
    both end with the same test result, and process 0 writes the report. With
    --checkpoint-dir both write their shards of one orbax checkpoint per epoch, and a run
    resumed from epoch 2 ends where the uninterrupted 3-epoch run did."""
    ckpt = str(tmp_path / "ckpt")
    whole = _train_on_two_processes("--epochs", "3", "--report", str(tmp_path / "r{i}.json"),
                                    "--checkpoint-dir", ckpt)
    assert _result(whole[0]) == _result(whole[1]) and "test accuracy" in whole[0]
    report = json.loads((tmp_path / "r0.json").read_text())
    assert report["epochs_run"] == 3 and report["steps_per_epoch"] == 1257 // 64
    assert not (tmp_path / "r1.json").exists()
    assert sorted(os.listdir(ckpt)) == ["2", "3"]  # the newest two are kept
    resumed = _train_on_two_processes("--epochs", "3", "--checkpoint-dir", ckpt,
                                      "--resume-from", "2")
    assert _result(resumed[0]) == _result(resumed[1]) == _result(whole[0])


# --- in-process: rules, mesh and entry-point arguments --------------------------------

MESH = AbstractMesh((2, 4), (sharding.DATA, sharding.MODEL))
PARAMS = {"dense_0": {"w": np.zeros((8, 512)), "b": np.zeros(512)},
          "dense_1": {"w": np.zeros((512, 10)), "b": np.zeros(10)}}


def test_rules_match_parameter_paths_and_the_optimizer_state_follows():
    rules = sharding.dense_rules("dense_0")
    state = {"params": PARAMS, "opt_state": {"mu": PARAMS}}
    specs = sharding.param_specs(state, MESH, rules)
    assert specs["params"]["dense_0"]["w"] == P(None, "model")
    assert specs["opt_state"]["mu"]["dense_0"]["b"] == P("model")
    assert specs["params"]["dense_1"]["w"] == P()


def test_attention_rules_split_the_heads_of_a_transformer_block():
    block = jaxnet.TransformerBlock(4, 16, 128)
    params = jax.eval_shape(lambda k: block.init(k, (-1, 8, 64))[1], jax.random.key(0))
    specs = sharding.param_specs(params, MESH, sharding.attention_rules())
    att = specs["residual_0"]["attention_0"]
    assert att["query"]["w"] == att["key"]["w"] == att["value"]["w"] == P(None, "model")
    assert att["query"]["b"] == P("model") and att["out"]["w"] == P("model", None)
    assert att["out"]["b"] == P() and specs["residual_1"]["dense_0"]["w"] == P()


def test_wide_dense_rules_pick_layers_by_width():
    rules = sharding.wide_dense_rules(PARAMS, model=4, min_width=256)
    specs = sharding.param_specs(PARAMS, MESH, rules)
    assert specs["dense_0"]["w"] == P(None, "model") and specs["dense_1"]["w"] == P()


def test_rule_whose_axis_does_not_divide_names_the_path_and_shapes():
    with pytest.raises(ValueError, match=r"cannot shard 'dense_1/[bw]' of shape \((512, )?10,?\)"
                                         r".*axis 'model' of size 4"):
        sharding.param_specs(PARAMS, MESH, sharding.dense_rules("dense_1"))


def test_rule_with_more_axes_than_the_leaf_is_refused():
    with pytest.raises(ValueError, match=r"rule 'dense_0/b' → .* does not fit 'dense_0/b' of "
                                         r"shape \(512,\)"):
        sharding.param_specs(PARAMS, MESH, [("dense_0/b", P(None, "model"))])


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 64 devices"):
        sharding.make_mesh(data=16, model=4)
    with pytest.raises(ValueError, match="model axis"):
        sharding.make_mesh(model=0)


def test_distributed_entry_point_reads_flags_and_environment(monkeypatch):
    for k in ("JAXNET_COORDINATOR", "JAXNET_NUM_PROCESSES", "JAXNET_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert sharding.initialize_distributed() is False  # single process: nothing to do
    monkeypatch.setenv("JAXNET_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="needs all of coordinator, num_processes"):
        sharding.initialize_distributed()
    import argparse
    args = sharding.add_distributed_args(argparse.ArgumentParser()).parse_args(
        ["--num-processes", "2", "--process-id", "5"])
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        sharding.initialize_distributed(args=args)


def test_process_rows_split_the_batch_in_process_order():
    assert sharding.process_rows(12, 1, 3) == slice(4, 8)
    with pytest.raises(ValueError, match="do not split evenly over 3"):
        sharding.process_rows(10, 0, 3)
