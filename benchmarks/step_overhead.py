"""Per-call overhead of jaxnet's compiled train step against a hand-written JAX step.

A compiled step's time is its kernels plus a per-call cost on the host that grows with the
number of arrays going in and out (flattening the pytree, handing buffers over, donation).
On a small net on a GPU the kernels take ~90 µs, so a few µs of host cost show as a few
per cent (issue 13: 1.04-1.09× pure JAX there, with ``TrainState``'s step count and key
carried through every call). This benchmark isolates that cost on the CPU, side by side in
one run:

- ``pure_jax``: the hand-written step ``(params, opt_state, x, y) -> (params, opt_state,
  loss)``, ``jax.jit`` with params and optimizer state donated. Ratios are to it.
- ``pure_jax_again``: the same, built again: the A/A control (the method's noise).
- ``pure_jax_dict_params``: the same hand-written step over jaxnet's net and its params, a
  dict of dicts (``{"dense_0": {"w", "b"}, ...}``) instead of a list of ``(w, b)`` tuples:
  what readable parameter names cost per call (dicts flatten slower than tuples), apart
  from anything ``make_train_step`` adds.
- ``whole_state``: jaxnet's step function over the whole ``TrainState`` (params, optimizer
  state, step count, key, model state) in one ``jax.jit``: what ``make_train_step`` compiled
  before it left the key and count out for nets without randomness.
- ``jaxnet``: ``jaxnet.train.make_train_step`` as it is (for a net without Dropout the
  compiled call takes only params and optimizer state; the count is kept on the host).
- ``jaxnet_dropout`` / ``whole_state_dropout``: the same net with Dropout(0.1) before the
  output, which needs the key and count inside the step, so both take the whole state
  (ratios to ``pure_jax``, whose net has no dropout: the dropout mask's cost is included).

Configurations: ``tiny`` (8-8-2, batch 8: nearly all host cost) and ``small`` (784-128-10,
batch 128, as in peers.py). Method as peers.py: compile and warm up, then rounds in a
shuffled order, each variant timed over the same number of back-to-back calls to
``block_until_ready``; the paired ratio per round to ``pure_jax`` of the same round, median
and 25-75 % range reported, and the µs difference ``median_us - pure_jax median_us``.

    python benchmarks/step_overhead.py --json benchmarks/results/step_overhead_cpu.json \
        --markdown benchmarks/results/step_overhead_cpu.md
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

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (the hand-written step and its runner are shared with peers.py)

import jaxnet  # noqa: E402
from jaxnet import train  # noqa: E402

CONFIGS = {"tiny": ([8, 8, 2], 8), "small": ([784, 128, 10], 128)}
LR = 1e-3


def _net(widths, dropout):
    return jaxnet.mlp(widths[1:-1], widths[-1], "relu", dropout=dropout)


def _runner(step, state):
    box = [state]

    def run(n, x, y):
        s, out = box[0], None
        for _ in range(n):
            s, out = step(s, x, y)
        box[0] = s
        return peers.sync(out)

    return run


def make_variants(widths):
    opt = optax.adam(LR)
    loss = jaxnet.softmax_cross_entropy
    shape = (-1, widths[0])
    variants = {}

    def pure(x, y):
        return peers.make_pure_jax(widths, x, y)

    variants["pure_jax"] = variants["pure_jax_again"] = pure

    def dict_params(x, y):
        net = _net(widths, 0.0)
        _, params = net.init(jax.random.key(0), shape)
        apply = lambda p, x: net.apply(p, x)  # noqa: E731
        return peers.jitted_runner(peers.optax_step(apply, opt), params, opt.init(params), x, y)

    variants["pure_jax_dict_params"] = dict_params
    for suffix, dropout in (("", 0.0), ("_dropout", 0.1)):
        net = _net(widths, dropout)

        def whole(x, y, net=net):
            step = jax.jit(train.train_step_fn(net, loss, opt), donate_argnums=(0,))
            run = _runner(step, train.init_state(net, opt, 0, shape))
            return lambda n: run(n, x, y)

        def lean(x, y, net=net):
            step = train.make_train_step(net, loss, opt)
            run = _runner(step, train.init_state(net, opt, 0, shape))
            return lambda n: run(n, x, y)

        variants["whole_state" + suffix] = whole
        variants["jaxnet" + suffix] = lean
    return variants


def measure(config, rounds, target_ms):
    widths, batch = CONFIGS[config]
    x = jax.random.normal(jax.random.key(1), (batch, widths[0]), jnp.float32)
    y = jnp.arange(batch) % widths[-1]
    runs = {name: make(x, y) for name, make in make_variants(widths).items()}
    for run in runs.values():  # compile and warm up
        run(20)
    t = time.perf_counter()
    runs["pure_jax"](50)
    per_call = (time.perf_counter() - t) / 50
    n = max(10, int(target_ms / 1e3 / per_call))
    times = {name: [] for name in runs}
    for _ in range(rounds):
        order = list(runs)
        random.shuffle(order)
        for name in order:
            t = time.perf_counter()
            runs[name](n)
            times[name].append((time.perf_counter() - t) / n * 1e6)
    base = statistics.median(times["pure_jax"])
    rows = []
    for name, ts in times.items():
        ratios = sorted(a / b for a, b in zip(ts, times["pure_jax"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        rows.append({"config": config, "variant": name, "widths": widths, "batch": batch,
                     "calls_per_round": n, "median_us": statistics.median(ts),
                     "overhead_us": statistics.median(ts) - base,
                     "ratio_to_pure_jax": 1.0 if name == "pure_jax" else statistics.median(ratios),
                     "ratio_q25": q[0], "ratio_q75": q[2]})
    return rows


def table(rows):
    lines = ["| config | variant | median µs | µs over pure JAX | ratio to pure JAX (25-75 %) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['variant']} | {r['median_us']:.1f} | "
                     f"{r['overhead_us']:+.1f} | {r['ratio_to_pure_jax']:.3f} "
                     f"({r['ratio_q25']:.3f}-{r['ratio_q75']:.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--target-ms", type=float, default=100.0,
                        help="time per variant per round")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
        rows += measure(config, args.rounds, args.target_ms)
    text = table(rows)
    print(text)
    result = {"device": str(jax.devices()[0]), "platform": platform.platform(),
              "versions": {"jax": jax.__version__, "numpy": np.__version__,
                           "optax": optax.__version__},
              "rounds": args.rounds, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
