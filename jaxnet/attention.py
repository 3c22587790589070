"""Multi-head attention with a hand-written backward rule (storing or recomputing the
probabilities) and a pre-norm transformer block built from jaxnet's combinators.

For queries from x (B, T, d) and keys and values from the context c (B, S, d_c; c = x for
self-attention), per head h:

    q = x·W_q + b_q,  k = c·W_k + b_k,  v = c·W_v + b_v           (each split into H heads)
    sᵢⱼ = qᵢ·kⱼ / √d_h,   pᵢⱼ = softmax_j(sᵢⱼ over the allowed keys j),   oᵢ = Σⱼ pᵢⱼ vⱼ
    y = concat_h(o)·W_o + b_o

Backward rule, δ = ∂L/∂y:

    ∂L/∂W_o = concat(o)ᵀ·δ,  ∂L/∂o = δ·W_oᵀ
    ∂L/∂vⱼ = Σᵢ pᵢⱼ ∂L/∂oᵢ,   ∂L/∂pᵢⱼ = ∂L/∂oᵢ · vⱼ
    ∂L/∂sᵢⱼ = Σₗ ∂pᵢₗ/∂sᵢⱼ ∂L/∂pᵢₗ = pᵢⱼ(∂L/∂pᵢⱼ − Σₗ pᵢₗ ∂L/∂pᵢₗ)
              (the softmax derivative σᵢ(δᵢⱼ − σⱼ) as a JVP, :func:`jaxnet.activations.softmax_jvp`)
    ∂L/∂qᵢ = Σⱼ ∂L/∂sᵢⱼ kⱼ / √d_h,   ∂L/∂kⱼ = Σᵢ ∂L/∂sᵢⱼ qᵢ / √d_h

and the projections' rules (as Dense's) map ∂L/∂q, ∂L/∂k, ∂L/∂v to their weights and inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from .activations import softmax_jvp
from .combinators import residual, serial
from .layers import Dense, Gelu, Initializer, Layer, LayerNorm, ShapeError
from .protocol import recorded

Array = jax.Array

__all__ = ["MultiHeadAttention", "TransformerBlock", "attention_weights"]

_PROJECTIONS = ("query", "key", "value")


# --- the attention of one set of projected heads -----------------------------------

def _allowed(q_pos: Array, s: int, causal: bool, mask: Array | None) -> Array | None:
    """Which keys each query may attend to, broadcastable to (B, H, T_q, S); None: all."""
    allowed = None
    if causal:
        allowed = (jnp.arange(s)[None, :] <= q_pos[:, None])[None, None]
    if mask is not None:
        key_ok = mask[:, None, None, :]
        allowed = key_ok if allowed is None else allowed & key_ok
    return allowed


def _scores(q: Array, k: Array) -> Array:
    """sᵢⱼ = qᵢ·kⱼ / √d_h, (B, T, H, d_h) × (B, S, H, d_h) → (B, H, T, S)."""
    return jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))


@jax.custom_jvp
def _softmax_with_stats(s: Array, allowed: Array | None) -> tuple[Array, Array]:
    """p = softmax over the allowed keys and each row's log-sum-exp lse = m + log Σⱼ e^(sⱼ − m).

    A row with no allowed key has p = 0 (its output is 0) and lse = +∞, so that
    e^(s − lse) = 0 gives the same p when it is recomputed. No NaN either way, in the values
    or in their derivatives (the masked entries never reach exp or log).

    Its JVP is written by hand: ṗ = p ⊙ (ṡ − Σⱼ pⱼṡⱼ) (σᵢ(δᵢⱼ − σⱼ)), and lse' = Σⱼ pⱼṡⱼ;
    masked keys have p = 0, so they get no tangent. Autodiff of the masked formula above
    instead runs through its selects, exp and division: on a 2-core CPU that made
    ``jax.grad`` of causal attention 1.4× (T = 2048) and 2.3× (T = 4096) slower than
    ``jax.nn.softmax``'s, which has a rule of its own.
    """
    if allowed is None:
        m = lax.stop_gradient(jnp.max(s, -1, keepdims=True))
        e = jnp.exp(s - m)
        total = jnp.sum(e, -1, keepdims=True)
        return e / total, (m + jnp.log(total))[..., 0]
    s = jnp.where(allowed, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, -1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros((), s.dtype))
    e = jnp.where(allowed, jnp.exp(jnp.where(allowed, s, m) - m), jnp.zeros((), s.dtype))
    total = jnp.sum(e, -1, keepdims=True)
    some = total > 0
    safe = jnp.where(some, total, jnp.ones((), total.dtype))
    lse = jnp.where(some, m + jnp.log(safe), jnp.asarray(jnp.inf, s.dtype))
    return e / safe, lse[..., 0]


@_softmax_with_stats.defjvp
def _softmax_with_stats_jvp(primals, tangents):
    (s, allowed), (ds, _) = primals, tangents
    p, lse = _softmax_with_stats(s, allowed)
    return (p, lse), (softmax_jvp(p, ds), jnp.sum(p * ds, -1))  # lse' = Σⱼ pⱼṡⱼ


def attention_weights(q: Array, k: Array, causal: bool = False,
                      mask: Array | None = None) -> Array:
    """The probabilities pᵢⱼ (B, H, T, S) of heads q (B, T, H, d_h) over keys k (B, S, H, d_h)."""
    allowed = _allowed(jnp.arange(q.shape[1]), k.shape[1], causal, mask)
    return _softmax_with_stats(_scores(q, k), allowed)[0]


def _attend_stored(q, k, v, causal, mask):
    """o and p, the T×T probabilities kept for the backward rule."""
    p = attention_weights(q, k, causal, mask)
    return jnp.einsum("bhts,bshd->bthd", p, v), p


def _attend_stored_bwd(q, k, v, p, do):
    """(∂L/∂q, ∂L/∂k, ∂L/∂v) from the stored probabilities p and δ_o = ∂L/∂o."""
    scale = 1 / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    dv = jnp.einsum("bhts,bthd->bshd", p, do)
    ds = softmax_jvp(p, jnp.einsum("bthd,bshd->bhts", do, v))
    return (jnp.einsum("bhts,bshd->bthd", ds, k) * scale,
            jnp.einsum("bhts,bthd->bshd", ds, q) * scale, dv)


def _blocks(a: Array, size: int) -> Array:
    """(B, T, ...) → (T_pad / size, B, size, ...), zero-padding T up to a multiple of size."""
    t = a.shape[1]
    pad = -t % size
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(a.shape[0], -1, size, *a.shape[2:]), 1, 0)


# A causal block of queries [i·size, (i + 1)·size) sees keys [0, (i + 1)·size) only. The
# blocks are split into this many consecutive groups, and each group loops over the keys its
# last block sees: (g + 1) / 2g of the whole T×S work (5/8 for 4 groups) where one loop over
# all S keys would do all of it. Each group is its own loop, one block at a time.
_CAUSAL_GROUPS = 4


def _groups(t: int, s: int, size: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first block, end block, key count) of each group of query blocks."""
    n = -(-t // size)
    if not causal:
        return [(0, n, s)]
    cuts = sorted({round(n * j / _CAUSAL_GROUPS) for j in range(_CAUSAL_GROUPS + 1)})
    return [(a, b, min(s, b * size)) for a, b in zip(cuts, cuts[1:])]


def _keys(a: Array | None, end: int) -> Array | None:
    return None if a is None else a[:, :end]


def _attend_blocked(q, k, v, causal, mask, size):
    """o and each row's lse, one block of ``size`` queries at a time (``lax.map`` over each
    group of :func:`_groups`): the (size × S) scores of one block exist at once, never the
    whole T×T matrix."""
    t, b, h = q.shape[1], q.shape[0], q.shape[2]
    q_blocks, o, lse = _blocks(q, size), [], []
    for first, stop, end in _groups(t, k.shape[1], size, causal):
        k_g, v_g, mask_g = k[:, :end], v[:, :end], _keys(mask, end)

        def block(args, k_g=k_g, v_g=v_g, mask_g=mask_g, end=end):
            q_b, start = args
            allowed = _allowed(start + jnp.arange(size), end, causal, mask_g)
            p, lse_b = _softmax_with_stats(_scores(q_b, k_g), allowed)
            return jnp.einsum("bhts,bshd->bthd", p, v_g), lse_b  # (B, n, H, d), (B, H, n)

        o_g, lse_g = lax.map(block, (q_blocks[first:stop], jnp.arange(first, stop) * size))
        o.append(o_g)
        lse.append(lse_g)
    o = jnp.moveaxis(jnp.concatenate(o), 0, 1).reshape(b, -1, h, q.shape[-1])[:, :t]
    lse = jnp.moveaxis(jnp.concatenate(lse), 0, 2).reshape(b, h, -1)[..., :t]
    return o, lse


def _attend_recompute_bwd(q, k, v, o, lse, do, causal, mask, size):
    """(∂L/∂q, ∂L/∂k, ∂L/∂v) from the row statistics lse alone: each block of queries
    recomputes its probabilities p = e^(s − lse) over the allowed keys (``lax.scan`` over
    each group of :func:`_groups`), takes its share of ∂L/∂s = p ⊙ (∂L/∂p − Dᵢ), and adds
    its share of ∂L/∂k and ∂L/∂v to the carry. Only (size × S) probabilities exist at once.
    The softmax JVP's row sum Dᵢ = Σⱼ pᵢⱼ (δ_oᵢ·vⱼ) is δ_oᵢ·oᵢ (o = Σⱼ pᵢⱼvⱼ), computed
    once from the output, so no block reduces over its keys for it."""
    t, s_len = q.shape[1], k.shape[1]
    scale = 1 / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    row = jnp.stack([lse, jnp.moveaxis(jnp.sum(do * o, -1), 1, 2)], -1)  # (B, H, T, 2)
    blocks = (_blocks(q, size), _blocks(do, size), _blocks(jnp.moveaxis(row, 2, 1), size))
    dk = dv = jnp.zeros((k.shape[0], 0) + k.shape[2:], k.dtype)
    dq = []
    for first, stop, end in _groups(t, s_len, size, causal):
        k_g, v_g, mask_g = k[:, :end], v[:, :end], _keys(mask, end)

        def step(carry, args, k_g=k_g, v_g=v_g, mask_g=mask_g, end=end):
            dk, dv = carry
            q_b, do_b, row_b, start = args
            allowed = _allowed(start + jnp.arange(size), end, causal, mask_g)
            row_b = jnp.moveaxis(row_b, 1, 2)[..., None, :]       # (B, H, size, 1, 2)
            p = jnp.exp(_scores(q_b, k_g) - row_b[..., 0])
            if allowed is not None:
                p = jnp.where(allowed, p, jnp.zeros((), p.dtype))
            dv = dv + jnp.einsum("bhts,bthd->bshd", p, do_b)
            ds = p * (jnp.einsum("bthd,bshd->bhts", do_b, v_g) - row_b[..., 1])
            dk = dk + jnp.einsum("bhts,bthd->bshd", ds, q_b) * scale
            return (dk, dv), jnp.einsum("bhts,bshd->bthd", ds, k_g) * scale

        grow = [(0, 0), (0, end - dk.shape[1]), (0, 0), (0, 0)]   # the group's keys
        (dk, dv), dq_g = lax.scan(step, (jnp.pad(dk, grow), jnp.pad(dv, grow)),
                                  tuple(a[first:stop] for a in blocks)
                                  + (jnp.arange(first, stop) * size,))
        dq.append(dq_g)
    rest = [(0, 0), (0, s_len - dk.shape[1]), (0, 0), (0, 0)]
    dq = jnp.moveaxis(jnp.concatenate(dq), 0, 1).reshape(q.shape[0], -1, *q.shape[2:])[:, :t]
    return dq, jnp.pad(dk, rest), jnp.pad(dv, rest)


# --- the layer ---------------------------------------------------------------------

def _split_inputs(inputs: Any) -> tuple[Any, Any, bool]:
    """(x, context, is_cross) from ``x`` or ``(x, context)``."""
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 2:
            raise ShapeError(f"MultiHeadAttention takes x or a pair (x, context), got a tuple "
                             f"of {len(inputs)}")
        return inputs[0], inputs[1], True
    return inputs, inputs, False


def _is_shape_pair(shape: Any) -> bool:
    return isinstance(shape, (tuple, list)) and len(shape) == 2 and all(
        isinstance(s, (tuple, list)) for s in shape)


@recorded
def MultiHeadAttention(num_heads: int, head_dim: int | None = None, out_dim: int | None = None,
                       backward: str = "store", block_size: int = 128, causal: bool = False,
                       W_init: Initializer = initializers.lecun_normal(),
                       b_init: Initializer = initializers.zeros,
                       name: str | None = None) -> Layer:
    """Multi-head scaled dot-product attention (module docstring), self or cross.

    **Arguments**

    - ``num_heads`` H; ``head_dim`` d_h (default: the input width d / H, which H must
      divide); ``out_dim`` (default: the input width d, so the layer fits a residual block).
    - ``backward``: what the hand-written backward rule keeps from the forward pass.
      ``"store"`` keeps the probabilities p (B, H, T, S): O(T·S) memory, no recomputation.
      ``"recompute"`` keeps only each query row's softmax statistics, its log-sum-exp
      lse = m + log Σⱼ e^(sⱼ − m) (m the row's maximum, folded in: one number a row), and
      recomputes p = e^(s − lse) block by block in the backward pass, ``block_size`` queries
      at a time under ``lax.scan``; its forward pass is blocked the same way (``lax.map``),
      so that neither pass holds the T×S matrix whole: the memory-efficient attention
      backward, O(block_size·S) memory for one more computation of the scores. ``apply``
      is the same blocked computation (``jax.grad`` of it differentiates the loop).
    - ``causal``: the default of apply's ``causal=`` (a decoder's attention is causal at
      every call, including those of ``fit`` and ``manual_value_and_grad``, which pass only
      ``rng=`` and ``mode=``).
    - ``W_init``, ``b_init``: initialisers of the four projections (LeCun normal, zeros).
    - ``name``: a snake_case name keying the params in a combinator (default ``"attention"``).

    **Inputs**: x of shape (B, T, d) (self-attention) or a pair (x, context) with context
    (B, S, d_c) (cross-attention: keys and values from the context).

    **Keyword arguments of apply / fwd** (others, such as ``rng=`` and ``mode=``, are ignored,
    so they pass through ``serial`` and ``residual``):

    - ``causal`` (default: the constructor's): query i attends to keys j ≤ i only (positions
      counted from the start of both sequences);
    - ``mask=None``: a key-padding mask (B, S), ``True`` = attend.

    A query row with no key to attend to (all masked) outputs o = 0, so y = b_o, and passes
    no gradient to the keys or values (no NaN).

    **Returns**: (B, T, out_dim). Params ``{"query": {"w": (d, H·d_h), "b": (H·d_h,)}, "key":
    {"w": (d_c, H·d_h), ...}, "value": {...}, "out": {"w": (H·d_h, out_dim), "b": (out_dim,)}}``.
    The input gradient is a pair (∂L/∂x, ∂L/∂context) for pair inputs.
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"MultiHeadAttention num_heads must be a positive integer, got "
                         f"{num_heads!r}")
    for what, value in (("head_dim", head_dim), ("out_dim", out_dim)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value <= 0):
            raise ValueError(f"MultiHeadAttention {what} must be a positive integer or None, "
                             f"got {value!r}")
    if backward not in ("store", "recompute"):
        raise ValueError(f"MultiHeadAttention backward must be 'store' or 'recompute', got "
                         f"{backward!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"MultiHeadAttention block_size must be a positive integer, got "
                         f"{block_size!r}")
    label = f"MultiHeadAttention({num_heads}, {head_dim})"
    kind = "attention"
    if name is not None:
        if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
            raise ValueError(f"{label}: name must be a snake_case identifier (it keys the "
                             f"params), got {name!r}")

    def check_rank(what, shape):
        if len(shape) != 3:
            raise ShapeError(f"{label} expects {what} of shape (B, T, d), got {tuple(shape)}")

    def init(rng, input_shape):
        cross = _is_shape_pair(input_shape)
        x_shape, c_shape = (input_shape if cross else (input_shape, input_shape))
        check_rank("inputs", x_shape)
        check_rank("a context", c_shape)
        d = x_shape[-1]
        if head_dim is None and d % num_heads:
            raise ValueError(f"{label}: num_heads={num_heads} must divide the input width {d} "
                             f"(or give head_dim); input shape {tuple(x_shape)}")
        width = num_heads * (head_dim or d // num_heads)
        out = out_dim or d
        keys = jax.random.split(rng, 8)
        params = {}
        for i, (proj, n_in, n_out) in enumerate((("query", d, width), ("key", c_shape[-1], width),
                                                 ("value", c_shape[-1], width),
                                                 ("out", width, out))):
            params[proj] = {"w": W_init(keys[2 * i], (n_in, n_out)),
                            "b": b_init(keys[2 * i + 1], (n_out,))}
        return tuple(x_shape[:-1]) + (out,), params

    def check(params, x, c, mask):
        check_rank("inputs", x.shape)
        check_rank("a context", c.shape)
        for proj, a, what in (("query", x, "inputs"), ("key", c, "a context")):
            n_in = params[proj]["w"].shape[0]
            if a.shape[-1] != n_in:
                raise ShapeError(f"{label} expects {what} of shape (B, T, {n_in}), got "
                                 f"{tuple(a.shape)}")
        if c.shape[0] != x.shape[0]:
            raise ShapeError(f"{label}: inputs {tuple(x.shape)} and context {tuple(c.shape)} "
                             f"have different batch sizes")
        if mask is not None and tuple(mask.shape) != (x.shape[0], c.shape[1]):
            raise ShapeError(f"{label} expects a key-padding mask of shape "
                             f"{(x.shape[0], c.shape[1])} (B, S), got {tuple(mask.shape)}")

    def heads(params, proj, a):
        w, b = params[proj]["w"], params[proj]["b"]
        y = a @ w + b
        return y.reshape(*y.shape[:-1], num_heads, -1)

    def forward(params, inputs, causal, mask):
        x, c, cross = _split_inputs(inputs)
        mask = None if mask is None else jnp.asarray(mask).astype(bool)
        check(params, x, c, mask)
        q, k, v = (heads(params, p, a) for p, a in zip(_PROJECTIONS, (x, c, c)))
        if backward == "store":
            o, stats = _attend_stored(q, k, v, causal, mask)
        else:
            o, stats = _attend_blocked(q, k, v, causal, mask, min(block_size, x.shape[1]))
        o = o.reshape(*o.shape[:2], -1)
        y = o @ params["out"]["w"] + params["out"]["b"]
        return y, (x, c, cross, q, k, v, o, stats, causal, mask)

    default_causal = causal

    def apply(params, inputs, *, causal: bool | None = None, mask: Array | None = None,
              **kwargs):
        return forward(params, inputs, default_causal if causal is None else causal, mask)[0]

    def fwd(params, inputs, *, causal: bool | None = None, mask: Array | None = None, **kwargs):
        return forward(params, inputs, default_causal if causal is None else causal, mask)

    def bwd(params, residuals, g):
        x, c, cross, q, k, v, o, stats, causal, mask = residuals
        grads = {"out": {"w": o.reshape(-1, o.shape[-1]).T @ g.reshape(-1, g.shape[-1]),
                         "b": jnp.sum(g.reshape(-1, g.shape[-1]), 0)}}
        do = (g @ params["out"]["w"].T).reshape(q.shape)
        if backward == "store":
            dq, dk, dv = _attend_stored_bwd(q, k, v, stats, do)
        else:
            dq, dk, dv = _attend_recompute_bwd(q, k, v, o.reshape(q.shape), stats, do,
                                               causal, mask, min(block_size, x.shape[1]))
        dx = dc = None
        for proj, a, dh in zip(_PROJECTIONS, (x, c, c), (dq, dk, dv)):
            dh = dh.reshape(*dh.shape[:2], -1)
            grads[proj] = {"w": a.reshape(-1, a.shape[-1]).T @ dh.reshape(-1, dh.shape[-1]),
                           "b": jnp.sum(dh.reshape(-1, dh.shape[-1]), 0)}
            da = dh @ params[proj]["w"].T
            if proj == "query":
                dx = da
            else:
                dc = da if dc is None else dc + da
        grads = {p: grads[p] for p in params}
        return grads, ((dx, dc) if cross else dx + dc)

    return Layer(init, apply, kind=kind, label=label, fwd=fwd, bwd=bwd, name=name,
                 config={"num_heads": num_heads, "head_dim": head_dim, "out_dim": out_dim,
                         "backward": backward, "block_size": block_size, "causal": causal})


# --- the transformer block -----------------------------------------------------------

@recorded
def TransformerBlock(num_heads: int, head_dim: int | None, mlp_dim: int, dim: int | None = None,
                     backward: str = "store", block_size: int = 128,
                     epsilon: float = 1e-5, causal: bool = False) -> Layer:
    """A pre-norm transformer block on (B, T, dim):

        x ← x + MultiHeadAttention(LayerNorm(x))
        x ← x + Dense(dim)(gelu(Dense(mlp_dim)(LayerNorm(x))))

    built as ``serial(residual(LayerNorm, MultiHeadAttention), residual(LayerNorm,
    Dense(mlp_dim), Gelu, Dense(dim)))``, so its backward rule is its pieces' rules composed.
    ``dim`` (the model width) defaults to ``num_heads · head_dim``; with ``head_dim=None`` it
    must be given, and the heads are dim / num_heads wide. ``causal=`` and ``mask=`` passed to
    apply reach the attention through ``serial`` and ``residual``; ``backward`` and
    ``block_size`` and ``causal`` (the default) are the attention's (:func:`MultiHeadAttention`).

    Params: ``{"residual_0": {"layer_norm_0", "attention_0"}, "residual_1": {"layer_norm_0",
    "dense_0", "dense_1"}}``.
    """
    if dim is None:
        if head_dim is None:
            raise ValueError("TransformerBlock needs head_dim or dim (the model width)")
        dim = num_heads * head_dim
    if not isinstance(mlp_dim, int) or isinstance(mlp_dim, bool) or mlp_dim <= 0:
        raise ValueError(f"TransformerBlock mlp_dim must be a positive integer, got {mlp_dim!r}")
    if head_dim is None and (not isinstance(dim, int) or dim % num_heads):
        raise ValueError(f"TransformerBlock: num_heads={num_heads} must divide dim={dim!r}")
    attention = MultiHeadAttention(num_heads, head_dim, out_dim=dim, backward=backward,
                                   block_size=block_size, causal=causal)
    body = serial(residual(LayerNorm(epsilon), attention),
                  residual(LayerNorm(epsilon), Dense(mlp_dim), Gelu, Dense(dim)))
    label = f"TransformerBlock({num_heads}, {head_dim}, {mlp_dim})"

    def init(rng, input_shape):
        if len(input_shape) != 3 or input_shape[-1] != dim:
            raise ShapeError(f"{label} expects inputs of shape (B, T, {dim}), got "
                             f"{tuple(input_shape)}")
        return body.composite.init(rng, input_shape)

    # the serial itself (its structure, state and backward rule), under its own kind and label
    return dataclasses.replace(
        body, init=lambda rng, shape: init(rng, shape)[:2],
        composite=body.composite._replace(init=init), kind="transformer_block", label=label,
        config={"num_heads": num_heads, "head_dim": head_dim, "mlp_dim": mlp_dim, "dim": dim,
                "backward": backward, "block_size": block_size, "epsilon": epsilon,
                "causal": causal})

