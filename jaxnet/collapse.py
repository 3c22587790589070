"""Linear collapse: two consecutive linear layers are one linear layer.

For y = (x·W₁ + b₁)·W₂ + b₂ = x·(W₁W₂) + (b₁W₂ + b₂), so

    W* = W₁·W₂,   b* = b₁·W₂ + b₂.

:func:`collapse_linear` fuses every run of Dense layers with nothing but
Identity layers between them into one Dense, recursively inside nested
``serial`` and ``residual`` blocks, and returns a new net and params whose
outputs equal the old ones (up to floating-point rounding).
"""

from __future__ import annotations

from typing import Any

from .layers import Dense, Params
from .protocol import Layer

__all__ = ["collapse_linear"]


def _is_dense(layer: Any) -> bool:
    """Made by :func:`~jaxnet.Dense` (its recorded constructor)."""
    return isinstance(layer, Layer) and layer.recipe is not None and layer.recipe[0] is Dense


def _is_identity(layer: Any) -> bool:
    return (isinstance(layer, Layer) and layer.composite is None
            and dict(layer.config) == {"activation": "identity"})


def _fuse(run: list[Params]) -> Params:
    w, b = run[0]["w"], run[0]["b"]
    for p in run[1:]:
        w, b = w @ p["w"], b @ p["w"] + p["b"]
    return {"w": w, "b": b}


def _collapse(net: Any, params: Params) -> tuple[Any, Params]:
    """Collapse inside ``net``: leaves stay as they are; a combinator whose children run in
    sequence (its ``output_child`` is its last child: serial, residual's body, a wrapper)
    fuses runs of Dense children, and every combinator collapses inside its children."""
    if not (isinstance(net, Layer) and net.children):
        return net, params
    names = [name for name, _ in net.children]
    if "" in names:  # a wrapper (mixed precision): params are its child's
        (_, inner), = net.children
        new_inner, new_params = _collapse(inner, params)
        return net.rebuild([new_inner]), new_params
    sequential = net.sequential
    layers: list[Any] = []
    layer_params: list[Params] = []
    run: list[Params] = []

    def flush():
        if run:
            fused = _fuse(run)
            layers.append(Dense(int(fused["w"].shape[-1])))
            layer_params.append(fused)
            run.clear()

    for name, child in net.children:
        p = params.get(name, {})
        if sequential and _is_dense(child):
            run.append(p)
            continue
        if sequential and _is_identity(child):
            continue
        flush()
        child, p = _collapse(child, p)
        layers.append(child)
        layer_params.append(p)
    flush()
    if not layers:  # the whole block was Identity layers
        layers, layer_params = [net.children[0][1]], [{}]
    new = net.rebuild(layers)
    new_params = {name: p for (name, _), p in zip(new.children, layer_params) if p}
    return new, new_params


def collapse_linear(net: Any, params: Params) -> tuple[Layer, Params]:
    """Fuse runs of Dense layers that have no non-linearity between them.

    Arguments:
      net: a jaxnet net (``serial``, ``residual``, ``mixed_precision`` and other
        combinators, nested); layers other than Dense and Identity stay in place
        (with their params and state keys); a lone leaf is returned as is.
      params: its parameters, as returned by ``net.init``.

    Returns:
      ``(new_net, new_params)`` with ``new_net.apply(new_params, x) ==
      net.apply(params, x)`` up to rounding: each run (W₁, b₁), …, (W_k, b_k)
      becomes W* = W₁⋯W_k, b* = ((b₁W₂ + b₂)W₃ + …)W_k + b_k. Model state (of a
      BatchNorm) is unchanged where its layer keeps its name; a named layer keeps it.
    """
    if not isinstance(net, Layer):
        raise TypeError(f"collapse_linear needs a jaxnet net, got {net!r}")
    return _collapse(net, params)
