"""Training: a state pytree, jit-compiled steps and epochs, and ``fit``.

The pieces, from small to large:

- :class:`TrainState`: everything training changes, as one pytree
  (params, optimizer state, step count, PRNG key); :func:`init_state` makes one.
- :func:`make_train_step`: one optimizer step on one batch,
  ``step(state, inputs, targets) -> (state, loss)``, compiled with
  ``jax.jit`` and the state's buffers donated. Drop it into any loop.
- :func:`make_epoch`: a whole epoch of steps over pre-batched data
  ``(num_batches, batch, ...)`` as one ``lax.scan`` in one compiled call.
- :func:`make_eval_step`: loss and metrics of params on a data set.
- :func:`fit`: epochs with per-epoch shuffling, validation metrics, early
  stopping with patience (restoring the best params), NaN detection,
  Ctrl-C handling and a history; resumable from a :class:`FitProgress`.

Randomness is explicit: the state's key is split once per epoch for the
shuffle, and the step's dropout key is ``fold_in(key, step)``, so a run is a
function of its initial key (and resuming from a checkpoint replays it
bit for bit).

All compiled functions are built from plain functions by :func:`_compile`,
the one place where ``jax.jit`` (and its donation) is applied.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import losses as _losses
from .protocol import apply_with_state, init_with_state

Array = jax.Array
Params = Any
Loss = Callable[[Array, Array], Array]

__all__ = ["TrainState", "FitProgress", "FitResult", "init_state", "make_train_step",
           "make_epoch", "make_eval_step", "evaluate", "fit", "make_optimizer", "OPTIMIZERS",
           "SCHEDULES"]


class TrainState(NamedTuple):
    """Everything one training step changes (a pytree).

    Attributes:
      params: the network's parameters.
      opt_state: the optax optimizer's state.
      step: int32 scalar, the number of steps taken. For a net that draws no
        randomness :func:`make_train_step` counts it on the host (a NumPy int32), so
        the compiled call carries neither it nor the key.
      key: uint32[2] raw PRNG key; split once per epoch for shuffling, and
        ``fold_in(key, step)`` gives each step's dropout key.
      model_state: the net's model state (BatchNorm's running statistics), keyed
        like the params; ``{}`` (no leaves) for a stateless net.
    """

    params: Params
    opt_state: optax.OptState
    step: Array
    key: Array
    model_state: Any = {}


def _raw_key(key: Any) -> Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.PRNGKey(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(f"expected a PRNG key (jax.random.key(seed), a uint32[2] raw key or an "
                         f"int seed), got an array of dtype {key.dtype} and shape {key.shape}")
    return key


def init_state(net: Any, optimizer: optax.GradientTransformation, key: Any,
               input_shape: Sequence[int], dtype: Any = None) -> TrainState:
    """A fresh :class:`TrainState`: params from ``net``'s init, the optimizer's initial state.

    ``key`` is a PRNG key (typed or raw) or an int seed; it is split into the
    init key and the state's key. ``input_shape`` includes the batch axis,
    e.g. ``(-1, 64)``. ``dtype`` (e.g. ``jnp.float32``) casts the floating
    params, whatever ``jax_enable_x64`` says; ``None`` keeps the init's dtype.
    """
    _check_optimizer(optimizer)
    init_key, key = jax.random.split(_raw_key(key))
    _, params, model_state = init_with_state(net, init_key, tuple(input_shape))
    if dtype is not None:
        params = jax.tree_util.tree_map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key, model_state)


def _check_optimizer(optimizer: Any) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"expected an optax GradientTransformation (with init and update), got "
                        f"{optimizer!r}")


def _check_loss(loss: Any) -> None:
    """``loss`` must be callable as ``loss(outputs, targets)``."""
    import inspect

    if not callable(loss):
        raise TypeError(f"loss must be a function loss(outputs, targets) -> scalar, got {loss!r}")
    try:
        inspect.signature(loss).bind(None, None)
    except TypeError:
        raise TypeError(f"loss must take two positional arguments, loss(outputs, targets) -> "
                        f"scalar; {getattr(loss, '__name__', loss)!r} has the signature "
                        f"{inspect.signature(loss)}") from None
    except ValueError:  # no signature to read (a builtin): trust it
        pass


def _value_and_grad(net: Any, loss: Loss, grad: str) -> Callable:
    """``f(params, model_state, inputs, targets, *, rng, mode) -> (loss, new_state, grads)``
    by jax.grad (through ``apply_with_state``) or by the hand-written backward pass."""
    _check_loss(loss)
    if grad == "auto":
        def objective(params, model_state, inputs, targets, rng, mode):
            outputs, new_state = apply_with_state(net, params, model_state, inputs,
                                                  {"rng": rng, "mode": mode})
            return loss(outputs, targets), new_state

        value_and_grad = jax.value_and_grad(objective, has_aux=True)

        def auto(params, model_state, inputs, targets, *, rng=None, mode=None):
            (value, new_state), grads = value_and_grad(params, model_state, inputs, targets,
                                                       rng, mode)
            return value, new_state, grads

        return auto
    if grad == "manual":
        from .backprop import manual_value_and_grad

        f = manual_value_and_grad(net, loss)
        stateful = getattr(net, "stateful", False)

        def manual(params, model_state, inputs, targets, *, rng=None, mode=None):
            if not stateful:
                value, grads = f(params, inputs, targets, rng=rng, mode=mode)
                return value, model_state, grads
            (value, new_state), grads = f(params, inputs, targets, state=model_state, rng=rng,
                                          mode=mode)
            return value, new_state, grads

        return manual
    raise ValueError(f"grad must be 'auto' (jax.grad) or 'manual' (jaxnet's hand-written "
                     f"backward pass), got {grad!r}")


def _update_fn(value_and_grad: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """``update(params, opt_state, model_state, inputs, targets, rng) -> (params, opt_state,
    model_state, loss)``: one optimizer step on what the step changes, nothing else."""

    def update(params, opt_state, model_state, inputs, targets, rng):
        value, model_state, grads = value_and_grad(params, model_state, inputs, targets,
                                                   rng=rng, mode="train")
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, model_state, value

    return update


def train_step_fn(net: Any, loss: Loss, optimizer: optax.GradientTransformation,
                  grad: str = "auto") -> Callable[[TrainState, Array, Array],
                                                   tuple[TrainState, Array]]:
    """The plain (uncompiled) training step; :func:`make_train_step` compiles it.

    One step: (L, g) = value_and_grad(params) on the batch, with the layers in
    ``mode="train"`` and ``rng = fold_in(key, step)``; then
    (u, s') = optimizer.update(g, s, params), params' = params + u.
    """
    _check_optimizer(optimizer)
    update = _update_fn(_value_and_grad(net, loss, grad), optimizer)

    def step(state: TrainState, inputs: Array, targets: Array) -> tuple[TrainState, Array]:
        rng = jax.random.fold_in(state.key, state.step)
        params, opt_state, model_state, value = update(state.params, state.opt_state,
                                                       state.model_state, inputs, targets, rng)
        return TrainState(params, opt_state, state.step + 1, state.key, model_state), value

    return step


_UNUSED_RNG = (2,), jnp.uint32  # a raw key's shape and dtype


def draws_randomness(net: Any, loss: Loss, state: TrainState, inputs: Any, targets: Any,
                     grad: str = "auto") -> bool:
    """Whether a training step of ``net`` reads its PRNG key (Dropout does; a plain MLP does not).

    Traces the step's loss and gradient with the key as an input (shapes only, nothing
    runs) and looks for an operation that takes the key. A net that draws no randomness
    needs neither the state's ``key`` nor its ``step`` (the dropout key is
    ``fold_in(key, step)``) inside the compiled step, so :func:`make_train_step` leaves
    both out of it.
    """
    value_and_grad = _value_and_grad(net, loss, grad)

    def objective(rng, params, model_state, inputs, targets):
        return value_and_grad(params, model_state, inputs, targets, rng=rng, mode="train")

    # make_jaxpr takes arrays, tracers and ShapeDtypeStructs alike, by shape and dtype
    closed = jax.make_jaxpr(objective)(jax.ShapeDtypeStruct(*_UNUSED_RNG), state.params,
                                       state.model_state, inputs, targets)
    return _live_inputs(closed.jaxpr, [True] * len(closed.jaxpr.outvars))[0]


def _is_var(v: Any) -> bool:
    return not hasattr(v, "val")  # a Literal carries its value; a Var does not


def _live_inputs(jaxpr: Any, live_out: Sequence[bool]) -> list[bool]:
    """Which inputs of ``jaxpr`` the live outputs depend on: dead-code analysis, walking the
    equations backwards. A call whose inner jaxpr matches its inputs and outputs one to one
    (``jit``, ``checkpoint``, custom derivatives) is looked into; any other equation with a
    live output (or an effect) is taken to need all of its inputs."""
    live = {v for v, keep in zip(jaxpr.outvars, live_out) if keep and _is_var(v)}
    for eqn in reversed(jaxpr.eqns):
        outs = [_is_var(v) and v in live for v in eqn.outvars]
        if not (any(outs) or eqn.effects):
            continue
        inner = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr")
                      if k in eqn.params), None)
        inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
        if (inner is not None and hasattr(inner, "eqns") and not eqn.effects
                and len(inner.invars) == len(eqn.invars)
                and len(inner.outvars) == len(eqn.outvars)):
            needed = _live_inputs(inner, outs)
        else:
            needed = [True] * len(eqn.invars)
        live |= {v for v, keep in zip(eqn.invars, needed) if keep and _is_var(v)}
    return [v in live for v in jaxpr.invars]


_ONE = np.int32(1)


def _next_count(step: Any) -> np.int32:
    """``step + 1`` as a NumPy int32 on the host (a device value is read once; the count
    stays on the host afterwards, so counting costs no device operation)."""
    if type(step) is np.int32:  # the common case, checked first: it runs every step
        return step + _ONE
    return np.int32(np.asarray(step)) + _ONE


def _lean_train_step(net: Any, loss: Loss, optimizer: optax.GradientTransformation, grad: str,
                     donate: bool, full: Callable) -> Callable:
    """:func:`make_train_step` without the key and the step count inside the compiled call,
    for nets that draw no randomness (the first call checks, by :func:`draws_randomness`;
    a net that does takes ``full``, the whole-state step).

    The compiled call takes and returns the params and optimizer state (and the model
    state, if there is any): the same buffers as a hand-written JAX step, so a call costs
    what that one costs. The count ``step + 1`` is kept on the host, the key is passed on.
    """
    update = _update_fn(_value_and_grad(net, loss, grad), optimizer)

    def stateless(params, opt_state, inputs, targets):
        params, opt_state, _, value = update(params, opt_state, {}, inputs, targets,
                                             jnp.zeros(*_UNUSED_RNG))
        return params, opt_state, value

    def stateful(params, opt_state, model_state, inputs, targets):
        return update(params, opt_state, model_state, inputs, targets, jnp.zeros(*_UNUSED_RNG))

    stateless = _compile(stateless, donate_state=donate, state_args=2)
    stateful = _compile(stateful, donate_state=donate, state_args=3)
    kind: list[str] = []  # "full", "stateful" or "stateless": decided at the first call

    def decide(state, inputs, targets):
        if not kind:
            kind.append("full" if draws_randomness(net, loss, state, inputs, targets, grad)
                        else "stateful" if jax.tree_util.tree_leaves(state.model_state)
                        else "stateless")
        return kind[0]

    def step(state: TrainState, inputs: Array, targets: Array) -> tuple[TrainState, Array]:
        path = kind[0] if kind else decide(state, inputs, targets)
        if path == "stateless":  # first: the plain MLP's path, taken every step
            params, opt_state, value = stateless(state.params, state.opt_state, inputs, targets)
            return TrainState(params, opt_state, _next_count(state.step), state.key,
                              state.model_state), value
        if path == "full":
            return full(state, inputs, targets)
        params, opt_state, model_state, value = stateful(
            state.params, state.opt_state, state.model_state, inputs, targets)
        return TrainState(params, opt_state, _next_count(state.step), state.key,
                          model_state), value

    def lower(state: TrainState, inputs: Array, targets: Array) -> Any:
        """``jax.stages.Lowered`` of the program this state's step runs (for
        ``.compile().memory_analysis()``, ``.as_text()``); its arguments are the params and
        optimizer state (and model state) then inputs and targets, or the whole state."""
        path = decide(state, inputs, targets)
        if path == "full":
            return full.lower(state, inputs, targets)
        parts = (state.params, state.opt_state) + (
            (state.model_state,) if path == "stateful" else ())
        return (stateful if path == "stateful" else stateless).lower(*parts, inputs, targets)

    # as on a jax.jit function: lower, and how many programs are compiled (for tests)
    step.lower = lower
    step._cache_size = lambda: sum(f._cache_size() for f in (stateless, stateful, full))
    return step


def _compile(fn: Callable, *, donate_state: bool = True, state_args: int = 1) -> Callable:
    """``jax.jit`` with the state (the first ``state_args`` arguments) donated: the one place
    jaxnet compiles a step."""
    return jax.jit(fn, donate_argnums=tuple(range(state_args)) if donate_state else ())


def make_train_step(net: Any, loss: Loss, optimizer: optax.GradientTransformation,
                    grad: str = "auto", *, jit: bool = True, donate: bool = True,
                    mesh: Any = None, rules: Sequence = ()) -> Callable[
                        [TrainState, Array, Array], tuple[TrainState, Array]]:
    """A compiled training step ``step(state, inputs, targets) -> (state, loss)``.

    **Arguments**

    - ``net``: a layer ``(init, apply)``; ``loss``: ``loss(outputs, targets) ->
      scalar`` (e.g. :func:`jaxnet.softmax_cross_entropy`).
    - ``optimizer``: any optax ``GradientTransformation``.
    - ``grad``: ``"auto"`` (``jax.value_and_grad``) or ``"manual"``
      (:func:`jaxnet.manual_value_and_grad`, the hand-written backward pass).
    - ``jit``: compile with ``jax.jit`` (``False`` returns the plain function).
    - ``donate``: donate the input state's buffers, so the step updates them
      in place; the state passed in must not be used afterwards.
    - ``mesh``: a ``jax.sharding.Mesh`` (:func:`jaxnet.sharding.make_mesh`):
      the batch is split over its ``"data"`` axis, the state laid out by
      ``rules`` (sharding rules on parameter names; none: replicated). The
      step computes the same thing; see :mod:`jaxnet.sharding`.

    Shapes: inputs (batch, features...), targets (batch,) labels or (batch, k).
    Compiles once per input shape/dtype.

    A net that draws no randomness (no Dropout: :func:`draws_randomness`, checked at
    the first call) needs no key and no step count inside the step: the compiled call
    then takes only the params and optimizer state (and model state, if any), as a
    hand-written JAX step does, and ``state.step`` is counted on the host (a NumPy
    int32). Without a mesh only; the result is the same either way.
    """
    fn = train_step_fn(net, loss, optimizer, grad)
    if mesh is not None:
        from .sharding import shard_step
        fn = shard_step(fn, mesh, rules)
    if not jit:
        return fn
    full = _compile(fn, donate_state=donate)
    return full if mesh is not None else _lean_train_step(net, loss, optimizer, grad, donate,
                                                          full)


def epoch_fn(net: Any, loss: Loss, optimizer: optax.GradientTransformation,
             grad: str = "auto") -> Callable[[TrainState, Array, Array], tuple[TrainState, Array]]:
    """The plain epoch: ``lax.scan`` of the step over batches (num_batches, batch, ...).

    For a net that draws no randomness (:func:`draws_randomness`) the scan carries only
    the params, optimizer and model state, and the count grows by ``num_batches`` once."""
    step = train_step_fn(net, loss, optimizer, grad)
    update = _update_fn(_value_and_grad(net, loss, grad), optimizer)

    def lean_body(carry, batch):
        params, opt_state, model_state, value = update(*carry, *batch, jnp.zeros(*_UNUSED_RNG))
        return (params, opt_state, model_state), value

    def epoch(state: TrainState, xs: Array, ys: Array) -> tuple[TrainState, Array]:
        one = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in (xs, ys)]
        if draws_randomness(net, loss, state, *one, grad):
            return jax.lax.scan(lambda s, b: step(s, *b), state, (xs, ys))
        (params, opt_state, model_state), losses = jax.lax.scan(
            lean_body, (state.params, state.opt_state, state.model_state), (xs, ys))
        return TrainState(params, opt_state, state.step + xs.shape[0], state.key,
                          model_state), losses

    return epoch


def make_epoch(net: Any, loss: Loss, optimizer: optax.GradientTransformation,
               grad: str = "auto", *, jit: bool = True, donate: bool = True,
               mesh: Any = None, rules: Sequence = ()) -> Callable[
                   [TrainState, Array, Array], tuple[TrainState, Array]]:
    """A compiled epoch ``epoch(state, xs, ys) -> (state, losses)``: all steps in one call.

    ``xs`` has shape (num_batches, batch, features...), ``ys`` (num_batches,
    batch, ...); the steps run in order in one ``lax.scan``; ``losses`` has
    shape (num_batches,). Arguments as :func:`make_train_step` (with a ``mesh``,
    each batch, axis 1 of ``xs``, is split over ``"data"``).
    """
    fn = epoch_fn(net, loss, optimizer, grad)
    if mesh is not None:
        from .sharding import shard_step
        fn = shard_step(fn, mesh, rules, batch_axis=1)
    return _compile(fn, donate_state=donate) if jit else fn


def _shuffled_batches(key: Array, x: Array, y: Array, batch_size: int):
    """Split the key, permute the rows, cut ``n // batch_size`` full batches (the rest is
    dropped this epoch; a different rest each epoch)."""
    key, perm_key = jax.random.split(key)
    num_batches = x.shape[0] // batch_size
    perm = jax.random.permutation(perm_key, x.shape[0])[: num_batches * batch_size]
    xs = x[perm].reshape(num_batches, batch_size, *x.shape[1:])
    ys = y[perm].reshape(num_batches, batch_size, *y.shape[1:])
    return key, xs, ys


def make_eval_step(net: Any, loss: Loss, metrics: Mapping[str, Callable] | None = None, *,
                   jit: bool = True) -> Callable[..., dict[str, Array]]:
    """``evaluate(params, inputs, targets, model_state={}) -> {"loss": L, name: metric, ...}``.

    The net runs with ``mode="eval"`` (dropout off, BatchNorm on its running statistics
    from ``model_state``). ``metrics`` maps names to ``metric(outputs, targets) ->
    scalar`` (e.g. ``{"accuracy": jaxnet.accuracy}``).
    """
    _check_loss(loss)
    metrics = dict(metrics or {})

    def eval_step(params, inputs, targets, model_state=None):
        model_state = {} if model_state is None else model_state
        outputs, _ = apply_with_state(net, params, model_state, inputs, {"mode": "eval"})
        out = {"loss": loss(outputs, targets)}
        out.update({name: m(outputs, targets) for name, m in metrics.items()})
        return out

    return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step: Callable, params: Params, inputs: Array, targets: Array,
             batch_size: int | None = None, model_state: Any = None) -> dict[str, float]:
    """Run ``eval_step`` over a data set (in chunks of ``batch_size`` rows if given) and
    return the row-weighted mean of each value as Python floats."""
    n = inputs.shape[0]
    if n == 0:
        return {}
    size = n if batch_size is None else batch_size
    totals: dict[str, float] = {}
    for start in range(0, n, size):
        out = eval_step(params, inputs[start:start + size], targets[start:start + size],
                        model_state)
        rows = min(size, n - start)
        for k, v in jax.device_get(out).items():
            totals[k] = totals.get(k, 0.0) + float(v) * rows
    return {k: v / n for k, v in totals.items()}


# --- fit -------------------------------------------------------------------------

class FitProgress(NamedTuple):
    """Where :func:`fit` stands after a completed epoch: what a checkpoint stores.

    Attributes:
      state: the :class:`TrainState` after ``epoch`` epochs.
      epoch: number of completed epochs.
      history: per-epoch lists (see :func:`fit`).
      best_params: params of the epoch with the lowest validation loss (``None``
        without validation data).
      best_val_loss: that loss (``inf`` before the first validation).
      best_epoch: that epoch (1-based; 0 before the first validation).
      bad_epochs: epochs since the validation loss last improved.
      best_state: the model state of that epoch (``{}`` for a stateless net;
        ``None`` before the first validation), restored with ``best_params``.
    """

    state: TrainState
    epoch: int
    history: dict[str, list[float]]
    best_params: Params | None
    best_val_loss: float
    best_epoch: int
    bad_epochs: int
    best_state: Any = None


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      state: the final state; with early stopping its params are the best epoch's.
      history: per-epoch lists: ``epoch``, ``batch_loss`` (mean loss of the
        epoch's steps), ``train_loss`` and each ``train_<metric>`` (after the
        epoch, whole training set), ``val_loss`` and ``val_<metric>`` (with
        validation data), ``seconds`` (wall time of the epoch).
      stop_reason: ``"epochs"``, ``"early_stopping"``, ``"nan"`` (a step's loss,
        an epoch metric or a value of the state was not finite: state and progress
        are the last good epoch's) or
        ``"interrupted"`` (KeyboardInterrupt: the last completed epoch's).
      epochs_run: completed epochs (including those before a resume).
      best_epoch: epoch of the best validation loss (``None`` without validation).
      nan_at: ``(epoch, step)`` where the loss first was NaN or infinite, 1-based
        (a finite epoch whose metrics or state are not: its last step).
      progress: the resumable :class:`FitProgress` at the last completed epoch.
    """

    state: TrainState
    history: dict[str, list[float]]
    stop_reason: str
    epochs_run: int
    best_epoch: int | None
    nan_at: tuple[int, int] | None
    progress: FitProgress


@jax.jit
def _finite(tree: Any) -> Array:
    """Whether every floating leaf of ``tree`` is finite (no NaN or infinity)."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _copy(tree: Any) -> Any:
    """Fresh buffers (a snapshot that donation cannot delete), copied without compiling."""
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, getattr(a, "sharding", None), may_alias=False), tree)


@functools.lru_cache(maxsize=16)
def _fit_functions(net, loss, optimizer, grad, batch, scan_epoch, metrics, mesh=None, rules=()):
    """The compiled evaluation and epoch of :func:`fit`, cached so that calling ``fit`` again
    with the same net, loss, optimizer and settings compiles nothing new."""
    eval_step = make_eval_step(net, loss, dict(metrics))
    if scan_epoch:
        epoch_body = make_epoch(net, loss, optimizer, grad, jit=False, mesh=mesh, rules=rules)

        def shuffled_epoch(state, x, y):
            key, xs, ys = _shuffled_batches(state.key, x, y, batch)
            return epoch_body(state._replace(key=key), xs, ys)

        return eval_step, _compile(shuffled_epoch)
    step = make_train_step(net, loss, optimizer, grad, mesh=mesh, rules=rules)
    shuffle = jax.jit(_shuffled_batches, static_argnums=3)

    def run_epoch(state, x, y):
        key, xs, ys = shuffle(state.key, x, y, batch)
        state = state._replace(key=key)
        losses = []
        for xb, yb in zip(xs, ys):
            state, value = step(state, xb, yb)
            losses.append(value)
        return state, np.asarray(jax.device_get(losses))

    return eval_step, run_epoch


def fit(net: Any, loss: Loss, optimizer: optax.GradientTransformation,
        start: TrainState | FitProgress, train: tuple[Any, Any], val: tuple[Any, Any] | None = None,
        *, epochs: int = 10, batch_size: int | None = 32, patience: int | None = None,
        min_delta: float = 0.0, grad: str = "auto", scan_epoch: bool = False,
        metrics: Mapping[str, Callable] | None = None, eval_batch_size: int | None = None,
        progress: bool = False, on_epoch_end: Callable[[FitProgress], None] | None = None,
        mesh: Any = None, rules: Sequence = ()) -> FitResult:
    """Train for up to ``epochs`` epochs and return the state, history and why it stopped.

    **Arguments**

    - ``net``, ``loss``, ``optimizer``, ``grad``: as :func:`make_train_step`.
    - ``start``: a fresh :class:`TrainState` (:func:`init_state`), or a
      :class:`FitProgress` (from a checkpoint) to continue from; ``epochs`` is
      the total, so a resumed run ends where the uninterrupted one would.
    - ``train``, ``val``: ``(inputs, targets)`` arrays (numpy or jax).
    - ``batch_size``: rows per step (``None``: the whole training set). Each
      epoch shuffles the rows with a key split from the state's key and takes
      ``n // batch_size`` full batches.
    - ``patience``: stop after this many epochs without a validation loss
      below the best by more than ``min_delta``; the returned state then has
      the best epoch's params (whether or not the run stopped early).
    - ``scan_epoch``: run each epoch (shuffle and all steps) as one
      ``lax.scan`` in one compiled call, instead of a Python loop of compiled
      steps. Both give the same params (up to float rounding of fused code).
    - ``metrics``: ``{name: metric(outputs, targets)}`` evaluated per epoch;
      default ``{"accuracy": jaxnet.accuracy}``; ``{}`` for none.
    - ``progress``: show a tqdm bar over epochs (only on a terminal).
    - ``on_epoch_end``: called with the :class:`FitProgress` after each epoch
      (e.g. to save a checkpoint or print metrics); its state is a copy, safe
      to keep.
    - ``mesh``, ``rules``: train sharded on a device mesh, as
      :func:`make_train_step`. With several processes
      (:func:`jaxnet.sharding.initialize_distributed`) every process passes
      its own rows of ``train`` and ``val`` (:func:`jaxnet.sharding.process_rows`);
      the run is the same as one process with all the rows.

    Compiles the step (or epoch) and the evaluation once, in the first epoch.
    A ``KeyboardInterrupt`` ends the run with ``stop_reason="interrupted"``
    and the last completed epoch.
    """
    _check_optimizer(optimizer)
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
    _check_fit_arguments(start, train, val)
    _check_loss(loss)
    if mesh is not None:
        from .sharding import global_rows
        x, y = global_rows(mesh, tuple(train))
    else:
        x, y = (jnp.asarray(a) for a in train)
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"training data needs rows and as many targets as inputs, got "
                         f"{x.shape[0]} inputs and {y.shape[0]} targets")
    n = x.shape[0]
    batch = n if batch_size is None else batch_size
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if batch > n:
        raise ValueError(f"batch_size {batch} is larger than the {n} training rows")
    has_val = val is not None and np.shape(val[0])[0] > 0
    if patience is not None and not has_val:
        raise ValueError("early stopping (patience) needs validation data")
    if has_val:
        xv, yv = global_rows(mesh, tuple(val)) if mesh is not None else (
            jnp.asarray(a) for a in val)
    state_template = start.state if isinstance(start, FitProgress) else start
    _check_labels(net, state_template, x, y, "train")
    if has_val:
        _check_labels(net, state_template, xv, yv, "val")
    metrics = {"accuracy": _losses.accuracy} if metrics is None else dict(metrics)
    key = (net, loss, optimizer, grad, batch, scan_epoch, tuple(metrics.items()), mesh,
           tuple(rules))
    try:
        hash(key)
    except TypeError:  # something unhashable: build without the cache
        eval_step, run_epoch = _fit_functions.__wrapped__(*key)
    else:
        eval_step, run_epoch = _fit_functions(*key)
    steps_per_epoch = n // batch

    if isinstance(start, FitProgress):
        good = start
    else:
        good = FitProgress(start, 0, {}, None, math.inf, 0, 0, None)
    state = _copy(good.state)
    if mesh is not None:
        from .sharding import shard_state
        state = shard_state(state, mesh, rules)
    history = {k: list(v) for k, v in good.history.items()}
    stop_reason, nan_at = "epochs", None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=min(good.epoch, epochs), unit="epoch", disable=None,
                   leave=False)
    try:
        done = patience is not None and good.bad_epochs >= patience
        for epoch in range(good.epoch + 1, 0 if done else epochs + 1):
            t0 = time.perf_counter()
            state, step_losses = run_epoch(state, x, y)
            step_losses = np.asarray(step_losses)
            if not np.all(np.isfinite(step_losses)):
                i = int(np.argmax(~np.isfinite(step_losses)))
                nan_at, stop_reason = (epoch, (epoch - 1) * steps_per_epoch + i + 1), "nan"
                break
            record = {"epoch": epoch, "batch_loss": float(np.mean(step_losses))}
            record.update({f"train_{k}": v for k, v in evaluate(
                eval_step, state.params, x, y, eval_batch_size, state.model_state).items()})
            best = (good.best_params, good.best_val_loss, good.best_epoch, good.bad_epochs,
                    good.best_state)
            if has_val:
                scores = evaluate(eval_step, state.params, xv, yv, eval_batch_size,
                                  state.model_state)
                record.update({f"val_{k}": v for k, v in scores.items()})
                if scores["loss"] < good.best_val_loss - min_delta:
                    best = (_copy(state.params), scores["loss"], epoch, 0,
                            _copy(state.model_state))
                else:
                    best = best[:3] + (best[3] + 1, best[4])
            if not (all(math.isfinite(v) for v in record.values()) and _finite(state)):
                # the steps' losses were finite, but the epoch's metrics or the state are not
                nan_at, stop_reason = (epoch, epoch * steps_per_epoch), "nan"
                break
            record["seconds"] = time.perf_counter() - t0
            for k, v in record.items():
                history.setdefault(k, []).append(v)
            good = FitProgress(_copy(state), epoch, {k: list(v) for k, v in history.items()},
                               *best)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                 if k in ("train_loss", "val_loss", "val_accuracy")})
            if on_epoch_end is not None:
                on_epoch_end(good)
            if patience is not None and good.bad_epochs >= patience:
                break
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    if stop_reason == "epochs" and patience is not None and good.bad_epochs >= patience:
        stop_reason = "early_stopping"

    final = good.state
    if patience is not None and good.best_params is not None:
        # the best epoch's params and model state together
        final = final._replace(params=good.best_params, model_state=final.model_state
                               if good.best_state is None else good.best_state)
    history = {k: list(v) for k, v in good.history.items()}
    return FitResult(final, history, stop_reason, good.epoch,
                     good.best_epoch if has_val and good.best_epoch else None, nan_at, good)


def _check_fit_arguments(start: Any, train: Any, val: Any) -> None:
    """Say what ``fit`` expects before anything deep fails on it."""
    if not isinstance(start, (TrainState, FitProgress)):
        if isinstance(start, tuple) and len(start) == 2 and isinstance(start[0], FitProgress):
            raise TypeError("fit's start is a TrainState or a FitProgress; "
                            "restore_checkpoint returns (progress, meta): pass its progress, "
                            "fit(..., start=progress, ...)")
        raise TypeError(f"fit's start must be a TrainState (jaxnet.train.init_state) or a "
                        f"FitProgress (a checkpoint's), got {type(start).__name__}")
    for what, data in (("train", train), ("val", val)):
        if data is None and what == "val":
            continue
        if not (isinstance(data, (tuple, list)) and len(data) == 2
                and all(hasattr(a, "shape") or isinstance(a, (list, tuple)) for a in data)):
            raise TypeError(f"fit's {what} must be an (inputs, targets) pair of arrays holding "
                            f"the whole data set (fit batches and shuffles it itself), got "
                            f"{type(data).__name__}; for a stream of batches call "
                            f"make_train_step in your own loop")


def _check_labels(net: Any, state: TrainState, x: Array, y: Array, what: str) -> None:
    """Integer labels must lie in [0, C) for a net with C outputs (else the loss is NaN)."""
    if not jnp.issubdtype(y.dtype, jnp.integer) or not getattr(y, "is_fully_addressable", True):
        return
    shape = jax.eval_shape(
        lambda p, s, a: apply_with_state(net, p, s, a, {"mode": "eval"})[0],
        state.params, state.model_state, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
    classes = shape[-1] if shape else 1
    labels = np.asarray(y)
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{what} label {labels.ravel()[row]} (row {row}) is out of range for "
                         f"a net with {classes} outputs: integer labels must lie in "
                         f"[0, {classes})")


# --- optimizers by name -------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
    "rmsprop": lambda lr: optax.rmsprop(lr),
}

SCHEDULES = ("constant", "cosine", "warmup-cosine", "exponential")


def make_optimizer(name: str, learning_rate: float, schedule: str = "constant",
                   total_steps: int | None = None,
                   steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """An optax optimizer by name (``sgd``, ``momentum`` (0.9), ``adam``, ``adamw``, ``rmsprop``).

    ``schedule``: ``constant``; ``cosine`` (``optax.cosine_decay_schedule`` to 0
    over ``total_steps``); ``warmup-cosine`` (linear warm-up over the first 5 %
    of ``total_steps``, then cosine decay); ``exponential`` (× 0.95 per epoch
    of ``steps_per_epoch`` steps).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate)
            and learning_rate > 0):
        raise ValueError(f"learning rate must be a positive number, got {learning_rate!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    if schedule in ("cosine", "warmup-cosine") and not total_steps:
        raise ValueError(f"the {schedule} schedule needs total_steps")
    if schedule == "exponential" and not steps_per_epoch:
        raise ValueError("the exponential schedule needs steps_per_epoch")
    lr: Any = learning_rate
    if schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, total_steps)
    elif schedule == "warmup-cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate,
                                                max(1, total_steps // 20), total_steps)
    elif schedule == "exponential":
        lr = optax.exponential_decay(learning_rate, steps_per_epoch, 0.95)
    return OPTIMIZERS[name](lr)
