"""Train one net twice, with manual backpropagation and with ``jax.grad``, and compare.

The net is the course's: Dense → tanh → Dense → sigmoid → Dense → softmax with
cross-entropy, on scikit-learn's 8×8 digits (bundled, no download). The manual
run uses ``jaxnet.manual_value_and_grad``: every layer's hand-written backward
rule and the fused output error δ = (y − t)/N. The other uses ``jax.grad``.
Both start from the same parameters and see the same mini-batches, so their
loss curves should agree to float32 rounding.

    python examples/manual_backprop.py                 # 300 steps, prints the curves
    python examples/manual_backprop.py --plot curves.png
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxnet as jn


def load_data(seed: int = 0):
    """Digits as float32 rows in [0, 1] (N, 64) and integer labels (N,), split 80/20."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int32), test_size=0.2, random_state=seed, stratify=y)


def train(value_and_grad, net, params, x, y, *, steps: int, batch: int, lr: float, seed: int):
    """``steps`` of SGD with momentum; returns (loss per step, final params). One jit, one scan."""
    opt = optax.sgd(lr, momentum=0.9)
    n = x.shape[0]
    batches = jax.random.randint(jax.random.key(seed), (steps, batch), 0, n)

    @jax.jit
    def run(params):
        def step(carry, idx):
            p, state = carry
            value, grads = value_and_grad(p, x[idx], y[idx])
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), value

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), batches)
        return losses, params

    return run(params)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="manual backprop vs jax.grad on digits")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="PATH", help="write the two loss curves as a PNG")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.lr <= 0:
        ap.error("--steps and --batch must be positive integers and --lr positive")

    x_train, x_test, y_train, y_test = load_data(args.seed)
    net = jn.serial(jn.Dense(64), jn.Tanh, jn.Dense(32), jn.Sigmoid, jn.Dense(10), jn.Softmax)
    _, params = net.init(jax.random.key(args.seed), (-1, x_train.shape[1]))
    params = jax.tree_util.tree_map(lambda w: w.astype(jnp.float32), params)  # float32 run
    loss = jn.cross_entropy
    variants = {
        "manual": jn.manual_value_and_grad(net, loss),
        "autodiff": jax.value_and_grad(lambda p, x, t: loss(net.apply(p, x), t)),
    }
    results = {}
    for name, fn in variants.items():
        losses, final = train(fn, net, params, jnp.asarray(x_train), jnp.asarray(y_train),
                              steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
        losses = np.asarray(losses)
        acc = float(jn.accuracy(net.apply(final, jnp.asarray(x_test)), jnp.asarray(y_test)))
        results[name] = {"losses": losses, "test_accuracy": acc}

    m, a = results["manual"]["losses"], results["autodiff"]["losses"]
    rel = np.abs(m - a) / np.abs(a)
    print(f"net: {' → '.join(layer.label for _, layer in net.children)}, loss cross-entropy "
          f"(fused δ = (y − t)/N in the manual run: {variants['manual'].fused})")
    print(f"{'step':>6} {'manual loss':>12} {'autodiff loss':>14} {'rel diff':>10}")
    for i in sorted({0, *range(args.steps // 10 or 1, args.steps, args.steps // 10 or 1),
                     args.steps - 1}):
        print(f"{i:>6} {m[i]:>12.6f} {a[i]:>14.6f} {rel[i]:>10.2e}")
    for name, r in results.items():
        print(f"{name:>8}: test accuracy {r['test_accuracy']:.3f} after {args.steps} steps")
    print(f"max relative difference of the loss curves over {args.steps} steps: {rel.max():.2e}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(a, label="jax.grad", lw=3, alpha=0.5)
        ax.plot(m, "--", label="manual backprop")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.set_title(f"digits, same batches; max rel. difference {rel.max():.1e}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return {"manual": m, "autodiff": a, "max_rel_diff": float(rel.max()),
            "test_accuracy": {k: r["test_accuracy"] for k, r in results.items()}}


if __name__ == "__main__":
    main()
