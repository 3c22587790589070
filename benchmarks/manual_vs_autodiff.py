"""Manual backpropagation against automatic differentiation, three ways: step time, compile
time, memory, kernels, FLOPs and bytes.

A step is one loss-and-gradient evaluation of a net, by three paths:

- manual: ``jaxnet.manual_value_and_grad(net, loss)``, each layer's hand-written rule;
- jaxnet autodiff: ``jax.value_and_grad`` through jaxnet's layers (its hand-written JVP rules:
  custom_jvp activations, the loss's hand-written gradient, Dense's matmul rule);
- plain autodiff: ``jax.value_and_grad`` of the same net written once more here with the
  rule-free formulas (``jnp``/``jax.nn`` ops, ``Activation.formula``, ``loss.formula``,
  ``lax.conv_general_dilated``, ``lax.reduce_window``, ``jax.nn.softmax`` attention), taking
  jaxnet's params tree; each plain net is checked to give jaxnet's outputs. What JAX does with
  no hand-written derivative at all, and the reference every ratio is taken to.

The nets (``--nets``):

- ``mlp``: ``jaxnet.mlp([width] * depth, 10, activation)`` on (batch, width), integer labels,
  softmax cross-entropy on the logits (the original sweep: depth × width × activation × batch);
- ``cnn1d``: the MNIST-1D CNN, Conv1D 25 channels k5/k3/k3 stride 2 padding 1, ReLU, Dense 10 on
  (batch, 40, 1), over batch sizes;
- ``cnn2d``: ``stages`` × [Conv2D 3×3, BatchNorm, ReLU, Conv2D 3×3, BatchNorm, ReLU, MaxPool
  2×2] with width, 2·width, … channels, GlobalAvgPool, Dense 10 on 32×32×3 random inputs
  (BatchNorm in train mode: the step also returns the new running statistics);
- ``attention``: a self-attention layer ``MultiHeadAttention(heads, 64)`` (projections,
  attention, output projection) on (batch, T, 64·heads), L2 loss to random targets, causal
  and not; manual runs both backward rules (``store`` and ``recompute``) and plain autodiff
  also runs with ``jax.checkpoint`` around the softmax attention.

Every path is compiled (``lower`` + ``compile``: the compile time) and its executables are
timed in interleaved rounds, the order rotating each round, so that machine drift cancels; a
path's ``ratio`` is the median over rounds of its time ÷ plain autodiff's in the same round.
Memory is XLA's ``compiled.memory_analysis()``: ``temp`` (the buffers the step allocates
for itself: what the gradient path chooses to keep) and ``peak`` = arguments + outputs +
temp − aliased (the CPU backend reports no peak of its own). ``kernels`` counts the
top-level ops of the optimised HLO's entry computation (fusions, dots, convolutions, loops,
copies; not parameters, constants, tuples or bitcasts); FLOPs and bytes are XLA's
``cost_analysis()`` (a loop body is counted once). Paths with the same HLO op counts, FLOPs
and bytes are reported as one program (``same_as``); otherwise the ops that differ from
plain autodiff's are listed (``op_diff_vs_plain``). The gradient difference is
max over parameter arrays of max|g − g_plain| / max|g_plain| (an array whose exact gradient
is 0, such as the key bias of attention, is compared at 1e-3 of the largest gradient). The
op-by-op (no jit) times are kept for the MLP, where jaxnet's paths are retraced in Python.

``--attention-memory`` measures the memory-efficient attention backward (issue 13 part 3):
T = 512 and 4096, batch 1, 4 heads of 64, causal.

    python benchmarks/manual_vs_autodiff.py --quick --json out.json --plot out.png
    python benchmarks/manual_vs_autodiff.py --nets attention --attention-memory --json a.json
    python benchmarks/manual_vs_autodiff.py --device-scale 16   # on a GPU: 16× batches
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import statistics
import sys
import time
from itertools import product

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxnet as jn
from jaxnet.backprop import manual_value_and_grad
from jaxnet.protocol import Layer

FULL = {"depth": [1, 2, 4, 8, 16, 32], "width": [64, 256, 1024, 4096],
        "activation": ["sigmoid", "tanh", "relu"], "batch": [32, 256, 1024]}
BASE = {"depth": 4, "width": 256, "activation": "relu", "batch": 256}
QUICK = {"depth": [1, 4, 16], "width": [64, 256, 1024], "activation": ["sigmoid", "tanh", "relu"],
         "batch": [32, 256, 1024]}
# conv and attention points: the full grids and the --quick subsets (each a list of dicts)
NET_FULL = {
    "cnn1d": [{"batch": b} for b in (32, 128, 512, 2048)],
    "cnn2d": [{"stages": s, "width": w, "batch": b} for s in (1, 2, 3) for w in (16, 32, 64)
              for b in (32, 128)],
    "attention": [{"T": t, "batch": b, "heads": h, "causal": c}
                  for t in (128, 512, 2048, 4096) for b, h in ((1, 4), (4, 8))
                  for c in (False, True)],
}
NET_QUICK = {
    "cnn1d": [{"batch": 32}, {"batch": 512}],
    "cnn2d": [{"stages": 1, "width": 16, "batch": 32}, {"stages": 2, "width": 16, "batch": 32},
              {"stages": 2, "width": 32, "batch": 32}, {"stages": 2, "width": 16, "batch": 128}],
    "attention": [{"T": 128, "batch": 8, "heads": 8, "causal": False},
                  {"T": 128, "batch": 8, "heads": 8, "causal": True},
                  {"T": 512, "batch": 1, "heads": 4, "causal": False},
                  {"T": 512, "batch": 1, "heads": 4, "causal": True},
                  {"T": 2048, "batch": 1, "heads": 4, "causal": True}],
}
# issue 13 part 3: the memory-efficient attention backward, and the block sizes tried
MEMORY_POINTS = [{"T": t, "batch": 1, "heads": 4, "causal": True} for t in (512, 4096)]
MEMORY_BLOCK_SIZES = (64, 128, 256, 512)
CLASSES = 10
HEAD_DIM = 64
LOSS = jn.softmax_cross_entropy


def points(quick: bool, scale: int) -> list[dict]:
    """The full factorial grid, or (quick) one axis at a time around BASE."""
    if quick:
        seen, out = set(), []
        for axis, values in QUICK.items():
            for v in values:
                p = {**BASE, axis: v}
                key = tuple(p.values())
                if key not in seen:
                    seen.add(key)
                    out.append(p)
    else:
        out = [dict(zip(FULL, values)) for values in product(*FULL.values())]
    return [{**p, "batch": p["batch"] * scale} for p in out]


def versions() -> dict:
    import jaxlib
    import optax
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "jaxnet": jn.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device() -> str:
    d = jax.devices()[0]
    kind = d.device_kind
    if d.platform == "cpu":
        kind = f"{cpu_model()}, {os.cpu_count()} cores visible"
    return f"{d.platform}: {kind} ({jax.device_count()} device(s), default {d})"


# --- the nets, each twice: jaxnet's layers and the plain rule-free formulas ------------------

def _act(name):
    return getattr(jn.activations, name).formula


def _dense(p, x):
    return x @ p["w"] + p["b"]


def _conv(p, x, stride=1, pads="SAME"):
    n = x.ndim - 2
    spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[n]
    pads = pads if isinstance(pads, str) else [tuple(pp) for pp in pads]
    return lax.conv_general_dilated(x, p["w"], (stride,) * n, pads,
                                    dimension_numbers=spec) + p["b"]


def _batch_norm(p, s, x, momentum=0.9, epsilon=1e-5):
    """Train-mode batch normalisation by its formula; returns (y, new running statistics)."""
    axes = tuple(range(x.ndim - 1))
    mean, var = jnp.mean(x, axes), jnp.var(x, axes)
    new = {"mean": momentum * s["mean"] + (1 - momentum) * lax.stop_gradient(mean),
           "var": momentum * s["var"] + (1 - momentum) * lax.stop_gradient(var)}
    return (x - mean) / jnp.sqrt(var + epsilon) * p["scale"] + p["bias"], new


def _max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _softmax_attention(q, k, v, causal):
    """o = softmax(q·kᵀ/√d_h) v per head, −∞ above the diagonal when causal."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        t = s.shape[-1]
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def mlp_nets(p: dict):
    """(jaxnet net, plain apply(params, state, x) -> (y, state))."""
    net = jn.mlp([p["width"]] * p["depth"], CLASSES, p["activation"])
    f = _act(p["activation"])

    def plain(params, state, x):
        for i in range(p["depth"]):
            x = f(_dense(params[f"dense_{i}"], x))
        return _dense(params[f"dense_{p['depth']}"], x), state
    return net, plain


CNN1D_PAD = ((1, 1),)


def cnn1d_nets(p: dict):
    """The MNIST-1D CNN (examples/mnist1d_cnn.py's architecture): 40 → 19 → 10 → 5 positions."""
    net = jn.serial(jn.Conv1D(25, 5, strides=2, padding=CNN1D_PAD), jn.Relu,
                    jn.Conv1D(25, 3, strides=2, padding=CNN1D_PAD), jn.Relu,
                    jn.Conv1D(25, 3, strides=2, padding=CNN1D_PAD), jn.Relu,
                    jn.Flatten, jn.Dense(CLASSES))
    relu = _act("relu")

    def plain(params, state, x):
        for i in range(3):
            x = relu(_conv(params[f"conv_{i}"], x, 2, CNN1D_PAD))
        return _dense(params["dense_0"], x.reshape(x.shape[0], -1)), state
    return net, plain


def cnn2d_nets(p: dict):
    layers = []
    for i in range(p["stages"]):
        c = p["width"] * 2 ** i
        layers += [jn.Conv2D(c, 3), jn.BatchNorm(), jn.Relu, jn.Conv2D(c, 3), jn.BatchNorm(),
                   jn.Relu, jn.MaxPool((2, 2), (2, 2))]
    net = jn.serial(*layers, jn.GlobalAvgPool, jn.Dense(CLASSES))
    relu = _act("relu")

    def plain(params, state, x):
        new = {}
        for i in range(2 * p["stages"]):
            name = f"batch_norm_{i}"
            x, new[name] = _batch_norm(params[name], state[name], _conv(params[f"conv_{i}"], x))
            x = relu(x)
            if i % 2:
                x = _max_pool(x)
        return _dense(params["dense_0"], jnp.mean(x, (1, 2))), new
    return net, plain


def _with_kwargs(layer, **fixed):
    """``layer`` with keyword arguments fixed (``causal=True``): ``manual_value_and_grad``
    passes only ``rng=`` and ``mode=`` on to the layers."""
    return Layer(layer.init, lambda q, x, **kw: layer.apply(q, x, **fixed),
                 fwd=lambda q, x, **kw: layer.fwd(q, x, **fixed), bwd=layer.bwd,
                 kind=layer.kind, label=layer.label)


def attention_nets(p: dict, backward: str = "store"):
    att = jn.MultiHeadAttention(p["heads"], HEAD_DIM, backward=backward,
                                block_size=p.get("block_size", 128))
    net = _with_kwargs(att, causal=p["causal"])
    h = p["heads"]

    def plain(params, state, x, checkpoint=False):
        q, k, v = (_dense(params[n], x).reshape(*x.shape[:2], h, HEAD_DIM)
                   for n in ("query", "key", "value"))
        core = jax.checkpoint(_softmax_attention, static_argnums=3) if checkpoint else \
            _softmax_attention
        o = core(q, k, v, p["causal"]).reshape(*x.shape[:2], h * HEAD_DIM)
        return _dense(params["out"], o), state
    return net, plain


NETS = {"mlp": mlp_nets, "cnn1d": cnn1d_nets, "cnn2d": cnn2d_nets, "attention": attention_nets}


def make_data(net_kind: str, p: dict):
    """(input shape, targets, loss) of a point; inputs are standard normal."""
    k = jax.random.key(3)
    if net_kind == "attention":
        shape = (p["batch"], p["T"], p["heads"] * HEAD_DIM)
        return shape, 0.1 * jax.random.normal(k, shape, jnp.float32), jn.l2_loss
    shape = {"mlp": lambda: (p["batch"], p.get("width", 0)), "cnn1d": lambda: (p["batch"], 40, 1),
             "cnn2d": lambda: (p["batch"], 32, 32, 3)}[net_kind]()
    return shape, jax.random.randint(k, (p["batch"],), 0, CLASSES), jn.softmax_cross_entropy


def _value_and_grad(apply_state, loss, stateful):
    """jax.value_and_grad of loss(apply_state(params, state, x)[0], t), returning (loss, grads)
    or, for a stateful net, ((loss, new_state), grads) as manual_value_and_grad does."""
    def objective(params, state, x, t):
        y, new_state = apply_state(params, state, x)
        return loss(y, t), new_state

    grad = jax.value_and_grad(objective, has_aux=True)
    if stateful:
        return grad

    def loss_and_grads(params, state, x, t):
        (value, _), grads = grad(params, state, x, t)
        return value, grads
    return loss_and_grads


def problem(net_kind: str, p: dict):
    """({path: f(params, state, x, t)}, (params, state, x, t)); plain autodiff is checked to
    give jaxnet's outputs first."""
    net, plain = NETS[net_kind](p)
    shape, targets, loss = make_data(net_kind, p)
    k1, k2 = jax.random.split(jax.random.key(0))
    _, params, state = net.init_with_state(k1, shape)
    params, state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), (params, state))
    x = jax.random.normal(k2, shape, jnp.float32)
    stateful = net.stateful
    mode = {"mode": "train"} if stateful else {}
    y_net = net.apply_with_state(params, state, x, **mode)[0]
    y_plain = plain(params, state, x)[0]
    err = float(jnp.max(jnp.abs(y_net - y_plain)) / (jnp.max(jnp.abs(y_net)) or 1.0))
    if err > 1e-4:
        raise AssertionError(f"{net_kind} {p}: the plain net differs from jaxnet's by {err:.2e}")

    def manual_of(m):
        f = manual_value_and_grad(m, loss)
        if stateful:
            return lambda q, s, x, t: f(q, x, t, state=s, mode="train")
        return lambda q, s, x, t: f(q, x, t)

    def jaxnet_apply(q, s, x):
        return net.apply_with_state(q, s, x, **mode)

    paths = {}
    if net_kind == "attention":
        paths["manual_store"] = manual_of(net)
        paths["manual_recompute"] = manual_of(attention_nets(p, "recompute")[0])
    else:
        paths["manual"] = manual_of(net)
    paths["jaxnet_autodiff"] = _value_and_grad(jaxnet_apply, loss, stateful)
    paths["plain_autodiff"] = _value_and_grad(plain, loss.formula, stateful)
    if net_kind == "attention":
        paths["plain_checkpoint"] = _value_and_grad(
            lambda q, s, x: plain(q, s, x, checkpoint=True), loss.formula, stateful)
    return paths, (params, state, x, targets)


# --- measuring ---------------------------------------------------------------------------------

def compile_step(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def memory(compiled) -> dict:
    """XLA's memory analysis: temp, arguments, outputs and peak = args + outputs + temp − alias
    (the CPU backend's own ``peak_memory_in_bytes`` leaves out the temporaries)."""
    m = compiled.memory_analysis()
    arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
    return {"temp_bytes": temp, "argument_bytes": arg, "output_bytes": out,
            "peak_bytes": arg + out + temp - alias}


def peak_bytes(compiled) -> int:
    return memory(compiled)["peak_bytes"]


NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def hlo_profile(compiled) -> dict:
    """Counts of what the compiled step runs: kernels (fusions), dots, copies; FLOPs, bytes."""
    text = compiled.as_text()
    entry = text[text.rfind("ENTRY"):]
    opcode = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = .*? ([a-z][\w\-]*)\(", re.M)
    ops = collections.Counter(opcode.findall(text))
    top = collections.Counter(opcode.findall(entry))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"entry_ops": dict(top), "all_ops": dict(ops),
            "kernels": sum(n for op, n in top.items() if op not in NOT_KERNELS),
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def explain(manual: dict, auto: dict) -> list[str]:
    """Where the manual step's time goes, compared with autodiff's, from the compiled HLO."""
    lines = [f"    FLOPs {manual['flops']:.4g} vs {auto['flops']:.4g}, bytes accessed "
             f"{manual['bytes_accessed']:.4g} vs {auto['bytes_accessed']:.4g} (manual vs autodiff)"]
    for title, key in (("top-level ops (kernels)", "entry_ops"), ("all HLO ops", "all_ops")):
        m, a = manual[key], auto[key]
        diff = {k: (m.get(k, 0), a.get(k, 0)) for k in sorted(set(m) | set(a))
                if m.get(k, 0) != a.get(k, 0)}
        same = ", ".join(f"{k} {m[k]}" for k in ("fusion", "dot", "copy", "transpose") if k in m
                         and k not in diff)
        shown = ", ".join(f"{k} {x} vs {y}" for k, (x, y) in diff.items()) or "none"
        lines.append(f"    {title}: differing {shown}; equal: {same or '-'}")
    kernels_m = manual["entry_ops"].get("fusion", 0) + manual["entry_ops"].get("dot", 0)
    kernels_a = auto["entry_ops"].get("fusion", 0) + auto["entry_ops"].get("dot", 0)
    if (kernels_m <= kernels_a and manual["flops"] <= 1.001 * auto["flops"]
            and manual["bytes_accessed"] <= 1.001 * auto["bytes_accessed"]):
        lines.append(f"    manual runs no more work ({kernels_m} vs {kernels_a} kernels, FLOPs and "
                     f"bytes no higher): the gap is timing noise of this machine, not work")
    else:
        lines.append("    manual runs more work here: see the differing ops above")
    return lines


def timed(fn, args, n: int) -> float:
    """Mean seconds per call over ``n`` calls, each waited for."""
    t0 = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / n


def interleaved(a, b, args, budget_s: float, rounds: int) -> tuple[list, list]:
    """Per-call times of a and b over paired rounds (A B, B A, …) within about ``budget_s``."""
    for _ in range(2):  # warm-up: caches, first-call costs
        jax.block_until_ready(a(*args))
        jax.block_until_ready(b(*args))
    one = max(min(timed(a, args, 1) for _ in range(2)), min(timed(b, args, 1) for _ in range(2)))
    rounds = max(3, min(rounds, int(budget_s / (2 * one))))
    n = max(1, int(budget_s / (2 * rounds * one)))
    ta, tb = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ta.append(timed(a, args, n))
            tb.append(timed(b, args, n))
        else:
            tb.append(timed(b, args, n))
            ta.append(timed(a, args, n))
    return ta, tb


def max_rel_diff(grads, ref) -> float:
    """max over parameter arrays of max|g − ref| / max|ref|, an array's scale floored at 1e-3
    of the largest gradient of the tree (so that an exactly-zero gradient compares its noise
    against the tree's scale, not against itself)."""
    pairs = list(zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)))
    top = max((float(jnp.max(jnp.abs(a))) for _, a in pairs), default=0.0)
    worst = 0.0
    for g, a in pairs:
        scale = max(float(jnp.max(jnp.abs(a))), 1e-3 * top)
        worst = max(worst, float(jnp.max(jnp.abs(g - a))) / (scale or 1.0))
    return worst


def interleaved_many(fns: dict, args, budget_s: float, rounds: int) -> dict:
    """Per-call times of every path over rounds within about ``budget_s``; the order of the
    paths rotates from round to round (A B C, B C A, C A B, …)."""
    names = list(fns)
    for name in names:  # warm-up: caches, first-call costs
        jax.block_until_ready(fns[name](*args))
    one = max(timed(fns[n], args, 1) for n in names)
    rounds = max(3, min(rounds, int(budget_s / (len(names) * one))))
    n = max(1, int(budget_s / (len(names) * rounds * one)))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(fns[name], args, n))
    return times


REFERENCE = "plain_autodiff"


def measure_paths(paths: dict, data, args) -> tuple[dict, dict]:
    """Compile, check and time every path; ({path: columns}, {path: compiled})."""
    compiled, out = {}, {}
    for name, fn in paths.items():
        compiled[name], seconds = compile_step(fn, data)
        prof = hlo_profile(compiled[name])
        out[name] = {"compile_s": seconds, **memory(compiled[name]), "kernels": prof["kernels"],
                     "flops": prof["flops"], "bytes_accessed": prof["bytes_accessed"],
                     "_ops": prof["all_ops"]}
    results = {name: c(*data) for name, c in compiled.items()}
    ref_value, ref_grads = results[REFERENCE]
    for name, (value, grads) in results.items():
        out[name]["max_rel_grad_diff"] = max_rel_diff(grads, ref_grads)
        out[name]["loss_diff"] = abs(float(jax.tree_util.tree_leaves(value)[0])
                                     - float(jax.tree_util.tree_leaves(ref_value)[0]))
    times = interleaved_many(compiled, data, args.budget, args.rounds)
    ref = times[REFERENCE]
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, ref)]
        out[name].update(us=statistics.median(ts) * 1e6, ratio=statistics.median(ratios),
                         ratio_min=min(ratios), ratio_max=max(ratios), rounds=len(ratios))
    program_of = {}
    for name, col in out.items():
        key = (tuple(sorted(col["_ops"].items())), col["flops"], col["bytes_accessed"])
        col["same_as"] = program_of.setdefault(key, name)
    ref_ops = out[REFERENCE]["_ops"]
    for col in out.values():
        ops = col.pop("_ops")
        col["op_diff_vs_plain"] = {op: [ops.get(op, 0), ref_ops.get(op, 0)]
                                   for op in sorted(set(ops) | set(ref_ops))
                                   if ops.get(op, 0) != ref_ops.get(op, 0)}
    return out, compiled, times


def run_point(p: dict, args) -> tuple[dict, list[str]]:
    """An MLP point: the three paths, plus the original manual ÷ jaxnet-autodiff columns."""
    paths, data = problem("mlp", p)
    cols, compiled, times = measure_paths(paths, data, args)
    m, a = cols["manual"], cols["jaxnet_autodiff"]
    ratios = [x / y for x, y in zip(times["manual"], times["jaxnet_autodiff"])]
    row = {**p, "manual_us": m["us"], "autodiff_us": a["us"], "plain_us": cols[REFERENCE]["us"],
           "ratio": statistics.median(ratios), "ratio_min": min(ratios),
           "ratio_max": max(ratios), "rounds": len(ratios),
           "compile_manual_s": m["compile_s"], "compile_autodiff_s": a["compile_s"],
           "manual_peak_bytes": m["peak_bytes"], "autodiff_peak_bytes": a["peak_bytes"],
           "max_rel_grad_diff": max_rel_diff(*(jax.tree_util.tree_leaves(
               compiled[n](*data)[1]) for n in ("manual", "jaxnet_autodiff"))),
           "loss_diff": abs(m["loss_diff"] - a["loss_diff"]), "paths": cols}
    prof_m, prof_a = hlo_profile(compiled["manual"]), hlo_profile(compiled["jaxnet_autodiff"])
    row["flops"] = prof_a["flops"]
    row["manual_fusions"] = prof_m["entry_ops"].get("fusion", 0)
    row["autodiff_fusions"] = prof_a["entry_ops"].get("fusion", 0)
    notes = []
    if row["ratio"] > args.slower_than:
        notes = [f"  manual slower ({row['ratio']:.3f}x) at depth {p['depth']} width "
                 f"{p['width']} {p['activation']} batch {p['batch']}:"] + explain(prof_m, prof_a)
    if not args.no_nojit:
        eager = interleaved_many(paths, data, args.budget / 2, max(3, args.rounds // 2))
        for name, ts in eager.items():
            cols[name]["nojit_us"] = statistics.median(ts) * 1e6
            cols[name]["nojit_ratio"] = statistics.median(
                [t / r for t, r in zip(ts, eager[REFERENCE])])
        row.update(manual_nojit_us=cols["manual"]["nojit_us"],
                   autodiff_nojit_us=cols["jaxnet_autodiff"]["nojit_us"],
                   nojit_ratio=statistics.median([x / y for x, y in zip(eager["manual"],
                                                                        eager["jaxnet_autodiff"])]))
    else:
        row.update(manual_nojit_us=None, autodiff_nojit_us=None, nojit_ratio=None)
    return row, notes


def run_net_point(net_kind: str, p: dict, args) -> dict:
    paths, data = problem(net_kind, p)
    cols = measure_paths(paths, data, args)[0]
    return {"net": net_kind, **p, "paths": cols}


HEADER = (f"{'depth':>5} {'width':>5} {'act':>7} {'batch':>6} | {'manual µs':>10} "
          f"{'autodiff µs':>11} {'ratio':>6} | {'nojit ratio':>11} | {'compile s m/a':>13} | "
          f"{'peak MiB m/a':>15} | {'max rel Δgrad':>13}")


def format_row(r: dict) -> str:
    nojit = f"{r['nojit_ratio']:.3f}" if r["nojit_ratio"] is not None else "-"
    mib = 2.0 ** 20
    return (f"{r['depth']:>5} {r['width']:>5} {r['activation']:>7} {r['batch']:>6} | "
            f"{r['manual_us']:>10.1f} {r['autodiff_us']:>11.1f} {r['ratio']:>6.3f} | "
            f"{nojit:>11} | {r['compile_manual_s']:>6.2f}/{r['compile_autodiff_s']:<6.2f} | "
            f"{r['manual_peak_bytes'] / mib:>7.2f}/{r['autodiff_peak_bytes'] / mib:<7.2f} | "
            f"{r['max_rel_grad_diff']:>13.2e}")


def plot(rows: list[dict], path: str, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_act = BASE["activation"]
    base_batch = statistics.median_low(sorted({r["batch"] for r in rows}))
    sel = [r for r in rows if r["activation"] == base_act and r["batch"] == base_batch] or rows
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x_axis, line_axis in ((axes[0], "width", "depth"), (axes[1], "depth", "width")):
        for value in sorted({r[line_axis] for r in sel}):
            pts = sorted((r[x_axis], r["ratio"]) for r in sel if r[line_axis] == value)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"{line_axis} {value}")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhspan(0.95, 1.05, color="0.9", zorder=0, label="±5 % (noise)")
        ax.set_xlabel(x_axis)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("jitted manual ÷ jax.grad step time")
    fig.suptitle(f"manual backprop vs jax.grad ({base_act}, batch {base_batch}); {device}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def estimate_full(rows: list[dict], args) -> str:
    """Rough cost of the full sweep on this device, from the FLOP rate measured here."""
    rate = max(r["flops"] / (r["autodiff_us"] * 1e-6) for r in rows)
    compile_per_layer = statistics.median(
        (r["compile_manual_s"] + r["compile_autodiff_s"]) / (r["depth"] + 1) for r in rows)
    nojit_overhead = statistics.median(
        ((r["manual_nojit_us"] or 0) - r["manual_us"]) / (r["depth"] + 1) for r in rows) * 1e-6
    total = 0.0
    for p in points(False, args.device_scale):
        # forward 2·B·Σ(n_in·n_out), backward twice that
        flops = 6.0 * p["batch"] * p["width"] * (p["width"] * p["depth"] + CLASSES)
        step = flops / rate
        # warm-up and sizing: 8 calls; then at least 3 paired rounds (6 calls)
        jit_s = 8 * step + max(args.budget, 6 * step)
        nojit_s = 0 if args.no_nojit else (8 * step + max(args.budget / 2, 6 * step)
                                           + 14 * nojit_overhead * (p["depth"] + 1))
        total += compile_per_layer * (p["depth"] + 1) + jit_s + nojit_s
    return (f"full sweep ({len(points(False, args.device_scale))} points) estimated at "
            f"~{total / 60:.0f} min on this device (best measured rate {rate / 1e9:.1f} GFLOP/s)")


PATH_HEADER = (f"  {'path':<17} {'µs':>10} {'ratio':>6} {'(min–max)':>12} | {'compile s':>9} | "
               f"{'temp MiB':>9} {'peak MiB':>9} | {'kernels':>7} {'GFLOP':>7} {'MB':>8} | "
               f"{'Δgrad':>8} | same program as")


def format_paths(cols: dict) -> list[str]:
    mib = 2.0 ** 20
    return [f"  {name:<17} {c['us']:>10.1f} {c['ratio']:>6.3f} "
            f"{c['ratio_min']:>5.2f}–{c['ratio_max']:<5.2f} | {c['compile_s']:>9.2f} | "
            f"{c['temp_bytes'] / mib:>9.2f} {c['peak_bytes'] / mib:>9.2f} | {c['kernels']:>7} "
            f"{c['flops'] / 1e9:>7.3f} {c['bytes_accessed'] / 1e6:>8.2f} | "
            f"{c['max_rel_grad_diff']:>8.1e} | {c['same_as']}" for name, c in cols.items()]


def point_label(row: dict) -> str:
    return " ".join(f"{k} {row[k]}" for k in ("net", "stages", "width", "T", "heads", "batch",
                                            "causal") if k in row)


def attention_memory(args) -> dict:
    """Issue 13 part 3: every attention path at MEMORY_POINTS, the recompute rule's temp
    memory for each of MEMORY_BLOCK_SIZES, and the ratios the issue sets targets for."""
    rows = []
    for p in MEMORY_POINTS:
        row = run_net_point("attention", p, args)
        sizes = {}
        for size in MEMORY_BLOCK_SIZES:
            paths, data = problem("attention", {**p, "block_size": size})
            sizes[str(size)] = memory(compile_step(paths["manual_recompute"], data)[0])
        row["recompute_memory_by_block_size"] = sizes
        c = row["paths"]
        row["targets"] = {
            "recompute_peak_vs_plain": c["manual_recompute"]["peak_bytes"]
            / c["plain_autodiff"]["peak_bytes"],
            "recompute_peak_vs_checkpoint": c["manual_recompute"]["peak_bytes"]
            / c["plain_checkpoint"]["peak_bytes"],
            "recompute_temp_vs_plain": c["manual_recompute"]["temp_bytes"]
            / c["plain_autodiff"]["temp_bytes"],
            "recompute_time_vs_plain": c["manual_recompute"]["ratio"],
            "store_time_vs_plain": c["manual_store"]["ratio"]}
        rows.append(row)
        print(point_label(row) + "  (attention memory)", flush=True)
        print(PATH_HEADER)
        for line in format_paths(c):
            print(line, flush=True)
        print("  recompute temp MiB by block size: " + ", ".join(
            f"{k}: {v['temp_bytes'] / 2 ** 20:.1f}" for k, v in sizes.items()))
        print("  targets: " + ", ".join(f"{k} {v:.3f}" for k, v in row["targets"].items()),
              flush=True)
    return {"points": rows}


PATH_COLORS = {"manual": "tab:blue", "manual_store": "tab:blue", "manual_recompute": "tab:cyan",
               "jaxnet_autodiff": "tab:orange", "plain_autodiff": "tab:green",
               "plain_checkpoint": "tab:purple"}


def plot_nets(net_rows: list[dict], memory_rows: list[dict], path: str, device: str) -> None:
    """Ratios to plain autodiff and peak memory of each path against the conv nets' depth,
    width and batch, and attention's sequence length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    conv = [r for r in net_rows if r["net"] == "cnn2d"]
    if conv:
        base_w = min(r["width"] for r in conv)
        base_b = min(r["batch"] for r in conv)
        base_s = max(r["stages"] for r in conv)
        panels.append(("cnn2d: depth (stages)", "stages", [r for r in conv if r["width"] == base_w
                                                             and r["batch"] == base_b]))
        panels.append(("cnn2d: width (channels)", "width", [r for r in conv if r["stages"] == base_s
                                                           and r["batch"] == base_b]))
        panels.append(("cnn2d: batch", "batch", [r for r in conv if r["stages"] == base_s
                                                 and r["width"] == base_w]))
    one_d = [r for r in net_rows if r["net"] == "cnn1d"]
    if one_d:
        panels.append(("cnn1d (MNIST-1D CNN): batch", "batch", one_d))
    att = [r for r in net_rows + memory_rows if r["net"] == "attention" and r["batch"] == 1
           and r["causal"]]
    if att:
        seen, uniq = set(), []
        for r in att:
            if r["T"] not in seen:
                seen.add(r["T"])
                uniq.append(r)
        panels.append(("attention, batch 1, 4 heads, causal: T", "T", uniq))
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 6.6), squeeze=False)
    lines = {}
    for j, (title, x_key, rows) in enumerate(panels):
        rows = sorted(rows, key=lambda r: r[x_key])
        for name in rows[0]["paths"]:
            xs = [r[x_key] for r in rows]
            style = dict(color=PATH_COLORS.get(name), label=name)  # one colour per path
            lines[name], = axes[0, j].plot(xs, [r["paths"][name]["ratio"] for r in rows], "o-",
                                           **style)
            axes[1, j].plot(xs, [r["paths"][name]["peak_bytes"] / 2 ** 20 for r in rows], "o-",
                            **style)
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
        axes[0, j].axhline(1.0, color="k", lw=0.8)
        axes[0, j].set_title(title, fontsize=9)
        axes[1, j].set_yscale("log")
    axes[0, 0].set_ylabel("step time ÷ plain autodiff (jitted)")
    axes[1, 0].set_ylabel("XLA peak MiB (args + outputs + temp)")
    fig.legend(lines.values(), lines.keys(), loc="lower center", ncol=len(lines), fontsize=8)
    fig.suptitle(f"manual vs jaxnet autodiff vs plain autodiff; {device}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)


def _all_points(result: dict) -> list[dict]:
    rows = [{"net": "mlp", **r} for r in result.get("rows", [])] + result.get("net_rows", [])
    return rows + (result.get("attention_memory") or {}).get("points", [])


def summary_table(result: dict) -> str:
    """One markdown row per point (the README's table): each path's ratio to plain autodiff,
    then its temp MiB, kernels and compile seconds, and the gradient difference of the
    hand-written paths, path after path in the order manual (store / recompute for
    attention), jaxnet autodiff, plain autodiff (/ plain checkpoint)."""
    mib = 2.0 ** 20
    out = ["| point | manual (store / recompute) | jaxnet autodiff | plain checkpoint | "
           "temp MiB: manual / jaxnet / plain | kernels m / j / p | compile s m / j / p | "
           "max rel Δgrad m / j |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in _all_points(result):
        label = point_label(row).replace("net ", "", 1)
        if row["net"] == "mlp":
            label = (f"MLP d{row['depth']} w{row['width']} {row['activation']} "
                     f"b{row['batch']}")
        paths = row["paths"]
        manual = [c for name, c in paths.items() if name.startswith("manual")]
        check = paths.get("plain_checkpoint")

        def joined(key, fmt, names=None, paths=paths):
            return " / ".join(fmt(paths[n][key]) for n in (names or paths))

        out.append(" | ".join([
            f"| {label}", " / ".join(f"{c['ratio']:.2f}" for c in manual),
            f"{paths['jaxnet_autodiff']['ratio']:.2f}",
            f"{check['ratio']:.2f}" if check else "–",
            joined("temp_bytes", lambda v: f"{v / mib:.1f}"), joined("kernels", str),
            joined("compile_s", lambda v: f"{v:.1f}"),
            joined("max_rel_grad_diff", lambda v: f"{v:.0e}",
                   [n for n in paths if not n.startswith("plain")])]) + " |")
    return "\n".join(out) + "\n"


def tables(result: dict) -> str:
    """Markdown tables of a result JSON: the one-row-per-point summary
    (:func:`summary_table`), then each point's paths with their ratio to plain autodiff,
    compile time, temp and peak memory, kernels, FLOPs, bytes and gradient difference."""
    mib = 2.0 ** 20
    out = [summary_table(result),
           "| point | path | µs | ratio to plain (min–max) | compile s | temp MiB | peak MiB | "
           "kernels | GFLOP | MB accessed | max rel Δgrad | same program as |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in _all_points(result):
        label = point_label(row)
        if row["net"] == "mlp":
            label += f" depth {row['depth']} width {row['width']} {row['activation']}"
        for name, c in row["paths"].items():
            out.append(f"| {label} | {name} | {c['us']:.0f} | {c['ratio']:.3f} "
                       f"({c['ratio_min']:.2f}–{c['ratio_max']:.2f}) | {c['compile_s']:.2f} | "
                       f"{c['temp_bytes'] / mib:.2f} | {c['peak_bytes'] / mib:.2f} | "
                       f"{c['kernels']} | {c['flops'] / 1e9:.3f} | "
                       f"{c['bytes_accessed'] / 1e6:.1f} | {c['max_rel_grad_diff']:.1e} | "
                       f"{c['same_as']} |")
            label = ""
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one axis at a time around "
                    f"{BASE} ({len(points(True, 1))} MLP points) and a few conv and attention "
                    "points (NET_QUICK); about 3 minutes on a 2-core CPU")
    ap.add_argument("--nets", default="mlp,cnn1d,cnn2d,attention",
                    help="comma-separated nets to run: mlp, cnn1d, cnn2d, attention")
    ap.add_argument("--attention-memory", action="store_true", help="also measure the "
                    "memory-efficient attention backward at T = 512 and 4096 (issue 13 part 3)")
    ap.add_argument("--json", metavar="PATH", help="write device, versions and rows as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of the MLP ratio against width "
                    "and depth; the conv and attention plot goes next to it (PATH's stem + "
                    "_nets.png)")
    ap.add_argument("--device-scale", type=int, nargs="?", const=16, default=1, metavar="N",
                    help="multiply every MLP batch size by N (16 if no N) to fill a GPU")
    ap.add_argument("--budget", type=float, default=None, help="seconds of jitted timing per "
                    "point (default 0.8 quick, 4 full)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per point "
                    "(default 10 quick, 20 full)")
    ap.add_argument("--slower-than", type=float, default=1.05, help="explain MLP points whose "
                    "jitted manual ÷ jaxnet-autodiff ratio exceeds this")
    ap.add_argument("--no-nojit", action="store_true", help="skip the timings without jit")
    ap.add_argument("--markdown", metavar="PATH", help="write the tables of every point's "
                    "paths as markdown")
    ap.add_argument("--tables-from", metavar="JSON", help="print the markdown tables of a "
                    "result JSON written before (and with --plot, draw its plots), and run nothing")
    args = ap.parse_args(argv)
    if args.tables_from:
        with open(args.tables_from) as fh:
            result = json.load(fh)
        print(tables(result), end="")
        if args.plot:  # the plots again, from the JSON
            if result.get("rows"):
                plot(result["rows"], args.plot, result["device"])
            plot_nets(result.get("net_rows", []),
                      (result.get("attention_memory") or {}).get("points", []),
                      os.path.splitext(args.plot)[0] + "_nets.png", result["device"])
        return []
    args.budget = args.budget or (0.8 if args.quick else 4.0)
    args.rounds = args.rounds or (10 if args.quick else 20)
    if args.device_scale < 1:
        ap.error("--device-scale must be a positive integer")
    nets = [n for n in args.nets.split(",") if n]
    unknown = sorted(set(nets) - set(NETS))
    if unknown:
        ap.error(f"--nets: unknown {unknown}; choose from {sorted(NETS)}")

    device = describe_device()
    print(f"device: {device}")
    print(f"jax {jax.__version__}; nets {nets} ({'quick' if args.quick else 'full'}); float32; "
          f"ratios are to plain autodiff unless said otherwise", flush=True)
    rows, notes, t0 = [], [], time.perf_counter()
    summary = estimate = None
    if "mlp" in nets:
        pts = points(args.quick, args.device_scale)
        print(f"mlp: {len(pts)} points; step = loss + gradients of mlp([width]*depth, "
              f"{CLASSES}) with softmax cross-entropy; ratio = manual ÷ jaxnet autodiff")
        print(HEADER, flush=True)
        for p in pts:
            row, note = run_point(p, args)
            rows.append(row)
            notes += note
            print(format_row(row) + "   plain µs {:.1f}, manual ÷ plain {:.3f}".format(
                row["plain_us"], row["paths"]["manual"]["ratio"]), flush=True)
            for line in note:
                print(line, flush=True)
        ratios = [r["ratio"] for r in rows]
        mem_ok = sum(r["manual_peak_bytes"] <= r["autodiff_peak_bytes"] for r in rows)
        within = sum(x <= args.slower_than for x in ratios)
        plain = [r["paths"]["manual"]["ratio"] for r in rows]
        summary = (f"jitted ratio manual/autodiff: median {statistics.median(ratios):.3f}, range "
                   f"{min(ratios):.3f} to {max(ratios):.3f}; {within}/{len(rows)} points "
                   f"within {args.slower_than}x; manual peak memory <= autodiff "
                   f"at {mem_ok}/{len(rows)} points; max rel grad diff "
                   f"{max(r['max_rel_grad_diff'] for r in rows):.2e}; manual/plain autodiff: "
                   f"median {statistics.median(plain):.3f}, range {min(plain):.3f} to "
                   f"{max(plain):.3f}; {time.perf_counter() - t0:.0f} s")
        print(summary)
        estimate = estimate_full(rows, args) if args.quick else None
        if estimate:
            print(estimate)
    net_rows = []
    for kind in (n for n in nets if n != "mlp"):
        for p in (NET_QUICK if args.quick else NET_FULL)[kind]:
            row = run_net_point(kind, p, args)
            net_rows.append(row)
            print(point_label(row), flush=True)
            print(PATH_HEADER)
            for line in format_paths(row["paths"]):
                print(line, flush=True)
    memory_result = attention_memory(args) if args.attention_memory else None
    elapsed = time.perf_counter() - t0
    print(f"{elapsed:.0f} s in all")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"device": device, "versions": versions(),
                       "settings": {"quick": args.quick, "device_scale": args.device_scale,
                                    "budget_s": args.budget, "rounds": args.rounds,
                                    "nets": nets, "dtype": "float32", "classes": CLASSES,
                                    "head_dim": HEAD_DIM, "reference": REFERENCE,
                                    "memory": "peak = argument + output + temp - alias bytes "
                                              "of compiled.memory_analysis()",
                                    "loss": "softmax_cross_entropy (mlp, cnn1d, cnn2d); "
                                            "l2_loss (attention)", "argv": sys.argv[1:]},
                       "summary": summary, "full_sweep_estimate": estimate,
                       "slower_notes": notes, "elapsed_s": elapsed, "rows": rows,
                       "net_rows": net_rows, "attention_memory": memory_result}, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(tables({"rows": rows, "net_rows": net_rows,
                             "attention_memory": memory_result}))
    if args.plot:
        if rows:
            plot(rows, args.plot, device)
        plot_nets(net_rows, memory_result["points"] if memory_result else [],
                  os.path.splitext(args.plot)[0] + "_nets.png", device)
    return rows


if __name__ == "__main__":
    main()
