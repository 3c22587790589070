"""Embeddings: a lookup table for integer tokens and learned positions, with hand-written
backward rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import initializers

from .layers import Initializer, Layer, ShapeError
from .protocol import recorded

Array = jax.Array

__all__ = ["Embedding", "PositionalEmbedding"]


def _positive_int(label, what, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{label}: {what} must be a positive integer, got {value!r}")


@recorded
def Embedding(vocab_size: int, dim: int,
              embedding_init: Initializer = initializers.normal(stddev=1.0)) -> Layer:
    """Token embedding: y[..., :] = table[x[...], :] for integer tokens x.

    **Arguments**: ``vocab_size`` V, ``dim`` d, ``embedding_init`` (``jax.nn.initializers``;
    N(0, 1) entries, as Equinox and PyTorch).

    **Shapes**: integer inputs of any shape ``(...)`` → ``(..., d)``; params
    ``{"table": (V, d)}``.

    **Out-of-vocabulary tokens** (x < 0 or x ≥ V): with concrete inputs (outside ``jit``) apply
    and fwd raise ``ValueError`` naming the bad token. Under ``jit`` the values are unknown at
    trace time: such a token's embedding is NaN (so the loss turns NaN rather than silently
    reading a clamped row) and it contributes no gradient to the table. Negative tokens are
    never wrapped around.

    **Backward rule**: a scatter-add of δ into the table, ∂L/∂table[v] = Σ_{positions p: x[p] =
    v} δ[p] (``zeros.at[x].add(δ)``); no input gradient (``None``): the inputs are integers.
    """
    label = f"Embedding({vocab_size}, {dim})"
    _positive_int(label, "vocab_size", vocab_size)
    _positive_int(label, "dim", dim)

    def init(rng, input_shape):
        return tuple(input_shape) + (dim,), {"table": embedding_init(rng, (vocab_size, dim))}

    def tokens(params, inputs):
        if params["table"].shape != (vocab_size, dim):
            raise ShapeError(f"{label} expects a table of shape {(vocab_size, dim)}, got "
                             f"{tuple(params['table'].shape)}")
        inputs = jnp.asarray(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise TypeError(f"{label} takes integer token ids, got {inputs.dtype} inputs of "
                            f"shape {tuple(inputs.shape)}")
        if inputs.size:
            try:  # concrete inputs are checked; traced ones (under jit) cannot be
                low, high = int(jnp.min(inputs)), int(jnp.max(inputs))
            except jax.errors.ConcretizationTypeError:
                low, high = 0, 0
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"{label}: token {bad} is outside the vocabulary "
                                 f"[0, {vocab_size})")
        valid = (inputs >= 0) & (inputs < vocab_size)
        return inputs, valid

    def lookup(params, inputs, valid):
        rows = params["table"][jnp.clip(inputs, 0, vocab_size - 1)]
        return jnp.where(valid[..., None], rows, jnp.asarray(np.nan, rows.dtype))

    def apply(params, inputs, **kwargs):
        inputs, valid = tokens(params, inputs)
        return lookup(params, inputs, valid)

    def fwd(params, inputs, **kwargs):
        inputs, valid = tokens(params, inputs)
        return lookup(params, inputs, valid), jnp.where(valid, inputs, vocab_size)

    def bwd(params, ids, g):
        table = params["table"]
        # out-of-vocabulary ids were set to V: mode="drop" discards them
        grad = jnp.zeros_like(table).at[ids].add(g.astype(table.dtype), mode="drop")
        return {"table": grad}, None

    return Layer(init, apply, kind="embedding", label=label, fwd=fwd, bwd=bwd,
                 config={"vocab_size": vocab_size, "dim": dim})


@recorded
def PositionalEmbedding(max_len: int,
                        embedding_init: Initializer = initializers.normal(stddev=0.02)) -> Layer:
    """Learned positional embedding added to a sequence: y[b, t, :] = x[b, t, :] + pos[t, :].

    **Arguments**: ``max_len`` (the longest sequence; shorter ones use the first T rows),
    ``embedding_init`` (N(0, 0.02²) entries, as GPT-2).

    **Shapes**: ``(B, T, d)`` with T ≤ ``max_len`` → the same; params
    ``{"table": (max_len, d)}``.

    **Backward rule**: ∂L/∂x = δ; ∂L/∂pos[t] = Σ_b δ[b, t] for t < T, 0 for the rows past T.
    """
    label = f"PositionalEmbedding({max_len})"
    _positive_int(label, "max_len", max_len)

    def check(shape, d=None):
        shape = tuple(shape)
        want = f"(B, T ≤ {max_len}, {d if d is not None else 'd'})"
        if len(shape) != 3 or shape[1] > max_len or (d is not None and shape[2] != d):
            raise ShapeError(f"{label} expects inputs of shape {want}, got {shape}")

    def init(rng, input_shape):
        check(input_shape)
        return tuple(input_shape), {"table": embedding_init(rng, (max_len, input_shape[-1]))}

    def apply(params, inputs, **kwargs):
        check(inputs.shape, params["table"].shape[-1])
        return inputs + params["table"][:inputs.shape[1]]

    def fwd(params, inputs, **kwargs):
        return apply(params, inputs), None

    def bwd(params, _, g):
        table = params["table"]
        rows = jnp.sum(g, 0).astype(table.dtype)
        return {"table": jnp.pad(rows, ((0, max_len - g.shape[1]), (0, 0)))}, g

    return Layer(init, apply, kind="positional_embedding", label=label, fwd=fwd, bwd=bwd,
                 config={"max_len": max_len})
