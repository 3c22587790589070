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

import jax
import jax.numpy as jnp
import numpy as np

import jaxnet
from jaxnet import activations


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logits", type=float, nargs="+", default=[-0.21, 0.47, 1.72])
    parser.add_argument("--target", type=int, default=2, help="class of the one-hot target")
    args = parser.parse_args(argv)

    a = jnp.asarray(args.logits)
    total = float(jnp.sum(jnp.exp(a)))
    y = jaxnet.softmax(a)
    print(f"a = {[round(float(v), 2) for v in a]}")
    print(f"sum_j exp(a_j) = {total:.3f}")
    print(f"softmax(a) = {[round(float(v), 3) for v in y]}  (sum {float(jnp.sum(y)):.6f})")

    # The hand-written derivative: J t = σ ⊙ (t − σ·t), one basis vector at a time.
    record = activations.get("softmax")
    eye = jnp.eye(a.shape[0], dtype=a.dtype)
    hand = jnp.stack([record.derivative(a, e) for e in eye], axis=1)
    formula = jnp.diag(y) - jnp.outer(y, y)  # σᵢ(δᵢⱼ − σⱼ)
    auto = jax.jacobian(record.formula)(a)
    jac_error = float(jnp.max(jnp.abs(hand - auto)))
    print("Jacobian σ_i(δ_ij − σ_j):\n" + np.array2string(np.asarray(hand), precision=4))
    print(f"max |hand-written − jax.jacobian| = {jac_error:.1e}, "
          f"|hand − diag(σ) + σσᵀ| = {float(jnp.max(jnp.abs(hand - formula))):.1e}")

    # Softmax output + cross-entropy: ∂L/∂a = y − t.
    t = jax.nn.one_hot(args.target, a.shape[0], dtype=a.dtype)
    grad = jax.grad(lambda z: jaxnet.cross_entropy(jaxnet.softmax(z)[None], t[None]))(a)
    delta = y - t
    print(f"cross-entropy gradient wrt a: {[round(float(v), 3) for v in grad]} = y − t "
          f"{[round(float(v), 3) for v in delta]}")

    # A net with a softmax output layer gives one distribution per row.
    net = jaxnet.mlp([16], 3, "relu", "softmax")
    _, params = net.init(jax.random.PRNGKey(0), (-1, 5))
    probs = net.apply(params, jax.random.normal(jax.random.PRNGKey(1), (4, 5)))
    print(f"mlp([16], 3, output 'softmax'): rows sum to "
          f"{[round(float(v), 6) for v in jnp.sum(probs, -1)]}")
    return {"sum_exp": total, "softmax": np.asarray(y).tolist(), "jacobian_error": jac_error,
            "grad_minus_delta": float(jnp.max(jnp.abs(grad - delta))),
            "row_sums": np.asarray(jnp.sum(probs, -1)).tolist()}


if __name__ == "__main__":
    main()
