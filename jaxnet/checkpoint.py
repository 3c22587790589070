"""Checkpoints of a training run, written with orbax-checkpoint.

A checkpoint directory holds one sub-directory per saved epoch (the newest
``keep`` are kept). Each stores the :class:`~jaxnet.train.FitProgress` of
that epoch: the :class:`~jaxnet.train.TrainState` arrays and the best params
(as orbax's standard array format, no pickle) and the rest (history, early
stopping counters, the caller's ``meta`` such as the run's configuration) as
JSON.

Arrays go to orbax as they are: sharded arrays write their own shards, and with several
processes (``jax.distributed``) every process calls save and restore on a shared directory
and writes or reads its shards; restored arrays take the template's shardings.

Atomic: orbax writes a save into a temporary directory and renames it into
place when complete, so an interrupted save leaves the previous checkpoint
as the latest loadable one (temporary directories are ignored and cleaned).

Strict: :func:`restore_checkpoint` compares the stored arrays with a template
state (the one a fresh run would start from) before reading them, and refuses
a checkpoint whose tree structure, shapes or dtypes differ, naming the first
path that differs (``params/dense_1/w``) and both shapes/dtypes.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .sharding import abstract_array, leaves_by_path, path_name
from .train import FitProgress, TrainState

__all__ = ["CheckpointError", "save_checkpoint", "restore_checkpoint", "latest_epoch"]

FORMAT = "jaxnet-fit-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the run."""


def _flatten(tree: Any) -> dict[str, Any]:
    return dict(leaves_by_path(tree))


def _arrays(tree: Any) -> dict[str, Any]:
    """The leaves by path; jax arrays stay as they are (sharded ones too: with several
    processes each writes its own shards, orbax's way), anything else becomes numpy."""
    return {k: v if isinstance(v, jax.Array) else np.asarray(v)
            for k, v in _flatten(tree).items()}


def _manager(directory: str, keep: int = 2, create: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           create=create)
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "best": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def save_checkpoint(directory: str, progress: FitProgress, meta: dict | None = None, *,
                    keep: int = 2) -> str:
    """Save ``progress`` as epoch ``progress.epoch`` under ``directory``; return its path.

    ``meta`` is any JSON-serialisable dict stored alongside (e.g. the run's
    configuration, to check on resume). Keeps the newest ``keep`` epochs.
    Saving an epoch that is already saved replaces it.
    """
    import orbax.checkpoint as ocp

    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    items = {"state": ocp.args.StandardSave(_arrays(progress.state))}
    if progress.best_params is not None:
        items["best"] = ocp.args.StandardSave(_arrays(progress.best_params))
    best = progress.best_val_loss
    items["meta"] = ocp.args.JsonSave({
        "format": FORMAT, "epoch": progress.epoch, "history": progress.history,
        "best_val_loss": None if math.isinf(best) else best, "best_epoch": progress.best_epoch,
        "bad_epochs": progress.bad_epochs, "has_best": progress.best_params is not None,
        "meta": meta or {}})
    with _manager(directory, keep, create=True) as mngr:
        if progress.epoch in mngr.all_steps():
            mngr.delete(progress.epoch)
        mngr.save(progress.epoch, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
    return os.path.join(os.path.abspath(directory), str(progress.epoch))


def latest_epoch(directory: str) -> int | None:
    """The newest completely saved epoch in ``directory`` (``None`` if there is none)."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def _check_against(stored: dict[str, Any], template: dict[str, Any], where: str) -> None:
    """Raise CheckpointError at the first path whose presence, shape or dtype differs."""
    for path, want in template.items():
        if path not in stored:
            raise CheckpointError(f"{where}: the checkpoint has no array at '{path}' (expected "
                                  f"shape {tuple(want.shape)}, dtype {want.dtype}); it was "
                                  f"written for a different net or optimizer")
        got = stored[path]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{where}: '{path}' has shape {tuple(got.shape)}, dtype "
                                  f"{np.dtype(got.dtype)} in the checkpoint but the run expects "
                                  f"shape {tuple(want.shape)}, dtype {np.dtype(want.dtype)}")
    extra = [p for p in stored if p not in template]
    if extra:
        raise CheckpointError(f"{where}: the checkpoint has an array at '{extra[0]}' that the run "
                              f"does not have; it was written for a different net or optimizer")


def _unflatten(template: Any, flat: dict[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(flat[path_name(p)]) for p, _ in leaves])


def restore_checkpoint(directory: str, template: TrainState, *,
                       epoch: int | None = None) -> tuple[FitProgress, dict]:
    """Load the checkpoint of ``epoch`` (default: the newest) as ``(FitProgress, meta)``.

    ``template`` is a state of the run being resumed (e.g. from
    :func:`~jaxnet.train.init_state`); only its tree structure, shapes and
    dtypes are used. Raises :class:`CheckpointError` naming the first
    mismatching path, or when the checkpoint is missing or unreadable.
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no checkpoint directory")
    with _manager(directory) as mngr:
        if epoch is None:
            epoch = mngr.latest_step()
            if epoch is None:
                raise CheckpointError(f"{directory}: no complete checkpoint in this directory")
        elif epoch not in mngr.all_steps():
            raise CheckpointError(f"{directory}: no checkpoint for epoch {epoch} (have "
                                  f"{sorted(mngr.all_steps())})")
        where = os.path.join(directory, str(epoch))
        try:
            meta = mngr.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            stored = mngr.item_metadata(epoch)["state"]
            stored = dict(stored.tree) if hasattr(stored, "tree") else dict(stored)
        except Exception as e:  # orbax raises many kinds for damaged files
            raise CheckpointError(f"{where}: cannot read the checkpoint "
                                  f"({type(e).__name__}: {e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise CheckpointError(f"{where}: not a jaxnet training checkpoint (format {found!r})")
        want = _flatten(template)
        _check_against(stored, want, where)
        targets = {"state": ocp.args.StandardRestore(jax.tree.map(abstract_array, want))}
        want_best = _flatten(template.params)
        if meta["has_best"]:
            targets["best"] = ocp.args.StandardRestore(jax.tree.map(abstract_array, want_best))
        try:
            if meta["has_best"]:
                stored_best = mngr.item_metadata(epoch)["best"]
                stored_best = dict(getattr(stored_best, "tree", stored_best))
                _check_against(stored_best, want_best, where + " (best params)")
            restored = mngr.restore(epoch, args=ocp.args.Composite(**targets))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{where}: cannot read the checkpoint "
                                  f"({type(e).__name__}: {e})") from e
    state = _unflatten(template, restored.state)
    best = _unflatten(template.params, restored.best) if meta["has_best"] else None
    best_loss = meta["best_val_loss"]
    progress = FitProgress(state, int(meta["epoch"]), meta["history"], best,
                           math.inf if best_loss is None else float(best_loss),
                           int(meta["best_epoch"]), int(meta["bad_epochs"]))
    return progress, meta["meta"]
