"""Manual backpropagation against ``jax.grad``: step time, compile time and peak memory.

For each point (depth, width, activation, batch) the net is
``jaxnet.mlp([width] * depth, 10, activation)`` on inputs (batch, width) with
integer labels and ``softmax_cross_entropy`` on the logits (float32). A step is
one loss-and-gradient evaluation, two ways:

- manual: ``jaxnet.manual_value_and_grad(net, loss)``, each layer's hand-written rule;
- autodiff: ``jax.value_and_grad(lambda p: loss(net.apply(p, x), t))``.

Both are timed jitted (the compiled executable, ``block_until_ready`` after
every call) and without jit (op by op), interleaved round by round (A B, then
B A, …) so that machine drift cancels; ``ratio`` is the median of the per-round
ratios manual ÷ autodiff. Compile time is ``lower`` + ``compile``; peak memory
is XLA's ``compiled.memory_analysis()``. Where the jitted manual step is
slower than ``--slower-than``, the compiled HLO of both is compared (kernel
and op counts, FLOPs and bytes from XLA's cost analysis).

    python benchmarks/manual_vs_autodiff.py --quick --json out.json --plot out.png
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

import jaxnet as jn
from jaxnet.backprop import manual_value_and_grad

FULL = {"depth": [1, 2, 4, 8, 16, 32], "width": [64, 256, 1024, 4096],
        "activation": ["sigmoid", "tanh", "relu"], "batch": [32, 256, 1024]}
BASE = {"depth": 4, "width": 256, "activation": "relu", "batch": 256}
QUICK = {"depth": [1, 4, 16], "width": [64, 256, 1024], "activation": ["sigmoid", "tanh", "relu"],
         "batch": [32, 256, 1024]}
CLASSES = 10
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


def problem(p: dict):
    net = jn.mlp([p["width"]] * p["depth"], CLASSES, p["activation"])
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    _, params = net.init(k1, (p["batch"], p["width"]))
    inputs = jax.random.normal(k2, (p["batch"], p["width"]), jnp.float32)
    targets = jax.random.randint(k3, (p["batch"],), 0, CLASSES)
    manual = manual_value_and_grad(net, LOSS)
    auto = jax.value_and_grad(lambda q, x, t: LOSS(net.apply(q, x), t))
    return manual, auto, (params, inputs, targets)


def compile_step(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    peak = getattr(m, "peak_memory_in_bytes", 0)
    if peak:
        return int(peak)
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


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


def max_rel_diff(manual, auto) -> float:
    """max over parameter arrays of max|manual − autodiff| / max|autodiff|."""
    worst = 0.0
    for m, a in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(auto)):
        scale = float(jnp.max(jnp.abs(a)))
        worst = max(worst, float(jnp.max(jnp.abs(m - a))) / (scale or 1.0))
    return worst


def run_point(p: dict, args) -> tuple[dict, list[str]]:
    manual, auto, data = problem(p)
    cm, compile_m = compile_step(manual, data)
    ca, compile_a = compile_step(auto, data)
    value_m, grads_m = cm(*data)
    value_a, grads_a = ca(*data)
    tm, ta = interleaved(cm, ca, data, args.budget, args.rounds)
    ratios = [m / a for m, a in zip(tm, ta)]
    row = {**p, "manual_us": statistics.median(tm) * 1e6,
           "autodiff_us": statistics.median(ta) * 1e6, "ratio": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": len(ratios),
           "compile_manual_s": compile_m, "compile_autodiff_s": compile_a,
           "manual_peak_bytes": peak_bytes(cm), "autodiff_peak_bytes": peak_bytes(ca),
           "max_rel_grad_diff": max_rel_diff(grads_m, grads_a),
           "loss_diff": abs(float(value_m) - float(value_a))}
    prof_m, prof_a = hlo_profile(cm), hlo_profile(ca)
    row["flops"] = prof_a["flops"]
    row["manual_fusions"] = prof_m["entry_ops"].get("fusion", 0)
    row["autodiff_fusions"] = prof_a["entry_ops"].get("fusion", 0)
    notes = []
    if row["ratio"] > args.slower_than:
        notes = [f"  manual slower ({row['ratio']:.3f}x) at depth {p['depth']} width "
                 f"{p['width']} {p['activation']} batch {p['batch']}:"] + explain(prof_m, prof_a)
    if not args.no_nojit:
        nm, na = interleaved(manual, auto, data, args.budget / 2, max(3, args.rounds // 2))
        row.update(manual_nojit_us=statistics.median(nm) * 1e6,
                   autodiff_nojit_us=statistics.median(na) * 1e6,
                   nojit_ratio=statistics.median([m / a for m, a in zip(nm, na)]))
    else:
        row.update(manual_nojit_us=None, autodiff_nojit_us=None, nojit_ratio=None)
    return row, notes


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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one axis at a time around "
                    f"{BASE} ({len(points(True, 1))} points, under 2 minutes on a CPU)")
    ap.add_argument("--json", metavar="PATH", help="write device, versions and rows as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of the ratio against width "
                    "and depth")
    ap.add_argument("--device-scale", type=int, nargs="?", const=16, default=1, metavar="N",
                    help="multiply every batch size by N (16 if no N) to fill a GPU")
    ap.add_argument("--budget", type=float, default=None, help="seconds of jitted timing per "
                    "point (default 0.8 quick, 4 full)")
    ap.add_argument("--rounds", type=int, default=None, help="paired rounds per point "
                    "(default 10 quick, 20 full)")
    ap.add_argument("--slower-than", type=float, default=1.05, help="explain points whose "
                    "jitted ratio exceeds this")
    ap.add_argument("--no-nojit", action="store_true", help="skip the timings without jit")
    args = ap.parse_args(argv)
    args.budget = args.budget or (0.8 if args.quick else 4.0)
    args.rounds = args.rounds or (10 if args.quick else 20)
    if args.device_scale < 1:
        ap.error("--device-scale must be a positive integer")

    device = describe_device()
    pts = points(args.quick, args.device_scale)
    print(f"device: {device}")
    print(f"jax {jax.__version__}; {len(pts)} points ({'quick' if args.quick else 'full'}); "
          f"float32; step = loss + gradients of mlp([width]*depth, {CLASSES}) with "
          f"softmax cross-entropy", flush=True)
    print(HEADER, flush=True)
    rows, notes, t0 = [], [], time.perf_counter()
    for p in pts:
        row, note = run_point(p, args)
        rows.append(row)
        notes += note
        print(format_row(row), flush=True)
        for line in note:
            print(line, flush=True)
    elapsed = time.perf_counter() - t0
    ratios = [r["ratio"] for r in rows]
    mem_ok = sum(r["manual_peak_bytes"] <= r["autodiff_peak_bytes"] for r in rows)
    within = sum(x <= args.slower_than for x in ratios)
    summary = (f"jitted ratio manual/autodiff: median {statistics.median(ratios):.3f}, range "
               f"{min(ratios):.3f} to {max(ratios):.3f}; {within}/{len(rows)} points "
               f"within {args.slower_than}x; manual peak memory <= autodiff "
               f"at {mem_ok}/{len(rows)} points; max rel grad diff "
               f"{max(r['max_rel_grad_diff'] for r in rows):.2e}; {elapsed:.0f} s")
    print(summary)
    estimate = estimate_full(rows, args) if args.quick else None
    if estimate:
        print(estimate)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"device": device, "versions": versions(),
                       "settings": {"quick": args.quick, "device_scale": args.device_scale,
                                    "budget_s": args.budget, "rounds": args.rounds,
                                    "dtype": "float32", "classes": CLASSES,
                                    "loss": "softmax_cross_entropy", "argv": sys.argv[1:]},
                       "summary": summary, "full_sweep_estimate": estimate,
                       "slower_notes": notes, "elapsed_s": elapsed, "rows": rows}, fh, indent=1)
    if args.plot:
        plot(rows, args.plot, device)
    return rows


if __name__ == "__main__":
    main()
