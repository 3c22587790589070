"""Convolution layers, N-d, channels-last, with hand-written backward rules.

Layout: inputs are ``(N, *spatial, C_in)`` (NWC in 1-d, NHWC in 2-d, NDHWC in 3-d), kernels
``(*filter_shape, C_in / groups, C_out)`` (WIO, HWIO, DHWIO), outputs ``(N, *spatial', C_out)``.

One general convolution covers :func:`Conv` and :func:`ConvTranspose`. In one spatial
dimension, with x̃ the input dilated by ``a`` (``a − 1`` zeros between neighbours: the
transposed convolution's stride, 1 for ``Conv``), padded by (lo, hi), a window stride ``s``
and a kernel dilation ``d``:

    y[n, o, c] = Σₖ Σᵢ x̃[n, s·o + d·k, i] · W[k, i, c] + b[c]

(i runs over the input channels of c's group). Its backward rule, δ = ∂L/∂y, is two more
convolutions, each written with ``lax.conv_general_dilated``:

- **input gradient** ∂L/∂x̃[p] = Σ_{o,k: s·o + d·k = p} δ[o]·W[k]: a *transposed* convolution,
  i.e. δ dilated by ``s`` (``lhs_dilation=s``) convolved with the **flipped** kernel
  (W[K − 1 − k], input and output channels swapped within each group), kernel dilation ``d``,
  padded by (K′ − 1 − lo, L + lo − 1 − (O − 1)·s) with K′ = d(K − 1) + 1 the dilated
  kernel's span and L = a(in − 1) + 1 the dilated input's length, read with window stride
  ``a`` (which undoes the input dilation);
- **kernel gradient** ∂L/∂W[k, i, c] = Σₙ Σₒ x̃[n, s·o + d·k, i]·δ[n, o, c]: the input
  convolved with δ as the kernel, the batch axis contracted (it plays the feature axis),
  ``rhs_dilation=s``, window stride ``d``, padding (lo, d(K − 1) + s(O − 1) + 1 − L − lo) so
  that exactly K outputs come out; with groups, ``batch_group_count=groups`` keeps each
  group's channels apart;
- **bias gradient** ∂L/∂b[c] = Σ_{n,o} δ[n, o, c].

Every spatial dimension does this independently.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.nn import initializers

from .layers import Initializer, Layer, ShapeError
from .protocol import recorded

Array = jax.Array
Padding = str | Sequence[tuple[int, int]]

__all__ = ["Conv", "Conv1D", "Conv2D", "ConvTranspose", "conv_general", "conv_general_bwd"]


# --- the general convolution and its backward rule -------------------------

def _dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
    """Channels-last input/output ``(N, *spatial, C)``, kernel ``(*spatial, I, O)``."""
    spatial = tuple(range(1, n + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, n + 1) + spatial,
                                    rhs_spec=(n + 1, n) + tuple(range(n)),
                                    out_spec=(0, n + 1) + spatial)


def _by_patches(w: Array, input_dilation: Sequence[int], groups: int) -> bool:
    """Whether a convolution runs as patches·W on CPUs: a plain one (no groups, no input
    dilation) whose receptive field K·C_in is no wider than its C_out outputs, so that the
    patches take no more memory than the output. That is a first layer on images or signals
    (3×3×3 = 27 ≤ 32), where XLA's CPU convolution is slow: a 3×3 convolution of
    (128, 32, 32, 3) to 32 channels takes 17 ms forward and 14 ms for its kernel gradient on
    a 2-core CPU, by patches 4 and 7 ms."""
    return (groups == 1 and all(a == 1 for a in input_dilation)
            and math.prod(w.shape[:-2]) * w.shape[-2] <= w.shape[-1])


def _patches(x: Array, ks: Sequence[int], strides: Sequence[int],
             pads: Sequence[tuple[int, int]], dilation: Sequence[int]) -> Array:
    """(N, *O, K·C): x_pad[n, s·o + d·k, c] for every kernel offset k (row-major), then c: the
    order of W.reshape(K·C, C_out), so that patches·W is the convolution."""
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
    out = [(size - d * (k - 1) - 1) // s + 1
           for size, k, s, d in zip(x.shape[1:-1], ks, strides, dilation)]
    return jnp.concatenate([
        x[(slice(None),) + tuple(slice(d * kj, d * kj + s * (o - 1) + 1, s)
                                 for kj, s, o, d in zip(k, strides, out, dilation))
          + (slice(None),)]
        for k in itertools.product(*map(range, ks))], axis=-1)


def conv_general(x: Array, w: Array, strides: Sequence[int], pads: Sequence[tuple[int, int]],
                 input_dilation: Sequence[int], dilation: Sequence[int],
                 groups: int = 1) -> Array:
    """y = x̃ ⋆ W (module docstring), channels-last, no bias, in x's and W's promoted dtype.

    On CPUs a convolution with few input channels (:func:`_by_patches`) is computed as
    patches·W, one matmul (the same sums in another order)."""
    dtype = jnp.result_type(x, w)
    x, w = x.astype(dtype), w.astype(dtype)

    def xla(x, w):
        return lax.conv_general_dilated(
            x, w, tuple(strides), tuple(pads), lhs_dilation=tuple(input_dilation),
            rhs_dilation=tuple(dilation), dimension_numbers=_dimension_numbers(x.ndim - 2),
            feature_group_count=groups)

    if not _by_patches(w, input_dilation, groups):
        return xla(x, w)

    def matmul(x, w):
        # as (N·O, K·C)·(K·C, C_out): jax.grad's ∂L/∂W = patchesᵀ·δ then contracts one axis,
        # not the three of (N, *O, K·C) (the first layer above: 19.5 against 7.5 ms)
        p = _patches(x, w.shape[:-2], strides, pads, dilation)
        return (p.reshape(-1, p.shape[-1]) @ w.reshape(-1, w.shape[-1])).reshape(
            *p.shape[:-1], w.shape[-1])

    return lax.platform_dependent(x, w, cpu=matmul, default=xla)


def _flip_and_swap(w: Array, groups: int) -> Array:
    """W[K − 1 − k] with input and output channels swapped inside each group:
    (*K, I/G, O) → (*K, O/G, I)."""
    n = w.ndim - 2
    w = jnp.flip(w, axis=tuple(range(n)))
    *k, i_g, o = w.shape
    w = w.reshape(*k, i_g, groups, o // groups)
    w = jnp.swapaxes(w, n, n + 2)  # (*K, O/G, G, I/G)
    return w.reshape(*k, o // groups, groups * i_g)


def conv_general_bwd(x: Array, w: Array, g: Array, strides: Sequence[int],
                     pads: Sequence[tuple[int, int]], input_dilation: Sequence[int],
                     dilation: Sequence[int], groups: int = 1) -> tuple[Array, Array]:
    """(∂L/∂x, ∂L/∂W) of :func:`conv_general` for δ = ``g``, by the formulas in the module
    docstring (no autodiff)."""
    n = x.ndim - 2
    x_dtype, w_dtype = x.dtype, w.dtype
    dtype = jnp.result_type(x, w, g)
    x, w, g = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    ks, ins, outs = w.shape[:n], x.shape[1:-1], g.shape[1:-1]
    dx_pads, dw_pads = [], []
    for k, size, o, s, (lo, _), a, d in zip(ks, ins, outs, strides, pads, input_dilation,
                                            dilation):
        span, length = d * (k - 1) + 1, a * (size - 1) + 1
        dx_pads.append((span - 1 - lo, length + lo - 1 - (o - 1) * s))
        dw_pads.append((lo, d * (k - 1) + s * (o - 1) + 1 - length - lo))
    dx = lax.conv_general_dilated(
        g, _flip_and_swap(w, groups), window_strides=tuple(input_dilation), padding=dx_pads,
        lhs_dilation=tuple(strides), rhs_dilation=tuple(dilation),
        dimension_numbers=_dimension_numbers(n), feature_group_count=groups)
    # Kernel gradient: x's channel axis is the "batch", its batch axis the contracted
    # "feature"; δ's batch axis is contracted too and its channels are the outputs. The
    # result comes out directly in the kernel's layout (*K, I/G, O).
    spatial = tuple(range(1, n + 1))
    numbers = lax.ConvDimensionNumbers(lhs_spec=(n + 1, 0) + spatial,
                                       rhs_spec=(n + 1, 0) + spatial,
                                       out_spec=(n, n + 1) + tuple(range(n)))

    def xla(x, g):
        return lax.conv_general_dilated(
            x, g, window_strides=tuple(dilation), padding=dw_pads,
            lhs_dilation=tuple(input_dilation), rhs_dilation=tuple(strides),
            dimension_numbers=numbers, batch_group_count=groups)

    def matmul(x, g):  # ∂L/∂W = patchesᵀ·δ, as conv_general's forward on CPUs
        p = _patches(x, ks, strides, pads, dilation)
        return (p.reshape(-1, p.shape[-1]).T @ g.reshape(-1, g.shape[-1])).reshape(w.shape)

    dw = (lax.platform_dependent(x, g, cpu=matmul, default=xla)
          if _by_patches(w, input_dilation, groups) else xla(x, g))
    return dx.astype(x_dtype), dw.astype(w_dtype)


# --- configuration helpers ---------------------------------------------------

def _ints(value: Any, n: int, what: str, owner: str, minimum: int = 1) -> tuple[int, ...]:
    """A tuple of ``n`` integers ≥ ``minimum`` from an int or a sequence."""
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                   and v >= minimum for v in values):
        raise ValueError(f"{owner}: {what} must be {n} integer(s) ≥ {minimum} (one per spatial "
                         f"dimension), got {value!r}")
    return tuple(int(v) for v in values)


def _check_padding(padding: Padding, n: int, owner: str) -> Padding:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{owner}: padding must be 'SAME', 'VALID' or {n} (low, high) "
                             f"pairs, got {padding!r}")
        return padding.upper()
    pairs = tuple(tuple(p) for p in padding)
    if len(pairs) != n or not all(len(p) == 2 and all(isinstance(v, (int, np.integer))
                                                      and v >= 0 for v in p) for p in pairs):
        raise ValueError(f"{owner}: explicit padding must be {n} pair(s) of non-negative "
                         f"integers (low, high), one per spatial dimension, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def _kind_and_label(name: str | None, kind: str, label: str) -> tuple[str, str]:
    if name is None:
        return kind, label
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
        raise ValueError(f"{label}: name must be a snake_case identifier (it keys the params), "
                         f"got {name!r}")
    return kind, label


def _conv_pads(spatial, ks, strides, padding, dilation):
    """Explicit (lo, hi) pads of a convolution: SAME keeps ⌈in / s⌉ outputs, VALID pads 0."""
    if not isinstance(padding, str):
        return padding
    spans = [d * (k - 1) + 1 for k, d in zip(ks, dilation)]
    return tuple(lax.padtype_to_pads(spatial, spans, strides, padding))


def _transpose_pads(ks, strides, padding, dilation):
    """Pads of ``lax.conv_transpose`` (SAME: in·s outputs; VALID: (in − 1)·s + K′ at least)."""
    if not isinstance(padding, str):
        return padding
    pads = []
    for k, s, d in zip(ks, strides, dilation):
        span = d * (k - 1) + 1
        if padding == "SAME":
            total = span + s - 2
            lo = span - 1 if s > span - 1 else int(np.ceil(total / 2))
        else:
            total, lo = span + s - 2 + max(span - s, 0), span - 1
        pads.append((lo, total - lo))
    return tuple(pads)


def _out_size(size, k, s, lo, hi, a, d):
    return (a * (size - 1) + 1 + lo + hi - (d * (k - 1) + 1)) // s + 1


# --- the layers --------------------------------------------------------------

def _conv_layer(out_chan, filter_shape, strides, padding, dilation, groups, W_init, b_init,
                name, transpose, kind, label):
    """Shared body of :func:`Conv` and :func:`ConvTranspose`."""
    if not isinstance(filter_shape, (tuple, list)) or not filter_shape:
        raise ValueError(f"{label}: filter_shape must be a non-empty tuple of positive "
                         f"integers, got {filter_shape!r}")
    n = len(filter_shape)
    ks = _ints(filter_shape, n, "filter_shape", label)
    if not isinstance(out_chan, int) or isinstance(out_chan, bool) or out_chan <= 0:
        raise ValueError(f"{label}: out_chan must be a positive integer, got {out_chan!r}")
    strides = _ints(1 if strides is None else strides, n, "strides", label)
    dilation = _ints(1 if dilation is None else dilation, n, "dilation", label)
    padding = _check_padding(padding, n, label)
    if not isinstance(groups, int) or groups <= 0 or out_chan % groups:
        raise ValueError(f"{label}: feature_group_count must be a positive integer dividing "
                         f"out_chan={out_chan}, got {groups!r}")
    kind, label = _kind_and_label(name, kind, label)

    def geometry(input_shape):
        """(pads, window strides, input dilation, output spatial shape) for an input shape."""
        spatial = tuple(input_shape[1:-1])
        if transpose:
            pads, win, lhs = _transpose_pads(ks, strides, padding, dilation), (1,) * n, strides
        else:
            pads, win, lhs = _conv_pads(spatial, ks, strides, padding, dilation), strides, (1,) * n
        out = tuple(_out_size(size, k, s, lo, hi, a, d) for size, k, s, (lo, hi), a, d
                    in zip(spatial, ks, win, pads, lhs, dilation))
        if any(o <= 0 for o in out):
            raise ValueError(f"{label}: the dilated filter {ks} (dilation {dilation}) is larger "
                             f"than the padded input; input shape {tuple(input_shape)}, padding "
                             f"{pads}")
        return pads, win, lhs, out

    def check_shape(shape, in_chan=None):
        shape = tuple(shape)
        expected = f"(N, {', '.join('?' * n)}, {in_chan if in_chan else 'C'})"
        if len(shape) != n + 2 or (in_chan is not None and shape[-1] != in_chan):
            raise ShapeError(f"{label} expects channels-last inputs of shape {expected}, got "
                             f"{shape}")
        if not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape[1:]):
            raise ShapeError(f"{label} needs known positive spatial and channel sizes, got "
                             f"input shape {shape}")

    def init(rng, input_shape):
        check_shape(input_shape)
        in_chan = input_shape[-1]
        if in_chan % groups:
            raise ValueError(f"{label}: feature_group_count={groups} must divide the input's "
                             f"{in_chan} channels (input shape {tuple(input_shape)})")
        *_, out = geometry(input_shape)
        k1, k2 = jax.random.split(rng)
        w = W_init(k1, ks + (in_chan // groups, out_chan))
        b = b_init(k2, (out_chan,))
        return (input_shape[0],) + out + (out_chan,), {"w": w, "b": b}

    def apply(params, inputs, **kwargs):
        w = params["w"]
        check_shape(inputs.shape, w.shape[-2] * groups)
        pads, win, lhs, _ = geometry(inputs.shape)
        return conv_general(inputs, w, win, pads, lhs, dilation, groups) + params["b"]

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), inputs

    def bwd(params, x, g):
        pads, win, lhs, _ = geometry(x.shape)
        dx, dw = conv_general_bwd(x, params["w"], g, win, pads, lhs, dilation, groups)
        db = jnp.sum(g.reshape(-1, g.shape[-1]), 0).astype(params["b"].dtype)
        return {"w": dw, "b": db}, dx

    config = {"out_chan": out_chan, "filter_shape": ks, "strides": strides, "padding": padding,
              "dilation": dilation}
    if not transpose:
        config["feature_group_count"] = groups
    return Layer(init, apply, kind=kind, label=label, fwd=fwd, bwd=bwd, config=config, name=name)


@recorded
def Conv(out_chan: int, filter_shape: Sequence[int], strides: Sequence[int] | None = None,
         padding: Padding = "SAME", dilation: Sequence[int] | None = None,
         feature_group_count: int = 1, W_init: Initializer = initializers.glorot_normal(),
         b_init: Initializer = initializers.zeros, name: str | None = None) -> Layer:
    """N-d convolution (cross-correlation, as in every deep-learning library), channels-last.

    y[n, o, c] = Σₖ Σᵢ x_pad[n, s·o + d·k, i]·W[k, i, c] + b[c] in each spatial dimension
    (module docstring), over ``lax.conv_general_dilated``.

    **Arguments**

    - ``out_chan``: output channels C_out.
    - ``filter_shape``: the kernel's spatial shape K, one entry per spatial dimension (its
      length sets the number of spatial dimensions: ``(3,)`` is 1-d, ``(3, 3)`` 2-d).
    - ``strides``: window strides s (default 1).
    - ``padding``: ``"SAME"`` (⌈in / s⌉ outputs, the extra padding at the high end, as in
      ``lax``), ``"VALID"`` (no padding) or explicit ``((lo, hi), ...)`` per spatial dimension.
    - ``dilation``: kernel (atrous) dilation d (default 1).
    - ``feature_group_count``: G groups; each output channel sees C_in / G input channels
      (G = C_in is a depthwise convolution). G must divide C_in and C_out.
    - ``W_init``, ``b_init``: ``jax.nn.initializers`` (Glorot normal on the (*K, I, O) kernel
      — fan-in K·C_in/G, fan-out K·C_out — and zero bias).
    - ``name``: a snake_case name keying the params in a combinator (default ``"conv"``).

    **Shapes**: inputs ``(N, *spatial, C_in)`` (NWC / NHWC / NDHWC); outputs
    ``(N, *spatial', C_out)`` with spatial′ = ⌊(in + lo + hi − d(K − 1) − 1) / s⌋ + 1; params
    ``{"w": (*K, C_in / G, C_out), "b": (C_out,)}``.

    **Backward rule** (by hand, three ``lax.conv_general_dilated`` calls; module docstring):
    ∂L/∂x is δ dilated by s, convolved with the flipped, channel-swapped kernel (dilation d);
    ∂L/∂W[k, i, c] = Σ_{n,o} x_pad[n, s·o + d·k, i]·δ[n, o, c], the input convolved with δ;
    ∂L/∂b = Σ δ.
    """
    label = f"Conv({out_chan}, {tuple(filter_shape) if isinstance(filter_shape, (list, tuple)) else filter_shape})"  # noqa: E501
    return _conv_layer(out_chan, filter_shape, strides, padding, dilation, feature_group_count,
                       W_init, b_init, name, False, "conv", label)


@recorded
def Conv1D(out_chan: int, kernel_size: int | Sequence[int], strides: int = 1,
           padding: Padding = "SAME", dilation: int = 1, feature_group_count: int = 1,
           **kwargs) -> Layer:
    """1-d :func:`Conv` on ``(N, W, C)`` inputs with a kernel of width ``kernel_size``."""
    ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    return Conv(out_chan, ks, _ints(strides, 1, "strides", "Conv1D"), padding,
                _ints(dilation, 1, "dilation", "Conv1D"), feature_group_count, **kwargs)


@recorded
def Conv2D(out_chan: int, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1,
           padding: Padding = "SAME", dilation: int | Sequence[int] = 1,
           feature_group_count: int = 1, **kwargs) -> Layer:
    """2-d :func:`Conv` on ``(N, H, W, C)`` inputs; an int ``kernel_size`` is square."""
    ks = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
    return Conv(out_chan, ks, _ints(strides, 2, "strides", "Conv2D"), padding,
                _ints(dilation, 2, "dilation", "Conv2D"), feature_group_count, **kwargs)


@recorded
def ConvTranspose(out_chan: int, filter_shape: Sequence[int],
                  strides: Sequence[int] | None = None, padding: Padding = "SAME",
                  dilation: Sequence[int] | None = None,
                  W_init: Initializer = initializers.glorot_normal(),
                  b_init: Initializer = initializers.zeros, name: str | None = None) -> Layer:
    """N-d transposed convolution (the upsampling one), channels-last; ``lax.conv_transpose``.

    y = x̃ ⋆ W + b with x̃ the input dilated by the strides s (s − 1 zeros between
    neighbours), then padded, convolved with stride 1 and kernel dilation d. As in
    ``lax.conv_transpose`` and Flax's ``ConvTranspose`` (``transpose_kernel=False``), the
    kernel is not flipped: the kernel is ``(*K, C_in, C_out)``.

    **Arguments**: as :func:`Conv` (no groups). ``padding="SAME"`` gives in·s outputs,
    ``"VALID"`` gives (in − 1)·s + max(K′, s) with K′ = d(K − 1) + 1 (``lax.conv_transpose``'s
    pads); explicit ``((lo, hi), ...)`` pads the dilated input.

    **Shapes**: ``(N, *spatial, C_in)`` → ``(N, *spatial', C_out)``; params
    ``{"w": (*K, C_in, C_out), "b": (C_out,)}``.

    **Backward rule**: the module docstring's with input dilation a = s and window stride 1:
    ∂L/∂x is δ convolved with the flipped, channel-swapped kernel read with window stride s
    (a plain strided convolution), ∂L/∂W the dilated input convolved with δ, ∂L/∂b = Σ δ.
    """
    label = f"ConvTranspose({out_chan}, {tuple(filter_shape) if isinstance(filter_shape, (list, tuple)) else filter_shape})"  # noqa: E501
    return _conv_layer(out_chan, filter_shape, strides, padding, dilation, 1, W_init, b_init,
                       name, True, "conv_transpose", label)
