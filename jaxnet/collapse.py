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

from .combinators import residual, serial
from .layers import Dense, Layer, Params
from .precision import mixed_precision

__all__ = ["collapse_linear"]


def _fuse(run: list[Params]) -> Params:
    w, b = run[0]["w"], run[0]["b"]
    for p in run[1:]:
        w, b = w @ p["w"], b @ p["w"] + p["b"]
    return {"w": w, "b": b}


def _collapse_children(children, params: Params) -> tuple[list[Any], list[Params]]:
    layers: list[Any] = []
    layer_params: list[Params] = []
    run: list[Params] = []

    def flush():
        if run:
            fused = _fuse(run)
            layers.append(Dense(int(fused["w"].shape[-1])))
            layer_params.append(fused)
            run.clear()

    for name, child in children:
        p = params.get(name, {})
        kind = child.kind if isinstance(child, Layer) else None
        if kind == "dense":
            run.append(p)
            continue
        if kind == "identity":
            continue
        flush()
        if kind in _BLOCKS:
            child, p = _collapse(child, p)
        layers.append(child)
        layer_params.append(p)
    flush()
    if not layers:  # the whole block was Identity layers
        layers, layer_params = [children[0][1]], [{}]
    return layers, layer_params


_BLOCKS = ("serial", "residual", "mixed_precision")


def _collapse(net: Layer, params: Params) -> tuple[Layer, Params]:
    if net.kind == "mixed_precision":  # collapse the wrapped net, under the same policy
        (_, inner), = net.children
        if not (isinstance(inner, Layer) and inner.kind in _BLOCKS):
            return net, params
        new_inner, new_params = _collapse(inner, params)
        return mixed_precision(new_inner, net.config["policy"]), new_params
    layers, layer_params = _collapse_children(net.children, params)
    new = residual(*layers) if net.kind == "residual" else serial(*layers)
    new_params = {name: p for (name, _), p in zip(new.children, layer_params) if p}
    return new, new_params


def collapse_linear(net: Any, params: Params) -> tuple[Layer, Params]:
    """Fuse runs of Dense layers that have no non-linearity between them.

    Arguments:
      net: a ``serial`` or ``residual`` net, or one wrapped in ``mixed_precision``
        (the wrapped net is collapsed and rewrapped under the same policy; the fused
        W*, b* are computed in the params' dtype); a lone Dense is returned as is.
      params: its parameters, as returned by ``net.init``.

    Returns:
      ``(new_net, new_params)`` with ``new_net.apply(new_params, x) ==
      net.apply(params, x)`` up to rounding: each run (W₁, b₁), …, (W_k, b_k)
      becomes W* = W₁⋯W_k, b* = ((b₁W₂ + b₂)W₃ + …)W_k + b_k.
    """
    if not isinstance(net, Layer) or net.kind not in _BLOCKS:
        if isinstance(net, Layer) and net.kind == "dense":
            return net, params
        raise TypeError("collapse_linear needs a serial, residual or mixed_precision jaxnet "
                        f"net, got {net!r}")
    return _collapse(net, params)
