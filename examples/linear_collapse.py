"""Why we need non-linearities: stacked linear layers collapse into one.

The course's picture: x (8 features) → h = x·W₁ (9 units) → y = h·W₂ (4
outputs) is y = x·W* with W* = W₁·W₂ (8×4). ``jaxnet.collapse_linear`` does
this fusion on a net and its params (biases included:
b* = b₁·W₂ + b₂), and the outputs agree to rounding.

Then the consequence, on the digits (Adam 3e-3, batch 32, 30 epochs): a deep
net whose activations are all the identity is a single linear map (it
collapses to one Dense layer with exactly the same predictions) and does no
better than a one-layer softmax regression, while the same depth with ReLU
does better.

    python examples/linear_collapse.py
    python examples/linear_collapse.py --epochs 5
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax

import jaxnet
from jaxnet import datasets, train


def describe(params) -> str:
    return ", ".join(f"{name} W {tuple(p['w'].shape)}" for name, p in params.items())


def course_picture(seed: int = 0) -> float:
    """8 → 9 → 4 without activation collapses to one 8 → 4 layer; returns the max difference."""
    net = jaxnet.serial(jaxnet.Dense(9), jaxnet.Dense(4))
    k_init, k_x = jax.random.split(jax.random.PRNGKey(seed))
    _, params = net.init(k_init, (-1, 8))
    x = jax.random.normal(k_x, (5, 8))
    flat, flat_params = jaxnet.collapse_linear(net, params)
    w = flat_params["dense_0"]["w"]
    diff = float(np.max(np.abs(net.apply(params, x) - flat.apply(flat_params, x))))
    print(f"8 -> 9 -> 4 linear net: W1 {params['dense_0']['w'].shape} · W2 "
          f"{params['dense_1']['w'].shape} = W* {w.shape}; collapsed: {describe(flat_params)}; "
          f"max |y - y*| = {diff:.1e}")
    return diff


def train_digits(net, data, epochs, seed):
    optimizer = optax.adam(3e-3)
    state = train.init_state(net, optimizer, seed, (-1, data.num_features))
    result = train.fit(net, jaxnet.softmax_cross_entropy, optimizer, state,
                       (data.x_train, data.y_train), epochs=epochs, batch_size=32,
                       scan_epoch=True)
    return result.state.params


def test_accuracy(net, params, data) -> float:
    return float(jax.jit(lambda p: jaxnet.accuracy(net.apply(p, data.x_test), data.y_test))(params))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    diff = course_picture(args.seed)
    data = datasets.digits()
    nets = {"one linear layer (softmax regression)": jaxnet.mlp([], 10),
            "3 hidden layers of 64, identity": jaxnet.mlp([64, 64, 64], 10, "identity"),
            "3 hidden layers of 64, relu": jaxnet.mlp([64, 64, 64], 10, "relu")}
    results = {"collapse_max_difference": diff}
    for name, net in nets.items():
        params = train_digits(net, data, args.epochs, args.seed)
        results[name] = test_accuracy(net, params, data)
        print(f"{name:40s} digits test accuracy {results[name]:.4f}")
        if "identity" in name:
            flat, flat_params = jaxnet.collapse_linear(net, params)
            def predict(n, p):
                return np.argmax(jax.jit(n.apply)(p, data.x_test), -1)

            same = np.array_equal(predict(net, params), predict(flat, flat_params))
            results["collapsed"] = test_accuracy(flat, flat_params, data)
            results["collapsed_same_predictions"] = bool(same)
            print(f"{'  collapsed: ' + describe(flat_params):40s} digits test accuracy "
                  f"{results['collapsed']:.4f} (same predictions: {same})")
    return results


if __name__ == "__main__":
    main()
