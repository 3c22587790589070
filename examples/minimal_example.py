"""The course's minimal example with jaxnet's linear layer.

1,000 points (x, z) ~ U(−10, 10), targets 2x − 3z + 5 + U(−1, 1) noise; one
Dense(1) layer y = x·w + b with w and b drawn from U(−0.1, 0.1); full-batch
gradient descent, learning rate 0.02, loss = Σ(y − t)² / 2 / N
(jaxnet.l2_loss).

Why b lags behind w: the gradient for b is the mean error, so b's error
shrinks by a factor (1 − η·1) = 0.98 per step, while w sees inputs with
variance ≈ 33 and converges about 33 times faster. After 100 steps b has
closed 1 − 0.98¹⁰⁰ ≈ 87 % of the gap (b ≈ 4.3); after 1,000 steps
0.98¹⁰⁰⁰ ≈ 2·10⁻⁹ is left (b ≈ 5), and the loss is the noise's: Var(U(−1, 1))/2
= 1/6 ≈ 0.167.

    python examples/minimal_example.py              # steps 100 and 1000
    python examples/minimal_example.py --steps 100
"""

from __future__ import annotations

import argparse

import jax
import optax

import jaxnet
from jaxnet import datasets, train


def symmetric_uniform(scale: float):
    """Initialiser U(−scale, scale), the course's init."""
    def init(key, shape, dtype=float):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000],
                        help="report w, b and the loss after these many steps")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the init")
    args = parser.parse_args(argv)

    inputs, targets = datasets.minimal_data(1000, seed=args.seed)
    net = jaxnet.Dense(1, W_init=symmetric_uniform(0.1), b_init=symmetric_uniform(0.1))
    optimizer = optax.sgd(args.lr)
    state = train.init_state(net, optimizer, args.seed, (-1, 2))
    step = train.make_train_step(net, jaxnet.l2_loss, optimizer)

    results = {}
    print(f"{'steps':>6}  {'w_x':>7}  {'w_z':>7}  {'b':>6}  {'loss':>7}   (want 2, -3, 5)")
    done = 0
    for stop in sorted(args.steps):
        for _ in range(stop - done):
            state, loss = step(state, inputs, targets)
        done = stop
        w, b = state.params["w"][:, 0], state.params["b"][0]
        loss = float(jaxnet.l2_loss(net.apply(state.params, inputs), targets))
        results[stop] = {"w": [float(w[0]), float(w[1])], "b": float(b), "loss": loss}
        print(f"{stop:>6}  {float(w[0]):7.3f}  {float(w[1]):7.3f}  {float(b):6.3f}  {loss:7.4f}")
    print("b converges slowly: its error shrinks by (1 - lr) = 0.98 per step "
          "(0.98^100 = 0.13 of the gap left, 0.98^1000 = 2e-9);\nthe final loss is the noise's "
          "variance / 2 = 1/6.")
    return results


if __name__ == "__main__":
    main()
