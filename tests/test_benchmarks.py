"""The benchmark scripts run and write what the issue asks of them (tiny sizes; no timing is
checked: speed is measured by the benchmarks themselves, not by tests)."""

import importlib.util
import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    # registered as Python's docs do it: dataclasses (Equinox modules defined in the script)
    # look their module up in sys.modules
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_flops_per_step_counts_forward_and_two_backward_matmuls():
    peers = load("peers")
    # 6 · batch · Σ fan_in·fan_out: 784-128-10 at batch 128
    assert peers.flops_per_step([784, 128, 10], 128) == 6 * 128 * (784 * 128 + 128 * 10)


def test_peers_writes_the_json_the_issue_specifies(tmp_path, monkeypatch, capsys):
    peers = load("peers")
    monkeypatch.setitem(peers.CONFIGS, "small", ([16, 8, 4], 8))  # tiny: compile-bound
    monkeypatch.setattr(peers, "make_peak", lambda: _tiny_peak(peers))
    # the conv net (BatchNorm, pooling) and the transformer stack, tiny
    monkeypatch.setitem(peers.NET_CONFIGS, "cnn", dict(peers.NET_CONFIGS["cnn"], batch=4, hw=8,
                                                       chans=(2, 4)))
    monkeypatch.setitem(peers.NET_CONFIGS, "transformer", dict(
        peers.NET_CONFIGS["transformer"], batch=2, T=4, dim=8, heads=2, mlp=16, depth=1))
    out = tmp_path / "peers.json"
    peers.main(["--configs", "small,small_epoch,cnn,transformer", "--rounds", "2",
                "--target-ms", "1",
                "--variants", "pure_jax,jaxnet_auto,jaxnet_manual,stax",
                "--json", str(out), "--markdown", str(tmp_path / "peers.md")])
    result = json.loads(out.read_text())
    assert {"device", "versions", "peak_gflops", "rows"} <= set(result)
    assert result["complete"] and result["peak_gflops"] > 0
    rows = {(r["config"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {("small", v) for v in ("pure_jax", "jaxnet_auto", "jaxnet_manual",
                                                 "stax")} | {
        ("small_epoch", v) for v in ("pure_jax", "pure_jax_again", "pure_jax_scan",
                                     "jaxnet_step", "jaxnet_fit_scan")} | {
        (c, v) for c in ("cnn", "transformer")
        for v in ("pure_jax", "jaxnet_auto", "jaxnet_manual")}  # stax: MLP only
    for row in rows.values():
        for key in ("median_us", "ratio_to_pure_jax", "gflops", "fraction_of_peak"):
            assert row[key] > 0, (row["variant"], key)
    assert rows[("small", "pure_jax")]["ratio_to_pure_jax"] == 1.0
    for config in ("cnn", "transformer"):
        assert rows[(config, "pure_jax")]["ratio_to_pure_jax"] == 1.0
        assert rows[(config, "jaxnet_auto")]["widths"] is None
        assert rows[(config, "jaxnet_auto")]["net"] == peers.net_describe(
            peers.NET_CONFIGS[config])
        assert rows[(config, "jaxnet_auto")]["gflops"] == pytest.approx(
            peers.net_flops(peers.NET_CONFIGS[config]) / rows[(config, "jaxnet_auto")][
                "median_us"] / 1e3)
    md = (tmp_path / "peers.md").read_text()
    assert "| small | jaxnet_auto |" in md and "| cnn | jaxnet_manual |" in md
    assert "| transformer | jaxnet_auto |" in md


def _tiny_peak(peers):
    import jax.numpy as jnp

    a = jnp.ones((64, 64), jnp.float32)

    def run(k):
        out = None
        for _ in range(k):
            out = jnp.dot(a, a)
        return peers.sync(out)

    return run, 2 * 64 ** 3


@pytest.mark.parametrize("depth", [4])
def test_remat_memory_reports_memory_with_and_without_remat(tmp_path, depth):
    remat_memory = load("remat_memory")
    out = tmp_path / "remat.json"
    remat_memory.main(["--depths", str(depth), "--width", "16", "--batch", "8", "--rounds", "1",
                       "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"none", "remat", "remat_dots_saveable"}
    for r in rows:
        assert r["temp_mib"] >= 0 and r["peak_mib"] > 0 and r["matmuls_compiled"] > 0
    by = {r["variant"]: r for r in rows}
    # remat hands XLA the recomputed forward matmuls: more than without
    assert by["remat"]["matmuls_lowered"] > by["none"]["matmuls_lowered"]


def test_manual_vs_autodiff_writes_three_paths_for_every_net(tmp_path, monkeypatch):
    bench = load("manual_vs_autodiff")
    monkeypatch.setattr(bench, "QUICK", {"depth": [1], "width": [8], "activation": ["relu"],
                                         "batch": [4]})
    monkeypatch.setattr(bench, "BASE", {"depth": 1, "width": 8, "activation": "relu",
                                        "batch": 4})
    monkeypatch.setitem(bench.NET_QUICK, "cnn2d", [{"stages": 1, "width": 2, "batch": 2}])
    monkeypatch.setattr(bench, "MEMORY_POINTS", [{"T": 8, "batch": 1, "heads": 1,
                                                  "causal": True}])
    monkeypatch.setattr(bench, "MEMORY_BLOCK_SIZES", (4,))
    out = tmp_path / "m.json"
    bench.main(["--quick", "--nets", "mlp,cnn2d", "--attention-memory", "--no-nojit",
                "--budget", "0.01", "--rounds", "3", "--json", str(out),
                "--plot", str(tmp_path / "m.png")])
    result = json.loads(out.read_text())
    columns = {"us", "ratio", "ratio_min", "ratio_max", "compile_s", "temp_bytes", "peak_bytes",
               "kernels", "flops", "bytes_accessed", "max_rel_grad_diff", "same_as",
               "op_diff_vs_plain"}
    (mlp,) = result["rows"]  # the MLP rows keep their original fields, and gain the paths
    for key in ("manual_us", "autodiff_us", "ratio", "compile_manual_s", "manual_peak_bytes",
                "autodiff_peak_bytes", "max_rel_grad_diff", "flops", "manual_fusions"):
        assert key in mlp, key
    assert set(mlp["paths"]) == {"manual", "jaxnet_autodiff", "plain_autodiff"}
    (conv,) = result["net_rows"]
    assert conv["net"] == "cnn2d" and set(conv["paths"]) == set(mlp["paths"])
    (att,) = result["attention_memory"]["points"]
    assert set(att["paths"]) == {"manual_store", "manual_recompute", "jaxnet_autodiff",
                                 "plain_autodiff", "plain_checkpoint"}
    assert set(att["recompute_memory_by_block_size"]) == {"4"}
    assert att["targets"]["recompute_peak_vs_plain"] > 0
    for row in (mlp, conv, att):
        for name, col in row["paths"].items():
            assert columns <= set(col), (name, columns - set(col))
            assert col["us"] > 0 and col["peak_bytes"] > 0 and col["kernels"] > 0
            assert col["max_rel_grad_diff"] < 1e-3, (name, col["max_rel_grad_diff"])
        assert row["paths"]["plain_autodiff"]["ratio"] == 1.0
    assert (tmp_path / "m.png").exists() and (tmp_path / "m_nets.png").exists()
    bench.main(["--tables-from", str(out), "--plot", str(tmp_path / "again.png")])  # from JSON
    assert (tmp_path / "again.png").exists() and (tmp_path / "again_nets.png").exists()
    # the README's table: one row per point, the ratios and memory read from the JSON
    summary = bench.summary_table(result).splitlines()
    assert len(summary) == 2 + 3
    assert summary[2].startswith("| MLP d1 w8 relu b4 | ")
    cells = summary[4].split(" | ")  # the attention point: store / recompute, jaxnet, checkpoint
    paths = att["paths"]
    assert cells[1] == f"{paths['manual_store']['ratio']:.2f} / " \
                       f"{paths['manual_recompute']['ratio']:.2f}"
    assert cells[3] == f"{paths['plain_checkpoint']['ratio']:.2f}"
    assert cells[4].split(" / ")[1] == f"{paths['manual_recompute']['temp_bytes'] / 2**20:.1f}"


def test_step_overhead_compares_the_lean_step_with_the_whole_state_step(tmp_path):
    bench = load("step_overhead")
    out = tmp_path / "o.json"
    bench.main(["--configs", "tiny", "--rounds", "2", "--target-ms", "1", "--json", str(out),
                "--markdown", str(tmp_path / "o.md")])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"pure_jax", "pure_jax_again", "pure_jax_dict_params", "whole_state",
                         "jaxnet",
                         "whole_state_dropout", "jaxnet_dropout"}
    assert rows["pure_jax"]["ratio_to_pure_jax"] == 1.0 and rows["pure_jax"]["overhead_us"] == 0
    for r in rows.values():
        assert r["median_us"] > 0 and r["ratio_q25"] <= r["ratio_q75"]
    assert "| tiny | jaxnet |" in (tmp_path / "o.md").read_text()
