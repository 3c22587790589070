"""Rematerialisation: memory and time of a deep MLP's training step with and without ``remat``.

For each depth, compiles jaxnet's training step (``make_train_step``, softmax cross-entropy,
Adam) of ``mlp([width] * depth, 10, remat=...)`` and reads XLA's ``memory_analysis()`` of the
compiled step: ``temp`` (scratch buffers: the activations kept for the backward pass live
here), arguments and outputs. Also counts the matmuls in the program JAX hands to XLA and in
the program XLA compiled (remat adds forward matmuls to the backward pass; an XLA that undoes
the recomputation shows the same count as without remat), and times the steps in interleaved
rounds (ratio to no remat).

Usage: ``python benchmarks/remat_memory.py [--quick] [--json PATH] [--markdown PATH]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnet
from jaxnet import train

VARIANTS = {
    "none": False,
    "remat": True,
    "remat_dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def count_matmuls(hlo: str) -> int:
    """Matmuls in compiled HLO: XLA dots (also inside fusions) and cuBLAS calls on GPUs."""
    return hlo.count(" dot(") + hlo.count('"__cublas$gemm"') + hlo.count('"__cublas$lt$matmul"')


def build(depth, width, batch, remat):
    net = jaxnet.mlp([width] * depth, 10, remat=remat)
    opt = optax.adam(1e-3)
    step = train.make_train_step(net, jaxnet.softmax_cross_entropy, opt)
    state = train.init_state(net, opt, jax.random.key(0), (-1, 784))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 784), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    lowered = step.lower(state, x, y)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    info = {
        "temp_mib": mem.temp_size_in_bytes / 2 ** 20,
        "argument_mib": mem.argument_size_in_bytes / 2 ** 20,
        "output_mib": mem.output_size_in_bytes / 2 ** 20,
        "alias_mib": mem.alias_size_in_bytes / 2 ** 20,
        "matmuls_lowered": lowered.as_text().count("dot_general"),
        "matmuls_compiled": count_matmuls(compiled.as_text()),
    }
    info["peak_mib"] = info["temp_mib"] + info["argument_mib"] + info["output_mib"] - info[
        "alias_mib"]
    holder = [state]

    def run(n):
        s, loss = holder[0], None
        for _ in range(n):
            s, loss = step(s, x, y)
        holder[0] = s
        jax.block_until_ready(loss)

    run(1)
    return info, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depths", default="32,64")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    d = jax.devices()[0]
    device = f"{d.platform}: {getattr(d, 'device_kind', d)}"
    rows = []
    for depth in map(int, args.depths.split(",")):
        built = {}
        for name, remat in VARIANTS.items():
            built[name] = build(depth, args.width, args.batch, remat)
            print(f"depth {depth} {name}: compiled", file=sys.stderr, flush=True)
        times = {name: [] for name in built}
        for r in range(rounds):
            for name in list(built)[r % len(built):] + list(built)[:r % len(built)]:
                t0 = time.perf_counter()
                built[name][1](3)
                times[name].append((time.perf_counter() - t0) / 3)
        for name, (info, _) in built.items():
            ratios = [t / b for t, b in zip(times[name], times["none"], strict=True)]
            rows.append({"depth": depth, "width": args.width, "batch": args.batch,
                         "variant": name, **info,
                         "median_ms": 1e3 * statistics.median(times[name]),
                         "time_ratio_to_none": statistics.median(ratios)})
    lines = [f"Device: {device}; jax {jax.__version__}; mlp([{args.width}] × depth, 10), batch "
             f"{args.batch}, Adam; XLA memory_analysis() of the compiled step", "",
             "| depth | remat | temp MiB | peak MiB | matmuls (to XLA / compiled) | step | "
             "time vs none |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['variant']} | {r['temp_mib']:.1f} | "
                     f"{r['peak_mib']:.1f} | {r['matmuls_lowered']} / {r['matmuls_compiled']} | "
                     f"{r['median_ms']:.1f} ms | {r['time_ratio_to_none']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
