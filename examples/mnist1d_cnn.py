"""The MNIST-1D paper's CNN, trained with jaxnet's convolution layers.

Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D" (ICML 2024).
The repo's ConvBase: the 40-sample signal as (N, 40, 1), channels-last; three
Conv1D layers of 25 channels, kernels 5, 3, 3, stride 2, padding 1, each
followed by ReLU (40 → 19 → 10 → 5 positions), then Flatten (125) and Dense 10:
5,210 params. The repo's recipe: Adam lr 1e-2, no weight decay, batch 100,
6,000 steps (150 epochs) on the 4,000 training rows,
PyTorch's default init (U(±1/√fan_in), here ``variance_scaling(1/3, "fan_in",
"uniform")``; biases start at 0). Batches are reshuffled every epoch (the repo
takes them in order).

The paper's table gives the CNN 94 % test accuracy; the repo's notebook
reaches 92.3 %. The repo's recipe gives 0.920 / 0.948 / 0.924 here (seeds 0-2,
mean 0.931), the training rows fitted perfectly. The default adds two things,
chosen on the validation split (``--val``: 400 of the 4,000 training rows held
out, seeds 0-1; validation accuracy in brackets): the learning rate decayed to
0 by a cosine (0.915 for seed 0, the constant rate 0.902; AdamW weight decay
0.1 on top: 0.920 / 0.907, 1.0: 0.69) and every training row moved by a random
−3…3 samples (edge repeated) each epoch, an augmentation (0.960 / 0.962 at
6,000 steps). It trains 3,000 steps (75 epochs), half the repo's, to fit three
seeds in two minutes on a 2-core CPU: validation 0.940 / 0.967 at 3,000 steps,
so the shorter run costs about 0.008 on average (``--steps 6000`` for the full
length). Result here, trained on all 4,000 rows: test accuracy 0.966 / 0.967
/ 0.968 over seeds 0-2, mean 0.967, in 46 s for the three on a 2-core CPU
(14-18 s a seed; 6,000 steps gave 0.973 / 0.962 / 0.972, mean 0.969).

    python examples/mnist1d_cnn.py                                 # seeds 0-2
    python examples/mnist1d_cnn.py --schedule constant --shift 0 --steps 6000  # the repo's recipe
    python examples/mnist1d_cnn.py --val                           # 400 rows held out
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# examples/mnist1d.py shares its name with the mnist1d package: keep this folder off the
# import path when this file runs as a script, so that `import mnist1d` finds the package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.nn import initializers  # noqa: E402

import jaxnet  # noqa: E402
from jaxnet import datasets, train  # noqa: E402

PAPER_CNN = 0.94
REPO_CNN = 0.923


def paper_cnn() -> jaxnet.Layer:
    torch_like = initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    pad = ((1, 1),)
    return jaxnet.serial(
        jaxnet.Conv1D(25, 5, strides=2, padding=pad, W_init=torch_like), jaxnet.Relu,
        jaxnet.Conv1D(25, 3, strides=2, padding=pad, W_init=torch_like), jaxnet.Relu,
        jaxnet.Conv1D(25, 3, strides=2, padding=pad, W_init=torch_like), jaxnet.Relu,
        jaxnet.Flatten, jaxnet.Dense(10, W_init=torch_like))


def optimizer_for(schedule: str, lr: float, steps: int,
                  weight_decay: float = 0.0) -> optax.GradientTransformation:
    rate = lr if schedule == "constant" else optax.cosine_decay_schedule(lr, steps)
    if weight_decay:
        return optax.adamw(rate, weight_decay=weight_decay)  # decoupled: θ ← θ − rate·wd·θ
    return optax.adam(rate)


def shifted(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Each row moved by a random whole number of samples in [−k, k], edges repeated."""
    if not k:
        return x
    moves = rng.integers(-k, k + 1, len(x))
    index = np.clip(np.arange(x.shape[1])[None, :] - moves[:, None], 0, x.shape[1] - 1)
    return np.take_along_axis(x, index[..., None], 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000,
                        help="training steps (batch 100; the repo trains 6,000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="AdamW's decoupled weight decay (0: Adam, as the repo)")
    parser.add_argument("--shift", type=int, default=3,
                        help="augmentation: move each training row by up to this many samples, "
                             "drawn afresh every epoch (0: none, as the repo)")
    parser.add_argument("--val", action="store_true",
                        help="train on 3,600 rows and report the 400 held-out validation rows "
                             "(for choosing a recipe without the test set)")
    args = parser.parse_args(argv)

    data = datasets.mnist1d(val_fraction=0.1 if args.val else 0.0)
    x_train, x_val, x_test = (a.reshape(-1, 40, 1) for a in
                              (data.x_train, data.x_val, data.x_test))
    net = paper_cnn()
    params = jaxnet.summary(net, (-1, 40, 1)).param_count
    steps_per_epoch = len(x_train) // 100
    epochs = max(1, args.steps // steps_per_epoch)
    steps = epochs * steps_per_epoch
    loss, optimizer = jaxnet.softmax_cross_entropy, optimizer_for(args.schedule, args.lr, steps,
                                                                 args.weight_decay)
    evaluate = train.make_eval_step(net, loss, {"accuracy": jaxnet.accuracy})
    run_epoch = train.make_epoch(net, loss, optimizer)
    rows = []
    wd = f", weight decay {args.weight_decay:g}" if args.weight_decay else ""
    wd += f", shifts up to {args.shift}" if args.shift else ""
    print(f"MNIST-1D CNN, {params:,} params, Adam {args.lr:g} ({args.schedule}{wd}), batch 100, "
          f"{steps} steps on {len(x_train):,} rows")
    print(f"{'seed':>4}  {'train acc':>9}  {'val acc':>7}  {'test acc':>8}  {'seconds':>7}")
    for seed in args.seeds:
        t0 = time.perf_counter()
        state = train.init_state(net, optimizer, seed, (-1, 40, 1))
        rng = np.random.default_rng(seed)
        for _ in range(epochs):  # each epoch: shuffle (and shift), then one compiled scan
            order = rng.permutation(len(x_train))[:steps_per_epoch * 100]
            xs = shifted(x_train[order], args.shift, rng).reshape(steps_per_epoch, 100, 40, 1)
            ys = data.y_train[order].reshape(steps_per_epoch, 100)
            state, _ = run_epoch(state, xs, ys)
        final = state.params
        row = {"seed": seed,
               "train": train.evaluate(evaluate, final, x_train, data.y_train)["accuracy"],
               "val": (train.evaluate(evaluate, final, x_val, data.y_val)["accuracy"]
                       if args.val else float("nan")),
               "test": train.evaluate(evaluate, final, x_test, data.y_test)["accuracy"],
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        val = f"{row['val']:.3f}" if args.val else "-"
        print(f"{seed:>4}  {row['train']:>9.3f}  {val:>7}  {row['test']:>8.3f}  "
              f"{row['seconds']:>7.1f}")
    mean = float(np.mean([r["test"] for r in rows]))
    total = sum(r["seconds"] for r in rows)
    print(f"mean test accuracy {mean:.3f} over {len(rows)} seed(s) in {total:.0f} s; paper's "
          f"table {PAPER_CNN:.2f}, repo notebook {REPO_CNN:.3f}")
    return {"test_accuracy": [r["test"] for r in rows], "mean": mean,
            "val_accuracy": [r["val"] for r in rows], "train_accuracy": [r["train"] for r in rows],
            "seconds": [r["seconds"] for r in rows], "steps": steps, "params": params}


if __name__ == "__main__":
    main()
