"""Your own activation with a hand-written derivative, checked, then trained.

softsign(a) = a / (1 + |a|), range (−1, 1), with derivative
softsign′(a) = 1 / (1 + |a|)², attached with ``jax.custom_jvp`` so that
``jax.grad`` uses it. ``jaxnet.check_activation`` compares the hand-written
derivative with ``jax.grad`` of the plain formula and with finite
differences, and checks the claimed properties; a wrong derivative fails.
Then the activation becomes a layer (``jaxnet.elementwise``) and a net
trains on the digits with jaxnet's manual backward pass, which uses the
hand-written derivative, and with ``jax.grad``, to the same result.

    python examples/custom_activation.py
    python examples/custom_activation.py --epochs 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jaxnet
from jaxnet import datasets, train


def softsign_formula(a):
    """The plain formula: a / (1 + |a|)."""
    return a / (1 + jnp.abs(a))


def softsign_derivative(a):
    """Written by hand: d/da a/(1 + |a|) = 1 / (1 + |a|)²."""
    return 1 / jnp.square(1 + jnp.abs(a))


@jax.custom_jvp
def softsign(a):
    return softsign_formula(a)


@softsign.defjvp
def _softsign_jvp(primals, tangents):
    (a,), (t,) = primals, tangents
    return softsign(a), softsign_derivative(a) * t


def wrong_derivative(a):
    """A plausible mistake: forgets to square."""
    return 1 / (1 + jnp.abs(a))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    report = jaxnet.check_activation(softsign, softsign_derivative, formula=softsign_formula,
                                     name="softsign", monotonic=True, continuous=True,
                                     differentiable=True)
    print(report)
    wrong = jaxnet.check_activation(softsign_formula, wrong_derivative, name="softsign (wrong)",
                                    raise_on_failure=False)
    print(f"with a wrong derivative: passed = {wrong.passed}")

    data = datasets.digits()
    layer = jaxnet.elementwise(softsign, derivative=softsign_derivative)
    net = jaxnet.serial(jaxnet.Dense(64), layer, jaxnet.Dense(64), layer, jaxnet.Dense(10))
    optimizer = optax.adam(3e-3)
    evaluate = train.make_eval_step(net, jaxnet.softmax_cross_entropy,
                                    {"accuracy": jaxnet.accuracy})
    results = {"check_passed": report.passed, "wrong_derivative_passed": wrong.passed}
    for grad in ("manual", "auto"):
        state = train.init_state(net, optimizer, args.seed, (-1, 64))
        fitted = train.fit(net, jaxnet.softmax_cross_entropy, optimizer, state,
                           (data.x_train, data.y_train), epochs=args.epochs, batch_size=32,
                           grad=grad, scan_epoch=True)
        test = train.evaluate(evaluate, fitted.state.params, data.x_test, data.y_test)
        results[grad] = test["accuracy"]
        print(f"softsign net, grad={grad}: digits test accuracy {test['accuracy']:.4f}")
    return results


if __name__ == "__main__":
    main()
