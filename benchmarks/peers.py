"""Peer benchmark: the same MLP training step in jaxnet and in its peers, side by side.

One step = forward pass, softmax cross-entropy on integer labels, gradients, Adam (lr 1e-3),
parameter update, all in float32. Variants:

- ``pure_jax``: a hand-written step (list of (w, b), ``jax.value_and_grad``, optax.adam),
  ``jax.jit`` with the parameters and optimiser state donated. Every ratio is relative to it.
- ``pure_jax_again``: the same step built a second time (its own buffers), timed as a variant
  of its own: an A/A control, whose ratio (ideally 1) shows the method's error on this machine.
- ``pure_jax_grads_only``: not a step, its forward and backward pass alone (no Adam update):
  the difference to ``pure_jax`` is the optimizer update's share.
- ``jaxnet_auto`` / ``jaxnet_manual``: ``jaxnet.train.make_train_step(net, loss, opt, grad=...)``
  (``jax.grad`` versus jaxnet's hand-written backward pass).
- ``stax``, ``flax_linen``, ``haiku``: their modules with the same optax step under ``jax.jit``.
- ``flax_nnx_jit`` (``nnx.jit``) and ``flax_nnx_split`` (``nnx.split``/``nnx.merge`` + ``jax.jit``).
- ``equinox_filter_jit`` (``eqx.filter_jit``) and ``equinox_jit`` (``eqx.partition`` + ``jax.jit``).
- ``torch_eager`` and ``torch_compile`` (PyTorch on the CPU; ``torch.optim.Adam``).

Configurations: small 784-128-10 batch 128; large 784-2048-2048-2048-10 batch 512; deep
784-(256×16)-10 batch 256; ``small_epoch``: a whole epoch of the small config in one
``lax.scan`` (time reported per step, ratio to the per-call pure-JAX step of the same round).
Bigger nets (:data:`NET_CONFIGS`, ``--configs cnn,transformer``): ``cnn``, a 2-d conv net on
32×32×3 inputs (conv 3×3 32 → BatchNorm → ReLU → max-pool 2 → conv 3×3 64 → BatchNorm →
ReLU → max-pool 2 → mean → Dense 10, batch 128; BatchNorm in train mode, its running
statistics carried in the step's state) and ``transformer``, 4 pre-norm blocks (width 256,
4 heads, MLP 1024, tanh GELU) on T = 256, batch 16, mean-pooled, Dense 10; the same variants
but stax and ``pure_jax_grads_only``; GFLOP/s from the convolutions' and matmuls' flops.

Method: every variant is compiled and warmed up first (not timed). Then rounds: in each round
every variant (in an order shuffled each round, with a pause after PyTorch, whose worker threads
keep spinning after a call) runs the same number of back-to-back steps and is timed to
``block_until_ready``; the paired ratio of a variant in a round is its time over pure JAX's time
in that round, so drift of the shared machine cancels. Reported: the median step time, the
median of the paired ratios and their 25–75 % range, GFLOP/s = 6 · batch · Σ fan_in·fan_out per
step, and its fraction of the machine's matmul peak (jitted 2048×2048 float32 ``jnp.dot``,
2·2048³ flops, measured in every round too).

Usage::

    python benchmarks/peers.py --quick                 # a minute or two, for development
    python benchmarks/peers.py --json benchmarks/results/peers_cpu.json \
        --markdown benchmarks/results/peers_cpu.md --plot benchmarks/results/peers_cpu.png

Peers are optional (``pip install -e '.[bench]'`` and ``pip install torch==2.13.0``); a variant
whose library is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

CONFIGS: dict[str, tuple[list[int], int]] = {
    "small": ([784, 128, 10], 128),
    "large": ([784, 2048, 2048, 2048, 10], 512),
    "deep": ([784] + [256] * 16 + [10], 256),
}
EPOCH_STEPS = 40  # ≈ 5,000 examples / batch 128: the mnist5k training set
LR = 1e-3
# PyTorch's OpenMP/MKL worker threads keep spinning for a while after a call. Timed right
# after PyTorch, the pure-JAX step lost 14 % on the small config (its A/A control read 0.86);
# after a pause of SETTLE_S, and with the order shuffled each round, it read 0.96–1.00.
SETTLE_S = 0.3
ALL_VARIANTS = ["pure_jax", "pure_jax_again", "pure_jax_grads_only", "jaxnet_auto",
                "jaxnet_manual", "stax", "flax_linen", "flax_nnx_jit", "flax_nnx_split",
                "equinox_filter_jit", "equinox_jit", "haiku", "torch_eager", "torch_compile"]


class Skip(Exception):
    """A variant that cannot run here (library missing, API absent)."""


def flops_per_step(widths: list[int], batch: int) -> int:
    """6 · batch · Σ fan_in·fan_out: forward (2·b·m·n) plus two backward matmuls per layer."""
    return 6 * batch * sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=False))


def data(widths, batch, steps=None, seed=0):
    rng = np.random.default_rng(seed)
    lead = (batch,) if steps is None else (steps, batch)
    x = rng.standard_normal(lead + (widths[0],), dtype=np.float32)
    y = rng.integers(0, widths[-1], size=lead).astype(np.int32)
    return x, y


def sync(tree):
    return jax.block_until_ready(tree)


# --- pure JAX ---------------------------------------------------------------

def pure_init(key, widths):
    params = []
    keys = jax.random.split(key, len(widths) - 1)
    for k, m, n in zip(keys, widths[:-1], widths[1:], strict=True):
        w = jax.nn.initializers.glorot_normal()(k, (m, n), jnp.float32)
        params.append((w, jnp.zeros((n,), jnp.float32)))
    return params


def pure_apply(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def optax_step(apply_fn, opt):
    """The step shared by pure JAX, stax, linen and haiku: only ``apply_fn`` differs."""

    def step(params, opt_state, x, y):
        loss, g = jax.value_and_grad(lambda p: ce(apply_fn(p, x), y))(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def jitted_runner(step, params, opt_state, x, y):
    """Runner for a (params, opt_state, x, y) -> (params, opt_state, loss) step."""
    jstep = jax.jit(step, donate_argnums=(0, 1))
    state = [params, opt_state]

    def run(n):
        p, o = state
        loss = None
        for _ in range(n):
            p, o, loss = jstep(p, o, x, y)
        state[:] = [p, o]
        return sync(loss)

    return run


def make_pure_jax(widths, x, y):
    opt = optax.adam(LR)
    params = pure_init(jax.random.key(0), widths)
    return jitted_runner(optax_step(pure_apply, opt), params, opt.init(params), x, y)


def make_pure_jax_grads_only(widths, x, y):
    """Not a training step: forward + backward only (no Adam, no update), to show how much of
    the step the optimizer's update takes."""
    params = pure_init(jax.random.key(0), widths)
    grads = jax.jit(jax.value_and_grad(lambda p: ce(pure_apply(p, x), y)))

    def run(n):
        out = None
        for _ in range(n):
            out = grads(params)
        return sync(out)

    return run


def make_pure_jax_scan(widths, xs, ys):
    opt = optax.adam(LR)
    step = optax_step(pure_apply, opt)

    @partial(jax.jit, donate_argnums=(0, 1))
    def epoch(params, opt_state, xs, ys):
        def body(carry, xy):
            p, o, loss = step(*carry, *xy)
            return (p, o), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xs, ys))
        return params, opt_state, losses

    params = pure_init(jax.random.key(0), widths)
    state = [params, opt.init(params)]

    def run(n):
        losses = None
        for _ in range(n):
            p, o, losses = epoch(*state, xs, ys)
            state[:] = [p, o]
        return sync(losses)

    return run


# --- jaxnet -----------------------------------------------------------------

def _jaxnet_net(widths):
    import jaxnet
    return jaxnet.mlp(widths[1:-1], widths[-1], "relu")


def _jaxnet_train():
    try:
        from jaxnet import train
    except ImportError as e:
        raise Skip(f"jaxnet.train not importable ({e})") from None
    return train


def _jaxnet_runner(net, grad, x, y, **init_kwargs):
    """n steps of jaxnet's compiled train step (``make_train_step``) on one batch."""
    import jaxnet
    train = _jaxnet_train()
    step = train.make_train_step(net, jaxnet.softmax_cross_entropy, optax.adam(LR), grad=grad)
    state = [train.init_state(net, optax.adam(LR), jax.random.key(0),
                              (-1,) + tuple(x.shape[1:]), **init_kwargs)]

    def run(n):
        s, out = state[0], None
        for _ in range(n):
            s, out = step(s, x, y)
        state[0] = s
        return sync(out)

    return run


def make_jaxnet(grad):
    def make(widths, x, y):
        return _jaxnet_runner(_jaxnet_net(widths), grad, x, y)

    return make


def make_jaxnet_fit_scan(widths, xs, ys):
    """jaxnet's scanned epoch: the epoch function ``fit`` runs (one ``lax.scan`` per epoch)."""
    import jaxnet
    train = _jaxnet_train()
    if not hasattr(train, "make_epoch"):
        raise Skip("jaxnet.train has no make_epoch")
    net = _jaxnet_net(widths)
    epoch = train.make_epoch(net, jaxnet.softmax_cross_entropy, optax.adam(LR))
    state = [train.init_state(net, optax.adam(LR), jax.random.key(0), (-1, widths[0]))]

    def run(n):
        out = None
        for _ in range(n):
            s, out = epoch(state[0], xs, ys)
            state[0] = s
        return sync(out)

    return run


# --- stax, linen, haiku -------------------------------------------------------

def make_stax(widths, x, y):
    from jax.example_libraries import stax
    layers = []
    for n in widths[1:-1]:
        layers += [stax.Dense(n), stax.Relu]
    init, apply = stax.serial(*layers, stax.Dense(widths[-1]))
    _, params = init(jax.random.key(0), (-1, widths[0]))
    opt = optax.adam(LR)
    return jitted_runner(optax_step(apply, opt), params, opt.init(params), x, y)


def make_flax_linen(widths, x, y):
    try:
        import flax.linen as nn
    except ImportError as e:
        raise Skip(str(e)) from None

    class MLP(nn.Module):
        widths: tuple

        @nn.compact
        def __call__(self, x):
            for n in self.widths[1:-1]:
                x = nn.relu(nn.Dense(n)(x))
            return nn.Dense(self.widths[-1])(x)

    model = MLP(tuple(widths))
    params = model.init(jax.random.key(0), x)
    opt = optax.adam(LR)
    return jitted_runner(optax_step(model.apply, opt), params, opt.init(params), x, y)


def make_haiku(widths, x, y):
    try:
        import haiku as hk
    except ImportError as e:
        raise Skip(str(e)) from None
    model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP(widths[1:])(x)))
    params = model.init(jax.random.key(0), x)
    opt = optax.adam(LR)
    return jitted_runner(optax_step(model.apply, opt), params, opt.init(params), x, y)


# --- flax nnx -----------------------------------------------------------------

def _nnx_model(widths):
    try:
        from flax import nnx
    except ImportError as e:
        raise Skip(str(e)) from None

    class MLP(nnx.Module):
        def __init__(self, widths, rngs):
            self.layers = nnx.List([nnx.Linear(m, n, rngs=rngs)
                                    for m, n in zip(widths[:-1], widths[1:], strict=False)])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.relu(layer(x))
            return self.layers[-1](x)

    model = MLP(widths, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)

    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: ce(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    return nnx, model, optimizer, train_step


def _nnx_jit_runner(parts, x, y):
    """``nnx.jit`` of the step on the (graph-mode) module and optimizer."""
    nnx, model, optimizer, train_step = parts
    step = nnx.jit(train_step, donate_argnums=(0, 1))

    def run(n):
        loss = None
        for _ in range(n):
            loss = step(model, optimizer, x, y)
        return sync(loss)

    return run


def _nnx_split_runner(parts, x, y):
    """``jax.jit`` of the step on the split state, merged inside (the fast NNX pattern)."""
    nnx, model, optimizer, train_step = parts
    graphdef, state0 = nnx.split((model, optimizer))

    @partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss = train_step(model, optimizer, x, y)
        return nnx.state((model, optimizer)), loss

    state = [state0]

    def run(n):
        loss = None
        for _ in range(n):
            state[0], loss = step(state[0], x, y)
        return sync(loss)

    return run


def make_flax_nnx_jit(widths, x, y):
    return _nnx_jit_runner(_nnx_model(widths), x, y)


def make_flax_nnx_split(widths, x, y):
    return _nnx_split_runner(_nnx_model(widths), x, y)


# --- equinox ------------------------------------------------------------------

def _eqx_model(widths):
    try:
        import equinox as eqx
    except ImportError as e:
        raise Skip(str(e)) from None
    hidden = widths[1:-1]
    if len(set(hidden)) != 1:
        raise Skip("eqx.nn.MLP needs equal hidden widths")
    model = eqx.nn.MLP(widths[0], widths[-1], hidden[0], len(hidden), activation=jax.nn.relu,
                       key=jax.random.key(0))
    opt = optax.adam(LR)

    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(lambda m: ce(jax.vmap(m)(x), y))(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return eqx, model, opt, step


def make_equinox_filter_jit(widths, x, y):
    eqx, model, opt, step = _eqx_model(widths)
    jstep = eqx.filter_jit(lambda xy, model, opt_state: step(model, opt_state, *xy),
                           donate="all-except-first")
    state = [model, opt.init(eqx.filter(model, eqx.is_array))]

    def run(n):
        loss = None
        for _ in range(n):
            m, o, loss = jstep((x, y), *state)
            state[:] = [m, o]
        return sync(loss)

    return run


def make_equinox_jit(widths, x, y):
    eqx, model, opt, step = _eqx_model(widths)
    params, static = eqx.partition(model, eqx.is_array)

    def pstep(params, opt_state, x, y):
        m, o, loss = step(eqx.combine(params, static), opt_state, x, y)
        return eqx.filter(m, eqx.is_array), o, loss

    return jitted_runner(pstep, params, opt.init(params), x, y)


# --- PyTorch ------------------------------------------------------------------

def _torch_model(widths, x, y):
    try:
        import torch
    except ImportError as e:
        raise Skip(f"{e} (pip install torch==2.13.0)") from None
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        # JAX's default float32 matmul precision on a GPU is TF32; let PyTorch use it too, or
        # the comparison would be of two precisions (recorded as "matmul_precision").
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    layers = []
    for m, n in zip(widths[:-2], widths[1:-1], strict=False):
        layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-2], widths[-1])).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    return torch, model, opt, torch.from_numpy(np.asarray(x)).to(dev), torch.from_numpy(
        np.asarray(y).astype(np.int64)).to(dev)


def _torch_loop(opt, forward, ty, step):
    """n training steps: zero the grads, cross-entropy of ``forward()``, backward, ``step()``."""
    import torch

    def run(n):
        loss = None
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(forward(), ty)
            loss.backward()
            step()
        return loss.item()

    return run


def _torch_eager(parts):
    torch, model, opt, tx, ty = parts
    return _torch_loop(opt, lambda: model(tx), ty, opt.step)


def _torch_compiled(parts):
    torch, model, opt, tx, ty = parts
    cmodel = torch.compile(model)

    @torch.compile(fullgraph=False)
    def opt_step():
        opt.step()

    return _torch_loop(opt, lambda: cmodel(tx), ty, opt_step)


def make_torch_eager(widths, x, y):
    return _torch_eager(_torch_model(widths, x, y))


def make_torch_compile(widths, x, y):
    return _torch_compiled(_torch_model(widths, x, y))


BUILDERS: dict[str, Callable] = {
    "pure_jax": make_pure_jax,
    "pure_jax_again": make_pure_jax,
    "pure_jax_grads_only": make_pure_jax_grads_only,
    "jaxnet_auto": make_jaxnet("auto"),
    "jaxnet_manual": make_jaxnet("manual"),
    "stax": make_stax,
    "flax_linen": make_flax_linen,
    "flax_nnx_jit": make_flax_nnx_jit,
    "flax_nnx_split": make_flax_nnx_split,
    "equinox_filter_jit": make_equinox_filter_jit,
    "equinox_jit": make_equinox_jit,
    "haiku": make_haiku,
    "torch_eager": make_torch_eager,
    "torch_compile": make_torch_compile,
}


# =============================================================================
# Bigger nets: a 2-d conv net with BatchNorm and pooling, and a transformer stack
# =============================================================================
#
# Every variant below is the same math as the pure-JAX reference: the same layer sizes, the
# same BatchNorm (train mode: batch mean and biased variance over N·H·W per channel,
# ε = 1e-5, running statistics m ← 0.9·m + 0.1·μ carried in the step's state), the same
# attention (separate q/k/v/out projections with biases, softmax(qkᵀ/√d_h)), pre-norm
# blocks with LayerNorm ε = 1e-5 and a tanh-approximate GELU, Adam 1e-3 on every parameter.
# Initialisers are each library's defaults where they are of the same scale.

NET_CONFIGS: dict[str, dict] = {
    # conv 3×3 32 → BN → ReLU → maxpool 2 → conv 3×3 64 → BN → ReLU → maxpool 2 → mean → dense
    "cnn": {"kind": "cnn", "batch": 128, "hw": 32, "in_chan": 3, "chans": (32, 64),
            "classes": 10},
    # 4 pre-norm blocks, width 256, 4 heads of 64, MLP 1024, T = 256, mean over T → dense
    "transformer": {"kind": "transformer", "batch": 16, "T": 256, "dim": 256, "heads": 4,
                    "depth": 4, "mlp": 1024, "classes": 10},
}
NET_VARIANTS = ["pure_jax", "pure_jax_again", "jaxnet_auto", "jaxnet_manual", "flax_linen",
                "flax_nnx_jit", "flax_nnx_split", "equinox_filter_jit", "equinox_jit", "haiku",
                "torch_eager", "torch_compile"]
BN_MOMENTUM, EPS = 0.9, 1e-5


def net_describe(cfg) -> str:
    if cfg["kind"] == "cnn":
        c1, c2 = cfg["chans"]
        return (f"{cfg['hw']}x{cfg['hw']}x{cfg['in_chan']} conv3x3 {c1}-BN-ReLU-maxpool2-conv3x3 "
                f"{c2}-BN-ReLU-maxpool2-mean-dense {cfg['classes']}, batch {cfg['batch']}")
    return (f"{cfg['depth']} pre-norm blocks, width {cfg['dim']}, {cfg['heads']} heads, MLP "
            f"{cfg['mlp']}, T = {cfg['T']}, mean-dense {cfg['classes']}, batch {cfg['batch']}")


def net_flops(cfg) -> int:
    """6 · (multiply-adds of the convolutions / matmuls per step's forward pass) / 2 · 2: the
    forward pass's 2·MACs and the backward pass's 4·MACs (input and weight gradients)."""
    b = cfg["batch"]
    if cfg["kind"] == "cnn":
        hw, cin, (c1, c2), k = cfg["hw"], cfg["in_chan"], cfg["chans"], cfg["classes"]
        macs = hw * hw * 9 * cin * c1 + (hw // 2) ** 2 * 9 * c1 * c2 + c2 * k
        return 6 * b * macs
    t, d, m = cfg["T"], cfg["dim"], cfg["mlp"]
    per_block = t * (4 * d * d + 2 * d * m) + 2 * t * t * d  # projections, MLP, qkᵀ and p·v
    return 6 * b * (cfg["depth"] * per_block + d * cfg["classes"])


def net_data(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b = cfg["batch"]
    if cfg["kind"] == "cnn":
        shape = (b, cfg["hw"], cfg["hw"], cfg["in_chan"])  # NHWC (PyTorch gets it as NCHW)
    else:
        shape = (b, cfg["T"], cfg["dim"])
    x = rng.standard_normal(shape, dtype=np.float32)
    y = rng.integers(0, cfg["classes"], size=(b,)).astype(np.int32)
    return x, y


def state_runner(step, state, x, y):
    """Runner for a jitted ``step(*state, x, y) -> (*state, loss)``, every state part donated."""
    k = len(state)
    jstep = jax.jit(step, donate_argnums=tuple(range(k)))
    state = list(state)

    def run(n):
        loss = None
        for _ in range(n):
            *new, loss = jstep(*state, x, y)
            state[:] = new
        return sync(loss)

    return run


def stateful_optax_step(apply_fn, opt):
    """``apply_fn(params, model_state, x) -> (logits, new_model_state)``; the step shared by the
    pure-JAX, linen and haiku nets."""

    def step(params, model_state, opt_state, x, y):
        def objective(p):
            logits, new_ms = apply_fn(p, model_state, x)
            return ce(logits, y), new_ms

        (loss, model_state), g = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, loss

    return step


# --- pure JAX -----------------------------------------------------------------

def _dense_init(key, m, n):
    return {"w": jax.nn.initializers.lecun_normal()(key, (m, n), jnp.float32),
            "b": jnp.zeros((n,), jnp.float32)}


def _norm_init(c):
    return {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}


def pure_net_init(key, cfg):
    """(params, model_state) of the hand-written net."""
    keys = iter(jax.random.split(key, 64))
    if cfg["kind"] == "cnn":
        c_in, params, ms = cfg["in_chan"], {}, {}
        for i, c in enumerate(cfg["chans"]):
            params[f"conv{i}"] = {"w": jax.nn.initializers.lecun_normal()(
                next(keys), (3, 3, c_in, c), jnp.float32), "b": jnp.zeros((c,), jnp.float32)}
            params[f"bn{i}"] = _norm_init(c)
            ms[f"bn{i}"] = {"mean": jnp.zeros((c,), jnp.float32),
                            "var": jnp.ones((c,), jnp.float32)}
            c_in = c
        params["head"] = _dense_init(next(keys), c_in, cfg["classes"])
        return params, ms
    d, m = cfg["dim"], cfg["mlp"]
    blocks = [{"ln1": _norm_init(d), "q": _dense_init(next(keys), d, d),
               "k": _dense_init(next(keys), d, d), "v": _dense_init(next(keys), d, d),
               "o": _dense_init(next(keys), d, d), "ln2": _norm_init(d),
               "mlp1": _dense_init(next(keys), d, m), "mlp2": _dense_init(next(keys), m, d)}
              for _ in range(cfg["depth"])]
    return {"blocks": blocks, "head": _dense_init(next(keys), d, cfg["classes"])}, {}


def _batch_norm(p, s, x):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
    y = (x - mean) * jax.lax.rsqrt(var + EPS) * p["scale"] + p["bias"]
    new = {"mean": BN_MOMENTUM * s["mean"] + (1 - BN_MOMENTUM) * jax.lax.stop_gradient(mean),
           "var": BN_MOMENTUM * s["var"] + (1 - BN_MOMENTUM) * jax.lax.stop_gradient(var)}
    return y, new


def _max_pool2(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _layer_norm(p, x):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + EPS) * p["scale"] + p["bias"]


def _attention(p, x, heads):
    b, t, d = x.shape
    q, k, v = ((x @ p[n]["w"] + p[n]["b"]).reshape(b, t, heads, d // heads) for n in "qkv")
    s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(d // heads))
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
    return o @ p["o"]["w"] + p["o"]["b"]


def pure_net_apply(cfg):
    """``apply(params, model_state, x) -> (logits, new_model_state)``."""
    if cfg["kind"] == "cnn":
        def apply(params, ms, x):
            new = {}
            for i in range(len(cfg["chans"])):
                c = params[f"conv{i}"]
                x = jax.lax.conv_general_dilated(x, c["w"], (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x, new[f"bn{i}"] = _batch_norm(params[f"bn{i}"], ms[f"bn{i}"], x + c["b"])
                x = _max_pool2(jax.nn.relu(x))
            x = jnp.mean(x, (1, 2))
            return x @ params["head"]["w"] + params["head"]["b"], new
        return apply

    def apply(params, ms, x):
        for p in params["blocks"]:
            x = x + _attention(p, _layer_norm(p["ln1"], x), cfg["heads"])
            h = jax.nn.gelu(_layer_norm(p["ln2"], x) @ p["mlp1"]["w"] + p["mlp1"]["b"])
            x = x + h @ p["mlp2"]["w"] + p["mlp2"]["b"]
        x = jnp.mean(x, 1)
        return x @ params["head"]["w"] + params["head"]["b"], ms
    return apply


def make_net_pure_jax(cfg, x, y):
    opt = optax.adam(LR)
    params, ms = pure_net_init(jax.random.key(0), cfg)
    return state_runner(stateful_optax_step(pure_net_apply(cfg), opt),
                        (params, ms, opt.init(params)), x, y)


# --- jaxnet -------------------------------------------------------------------

def jaxnet_net(cfg):
    import jaxnet
    if cfg["kind"] == "cnn":
        layers = []
        for c in cfg["chans"]:
            layers += [jaxnet.Conv2D(c, 3, W_init=jax.nn.initializers.lecun_normal()),
                       jaxnet.BatchNorm(BN_MOMENTUM, EPS), jaxnet.Relu,
                       jaxnet.MaxPool((2, 2), (2, 2))]
        return jaxnet.serial(*layers, jaxnet.GlobalAvgPool, jaxnet.Dense(cfg["classes"]))
    d, h = cfg["dim"], cfg["heads"]
    blocks = [jaxnet.TransformerBlock(h, d // h, cfg["mlp"], epsilon=EPS)
              for _ in range(cfg["depth"])]
    return jaxnet.serial(*blocks, jaxnet.GlobalAvgPool, jaxnet.Dense(cfg["classes"]))


def make_net_jaxnet(grad):
    def make(cfg, x, y):
        return _jaxnet_runner(jaxnet_net(cfg), grad, x, y, dtype=jnp.float32)

    return make


# --- Flax linen ---------------------------------------------------------------

def make_net_flax_linen(cfg, x, y):
    try:
        import flax.linen as nn
    except ImportError as e:
        raise Skip(str(e)) from None

    if cfg["kind"] == "cnn":
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                for c in cfg["chans"]:
                    x = nn.Conv(c, (3, 3), padding="SAME")(x)
                    x = nn.BatchNorm(use_running_average=False, momentum=BN_MOMENTUM,
                                     epsilon=EPS)(x)
                    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
                return nn.Dense(cfg["classes"])(jnp.mean(x, (1, 2)))
    else:
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                d = cfg["dim"]
                for _ in range(cfg["depth"]):
                    x = x + nn.MultiHeadDotProductAttention(cfg["heads"], qkv_features=d)(
                        nn.LayerNorm(EPS)(x))
                    h = nn.gelu(nn.Dense(cfg["mlp"])(nn.LayerNorm(EPS)(x)))
                    x = x + nn.Dense(d)(h)
                return nn.Dense(cfg["classes"])(jnp.mean(x, 1))

    model = Net()
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    ms = {k: v for k, v in variables.items() if k != "params"}

    def apply(p, ms, x):
        if not ms:
            return model.apply({"params": p}, x), ms
        return model.apply({"params": p, **ms}, x, mutable=list(ms))

    opt = optax.adam(LR)
    return state_runner(stateful_optax_step(apply, opt), (params, ms, opt.init(params)), x, y)


# --- Haiku --------------------------------------------------------------------

def make_net_haiku(cfg, x, y):
    try:
        import haiku as hk
    except ImportError as e:
        raise Skip(str(e)) from None

    def forward(x):
        if cfg["kind"] == "cnn":
            for c in cfg["chans"]:
                x = hk.Conv2D(c, 3, padding="SAME")(x)
                x = hk.BatchNorm(True, True, BN_MOMENTUM, EPS)(x, is_training=True)
                x = hk.max_pool(jax.nn.relu(x), (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            return hk.Linear(cfg["classes"])(jnp.mean(x, (1, 2)))
        d, h = cfg["dim"], cfg["heads"]
        for _ in range(cfg["depth"]):
            a = hk.LayerNorm(-1, True, True, eps=EPS)(x)
            x = x + hk.MultiHeadAttention(h, d // h, w_init=hk.initializers.VarianceScaling())(
                a, a, a)
            m = jax.nn.gelu(hk.Linear(cfg["mlp"])(hk.LayerNorm(-1, True, True, eps=EPS)(x)))
            x = x + hk.Linear(d)(m)
        return hk.Linear(cfg["classes"])(jnp.mean(x, 1))

    model = hk.without_apply_rng(hk.transform_with_state(forward))
    params, ms = model.init(jax.random.key(0), x)
    opt = optax.adam(LR)
    return state_runner(stateful_optax_step(model.apply, opt), (params, ms, opt.init(params)),
                        x, y)


# --- Flax NNX -----------------------------------------------------------------

def _nnx_net(cfg):
    try:
        import flax.linen as nn
        from flax import nnx
    except ImportError as e:
        raise Skip(str(e)) from None
    rngs = nnx.Rngs(0)

    if cfg["kind"] == "cnn":
        class Net(nnx.Module):
            def __init__(self):
                c_in, convs, norms = cfg["in_chan"], [], []
                for c in cfg["chans"]:
                    convs.append(nnx.Conv(c_in, c, (3, 3), padding="SAME", rngs=rngs))
                    norms.append(nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=EPS,
                                               use_running_average=False, rngs=rngs))
                    c_in = c
                self.convs, self.norms = nnx.List(convs), nnx.List(norms)
                self.head = nnx.Linear(c_in, cfg["classes"], rngs=rngs)

            def __call__(self, x):
                for conv, norm in zip(self.convs, self.norms, strict=True):
                    x = nn.max_pool(nnx.relu(norm(conv(x))), (2, 2), (2, 2))
                return self.head(jnp.mean(x, (1, 2)))
    else:
        d = cfg["dim"]

        class Block(nnx.Module):
            def __init__(self):
                self.ln1 = nnx.LayerNorm(d, epsilon=EPS, rngs=rngs)
                self.attn = nnx.MultiHeadAttention(cfg["heads"], d, d, decode=False, rngs=rngs)
                self.ln2 = nnx.LayerNorm(d, epsilon=EPS, rngs=rngs)
                self.mlp1 = nnx.Linear(d, cfg["mlp"], rngs=rngs)
                self.mlp2 = nnx.Linear(cfg["mlp"], d, rngs=rngs)

            def __call__(self, x):
                x = x + self.attn(self.ln1(x))
                return x + self.mlp2(nnx.gelu(self.mlp1(self.ln2(x))))

        class Net(nnx.Module):
            def __init__(self):
                self.blocks = nnx.List([Block() for _ in range(cfg["depth"])])
                self.head = nnx.Linear(d, cfg["classes"], rngs=rngs)

            def __call__(self, x):
                for block in self.blocks:
                    x = block(x)
                return self.head(jnp.mean(x, 1))

    model = Net()
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)

    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: ce(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    return nnx, model, optimizer, train_step


def make_net_flax_nnx_jit(cfg, x, y):
    return _nnx_jit_runner(_nnx_net(cfg), x, y)


def make_net_flax_nnx_split(cfg, x, y):
    return _nnx_split_runner(_nnx_net(cfg), x, y)


# --- Equinox ------------------------------------------------------------------

def _eqx_net(cfg):
    """(eqx, model, model_state, opt, step) with ``step(model, model_state, opt_state, x, y)``.

    Equinox layers see one example (its convolutions are channels-first, (C, H, W)): the net is
    ``jax.vmap``-ed over the batch, BatchNorm averaging over the vmapped axis "batch"."""
    try:
        import equinox as eqx
    except ImportError as e:
        raise Skip(str(e)) from None
    keys = iter(jax.random.split(jax.random.key(0), 64))

    if cfg["kind"] == "cnn":
        class Net(eqx.Module):
            convs: list
            norms: list
            head: eqx.nn.Linear

            def __init__(self):
                c_in, self.convs, self.norms = cfg["in_chan"], [], []
                for c in cfg["chans"]:
                    self.convs.append(eqx.nn.Conv2d(c_in, c, 3, padding="SAME", key=next(keys)))
                    self.norms.append(eqx.nn.BatchNorm(c, "batch", eps=EPS,
                                                       momentum=BN_MOMENTUM, mode="batch"))
                    c_in = c
                self.head = eqx.nn.Linear(c_in, cfg["classes"], key=next(keys))

            def __call__(self, x, state):
                x = jnp.transpose(x, (2, 0, 1))  # HWC → CHW
                for conv, norm in zip(self.convs, self.norms, strict=True):
                    x, state = norm(conv(x), state)
                    x = eqx.nn.MaxPool2d(2, 2)(jax.nn.relu(x))
                return self.head(jnp.mean(x, (1, 2))), state
    else:
        d = cfg["dim"]

        class Block(eqx.Module):
            ln1: eqx.nn.LayerNorm
            attn: eqx.nn.MultiheadAttention
            ln2: eqx.nn.LayerNorm
            mlp1: eqx.nn.Linear
            mlp2: eqx.nn.Linear

            def __init__(self):
                self.ln1 = eqx.nn.LayerNorm(d, eps=EPS)
                self.attn = eqx.nn.MultiheadAttention(cfg["heads"], d, use_query_bias=True,
                                                      use_key_bias=True, use_value_bias=True,
                                                      use_output_bias=True, key=next(keys))
                self.ln2 = eqx.nn.LayerNorm(d, eps=EPS)
                self.mlp1 = eqx.nn.Linear(d, cfg["mlp"], key=next(keys))
                self.mlp2 = eqx.nn.Linear(cfg["mlp"], d, key=next(keys))

            def __call__(self, x):  # (T, d)
                a = jax.vmap(self.ln1)(x)
                x = x + self.attn(a, a, a)
                h = jax.vmap(lambda r: self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(r)))))(x)
                return x + h

        class Net(eqx.Module):
            blocks: list
            head: eqx.nn.Linear

            def __init__(self):
                self.blocks = [Block() for _ in range(cfg["depth"])]
                self.head = eqx.nn.Linear(d, cfg["classes"], key=next(keys))

            def __call__(self, x, state):
                for block in self.blocks:
                    x = block(x)
                return self.head(jnp.mean(x, 0)), state

    model, ms = eqx.nn.make_with_state(Net)()
    opt = optax.adam(LR)

    def step(model, ms, opt_state, x, y):
        def objective(m):
            logits, new_ms = jax.vmap(m, in_axes=(0, None), out_axes=(0, None),
                                      axis_name="batch")(x, ms)
            return ce(logits, y), new_ms

        (loss, ms), grads = eqx.filter_value_and_grad(objective, has_aux=True)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), ms, opt_state, loss

    return eqx, model, ms, opt, step


def make_net_equinox_filter_jit(cfg, x, y):
    eqx, model, ms, opt, step = _eqx_net(cfg)
    jstep = eqx.filter_jit(lambda xy, *state: step(*state, *xy), donate="all-except-first")
    state = [model, ms, opt.init(eqx.filter(model, eqx.is_array))]

    def run(n):
        loss = None
        for _ in range(n):
            *new, loss = jstep((x, y), *state)
            state[:] = new
        return sync(loss)

    return run


def make_net_equinox_jit(cfg, x, y):
    eqx, model, ms, opt, step = _eqx_net(cfg)
    params, static = eqx.partition(model, eqx.is_array)

    def pstep(params, ms, opt_state, x, y):
        m, ms, o, loss = step(eqx.combine(params, static), ms, opt_state, x, y)
        return eqx.filter(m, eqx.is_array), ms, o, loss

    return state_runner(pstep, (params, ms, opt.init(params)), x, y)


# --- PyTorch ------------------------------------------------------------------

def _torch_net(cfg, x, y):
    try:
        import torch
    except ImportError as e:
        raise Skip(f"{e} (pip install torch==2.13.0)") from None
    nn = torch.nn
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tx = torch.from_numpy(np.array(x))
    if cfg["kind"] == "cnn":
        tx = tx.permute(0, 3, 1, 2).contiguous()  # PyTorch's own layout: NCHW
        layers, c_in = [], cfg["in_chan"]
        for c in cfg["chans"]:
            # PyTorch's momentum is the new value's weight: 0.1 = 1 − 0.9
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c, EPS, 1 - BN_MOMENTUM),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(c_in, cfg["classes"]))
    else:
        d = cfg["dim"]

        def gelu(a):
            return nn.functional.gelu(a, approximate="tanh")

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(
                    d, cfg["heads"], cfg["mlp"], dropout=0.0, activation=gelu,
                    layer_norm_eps=EPS, batch_first=True, norm_first=True)
                    for _ in range(cfg["depth"])])
                self.head = nn.Linear(d, cfg["classes"])

            def forward(self, x):
                for block in self.blocks:
                    x = block(x)
                return self.head(x.mean(1))

        model = Net()
    model = model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    return torch, model, opt, tx.to(dev), torch.from_numpy(
        np.asarray(y).astype(np.int64)).to(dev)


def make_net_torch_eager(cfg, x, y):
    return _torch_eager(_torch_net(cfg, x, y))


def make_net_torch_compile(cfg, x, y):
    return _torch_compiled(_torch_net(cfg, x, y))


NET_BUILDERS: dict[str, Callable] = {
    "pure_jax": make_net_pure_jax,
    "pure_jax_again": make_net_pure_jax,
    "jaxnet_auto": make_net_jaxnet("auto"),
    "jaxnet_manual": make_net_jaxnet("manual"),
    "flax_linen": make_net_flax_linen,
    "flax_nnx_jit": make_net_flax_nnx_jit,
    "flax_nnx_split": make_net_flax_nnx_split,
    "equinox_filter_jit": make_net_equinox_filter_jit,
    "equinox_jit": make_net_equinox_jit,
    "haiku": make_net_haiku,
    "torch_eager": make_net_torch_eager,
    "torch_compile": make_net_torch_compile,
}


# --- timing -------------------------------------------------------------------

def make_peak(n=2048):
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    sync(dot(a, b))

    def run(k):
        out = None
        for _ in range(k):
            out = dot(a, b)
        return sync(out)

    return run, 2 * n ** 3


def timed(run, n):
    t0 = time.perf_counter()
    run(n)
    return (time.perf_counter() - t0) / n


def build(specs, log):
    """Build and warm up every variant of ``specs`` ({name: (builder, args)})."""
    runners, skipped = {}, {}
    for name, (builder, builder_args) in specs.items():
        try:
            t0 = time.perf_counter()
            run = builder(*builder_args)
            run(2)  # compile + warm-up, not timed
            log(f"    {name:<20} ready ({time.perf_counter() - t0:.1f} s incl. compile)")
            runners[name] = run
        except Skip as e:
            skipped[name] = str(e)
            log(f"    {name:<20} skipped: {e}")
        except Exception as e:  # a peer's API change must not kill the whole benchmark
            skipped[name] = f"{type(e).__name__}: {e}"
            log(f"    {name:<20} failed: {type(e).__name__}: {e}")
            if os.environ.get("PEERS_DEBUG"):
                traceback.print_exc()
    return runners, skipped


def measure(runners, rounds, target_s, per_call_steps, peak_run, log):
    """Interleaved rounds; returns {variant: [seconds per step per round]} and peak times."""
    names = list(runners)
    t_ref = timed(runners["pure_jax"], 3) * per_call_steps.get("pure_jax", 1)
    n_inner = max(1, round(target_s / t_ref))
    # the peak's matmuls, as many as fill about a quarter of a measurement (at least 4): on a
    # GPU one 2048² product takes ~0.1 ms, and 4 of them timed alone vary by 2×.
    n_peak = max(4, round(target_s / 4 / timed(peak_run, 4)))
    times = {k: [] for k in names}
    peaks = []
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        order = list(names)
        shuffle(order)  # no variant always follows the same one
        for name in order:
            k = max(1, n_inner // per_call_steps.get(name, 1))
            times[name].append(timed(runners[name], k) / per_call_steps.get(name, 1))
            if name.startswith("torch"):
                time.sleep(SETTLE_S)
        peaks.append(timed(peak_run, n_peak))
    log(f"    {rounds} rounds × {n_inner} steps per variant, {n_peak} peak matmuls per round")
    return times, peaks


def summarise(config, widths, batch, times, skipped, flops=None, net=None):
    """Rows of one configuration; :func:`write` adds each row's fraction of the run's peak.
    ``flops`` per step defaults to the MLP's (:func:`flops_per_step`); ``net`` describes a
    non-MLP configuration (its rows get ``widths`` None and a ``net`` field)."""
    ref = times["pure_jax"]
    flops = flops_per_step(widths, batch) if flops is None else flops
    rows = []
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, ref, strict=False)]
        med = statistics.median(ts)
        q = np.percentile(ratios, [25, 75])
        rows.append({
            "config": config, "variant": name, "widths": widths, "batch": batch,
            "median_us": med * 1e6, "min_us": min(ts) * 1e6, "max_us": max(ts) * 1e6,
            "ratio_to_pure_jax": statistics.median(ratios),
            "ratio_q25": float(q[0]), "ratio_q75": float(q[1]),
            "gflops": flops / med / 1e9,
            "rounds": len(ts),
        })
        if net is not None:
            rows[-1]["net"] = net
    for name, why in skipped.items():
        rows.append({"config": config, "variant": name, "skipped": why})
    return rows


def versions():
    out = {"python": platform.python_version(), "jax": jax.__version__}
    for mod in ["jaxlib", "optax", "flax", "equinox", "haiku", "torch", "numpy"]:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def device_name():
    d = jax.devices()[0]
    if d.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f
                           if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"CPU: {cpu}, {os.cpu_count()} cores (jax {d.platform})"
    return f"{d.platform.upper()}: {getattr(d, 'device_kind', str(d))}"


def markdown(result):
    lines = [f"Device: {result['device']}  ",
             f"Matmul peak (jitted 2048² float32 jnp.dot): {result['peak_gflops']:.0f} GFLOP/s  ",
             f"jax {result['versions']['jax']}, {result['rounds']} interleaved rounds; ratio = "
             "median of per-round paired ratios to pure JAX (25–75 % range in brackets).", "",
             "| config | variant | median step | ratio to pure JAX | GFLOP/s | % of peak |",
             "|---|---|---:|---:|---:|---:|"]
    nets = dict.fromkeys((r["config"], r["net"]) for r in result["rows"] if r.get("net"))
    if nets:
        lines[3:3] = [f"{config}: {net}  " for config, net in nets]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['config']} | {row['variant']} | skipped: {row['skipped'][:60]} "
                         "| | | |")
            continue
        us = row["median_us"]
        t = f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"
        lines.append(f"| {row['config']} | {row['variant']} | {t} | "
                     f"{row['ratio_to_pure_jax']:.3f} [{row['ratio_q25']:.2f}–"
                     f"{row['ratio_q75']:.2f}] | {row['gflops']:.1f} | "
                     f"{100 * row['fraction_of_peak']:.1f} % |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "skipped" not in r]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 4.5), squeeze=False)
    for ax, cfg in zip(axes[0], configs, strict=False):
        rs = [r for r in rows if r["config"] == cfg]
        names = [r["variant"] for r in rs]
        med = np.array([r["ratio_to_pure_jax"] for r in rs])
        err = np.array([[m - r["ratio_q25"], r["ratio_q75"] - m]
                        for m, r in zip(med, rs, strict=True)]).T
        colors = ["tab:blue" if n.startswith("jaxnet") else "tab:gray" for n in names]
        ax.barh(names, med, xerr=np.clip(err, 0, None), color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(cfg)
        ax.set_xlabel("step time / pure JAX (lower is faster)")
    fig.suptitle(f"Training step, {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, short measurements")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--configs", default="small,large,deep,small_epoch",
                    help="comma-separated: small, large, deep, small_epoch (MLPs) and "
                         "cnn, transformer (NET_CONFIGS)")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS),
                    help="comma-separated subset of: " + ",".join(ALL_VARIANTS))
    ap.add_argument("--skip", default="", help="variants to leave out")
    ap.add_argument("--target-ms", type=float, default=None,
                    help="time per measurement (default 100 ms, quick 30 ms)")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--markdown")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 10)
    target_s = (args.target_ms or (30 if args.quick else 100)) / 1000
    skip = set(filter(None, args.skip.split(",")))
    variants = [v for v in args.variants.split(",") if v and v not in skip]
    if "pure_jax" not in variants:
        variants.insert(0, "pure_jax")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    peak_run, peak_flops = make_peak()
    result = {"device": device_name(), "versions": versions(), "rounds": rounds, "rows": [],
              "matmul_precision": ("float32 (CPU)" if jax.default_backend() == "cpu" else
                                   "JAX's default for float32 on this backend (TF32 on NVIDIA "
                                   "GPUs); PyTorch set to TF32 to match")}
    log(f"{result['device']}; jax {jax.__version__}")
    all_peaks = []
    configs = args.configs.split(",")
    for config in configs:
        if config in NET_CONFIGS:
            all_peaks += run_net_config(config, variants, result, rounds, target_s, peak_run,
                                        log)
            write(result, all_peaks, peak_flops, args, final=config == configs[-1])
            continue
        epoch = config.endswith("_epoch")
        widths, batch = CONFIGS[config.removesuffix("_epoch")]
        log(f"== {config}: {'-'.join(map(str, widths))}, batch {batch}")
        x, y = (jnp.asarray(a) for a in data(widths, batch))  # device-resident, as in training
        if epoch:
            xs, ys = (jnp.asarray(a) for a in data(widths, batch, EPOCH_STEPS))
            specs = {"pure_jax": (make_pure_jax, (widths, x, y)),
                     "pure_jax_again": (make_pure_jax, (widths, x, y)),
                     "pure_jax_scan": (make_pure_jax_scan, (widths, xs, ys)),
                     "jaxnet_step": (make_jaxnet("auto"), (widths, x, y)),
                     "jaxnet_fit_scan": (make_jaxnet_fit_scan, (widths, xs, ys))}
            runners, skipped = build(specs, log)
            per_call = {"pure_jax_scan": EPOCH_STEPS, "jaxnet_fit_scan": EPOCH_STEPS}
        else:
            runners, skipped = build({v: (BUILDERS[v], (widths, x, y)) for v in variants}, log)
            per_call = {}
        if "pure_jax" not in runners:
            raise SystemExit(f"{config}: pure JAX failed: {skipped.get('pure_jax')}")
        times, peaks = measure(runners, rounds, target_s, per_call, peak_run, log)
        all_peaks += peaks
        result["rows"] += summarise(config, widths, batch, times, skipped)
        del runners
        write(result, all_peaks, peak_flops, args, final=config == configs[-1])


def run_net_config(config, variants, result, rounds, target_s, peak_run, log):
    """Build, time and summarise one of :data:`NET_CONFIGS`; returns the peak timings."""
    cfg = NET_CONFIGS[config]
    log(f"== {config}: {net_describe(cfg)}")
    x, y = (jnp.asarray(a) for a in net_data(cfg))
    names = [v for v in variants if v in NET_BUILDERS]  # stax and grads_only: MLP only
    runners, skipped = build({v: (NET_BUILDERS[v], (cfg, x, y)) for v in names}, log)
    if "pure_jax" not in runners:
        raise SystemExit(f"{config}: pure JAX failed: {skipped.get('pure_jax')}")
    times, peaks = measure(runners, rounds, target_s, {}, peak_run, log)
    result["rows"] += summarise(config, None, cfg["batch"], times, skipped,
                                flops=net_flops(cfg), net=net_describe(cfg))
    return peaks


def write(result, all_peaks, peak_flops, args, final):
    """Fill in the peak (one for the whole run so far) and write the outputs; called after
    every configuration, so that a run stopped early keeps what it measured."""
    peak_gflops = peak_flops / statistics.median(all_peaks) / 1e9
    for row in result["rows"]:
        if "gflops" in row:
            row["fraction_of_peak"] = row["gflops"] / peak_gflops
    result["peak_gflops"] = peak_gflops
    result["peak_gflops_range"] = [peak_flops / max(all_peaks) / 1e9,
                                   peak_flops / min(all_peaks) / 1e9]
    result["complete"] = final
    md = markdown(result)
    if final:
        print(md)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
