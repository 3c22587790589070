"""Sharded training on JAX's own machinery: a device mesh, named shardings, several hosts.

The training step stays the same function; only where its arrays live changes:

- **data parallel**: a :class:`jax.sharding.Mesh` with a ``"data"`` axis; every batch is split
  along its first axis over ``"data"`` (``PartitionSpec("data")``), params and optimizer state
  are replicated. ``jax.jit`` partitions the step and inserts the all-reduce of the gradients.
- **tensor parallel** (optional ``"model"`` axis): rules on parameter *names* shard the weight
  matrices of wide Dense layers over ``"model"``; Adam's moments follow their params.

Rules are ``(pattern, PartitionSpec)`` pairs, tried in order; ``pattern`` is a regular
expression matched against the end of a leaf's path, e.g. ``"dense_1/w"`` matches
``params/dense_1/w`` and ``opt_state/0/mu/dense_1/w``. A matched leaf whose sharded axes do
not divide by the mesh axis raises ``ValueError``; unmatched leaves are replicated.

Several hosts: :func:`initialize_distributed` calls ``jax.distributed.initialize`` from flags or
environment variables; afterwards ``jax.devices()`` lists every process's devices, each
process loads its own rows (:func:`process_rows`) and :func:`shard_batch` assembles them
into one global batch. Checkpoints of sharded arrays: :func:`save_sharded` /
:func:`restore_sharded` (orbax; every process writes and reads only its own shards).

The same script on every host (``JAXNET_COORDINATOR=host0:1234 JAXNET_NUM_PROCESSES=2
JAXNET_PROCESS_ID=<i> python train.py``; on TPU pods, SLURM or Open MPI ``auto=True``)::

    from jaxnet import sharding, train
    sharding.initialize_distributed()            # before any other JAX call
    mesh = sharding.make_mesh()                  # all processes' devices on "data"
    rows = sharding.process_rows(len(x))         # this process loads only these rows
    result = train.fit(net, loss, opt, state, (x[rows], y[rows]), mesh=mesh)
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DATA", "MODEL", "Rule", "make_mesh", "dense_rules", "attention_rules",
           "wide_dense_rules",
           "param_specs", "state_shardings", "shard_state", "shard_batch", "global_rows",
           "shard_step",
           "initialize_distributed", "add_distributed_args", "process_rows", "save_sharded",
           "restore_sharded", "abstract_array", "path_name", "leaves_by_path"]

DATA = "data"
MODEL = "model"
Rule = tuple[str, P]


def make_mesh(data: int | None = None, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh of shape (data, model) with axis names ``("data", "model")``.

    ``data`` defaults to ``len(devices) // model``; ``data · model`` devices are used (all of
    them by default, across every process after :func:`initialize_distributed`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(model, int) or model < 1:
        raise ValueError(f"model axis size must be a positive integer, got {model!r}")
    if data is None:
        data = len(devices) // model
    if not isinstance(data, int) or data < 1 or data * model > len(devices):
        raise ValueError(f"a mesh of data={data} × model={model} devices needs "
                         f"{data * model if isinstance(data, int) else '?'} devices; "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def dense_rules(pattern: str = r"dense_\d+") -> tuple[Rule, ...]:
    """Shard the Dense layers named by ``pattern`` column-wise over ``"model"``:
    w (n_in, n_out) → ``P(None, "model")``, b (n_out,) → ``P("model")``.

    ``dense_rules(r"dense_[0-2]")`` shards the first three Dense layers of an mlp.
    """
    re.compile(pattern)
    return ((rf"{pattern}/w", P(None, MODEL)), (rf"{pattern}/b", P(MODEL)))


def attention_rules(pattern: str = r"attention_\d+") -> tuple[Rule, ...]:
    """Shard the :func:`~jaxnet.MultiHeadAttention` layers named by ``pattern`` over
    ``"model"`` by heads (Megatron's split): the query, key and value projections
    column-wise (each device computes whole heads), the output projection row-wise, its
    bias replicated; the attention itself then needs no communication, and the output
    projection one all-reduce. ``model`` must divide num_heads·head_dim.
    """
    re.compile(pattern)
    qkv = rf"{pattern}/(query|key|value)"
    return ((rf"{qkv}/w", P(None, MODEL)), (rf"{qkv}/b", P(MODEL)),
            (rf"{pattern}/out/w", P(MODEL, None)))


def wide_dense_rules(params: Any, model: int, min_width: int = 512) -> tuple[Rule, ...]:
    """:func:`dense_rules` for every Dense layer (a dict with ``w`` and ``b``) of ``params``
    whose output width is at least ``min_width`` and divides by the ``model`` axis size."""
    names = []
    for path, leaf in leaves_by_path(params):
        if path.endswith("/w") or path == "w":
            if np.ndim(leaf) == 2 and leaf.shape[1] >= min_width and leaf.shape[1] % model == 0:
                names.append(re.escape(path[:-2]) + "/" if path != "w" else "")
    rules: list[Rule] = []
    for name in names:
        rules += [(rf"{name}w", P(None, MODEL)), (rf"{name}b", P(MODEL))]
    return tuple(rules)


def path_name(keys) -> str:
    """A leaf's key path as the "a/b/c" name that rules match and checkpoints store."""
    return jax.tree_util.keystr(keys, simple=True, separator="/")


def leaves_by_path(tree: Any) -> list[tuple[str, Any]]:
    """``[("a/b/c", leaf), ...]`` in ``tree_leaves`` order."""
    return [(path_name(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def param_specs(tree: Any, mesh: Mesh, rules: Sequence[Rule] = ()) -> Any:
    """A ``PartitionSpec`` for every leaf of ``tree`` (params, a TrainState, …) by the rules;
    ``P()`` (replicated) where no rule matches."""
    compiled = [(pattern, re.compile(rf"(^|/){pattern}$"), spec) for pattern, spec in rules]

    def spec_of(keys, leaf):
        path = path_name(keys)
        shape = np.shape(leaf)
        for pattern, regex, spec in compiled:
            if regex.search(path):
                if len(spec) > len(shape):
                    raise ValueError(f"sharding rule {pattern!r} → {spec} does not "
                                     f"fit '{path}' of shape {shape}")
                for size, axes in zip(shape, spec, strict=False):
                    n = _axis_size(mesh, axes)
                    if size % n:
                        raise ValueError(f"cannot shard '{path}' of shape {shape} as {spec}: "
                                         f"axis of size {size} does not divide over mesh axis "
                                         f"{axes!r} of size {n}")
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, tree)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in names]))


def state_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] = ()) -> Any:
    """``NamedSharding``s for every leaf of ``tree`` (see :func:`param_specs`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def shard_state(tree: Any, mesh: Mesh, rules: Sequence[Rule] = ()) -> Any:
    """Place ``tree`` (a TrainState, params) on ``mesh`` by the rules.

    One process: ``jax.device_put``. Several: every process holds the same values (a state
    made from the same key) and keeps the shards of its own devices
    (``jax.make_array_from_callback``); already global arrays are resharded.
    """
    def place(x, sharding):
        if jax.process_count() == 1 or (isinstance(x, jax.Array)
                                        and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree, state_shardings(tree, mesh, rules))


def _batch_spec(ndim: int, batch_axis: int) -> P:
    return P(*([None] * batch_axis + [DATA] + [None] * (ndim - batch_axis - 1)))


def shard_batch(mesh: Mesh, local: Any, batch_axis: int = 0) -> Any:
    """One global batch, split over ``"data"`` along ``batch_axis``, from this process's rows.

    With one process ``local`` is the whole batch. With several, every process passes its own
    consecutive slice (:func:`process_rows`) and the global batch is their concatenation in
    process order (``jax.make_array_from_process_local_data``).
    """
    def one(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, _batch_spec(x.ndim, batch_axis))
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local)


def global_rows(mesh: Mesh, local: Any) -> Any:
    """A data set (a pytree of arrays with rows first) as global arrays on ``mesh``.

    One process: the whole data set, replicated on the mesh's devices. Several processes:
    every process passes its own consecutive rows (:func:`process_rows`); the global array
    is their concatenation in process order, its rows split over ``"data"``.
    """
    def one(a):
        a = np.asarray(a)
        if jax.process_count() == 1:
            return jax.device_put(a, NamedSharding(mesh, P()))
        return jax.make_array_from_process_local_data(
            NamedSharding(mesh, _batch_spec(a.ndim, 0)), a)

    return jax.tree.map(one, local)


def shard_step(step: Callable, mesh: Mesh, rules: Sequence[Rule] = (),
               batch_axis: int = 0) -> Callable:
    """Wrap ``step(state, inputs, targets) -> (state, out)`` so that, under ``jax.jit``, the
    batch is split over ``"data"`` (along ``batch_axis``) and the state is laid out by the
    rules, in and out. The computation is the same; only shardings are added
    (``jax.lax.with_sharding_constraint``), so the result equals the unsharded step's up to
    float rounding of the gradient all-reduce."""
    n_data = mesh.shape[DATA]

    def constrain_batch(x):
        if jnp.ndim(x) <= batch_axis or jnp.shape(x)[batch_axis] % n_data:
            raise ValueError(f"a batch of shape {jnp.shape(x)} does not split over the "
                             f"{n_data} devices of the mesh's 'data' axis along axis "
                             f"{batch_axis}: use a batch size divisible by {n_data}")
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, _batch_spec(jnp.ndim(x), batch_axis)))

    def sharded(state, inputs, targets):
        shardings = state_shardings(state, mesh, rules)
        state = jax.lax.with_sharding_constraint(state, shardings)
        inputs = jax.tree.map(constrain_batch, inputs)
        targets = jax.tree.map(constrain_batch, targets)
        new_state, out = step(state, inputs, targets)
        return jax.lax.with_sharding_constraint(new_state, shardings), out

    return sharded


# --- several hosts ------------------------------------------------------------------

_ENV = {"coordinator": "JAXNET_COORDINATOR", "num_processes": "JAXNET_NUM_PROCESSES",
        "process_id": "JAXNET_PROCESS_ID"}


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coordinator HOST:PORT``, ``--num-processes N``, ``--process-id I`` to a CLI."""
    g = parser.add_argument_group("several hosts (jax.distributed)")
    g.add_argument("--coordinator", default=None,
                   help=f"address of process 0, HOST:PORT (env {_ENV['coordinator']}); on TPU "
                        "pods, SLURM and Open MPI jax finds it alone: pass --distributed")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of processes (env {_ENV['num_processes']})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's index, 0-based (env {_ENV['process_id']})")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() even without the flags above "
                        "(cluster auto-detection)")
    return parser


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False,
                           args: argparse.Namespace | None = None,
                           **kwargs) -> bool:
    """Join a multi-process run: ``jax.distributed.initialize`` from arguments, parsed
    flags (:func:`add_distributed_args`) or the environment (``JAXNET_COORDINATOR``,
    ``JAXNET_NUM_PROCESSES``, ``JAXNET_PROCESS_ID``).

    Returns ``False`` (and does nothing) when none is given and ``auto`` is off: a
    single-process run. ``auto=True`` with nothing given lets JAX detect the cluster (TPU
    pod, SLURM, Open MPI). Must run before any other JAX call. On CPUs the cross-process
    collectives use gloo. Extra ``kwargs`` go to ``jax.distributed.initialize`` (e.g.
    ``initialization_timeout``, ``local_device_ids``).
    """
    if args is not None:
        coordinator = coordinator or getattr(args, "coordinator", None)
        num_processes = num_processes or getattr(args, "num_processes", None)
        process_id = process_id if process_id is not None else getattr(args, "process_id", None)
        auto = auto or bool(getattr(args, "distributed", False))
    coordinator = coordinator or os.environ.get(_ENV["coordinator"])
    if num_processes is None and os.environ.get(_ENV["num_processes"]):
        num_processes = int(os.environ[_ENV["num_processes"]])
    if process_id is None and os.environ.get(_ENV["process_id"]):
        process_id = int(os.environ[_ENV["process_id"]])
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if not any(given) and not auto:
        return False
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs all of coordinator, num_processes and "
                         f"process_id (got coordinator={coordinator!r}, "
                         f"num_processes={num_processes!r}, process_id={process_id!r})")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    return True


def process_rows(n: int, process_id: int | None = None,
                 num_processes: int | None = None) -> slice:
    """The rows of an ``n``-row global batch or data set that this process loads:
    consecutive equal slices in process order (``n`` must divide by the process count)."""
    pid = jax.process_index() if process_id is None else process_id
    count = jax.process_count() if num_processes is None else num_processes
    if n % count:
        raise ValueError(f"{n} rows do not split evenly over {count} processes")
    per = n // count
    return slice(pid * per, (pid + 1) * per)


# --- checkpoints of sharded arrays ----------------------------------------------------

def save_sharded(directory: str, tree: Any) -> str:
    """Save a pytree of (possibly sharded) arrays with orbax; each process writes its shards.

    ``directory`` must not exist yet. Returns its absolute path.
    """
    import orbax.checkpoint as ocp
    path = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
    return path


def restore_sharded(directory: str, target: Any) -> Any:
    """Restore a pytree saved by :func:`save_sharded` with the shardings of ``target``.

    ``target`` is a tree of arrays or ``jax.ShapeDtypeStruct``s with ``sharding=`` set (e.g.
    :func:`shard_state` of a fresh state, or ``jax.tree.map(lambda x, s:
    jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings(...))``);
    each array comes back laid out as its target, whatever layout it was saved with.
    """
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(directory), jax.tree.map(abstract_array, target))


def abstract_array(x: Any) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype as a restore target, with its sharding where it has one (a
    ``jax.Array``; numpy arrays have none). ``ShapeDtypeStruct``s pass through."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                sharding=x.sharding if isinstance(x, jax.Array) else None)
