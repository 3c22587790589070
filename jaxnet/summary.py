"""Summary of a network: per-layer output shapes, widths, parameter counts, depth and width.

The course's definitions (../shared/seed): a *layer* is a linear combination
plus a non-linearity, the *width of a layer* is its number of units, the
*width of the net* the number of units of its widest layer, and its *depth*
the number of hidden layers. In a jaxnet net each :func:`~jaxnet.Dense` is one
such layer's linear combination, so

- depth = (number of Dense layers) − 1, the last Dense being the output layer;
- width = the largest ``out_dim`` among the Dense layers (the input is not
  counted: its size is the data's, not a hyperparameter).

A convolution is a linear combination too (of a window, per output channel): its
width is its number of output channels (``out_chan``), and it counts as a layer for
the depth as a Dense does. Attention's width is its output width.

The walk uses only the layers' structure (``children``, ``rebuild``): each leaf is
rebuilt with an ``init`` that records its output shape, and the net's
``init_with_state`` runs under ``jax.eval_shape`` (nothing is allocated).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax

from .protocol import Layer, init_with_state, label_of

__all__ = ["LayerInfo", "Summary", "summary"]


@dataclass(frozen=True)
class LayerInfo:
    """One leaf layer: its path in the params tree, its label, output shape,
    parameter count, width (units of a Dense layer, channels of a convolution;
    ``None`` otherwise) and the number of model-state values it keeps."""

    path: str
    label: str
    output_shape: Any
    param_count: int
    width: int | None
    state_count: int = 0


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

    @property
    def state_count(self) -> int:
        """Model-state values (BatchNorm's running statistics); 0 for a stateless net."""
        return sum(info.state_count for info in self.layers)

    def __str__(self) -> str:
        head = ("layer", "kind", "output shape", "params")
        stateful = self.state_count > 0
        rows = [head + (("state",) if stateful else ())]
        rows += [(i.path, i.label, str(i.output_shape), f"{i.param_count:,}")
                 + ((f"{i.state_count:,}",) if stateful else ()) for i in self.layers]
        n = len(rows[0])
        cols = [max(len(r[c]) for r in rows) for c in range(n)]
        line = "  ".join("-" * w for w in cols)
        fmt = ["  ".join(r[c].ljust(cols[c]) if c < 3 else r[c].rjust(cols[c])
                         for c in range(n)) for r in rows]
        footer = (f"input {self.input_shape} -> output {self.output_shape}; "
                  f"depth {self.depth} (hidden layers), width {self.width} (widest layer), "
                  f"{self.param_count:,} parameters"
                  + (f", {self.state_count:,} state values" if stateful else ""))
        return "\n".join([fmt[0], line, *fmt[1:], line, footer])


def _count(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def _width(layer: Any) -> int | None:
    """Units of a linear combination: a Dense's ``out_dim``, a convolution's ``out_chan``."""
    if not isinstance(layer, Layer) or layer.composite is not None:
        return None
    for key in ("out_dim", "out_chan"):
        value = layer.config.get(key)
        if isinstance(value, int) and "num_heads" not in layer.config:
            return value
    return None


def _recording(layer: Any, path: str, rows: list) -> Any:
    """``layer`` rebuilt so that its init (under eval_shape) appends its :class:`LayerInfo`."""
    if isinstance(layer, Layer) and layer.children:
        prefix = f"{path}/" if path else ""
        new = [_recording(child, prefix + name if name else path, rows)
               for name, child in layer.children]
        return layer.rebuild(new)

    def init(rng, input_shape):
        out, params, state = init_with_state(layer, rng, input_shape)
        rows.append(LayerInfo(path or label_of(layer), label_of(layer), out, _count(params),
                              _width(layer), _count(state)))
        return out, params

    if isinstance(layer, Layer):
        return dataclasses.replace(layer, init=init, recipe=None)
    return Layer(init, layer[1], kind="layer", label=label_of(layer))


def summary(net: Any, input_shape: tuple) -> Summary:
    """Summarise ``net`` for inputs of ``input_shape`` (batch axis first, may be -1).

    Nothing is allocated: parameter shapes come from ``jax.eval_shape`` of the
    layers' ``init``.

    >>> s = summary(mlp([50, 50], 10), (-1, 784))
    >>> s.depth, s.width, s.param_count
    (2, 50, 42310)
    """
    rows: list[LayerInfo] = []
    recording = _recording(net, "", rows)
    shapes = []
    jax.eval_shape(lambda k: shapes.append(init_with_state(recording, k, tuple(input_shape))[0]),
                   jax.random.key(0))
    return Summary(tuple(input_shape), shapes[0], tuple(rows))
