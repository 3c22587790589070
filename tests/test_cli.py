"""`jaxnet train`: flags, reports, checkpoints, and one-line errors for bad input."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxnet.train
from jaxnet import checkpoint, cli

TINY = ["--hidden", "12", "--batch-size", "64", "--lr", "0.01", "--quiet"]


def train(*args):
    return cli.main(["train", *TINY, *args])


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """An uninterrupted 3-epoch run on digits with a report and a plot (and its stdout)."""
    d = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["train", *TINY[:-1], "--epochs", "3", "--report", str(d / "r.json"),
                         "--plot", str(d / "p.png")])
    return code, d, out.getvalue()


@pytest.fixture(scope="module")
def two_epoch_checkpoint(tmp_path_factory):
    """Checkpoints of the first 2 epochs of the same run."""
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    assert train("--epochs", "2", "--checkpoint-dir", ckpt) == 0
    return ckpt


def test_a_run_writes_the_report_and_the_plot(three_epochs):
    code, d, _ = three_epochs
    assert code == 0
    report = json.loads((d / "r.json").read_text())
    for key in ("test_accuracy", "test_loss", "epochs_run", "train_seconds", "steps_per_second",
                "param_count", "depth", "width", "device", "versions"):
        assert report[key] is not None, key
    assert report["epochs_run"] == 3 and report["depth"] == 1 and report["width"] == 12
    assert report["param_count"] == 64 * 12 + 12 + 12 * 10 + 10
    assert 0.5 < report["test_accuracy"] <= 1
    assert report["data"]["train"] == 1257 and report["data"]["test"] == 360
    assert set(report["versions"]) >= {"jax", "optax", "python"}
    assert len(report["history"]["val_accuracy"]) == 3
    assert (d / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_documents_every_flag(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--label-column", "--hidden", "--depth", "--width", "--activation",
                 "--output-activation", "--optimizer", "--lr", "--schedule", "--batch-size",
                 "--epochs", "--patience", "--seed", "--grad", "--checkpoint-dir", "--resume",
                 "--report", "--plot", "--quiet"):
        assert flag in text, flag


def write_npz(path, x, y):
    np.savez(path, x=x, y=y)
    return str(path)


def bad_inputs(tmp):
    x = np.random.default_rng(0).normal(size=(40, 3))
    y = np.arange(40) % 3
    nan_x = x.copy()
    nan_x[7, 1] = np.nan
    csv = tmp / "d.csv"
    csv.write_text("a,b,label\n1,2,0\n3,4,1\n")
    return {
        "labels outside [0, classes)": (["--data", write_npz(tmp / "a.npz", x, y),
                                         "--classes", "2"], "label 2 in row 2 is outside [0, 2)"),
        "negative label": (["--data", write_npz(tmp / "b.npz", x, np.where(y == 1, -1, y))],
                           "label -1 in row 1 is outside"),
        "lengths differ": (["--data", write_npz(tmp / "c.npz", x, y[:-1])],
                           "different lengths (40 rows of features, 39 labels)"),
        "NaN in data": (["--data", write_npz(tmp / "d.npz", nan_x, y)], "NaN or infinity (first "
                                                                        "in row 7"),
        "empty data set": (["--data", write_npz(tmp / "e.npz", x[:0], y[:0])], "empty"),
        "unknown data set": (["--data", "imagenet"], "unknown data set 'imagenet'"),
        "unknown optimizer": (["--optimizer", "adagrad"], "unknown optimizer 'adagrad'"),
        "unknown activation": (["--activation", "swish"], "unknown hidden activation 'swish'"),
        "unknown output activation": (["--output-activation", "sigmoid"],
                                      "output activation 'sigmoid' does not fit classification"),
        "bad widths": (["--hidden", "64,x"], "--hidden must be comma-separated integers"),
        "depth without width": (["--depth", "3"], "--depth and --width go together"),
        "negative learning rate": (["--lr", "-0.1"], "--lr must be a positive number"),
        "dropout of one": (["--dropout", "1"], "--dropout is the probability of dropping"),
        "zero batch": (["--batch-size", "0"], "--batch-size must be at least 1"),
        "batch too big": (["--batch-size", "5000"], "larger than the 1257 training rows"),
        "resume without a directory": (["--resume"], "--resume needs --checkpoint-dir"),
        "resume from nothing": (["--resume", "--checkpoint-dir", str(tmp / "none")],
                                "no checkpoint directory"),
        "csv without a label column": (["--data", str(csv)], "name the label column"),
        "csv with a wrong label column": (["--data", str(csv), "--label-column", "y"],
                                          "no column named 'y'"),
        "unknown flag": (["--epoch", "3"], "unrecognized arguments"),
        "not a number": (["--epochs", "many"], "invalid int value"),
    }


@pytest.mark.parametrize("case", [
    "labels outside [0, classes)", "negative label", "lengths differ", "NaN in data",
    "empty data set", "unknown data set", "unknown optimizer", "unknown activation",
    "unknown output activation", "bad widths", "depth without width", "negative learning rate",
    "dropout of one", "zero batch", "batch too big", "resume without a directory",
    "resume from nothing", "csv without a label column", "csv with a wrong label column",
    "unknown flag", "not a number"])
def test_bad_input_is_one_line_and_exit_code_2_before_training(case, tmp_path, capsys,
                                                                monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(jaxnet.train, "fit", no_training)
    args, message = bad_inputs(tmp_path)[case]
    report = tmp_path / "report.json"
    assert cli.main(["train", *args, "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxnet train: error: "), err
    assert message in err
    assert not report.exists()


def test_a_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                                    capsys):
    ckpt = tmp_path / "ckpt"
    code = cli.main(["train", "--data", "minimal", "--hidden", "", "--optimizer", "sgd",
                     "--lr", "0.1", "--epochs", "20", "--patience", "0", "--quiet",
                     "--checkpoint-dir", str(ckpt),
                     "--report", str(tmp_path / "r.json")])
    assert code == 1
    err = capsys.readouterr().err
    assert "the loss became NaN (or infinite) at epoch 3, step 49" in err
    assert checkpoint.latest_epoch(str(ckpt)) == 2
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["stop_reason"] == "nan" and report["nan_at"] == {"epoch": 3, "step": 49}
    assert report["test_accuracy"] is None and np.isfinite(report["test_loss"])


def test_resume_continues_to_the_same_result_as_an_uninterrupted_run(three_epochs, tmp_path,
                                                                      two_epoch_checkpoint):
    d = three_epochs[1]
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(two_epoch_checkpoint, ckpt)
    assert checkpoint.latest_epoch(ckpt) == 2
    assert train("--epochs", "3", "--checkpoint-dir", ckpt, "--resume",
                 "--report", str(tmp_path / "r.json")) == 0
    resumed = json.loads((tmp_path / "r.json").read_text())
    whole = json.loads((d / "r.json").read_text())
    assert resumed["resumed"] and resumed["epochs_run"] == 3
    assert resumed["test_loss"] == whole["test_loss"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert resumed["history"][key] == whole["history"][key]
    assert checkpoint.latest_epoch(ckpt) == 3


def test_resume_refuses_a_checkpoint_of_another_run(two_epoch_checkpoint, capsys):
    ckpt = two_epoch_checkpoint
    assert cli.main(["train", "--hidden", "13", "--batch-size", "64", "--lr", "0.01",
                     "--epochs", "2", "--checkpoint-dir", ckpt, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "'params/dense_0/b' has shape (12,)" in err and err.count("\n") == 1
    assert train("--epochs", "2", "--seed", "5", "--checkpoint-dir", ckpt, "--resume") == 2
    assert "trained with seed = 0, this run has 5" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_the_report_so_far(tmp_path, monkeypatch, capsys):
    lines = cli._epoch_line

    def interrupt_in_epoch_2(record, epochs):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
        return lines(record, epochs)

    monkeypatch.setattr(cli, "_epoch_line", interrupt_in_epoch_2)
    ckpt, report = str(tmp_path / "ckpt"), tmp_path / "r.json"
    code = cli.main(["train", "--hidden", "12", "--batch-size", "64", "--epochs", "5",
                     "--checkpoint-dir", ckpt, "--report", str(report)])
    assert code == 130
    assert checkpoint.latest_epoch(ckpt) == 2
    saved = json.loads(report.read_text())
    assert saved["stop_reason"] == "interrupted" and saved["epochs_run"] == 2
    assert "interrupted after epoch 2" in capsys.readouterr().err


def test_per_epoch_lines_unless_quiet_and_no_bar_off_a_terminal(three_epochs, capsys):
    out = three_epochs[2]
    assert "epoch   1/3" in out and "epoch   3/3" in out and "test accuracy" in out
    assert cli.main(["train", *TINY, "--epochs", "1", "--batch-size", "2000"]) == 2
    assert train("--epochs", "0") == 0  # --quiet: only the result line
    out, err = capsys.readouterr()
    assert "epoch " not in out and "test accuracy" in out
    assert "epoch/s" not in err and "it/s" not in err  # tqdm stays quiet off a terminal


def test_a_csv_file_with_a_label_column_trains(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    x = rng.normal(size=(60, 2)) + 3 * y[:, None]
    rows = ["f1,kind,f2"] + [f"{a:.4f},{'yes' if t else 'no'},{b:.4f}"
                             for (a, b), t in zip(x, y)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    report = tmp_path / "r.json"
    assert cli.main(["train", "--data", str(tmp_path / "d.csv"), "--label-column", "kind",
                     "--hidden", "4", "--batch-size", "8", "--epochs", "2", "--quiet",
                     "--report", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert saved["data"]["features"] == 2 and saved["data"]["classes"] == 2
    assert saved["data"]["train"] + saved["data"]["val"] + saved["data"]["test"] == 60


def test_dropout_trains_the_same_with_manual_and_auto_gradients(tmp_path):
    # the same per-step dropout keys (fold_in(key, step)) in both backward passes
    reports = {}
    for grad in ("auto", "manual"):
        path = tmp_path / f"{grad}.json"
        assert train("--epochs", "2", "--dropout", "0.3", "--grad", grad,
                     "--report", str(path)) == 0
        reports[grad] = json.loads(path.read_text())
    assert reports["auto"]["config"]["dropout"] == 0.3
    np.testing.assert_allclose(reports["manual"]["history"]["batch_loss"],
                               reports["auto"]["history"]["batch_loss"], rtol=1e-9)
    assert reports["auto"]["test_accuracy"] > 0.5


def test_python_dash_m_jaxnet_train_runs(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "jaxnet", "train", "--hidden", "8",
                           "--epochs", "1", "--batch-size", "128", "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout


# --- faults: issue 14 ------------------------------------------------------------------

def bad_files_and_outputs(tmp):
    """Inputs and outputs refused before training, with the message each must contain."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), np.arange(40) % 3
    (tmp / "x.csv").mkdir()
    (tmp / "empty.npz").write_bytes(b"")
    good = write_npz(tmp / "good.npz", x, y)
    (tmp / "cut.npz").write_bytes(open(good, "rb").read()[:300])
    np.save(tmp / "arr.npy", x)
    os.rename(tmp / "arr.npy", tmp / "arr.npz")
    (tmp / "noise.npz").write_bytes(rng.bytes(500))
    np.savez(tmp / "objects.npz", x=np.array([{"a": 1}] * 40, dtype=object), y=y)
    (tmp / "latin.csv").write_bytes("a,label\n1,0\n2,1\ncaf\xe9,0\n".encode("latin-1"))
    (tmp / "big.csv").write_text("a,label\n1,0\n1e39,1\n2,0\n3,1\n")
    (tmp / "blank.csv").write_text("a,label\n1,0\n\n2,1\nfoo,0\n")
    write_npz(tmp / "complex.npz", x + 1j, y)
    write_npz(tmp / "typo.npz", x, np.where(np.arange(40) == 17, 100000, y))
    write_npz(tmp / "one.npz", x, np.zeros(40, int))
    (tmp / "file").write_text("")
    os.symlink(tmp / "nowhere", tmp / "dangling")
    return {
        "report is a directory": (["--report", str(tmp)], "is a directory; give a file name"),
        "report under a file": (["--report", str(tmp / "file" / "r.json")],
                                "is a file, so nothing can be created under it"),
        "unknown plot format": (["--plot", str(tmp / "p.xyz")], "unknown image format .xyz"),
        "checkpoint dir is a file": (["--checkpoint-dir", str(tmp / "file")],
                                     "is a file, not a directory"),
        "checkpoint dir dangles": (["--checkpoint-dir", str(tmp / "dangling")],
                                   "is a symbolic link to"),
        "directory named x.csv": (["--data", str(tmp / "x.csv")], "is a directory, not a data"),
        "empty npz": (["--data", str(tmp / "empty.npz")], "empty.npz: the file is empty"),
        "truncated npz": (["--data", str(tmp / "cut.npz")], "cut.npz: not a .npz archive"),
        "npy renamed npz": (["--data", str(tmp / "arr.npz")], "a single .npy array"),
        "random bytes": (["--data", str(tmp / "noise.npz")], "noise.npz: not a .npz archive"),
        "pickled objects": (["--data", str(tmp / "objects.npz")], "holds Python objects"),
        "latin-1 bytes": (["--data", str(tmp / "latin.csv"), "--label-column", "label"],
                          "latin.csv: line 4 is not UTF-8 text (byte 0xe9 at column 4)"),
        "1e39 overflows float32": (["--data", str(tmp / "big.csv"), "--label-column", "label"],
                                   "hold 1e+39 in line 3, beyond float32"),
        "lines counted in the file": (["--data", str(tmp / "blank.csv"), "--label-column",
                                       "label"], "line 5, column 'a': 'foo' is not a number"),
        "complex inputs": (["--data", str(tmp / "complex.npz")], "features are complex numbers"),
        "a typo label": (["--data", str(tmp / "typo.npz")],
                         "the largest label, 100000 in row 17, makes 100001 classes, but only 4"),
        "one class": (["--data", str(tmp / "one.npz")], "one class"),
        "seed out of range": (["--seed", str(2**64 + 1)], "--seed must be in [0, "),
        "negative split seed": (["--split-seed", "-1"], "--split-seed must be in [0, "),
        "label column of a built-in set": (["--label-column", "y"], "--label-column is for a"),
        "resume from a missing epoch": (["--resume-from", "7", "--checkpoint-dir", str(tmp)],
                                        "no checkpoint for epoch 7"),
    }


@pytest.mark.parametrize("case", [
    "report is a directory", "report under a file", "unknown plot format",
    "checkpoint dir is a file", "checkpoint dir dangles", "directory named x.csv", "empty npz",
    "truncated npz", "npy renamed npz", "random bytes", "pickled objects", "latin-1 bytes",
    "1e39 overflows float32", "lines counted in the file", "complex inputs", "a typo label",
    "one class", "seed out of range", "negative split seed", "label column of a built-in set",
    "resume from a missing epoch"])
def test_bad_files_and_outputs_are_one_line_and_exit_code_2_before_training(
        case, tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(jaxnet.train, "fit", no_training)
    args, message = bad_files_and_outputs(tmp_path)[case]
    assert cli.main(["train", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxnet train: error: "), err
    assert message in err, err


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    rows = ["a,label"] + [f"{i},{i % 2}" for i in range(20)]
    (tmp_path / "bom.csv").write_bytes(("\n".join(rows) + "\n").encode("utf-8-sig"))
    data = jaxnet.datasets.load(str(tmp_path / "bom.csv"), label_column="label")
    assert data.num_classes == 2 and sum(data.sizes.values()) == 20


def test_nan_in_epoch_metrics_stops_the_run_and_the_report_is_strict_json(tmp_path, capsys):
    ckpt, report = tmp_path / "ckpt", tmp_path / "r.json"
    code = cli.main(["train", "--optimizer", "sgd", "--lr", "1e6",  # the run
                     "--batch-size", "1257", "--epochs", "4", "--quiet", "--report", str(report),
                     "--checkpoint-dir", str(ckpt)])
    assert code == 1
    assert "the loss became NaN (or infinite)" in capsys.readouterr().err

    def no_constants(name):
        raise AssertionError(f"{name} in the report")

    saved = json.loads(report.read_text(), parse_constant=no_constants)
    assert saved["stop_reason"] == "nan"
    for values in saved["history"].values():  # no epoch with a NaN metric is kept
        assert all(v is not None for v in values)
    kept = checkpoint.latest_epoch(str(ckpt))
    assert kept == saved["epochs_run"] and saved["nan_at"]["epoch"] == kept + 1


def test_five_rows_with_batch_2_train_without_early_stopping(tmp_path, capsys):
    (tmp_path / "five.csv").write_text("a,b,label\n1,0,0\n0,1,1\n1,1,0\n0,0,1\n2,1,0\n")
    code = cli.main(["train", "--data", str(tmp_path / "five.csv"), "--label-column", "label",
                     "--hidden", "4", "--batch-size", "2", "--epochs", "2", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "test loss" in out
    assert "leave none for validation, so early stopping (--patience) is off" in err


def test_a_report_that_cannot_be_written_comes_after_the_results(tmp_path, capsys, monkeypatch):
    def full_disk(path, report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_write_json", full_disk)
    assert train("--epochs", "1", "--report", str(tmp_path / "r.json")) == 1
    out, err = capsys.readouterr()
    assert "test accuracy" in out
    assert err.startswith("jaxnet train: error: could not write --report") and \
        "No space left on device" in err


def test_a_damaged_newest_checkpoint_is_skipped_on_resume_and_named(two_epoch_checkpoint,
                                                                    tmp_path, capsys):
    from test_checkpoint import flip_byte, largest_file

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(two_epoch_checkpoint, ckpt)
    flip_byte(largest_file(os.path.join(ckpt, "2", "state")))
    assert train("--epochs", "2", "--checkpoint-dir", ckpt, "--resume-from", "2") == 2
    err = capsys.readouterr().err
    assert "the checkpoint of epoch 2 is damaged" in err and err.count("\n") == 1
    assert "--resume-from one of the other saved epochs (1)" in err
    assert train("--epochs", "2", "--checkpoint-dir", ckpt, "--resume") == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "resuming from epoch 1, the newest intact checkpoint" in err
    progress, _ = checkpoint.restore_checkpoint(ckpt, jaxnet.train.init_state(
        jaxnet.mlp([12], 10, "relu", "log_softmax"), jaxnet.train.make_optimizer("adam", 0.01),
        0, (-1, 64), dtype=np.float32))
    assert progress.epoch == 2  # epoch 2 trained again and swapped in, intact


def test_a_second_ctrl_c_during_the_save_waits_for_it(tmp_path, monkeypatch, capsys):
    import signal

    real_save = checkpoint.save_checkpoint

    def save_under_fire(directory, progress, meta=None, **kw):
        if progress.epoch == 2:  # Ctrl-C twice while the checkpoint is being written
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(directory, progress, meta, **kw)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_under_fire)
    ckpt = str(tmp_path / "ckpt")
    assert train("--epochs", "5", "--checkpoint-dir", ckpt) == 130
    err = capsys.readouterr().err
    assert "interrupted after epoch 2" in err and "before training started" not in err
    assert checkpoint.latest_epoch(ckpt) == 2
    assert sorted(os.listdir(ckpt)) == ["1", "2"]  # intact, no staging, lock released


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}  # with conftest's JAX_DISABLE_MOST_OPTIMIZATIONS


def test_sigterm_saves_a_checkpoint_and_the_report_and_exits_143(tmp_path):
    import signal
    import time

    ckpt, report = tmp_path / "ckpt", tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "jaxnet", "train", *TINY, "--epochs", "100000",
                             "--patience", "0", "--checkpoint-dir", str(ckpt),
                             "--report", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 120
        while not (ckpt / "2").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "jaxnet train: terminated (SIGTERM) after epoch" in err and "report in" in err
    saved = json.loads(report.read_text())
    assert saved["stop_reason"] == "terminated"
    assert checkpoint.latest_epoch(str(ckpt)) == saved["epochs_run"] >= 2
    assert checkpoint.LOCK_FILE not in os.listdir(ckpt)


def test_a_second_writer_of_a_checkpoint_directory_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    with checkpoint.DirectoryLock(ckpt):  # a run of this process is writing there
        done = subprocess.run([sys.executable, "-m", "jaxnet", "train", *TINY, "--epochs", "1",
                               "--checkpoint-dir", ckpt], capture_output=True, text=True,
                              timeout=300, env=_env())
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"{ckpt} is in use by another run (pid " \
        f"{os.getpid()}" in done.stderr, done.stderr
    assert os.listdir(ckpt) == []


# --- models: --model cnn / transformer, --batch-norm (issues 11 and 12) ---------------

# (an MLP with --batch-norm: the resume test below; the digits CNN: examples/digits_cnn.py's test)
@pytest.mark.parametrize("args", [
    ["--model", "cnn", "--data", "mnist1d", "--batch-norm"],
    ["--model", "transformer", "--data", "mnist1d"],
], ids=["cnn-bn-mnist1d", "transformer-mnist1d"])
def test_every_model_trains_and_reports_its_shape(args, tmp_path):
    report = tmp_path / "r.json"
    assert cli.main(["train", "--quiet", "--epochs", "1", "--batch-size", "128", "--lr", "3e-3",
                     *args, "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["config"]["model"] == (args[1] if args[0] == "--model" else "mlp")
    assert r["config"]["batch_norm"] == ("--batch-norm" in args)
    assert r["test_accuracy"] > 0.15  # one short epoch: better than chance (0.1)


def test_a_batch_norm_run_resumes_to_the_same_result_with_its_running_statistics(tmp_path):
    straight, resumed = tmp_path / "s.json", tmp_path / "r.json"
    ckpt = str(tmp_path / "ckpt")
    common = ["--batch-norm", "--patience", "2"]
    assert train(*common, "--epochs", "3", "--report", str(straight)) == 0
    assert train(*common, "--epochs", "2", "--checkpoint-dir", ckpt) == 0
    assert train(*common, "--epochs", "3", "--checkpoint-dir", ckpt, "--resume",
                 "--report", str(resumed)) == 0
    a, b = json.loads(straight.read_text()), json.loads(resumed.read_text())
    assert a["test_loss"] == b["test_loss"] and a["history"] == {
        k: v for k, v in b["history"].items()} | {"seconds": a["history"]["seconds"]}


def test_model_flags_that_do_not_fit_are_refused(capsys):
    assert train("--model", "cnn", "--data", "minimal") == 2
    assert "classifier" in capsys.readouterr().err
    assert cli.main(["train", "--model", "transformer", "--batch-norm", "--data", "mnist1d"]) == 2
    assert "--batch-norm is for" in capsys.readouterr().err
