"""The course's softmax example, and softmax as an output layer.

a = [−0.21, 0.47, 1.72]: Σⱼ e^{aⱼ} ≈ 8, softmax(a) ≈ [0.1, 0.2, 0.7], a
probability distribution. Its derivative ∂σᵢ/∂aⱼ = σᵢ(δᵢⱼ − σⱼ) (written by
hand in jaxnet, applied as a Jacobian-vector product) is checked against
``jax.jacobian``. With cross-entropy on top, the gradient with respect to the
pre-softmax outputs is simply y − t (the course's δ).

    python examples/softmax_output.py
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxnet
from jaxnet import activations


@functools.partial(jax.jit, static_argnums=1)
def course_numbers(a, target: int) -> dict:
    """Σ e^a, softmax, its Jacobian three ways, and the cross-entropy gradient vs y − t."""
    y = jaxnet.softmax(a)
    # The hand-written derivative: J t = σ ⊙ (t − σ·t), one basis vector at a time.
    record = activations.get("softmax")
    hand = jnp.stack([record.derivative(a, e) for e in jnp.eye(a.shape[0], dtype=a.dtype)], 1)
    formula = jnp.diag(y) - jnp.outer(y, y)  # σᵢ(δᵢⱼ − σⱼ)
    auto = jax.jacobian(record.formula)(a)
    # Softmax output + cross-entropy: ∂L/∂a = y − t.
    t = jax.nn.one_hot(target, a.shape[0], dtype=a.dtype)
    grad = jax.grad(lambda z: jaxnet.cross_entropy(jaxnet.softmax(z)[None], t[None]))(a)
    return {"sum_exp": jnp.sum(jnp.exp(a)), "y": y, "hand": hand, "grad": grad, "delta": y - t,
            "jacobian_error": jnp.max(jnp.abs(hand - auto)),
            "formula_error": jnp.max(jnp.abs(hand - formula))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logits", type=float, nargs="+", default=[-0.21, 0.47, 1.72])
    parser.add_argument("--target", type=int, default=2, help="class of the one-hot target")
    args = parser.parse_args(argv)

    a = jnp.asarray(args.logits)
    r = jax.device_get(course_numbers(a, args.target))  # one compiled call
    print(f"a = {[round(float(v), 2) for v in a]}")
    print(f"sum_j exp(a_j) = {float(r['sum_exp']):.3f}")
    print(f"softmax(a) = {[round(float(v), 3) for v in r['y']]}  (sum {float(r['y'].sum()):.6f})")
    print("Jacobian σ_i(δ_ij − σ_j):\n" + np.array2string(r["hand"], precision=4))
    print(f"max |hand-written − jax.jacobian| = {float(r['jacobian_error']):.1e}, "
          f"|hand − diag(σ) + σσᵀ| = {float(r['formula_error']):.1e}")
    print(f"cross-entropy gradient wrt a: {[round(float(v), 3) for v in r['grad']]} = y − t "
          f"{[round(float(v), 3) for v in r['delta']]}")

    # A net with a softmax output layer gives one distribution per row.
    net = jaxnet.mlp([16], 3, "relu", "softmax")
    _, params = net.init(jax.random.PRNGKey(0), (-1, 5))
    row_sums = jax.jit(lambda p, x: jnp.sum(net.apply(p, x), -1))(
        params, jax.random.normal(jax.random.PRNGKey(1), (4, 5)))
    print(f"mlp([16], 3, output 'softmax'): rows sum to "
          f"{[round(float(v), 6) for v in row_sums]}")
    return {"sum_exp": float(r["sum_exp"]), "softmax": r["y"].tolist(),
            "jacobian_error": float(r["jacobian_error"]),
            "grad_minus_delta": float(np.max(np.abs(r["grad"] - r["delta"]))),
            "row_sums": np.asarray(row_sums).tolist()}


if __name__ == "__main__":
    main()
