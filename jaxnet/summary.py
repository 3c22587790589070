"""Summary of a network: per-layer output shapes, widths, parameter counts, depth and width.

The course's definitions (../shared/seed): a *layer* is a linear combination
plus a non-linearity, the *width of a layer* is its number of units, the
*width of the net* the number of units of its widest layer, and its *depth*
the number of hidden layers. In a jaxnet net each :func:`~jaxnet.Dense` is one
such layer's linear combination, so

- depth = (number of Dense layers) − 1, the last Dense being the output layer;
- width = the largest ``out_dim`` among the Dense layers (the input is not
  counted: its size is the data's, not a hyperparameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax

from .layers import Layer, label_of

__all__ = ["LayerInfo", "Summary", "summary"]


@dataclass(frozen=True)
class LayerInfo:
    """One leaf layer: its path in the params tree, its label, output shape,
    parameter count and width (units, for Dense layers; ``None`` otherwise)."""

    path: str
    label: str
    output_shape: Any
    param_count: int
    width: int | None


@dataclass(frozen=True)
class Summary:
    """What :func:`summary` reports. ``str(summary)`` is a table."""

    input_shape: tuple
    output_shape: Any
    layers: tuple[LayerInfo, ...]

    @property
    def widths(self) -> list[int]:
        """Widths (units) of the Dense layers, in order: hidden layers then the output layer."""
        return [info.width for info in self.layers if info.width is not None]

    @property
    def depth(self) -> int:
        """Number of hidden layers: Dense layers but the output one."""
        return max(len(self.widths) - 1, 0)

    @property
    def width(self) -> int:
        """Units in the widest layer (0 for a net with no Dense layer)."""
        return max(self.widths, default=0)

    @property
    def param_count(self) -> int:
        return sum(info.param_count for info in self.layers)

    def __str__(self) -> str:
        rows = [("layer", "kind", "output shape", "params")]
        rows += [(i.path, i.label, str(i.output_shape), f"{i.param_count:,}") for i in self.layers]
        cols = [max(len(r[c]) for r in rows) for c in range(4)]
        line = "  ".join("-" * w for w in cols)
        fmt = [r[0].ljust(cols[0]) + "  " + r[1].ljust(cols[1]) + "  " + r[2].ljust(cols[2])
               + "  " + r[3].rjust(cols[3]) for r in rows]
        footer = (f"input {self.input_shape} -> output {self.output_shape}; "
                  f"depth {self.depth} (hidden layers), width {self.width} (widest layer), "
                  f"{self.param_count:,} parameters")
        return "\n".join([fmt[0], line, *fmt[1:], line, footer])


def _count(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def _leaf(layer, shape, path, rng, rows):
    captured = {}

    def init(key):
        captured["shape"], params = layer[0](key, shape)
        return params

    params = jax.eval_shape(init, rng)
    out = captured["shape"]
    width = layer.config["out_dim"] if isinstance(layer, Layer) and layer.kind == "dense" else None
    rows.append(LayerInfo(path, label_of(layer), out, _count(params), width))
    return out


def _walk(layer, shape, path, rng, rows):
    kind = layer.kind if isinstance(layer, Layer) else None
    if kind == "mixed_precision":  # a wrapper: the same params and shapes as what it wraps
        return _walk(layer.children[0][1], shape, path, rng, rows)
    if kind not in ("serial", "residual", "parallel"):
        return _leaf(layer, shape, path or label_of(layer), rng, rows)
    keys = jax.random.split(rng, len(layer.children))
    prefix = f"{path}/" if path else ""
    if kind == "parallel":
        return tuple(_walk(child, s, prefix + name, k, rows)
                     for (name, child), s, k in zip(layer.children, shape, keys))
    out = shape
    for (name, child), k in zip(layer.children, keys):
        out = _walk(child, out, prefix + name, k, rows)
    return tuple(shape) if kind == "residual" else out


def summary(net: Any, input_shape: tuple) -> Summary:
    """Summarise ``net`` for inputs of ``input_shape`` (batch axis first, may be -1).

    Nothing is allocated: parameter shapes come from ``jax.eval_shape`` of the
    layers' ``init``.

    >>> s = summary(mlp([50, 50], 10), (-1, 784))
    >>> s.depth, s.width, s.param_count
    (2, 50, 42310)
    """
    rows: list[LayerInfo] = []
    out = _walk(net, tuple(input_shape), "", jax.random.key(0), rows)
    return Summary(tuple(input_shape), out, tuple(rows))
