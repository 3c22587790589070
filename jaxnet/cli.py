"""The command line: ``jaxnet train`` (also ``python -m jaxnet train``).

Trains an MLP on a built-in data set or a user's file, with a progress bar,
per-epoch metrics, a final test accuracy, optional checkpoints, a JSON report
and a PNG of the learning curves. ``jaxnet train --help`` lists every flag.

Exit codes: 0 done; 2 bad input, unwritable outputs or an unusable checkpoint
(a one-line error before training starts); 1 the loss became NaN (the last
good checkpoint is kept), or a result file could not be written at the end
(the results are printed first); 130 interrupted by Ctrl-C and 143 by SIGTERM
(what a cluster sends before preempting a job): a checkpoint and the report
so far are written first, and further signals during that save wait for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]

DEFAULTS = {"data": "digits", "hidden": "128,128", "activation": "relu", "optimizer": "adam",
            "lr": 1e-3, "schedule": "constant", "batch_size": 32, "epochs": 40, "patience": 8,
            "seed": 0, "grad": "auto", "epoch_mode": "scan", "split_seed": 42}

# Settings a resumed run must share with the checkpoint's run.
_RESUME_KEYS = ("data", "label_column", "classes", "split_seed", "model", "batch_norm",
                "hidden", "activation", "output_activation", "dropout", "optimizer", "lr",
                "schedule", "batch_size", "seed", "grad")
# What a checkpoint written before a setting existed had (the MLP without BatchNorm).
_RESUME_WAS = {"dropout": 0.0, "model": "mlp", "batch_norm": False}
# Training settings each --model uses unless given (the MLP's are DEFAULTS): the CNN and the
# transformer train on mnist1d with the MNIST-1D paper's Adam 1e-2 / batch 100 regime, cosine
# decay, and more epochs (measured results in the README).
MODEL_DEFAULTS = {
    "mlp": {},
    "cnn": {"lr": 1e-2, "batch_size": 100, "schedule": "cosine", "epochs": 150, "patience": 40},
    "transformer": {"lr": 3e-3, "batch_size": 100, "schedule": "cosine", "epochs": 60,
                    "patience": 20},
}
_PER_MODEL = ("lr", "batch_size", "schedule", "epochs", "patience")


def _fill_model_defaults(args) -> None:
    """The training settings left unset take ``--model``'s defaults (then the MLP's)."""
    for key in _PER_MODEL:
        if getattr(args, key) is None:
            setattr(args, key, MODEL_DEFAULTS[args.model].get(key, DEFAULTS[key]))


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset ones (None, False) whose help says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxnet`` argument parser (sub-command ``train``)."""
    parser = _Parser(prog="jaxnet", description="jaxnet: neural nets on JAX.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    t = sub.add_parser(
        "train", help="train an MLP on a data set", allow_abbrev=False,
        description="Train a deep MLP with optax and report its test accuracy. With no flags: "
                    "2 hidden layers of 128 ReLU units on scikit-learn's digits, Adam 1e-3, "
                    "batch 32, up to 40 epochs with early stopping (patience 8).",
        formatter_class=_Formatter)
    d = t.add_argument_group("data")
    d.add_argument("--data", default=DEFAULTS["data"], metavar="NAME|PATH",
                   help="built-in data set (digits, mnist1d, mnist5k, minimal) or a file: "
                        "PATH.npz with arrays x and y, or PATH.csv with a header row")
    d.add_argument("--label-column", default=None, metavar="NAME",
                   help="the label column of a CSV file (the other columns are features)")
    d.add_argument("--classes", type=int, default=None, metavar="K",
                   help="number of classes of a user's file (default: largest label + 1)")
    d.add_argument("--split-seed", type=int, default=DEFAULTS["split_seed"],
                   help="seed of the train/validation/test split (70/10/20 %%)")
    n = t.add_argument_group("network")
    n.add_argument("--model", default="mlp", choices=("mlp", "cnn", "transformer"),
                   help="mlp (--hidden, --activation); cnn: for mnist1d (and any 1-d signal) "
                        "the MNIST-1D paper's CNN (3 Conv1D of 25 channels, kernels 5/3/3, "
                        "stride 2), for digits (8x8 images) 3x3 convolutions of 32, 32 and 64 "
                        "channels (the last two stride 2); transformer: the features as a "
                        "sequence (width 32, 2 blocks, 4 heads)")
    n.add_argument("--batch-norm", action="store_true",
                   help="a BatchNorm after every hidden Dense (mlp) or convolution (cnn), "
                        "before its activation; its running statistics are model state, used "
                        "in evaluation and saved in checkpoints")
    n.add_argument("--hidden", default=None, metavar="W1,W2,...",
                   help=f"hidden layer widths, comma-separated (default {DEFAULTS['hidden']}); "
                        "'' for none")
    n.add_argument("--depth", type=int, default=None,
                   help="number of hidden layers (with --width, instead of --hidden)")
    n.add_argument("--width", type=int, default=None, help="units per hidden layer (with --depth)")
    n.add_argument("--activation", default=DEFAULTS["activation"],
                   help="hidden activation: sigmoid, tanh, relu, leaky_relu, elu, gelu, softplus, "
                        "silu, identity")
    n.add_argument("--output-activation", default=None,
                   help="output activation: log_softmax (default for classes; loss: softmax "
                        "cross-entropy), softmax (loss: cross-entropy of probabilities) or "
                        "identity (logits; default for regression, loss: L2)")
    n.add_argument("--dropout", type=float, default=0.0, metavar="RATE",
                   help="probability of dropping a hidden unit in training (a Dropout after "
                        "every hidden activation; off in evaluation)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--optimizer", default=DEFAULTS["optimizer"],
                   help="sgd, momentum (0.9), adam, adamw, rmsprop")
    o.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=None,
                   help=f"learning rate (default {DEFAULTS['lr']}; cnn 1e-2, transformer 3e-3)")
    o.add_argument("--schedule", default=None,
                   help="learning-rate schedule (default constant; cnn and transformer: "
                        "cosine): constant, cosine (to 0 over the run), "
                        "warmup-cosine (5 %% warm-up), exponential (x0.95 per epoch)")
    o.add_argument("--batch-size", type=int, default=None,
                   help=f"rows per step (each epoch takes the full batches of a reshuffle; "
                        f"default {DEFAULTS['batch_size']}, cnn and transformer 100)")
    o.add_argument("--epochs", type=int, default=None,
                   help=f"maximum epochs (default {DEFAULTS['epochs']}, cnn 150, "
                        f"transformer 60)")
    o.add_argument("--patience", type=int, default=None,
                   help=f"stop after this many epochs without a lower validation loss and keep "
                        f"the best params (0: no early stopping; default "
                        f"{DEFAULTS['patience']}, cnn 40, transformer 20)")
    o.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed of the initial params and the shuffles")
    o.add_argument("--grad", default=DEFAULTS["grad"], choices=("auto", "manual"),
                   help="gradients by jax.grad (auto) or jaxnet's hand-written backward pass "
                        "(manual)")
    o.add_argument("--epoch-mode", default=DEFAULTS["epoch_mode"], choices=("scan", "loop"),
                   help="run each epoch as one compiled lax.scan (scan) or as a Python loop of "
                        "compiled steps (loop)")
    r = t.add_argument_group("output")
    r.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save a checkpoint (orbax, checksummed) every --checkpoint-every "
                        "epochs, on Ctrl-C or SIGTERM and at the end; the run locks the directory")
    r.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="epochs between checkpoints")
    r.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --checkpoint-dir (a "
                        "damaged newest one is skipped, saying so)")
    r.add_argument("--resume-from", type=int, default=None, metavar="EPOCH",
                   help="continue from the checkpoint of this epoch in --checkpoint-dir")
    r.add_argument("--report", default=None, metavar="PATH",
                   help="write a JSON report (test accuracy and loss, epochs, time, steps/s, "
                        "params, depth, width, device, versions, history)")
    r.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of the learning curves (loss and accuracy by epoch)")
    r.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-epoch lines (the bar also hides when "
                        "stderr is not a terminal)")
    from .sharding import add_distributed_args

    add_distributed_args(t)
    t.add_argument_group("several hosts (jax.distributed)").add_argument(
        "--data-parallel", action="store_true",
        help="split every batch over all devices (a jax.sharding mesh; params replicated); "
             "on by itself with several processes, each loading its own rows")
    return parser


# --- checking the arguments -----------------------------------------------------------

def _hidden_widths(args) -> list[int]:
    if args.hidden is not None and (args.depth is not None or args.width is not None):
        raise UsageError("give either --hidden or --depth with --width, not both")
    if args.depth is not None or args.width is not None:
        if args.depth is None or args.width is None:
            raise UsageError("--depth and --width go together")
        if args.depth < 0 or args.width < 1:
            raise UsageError(f"--depth must be >= 0 and --width >= 1, got {args.depth} and "
                             f"{args.width}")
        return [args.width] * args.depth
    text = DEFAULTS["hidden"] if args.hidden is None else args.hidden
    try:
        widths = [int(w) for w in text.replace(" ", "").split(",") if w]
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise UsageError(f"--hidden widths must be positive, got {text!r}")
    return widths


def _check_numbers(args) -> None:
    from .train import OPTIMIZERS, SCHEDULES

    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {args.optimizer!r} (choose from "
                         f"{', '.join(OPTIMIZERS)})")
    if args.schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {args.schedule!r} (choose from "
                         f"{', '.join(SCHEDULES)})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 0),
                             ("--patience", args.patience, 0),
                             ("--checkpoint-every", args.checkpoint_every, 1)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not (math.isfinite(args.dropout) and 0 <= args.dropout < 1):
        raise UsageError(f"--dropout is the probability of dropping a unit and must be in "
                         f"[0, 1), got {args.dropout}")
    if args.classes is not None and args.classes < 2:
        raise UsageError(f"--classes must be at least 2, got {args.classes}")
    for flag, value, high in (("--seed", args.seed, 2**63 - 1),
                              ("--split-seed", args.split_seed, 2**32 - 1)):
        if not 0 <= value <= high:
            raise UsageError(f"{flag} must be in [0, {high}], got {value}")
    if args.resume_from is not None:
        if args.resume_from < 1:
            raise UsageError(f"--resume-from is an epoch (1 or more), got {args.resume_from}")
        args.resume = True
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir")


def _activations(args, task: str) -> tuple[str, str]:
    from . import activations

    names = sorted(activations.ACTIVATIONS)
    if args.activation not in activations.ACTIVATIONS or args.activation in ("softmax",
                                                                            "log_softmax"):
        raise UsageError(f"unknown hidden activation {args.activation!r} (choose from "
                         f"{', '.join(n for n in names if 'softmax' not in n)})")
    out = args.output_activation or ("log_softmax" if task == "classification" else "identity")
    allowed = ("log_softmax", "softmax", "identity") if task == "classification" else (
        "identity",)
    if out not in allowed:
        raise UsageError(f"output activation {out!r} does not fit {task} (choose from "
                         f"{', '.join(allowed)})")
    return args.activation, out


def _config(args, widths, output_activation) -> dict[str, Any]:
    return {"data": args.data, "label_column": args.label_column, "classes": args.classes,
            "split_seed": args.split_seed, "model": args.model, "batch_norm": args.batch_norm,
            "hidden": widths, "activation": args.activation,
            "output_activation": output_activation, "dropout": args.dropout,
            "optimizer": args.optimizer, "lr": args.lr,
            "schedule": args.schedule, "batch_size": args.batch_size, "epochs": args.epochs,
            "patience": args.patience, "seed": args.seed, "grad": args.grad,
            "epoch_mode": args.epoch_mode}


# --- report and plot -------------------------------------------------------------------

def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("jaxnet-nn", "jax", "jaxlib", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _device() -> str:
    import jax

    d = jax.devices()[0]
    kind = "" if d.device_kind == d.platform else f" {d.device_kind}"
    cpu = platform.processor() or platform.machine()
    return f"{d.platform}{kind} ({jax.device_count()} device(s); host {cpu}, " \
           f"{os.cpu_count()} cores)"


def _finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON's null)."""
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, float) or hasattr(value, "dtype"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value
        return number if math.isfinite(number) else None
    return value


def _write_json(path: str, report: dict) -> None:
    """Write ``report`` as strict JSON (NaN and infinity as null), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_finite_json(report), f, indent=2, default=float, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _check_writable(flag: str, path: str, directory: bool = False) -> None:
    """Refuse an output path that cannot be written, before training: a directory where a
    file goes (or a file where a directory goes), a dangling symbolic link, a path under a
    regular file, or a place this process cannot write to."""
    full = os.path.abspath(path)
    if os.path.islink(full) and not os.path.exists(full):
        raise UsageError(f"{flag} {path}: is a symbolic link to {os.readlink(full)}, which does "
                         f"not exist")
    if directory and os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"{flag} {path}: is a file, not a directory")
    if not directory and os.path.isdir(full):
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    probe = full if directory else os.path.dirname(full)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {path}: {probe} is a file, so nothing can be created under it")
    if not directory and os.path.exists(full) and not os.access(full, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable")
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=probe) as f:
            f.write(b"0")
            f.flush()
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {probe} ({e.strerror or e})") from None


def _check_outputs(args) -> None:
    """Every output flag checked before training: writable places and a known plot format."""
    if args.report:
        _check_writable("--report", args.report)
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        ext = os.path.splitext(args.plot)[1].lower().lstrip(".")
        if ext not in formats:
            raise UsageError(f"--plot {args.plot}: unknown image format "
                             f"{'.' + ext if ext else '(no extension)'}; use one of "
                             f"{', '.join('.' + f for f in sorted(formats))}")
        _check_writable("--plot", args.plot)
    if args.checkpoint_dir:
        _check_writable("--checkpoint-dir", args.checkpoint_dir, directory=True)


def plot_history(history: dict[str, list[float]], path: str, title: str = "") -> None:
    """Save the learning curves as a PNG: loss (left) and accuracy (right), train and
    validation, by epoch."""
    from matplotlib.figure import Figure

    metrics = ["loss"] + (["accuracy"] if "train_accuracy" in history else [])
    fig = Figure(figsize=(5 * len(metrics), 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    epochs = history.get("epoch", [])
    for ax, metric in zip(axes, metrics):
        for split, style in (("train", "-"), ("val", "--")):
            values = history.get(f"{split}_{metric}")
            if values:
                ax.plot(epochs, values, style, marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


# --- train ------------------------------------------------------------------------------

def _say(quiet: bool, text: str, file=None) -> None:
    if not quiet:
        try:
            from tqdm.auto import tqdm

            tqdm.write(text, file=file or sys.stdout)
        except ImportError:
            print(text, file=file or sys.stdout)


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM during a run, both as a KeyboardInterrupt that
    ``fit`` turns into ``stop_reason="interrupted"``. Inside :meth:`defer` (a
    checkpoint save, the final evaluation and report) a signal only sets ``pending``:
    the save finishes whole, and :meth:`raise_pending` raises it afterwards.
    ``received`` is the first signal's number."""

    def __init__(self):
        self.received: int | None = None
        self.pending = False
        self._deferring = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        if self._deferring:
            self.pending = True
            return
        raise KeyboardInterrupt

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                return

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @contextlib.contextmanager
    def defer(self):
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def raise_pending(self) -> None:
        if self.pending and not self._deferring:
            self.pending = False
            raise KeyboardInterrupt

    @property
    def terminated(self) -> bool:
        return self.received == signal.SIGTERM


_SIGNALS = _Signals()


def _epoch_line(record: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(record['epoch']):>3}/{epochs}"]
    for key, label in (("train_loss", "loss"), ("train_accuracy", "acc"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_acc")):
        if key in record:
            parts.append(f"{label} {record[key]:.4f}")
    parts.append(f"{record['seconds']:.2f}s")
    return "  ".join(parts)


_REASONS = {"epochs": "all epochs run", "early_stopping": "stopped early",
            "interrupted": "interrupted", "terminated": "terminated", "nan": "NaN loss"}


def _train(args) -> int:
    from . import sharding

    try:  # before any other JAX call
        distributed = sharding.initialize_distributed(args=args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.data_parallel = args.data_parallel or distributed
    with contextlib.ExitStack() as held:  # the checkpoint directory's lock, for the run
        try:
            run = _setup(args, held)
        except (ValueError, TypeError) as e:  # DataError, CheckpointError, bad settings
            raise UsageError(str(e)) from None
        return _run(args, *run)


def _setup(args, held: contextlib.ExitStack):
    """Everything that can refuse the input, before any training; takes the checkpoint
    directory's lock (released by ``held``)."""
    _fill_model_defaults(args)
    _check_numbers(args)
    widths = _hidden_widths(args)
    from . import datasets

    for flag, value in (("--classes", args.classes), ("--label-column", args.label_column)):
        if value is not None and args.data in datasets.BUILTIN:
            raise UsageError(f"{flag} is for a user's file; {args.data} has its own labels and "
                             f"classes")
    if args.resume and not os.path.isdir(args.checkpoint_dir):
        raise UsageError(f"--resume: {args.checkpoint_dir}: no checkpoint directory")
    _check_outputs(args)
    data = datasets.load(args.data, label_column=args.label_column, num_classes=args.classes,
                         split_seed=args.split_seed)
    if args.patience and len(data.x_val) == 0:
        print(f"jaxnet train: note: the {sum(data.sizes.values())} rows of {data.name} leave "
              f"none for validation, so early stopping (--patience) is off", file=sys.stderr)
        args.patience = 0
    activation, output_activation = _activations(args, data.task)
    if args.data_parallel:
        data = _own_rows(args, data)
    if args.batch_size > len(data.x_train):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the "
                         f"{len(data.x_train)} training rows")

    from . import checkpoint as ckpt
    from . import losses, train
    from .summary import summary

    classification = data.task == "classification"
    out_dim = data.num_classes if classification else data.y_train.shape[1]
    net = _net(args, data, widths, out_dim, activation, output_activation)
    loss = losses.l2_loss if not classification else (
        losses.cross_entropy if output_activation == "softmax" else losses.softmax_cross_entropy)
    metrics = {"accuracy": losses.accuracy} if classification else {}
    steps_per_epoch = _steps_per_epoch(args, data)
    optimizer = train.make_optimizer(args.optimizer, args.lr, args.schedule,
                                     total_steps=max(1, args.epochs * steps_per_epoch),
                                     steps_per_epoch=steps_per_epoch)
    input_shape = (-1, data.num_features)
    state = train.init_state(net, optimizer, args.seed, input_shape, dtype=data.x_train.dtype)
    config = _config(args, widths, output_activation)
    info = summary(net, input_shape)

    import jax

    if args.checkpoint_dir and jax.process_index() == 0:  # process 0 writes for all
        lock = held.enter_context(ckpt.DirectoryLock(args.checkpoint_dir))
        if lock.stale_owner:
            print(f"jaxnet train: note: took over the stale lock of {args.checkpoint_dir} (pid "
                  f"{lock.stale_owner.get('pid', '?')} on {lock.stale_owner.get('host', '?')} is "
                  f"gone)", file=sys.stderr)
    start: Any = state
    if args.resume:
        start, meta = _restore(args, state)
        saved = meta.get("config", {})
        keys = _RESUME_KEYS + (("epochs",) if "cosine" in args.schedule else ())
        for key in keys:
            was = saved.get(key, _RESUME_WAS.get(key))
            if was != config[key]:
                raise UsageError(f"--resume: the checkpoint was trained with {key} = "
                                 f"{was!r}, this run has {config[key]!r}")
    return data, net, loss, metrics, optimizer, start, config, info, widths, out_dim


# Examples of these built-in data sets are images (H, W); others are 1-d signals.
_IMAGES = {"digits": (8, 8)}


def _net(args, data, widths, out_dim, activation, output_activation):
    """The net ``--model`` names, for the data's rows."""
    from . import models
    from .combinators import mlp
    from .layers import elementwise

    if args.model == "mlp":
        return mlp(widths, out_dim, activation, output_activation, dropout=args.dropout,
                   batch_norm=args.batch_norm)
    if data.task != "classification":
        raise UsageError(f"--model {args.model} is a classifier; {data.name} is a regression "
                         f"task (use --model mlp)")
    for flag, value, default in (("--hidden", args.hidden, None), ("--depth", args.depth, None),
                                 ("--dropout", args.dropout, 0.0)):
        if value != default:
            raise UsageError(f"{flag} is for --model mlp")
    if args.model == "transformer" and args.batch_norm:
        raise UsageError("--batch-norm is for --model mlp or cnn (the transformer uses "
                         "LayerNorm)")
    if args.model == "cnn":
        shape = _IMAGES.get(args.data, (data.num_features,))
        net = models.cnn(shape, out_dim, batch_norm=args.batch_norm)
    else:
        net = models.transformer(data.num_features, out_dim)
    if output_activation not in (None, "identity"):
        from .combinators import serial

        net = serial(net, elementwise(output_activation))
    return net


def _restore(args, state):
    """The checkpoint to resume from: ``--resume-from``'s epoch, or the newest intact one
    (a damaged newer one is skipped, saying which and why)."""
    from . import checkpoint as ckpt

    directory = args.checkpoint_dir
    if args.resume_from is not None:
        try:
            return ckpt.restore_checkpoint(directory, state, epoch=args.resume_from)
        except ckpt.DamagedCheckpointError as e:
            others = [x for x in ckpt.saved_epochs(directory) if x != e.epoch]
            raise UsageError(f"{e}" + (f"; --resume-from one of the other saved epochs "
                                       f"({', '.join(map(str, others))})" if others else
                                       "; no other epoch is saved")) from None
    progress, meta, skipped = ckpt.restore_newest_intact(directory, state)
    for e in skipped:
        print(f"jaxnet train: warning: {e}; resuming from epoch {progress.epoch}, the newest "
              f"intact checkpoint (--resume-from EPOCH picks one)", file=sys.stderr)
    return progress, meta


def _steps_per_epoch(args, data) -> int:
    """Steps in an epoch: every process's rows together make the global data set."""
    import jax

    rows = len(data.x_train) * (jax.process_count() if args.data_parallel else 1)
    return rows // args.batch_size


def _own_rows(args, data):
    """With a data-parallel mesh: check the batch splits over the devices and, with several
    processes, keep this process's consecutive share of the training and validation rows."""
    import dataclasses

    import jax

    from . import sharding

    devices = jax.device_count()
    if args.batch_size % devices:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {devices} devices")
    count = jax.process_count()
    if count == 1:
        return data

    def mine(a):
        n = len(a) - len(a) % count
        return a[:n][sharding.process_rows(n)]

    return dataclasses.replace(data, x_train=mine(data.x_train), y_train=mine(data.y_train),
                               x_val=mine(data.x_val), y_val=mine(data.y_val))


def _run(args, data, net, loss, metrics, optimizer, start, config, info, widths, out_dim) -> int:
    from . import checkpoint as ckpt
    from . import train

    activation, output_activation = config["activation"], config["output_activation"]
    quiet = args.quiet
    _say(quiet, f"jaxnet train: {data.name} ({data.sizes['train']}/{data.sizes['val']}/"
                f"{data.sizes['test']} train/val/test, {data.num_features} features), "
                + (f"MLP {data.num_features}-{'-'.join(map(str, widths + [out_dim]))} "
                   f"{activation}/{output_activation}" if args.model == "mlp" else
                   f"{args.model.upper() if args.model == 'cnn' else args.model} "
                   f"{output_activation}")
                + (" with BatchNorm" if args.batch_norm else "")
                + f", {info.param_count} params, "
                f"{args.optimizer} lr {args.lr:g}, batch {args.batch_size}, grad {args.grad}"
                + (f", resuming after epoch {start.epoch}" if args.resume else ""))

    saved_epochs: set[int] = set()

    def save(progress) -> None:
        if args.checkpoint_dir and progress.epoch not in saved_epochs:
            ckpt.save_checkpoint(args.checkpoint_dir, progress, {"config": config})
            saved_epochs.add(progress.epoch)

    def on_epoch_end(progress) -> None:
        record = {k: v[-1] for k, v in progress.history.items()}
        _say(quiet, _epoch_line(record, args.epochs))
        if args.checkpoint_dir and progress.epoch % args.checkpoint_every == 0:
            with _SIGNALS.defer():  # a signal now waits for the save to finish
                save(progress)
        _SIGNALS.raise_pending()

    if args.resume:
        saved_epochs.add(start.epoch)  # on disk, intact: not saved again

    t0 = time.perf_counter()
    result = train.fit(net, loss, optimizer, start, (data.x_train, data.y_train),
                       (data.x_val, data.y_val), epochs=args.epochs,
                       batch_size=args.batch_size, patience=args.patience or None,
                       grad=args.grad, scan_epoch=args.epoch_mode == "scan", metrics=metrics,
                       progress=not quiet, on_epoch_end=on_epoch_end,
                       mesh=_mesh(args))
    train_seconds = time.perf_counter() - t0
    with _SIGNALS.defer():  # from here on a signal only marks the run as interrupted
        return _finish(args, data, net, loss, metrics, start, config, info, widths, result,
                       train_seconds, save)


def _finish(args, data, net, loss, metrics, start, config, info, widths, result,
            train_seconds, save) -> int:
    """Save, evaluate, print the results, then write the report and plot: a file that cannot
    be written is an error after the results are on the terminal."""
    import jax

    from . import train

    steps_per_epoch = _steps_per_epoch(args, data)
    problems = []
    try:
        save(result.progress)  # the last completed epoch (the last good one after a NaN)
    except (OSError, ValueError) as e:  # a full disk; CheckpointError
        problems.append(f"could not save the checkpoint in {args.checkpoint_dir} ({e})")
    interrupted = result.stop_reason == "interrupted" or _SIGNALS.received is not None

    eval_step = train.make_eval_step(net, loss, metrics)
    test = train.evaluate(eval_step, result.state.params, data.x_test, data.y_test,
                          model_state=result.state.model_state)
    history = result.history
    epochs_done = result.epochs_run - (start.epoch if args.resume else 0)
    steps = epochs_done * steps_per_epoch
    after_first = history.get("seconds", [])[1:epochs_done] if epochs_done > 1 else []
    report = {
        "test_accuracy": test.get("accuracy"), "test_loss": test["loss"],
        "epochs_run": result.epochs_run, "train_seconds": train_seconds,
        "steps_per_second": steps / train_seconds if train_seconds > 0 else None,
        "steps_per_second_after_first_epoch": (
            len(after_first) * steps_per_epoch / sum(after_first) if after_first else None),
        "param_count": info.param_count, "depth": info.depth, "width": info.width,
        "device": _device(), "versions": _versions(),
        "stop_reason": ("terminated" if _SIGNALS.terminated else "interrupted") if interrupted
        else result.stop_reason, "best_epoch": result.best_epoch,
        "nan_at": None if result.nan_at is None else
        {"epoch": result.nan_at[0], "step": result.nan_at[1]},
        "data": {"name": data.name, "description": data.description, **data.sizes,
                 "features": data.num_features, "classes": data.num_classes},
        "config": config, "steps_per_epoch": steps_per_epoch, "resumed": bool(args.resume),
        "history": history,
    }
    acc = test.get("accuracy")
    line = (f"test accuracy {acc:.4f}  " if acc is not None else "") + \
        f"test loss {test['loss']:.4f}  ({result.epochs_run} epochs, " + \
        _REASONS.get(report["stop_reason"], report["stop_reason"]) + \
        (f", best epoch {result.best_epoch}" if result.best_epoch else "") + \
        f"; {train_seconds:.1f} s, {report['steps_per_second'] or 0:.0f} steps/s)"

    # the results first, so that a file that cannot be written loses nothing
    if result.stop_reason == "nan":
        epoch, step = result.nan_at
        kept = (f"; checkpoint of epoch {result.epochs_run} kept in {args.checkpoint_dir}"
                if args.checkpoint_dir else "")
        print(f"jaxnet train: error: the loss became NaN (or infinite) at epoch {epoch}, step "
              f"{step} (try a lower --lr){kept}", file=sys.stderr)
        code = 1
    elif interrupted:
        what = "terminated (SIGTERM)" if _SIGNALS.terminated else "interrupted"
        saved = [f"checkpoint in {args.checkpoint_dir}"] if args.checkpoint_dir and not problems \
            else []
        saved += [f"report in {args.report}"] if args.report else []
        print(f"jaxnet train: {what} after epoch {result.epochs_run}"
              f"{', ' + ', '.join(saved) if saved else ''}; {line}", file=sys.stderr)
        code = 143 if _SIGNALS.terminated else 130
    else:
        print(line)
        code = 0
    lead = jax.process_index() == 0  # with several processes, process 0 writes the files
    for flag, path, write in (
            ("--report", args.report, lambda: _write_json(args.report, report)),
            ("--plot", args.plot if history.get("epoch") else None,
             lambda: plot_history(history, args.plot,
                                  f"{data.name}: MLP {'-'.join(map(str, widths))}"))):
        if path and lead:
            try:
                write()
            except (OSError, ValueError) as e:
                problems.append(f"could not write {flag} {path} ({e})")
    for problem in problems:
        print(f"jaxnet train: error: {problem}", file=sys.stderr)
    return code if code or not problems else 1


def _mesh(args):
    if not args.data_parallel:
        return None
    from .sharding import make_mesh

    return make_mesh()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxnet`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit
    code."""
    parser = build_parser()
    signals = _SIGNALS
    signals.__init__()
    signals.install()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _train(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:  # before training started (fit handles it during training)
        what = "terminated (SIGTERM)" if signals.terminated else "interrupted"
        print(f"jaxnet train: {what} before training started", file=sys.stderr)
        return 143 if signals.terminated else 130
    except UsageError as e:
        print(f"jaxnet train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        signals.restore()
