"""The README's tour: build a net, init, apply, train one step with optax, check a derivative."""

import jax
import jax.numpy as jnp
import optax

import jaxnet

net = jaxnet.mlp([64, 64], 10, activation="tanh")            # 2 hidden layers, logits out
out_shape, params = net.init(jax.random.key(0), (-1, 64))   # params: {"dense_0": {"w", "b"}, ...}
print(jaxnet.summary(net, (-1, 64)))                         # depth 2, width 64, 8,970 parameters

x = jax.random.normal(jax.random.key(1), (32, 64))
labels = jnp.arange(32) % 10
logits = net.apply(params, x)                                # (32, 10)

optimizer = optax.adam(1e-3)
opt_state = optimizer.init(params)


@jax.jit
def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: jaxnet.softmax_cross_entropy(net.apply(p, x), labels))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params, opt_state, loss = step(params, opt_state)
print(f"loss after one Adam step: {float(loss):.4f}")

print(jaxnet.tanh.derivative(0.5), jax.grad(jaxnet.tanh)(0.5))  # 4/(e^a+e^-a)^2, hand-written
print(jaxnet.check_activation("tanh"))                       # vs jax.grad and finite differences
