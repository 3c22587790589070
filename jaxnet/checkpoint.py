"""Checkpoints of a training run, written with orbax-checkpoint.

A checkpoint directory holds one sub-directory per saved epoch (the newest
``keep`` are kept). Each stores the :class:`~jaxnet.train.FitProgress` of
that epoch: the :class:`~jaxnet.train.TrainState` arrays and the best params
(as orbax's standard array format, no pickle) and the rest (history, early
stopping counters, the caller's ``meta`` such as the run's configuration) as
JSON. The state is handled as a generic pytree: whatever leaves it has
(params, optimizer state, model state) are stored by their path.

Arrays go to orbax as they are: sharded arrays write their own shards, and with several
processes (``jax.distributed``) every process calls save and restore on a shared directory
and writes or reads its shards; restored arrays take the template's shardings.

Checksummed: every array's SHA-256 (of its dtype, shape and bytes) is stored
in the JSON with the epoch, and the JSON carries the SHA-256 of its own
content. :func:`restore_checkpoint` recomputes them and refuses a damaged
checkpoint with a :class:`DamagedCheckpointError` naming the checkpoint, the
epoch and the array path (or the damaged file); :func:`restore_newest_intact`
falls back to the newest epoch that reads back intact. (Arrays that this
process cannot read whole, i.e. sharded over several processes, are checked
by orbax alone.)

Atomic: orbax writes a new epoch into a temporary directory and renames it
into place when complete, so an interrupted save leaves the previous
checkpoint as the latest loadable one (temporary directories are ignored
and cleaned). Re-saving an epoch that exists writes the new one beside it
(in ``.jaxnet-staging``) and swaps the two (one ``renameat2`` exchange
where the file system has it; otherwise two renames, which the next call
completes if a crash falls between them): the epoch is never missing.

Locked: :class:`DirectoryLock` makes one run the only writer of a
directory (a lock file with its pid and host, stale locks of dead
processes detected); :func:`save_checkpoint` refuses to write into a
directory locked by another live process.

Strict: :func:`restore_checkpoint` compares the stored arrays with a template
state (the one a fresh run would start from) before reading them, and refuses
a checkpoint whose tree structure, shapes or dtypes differ, naming the first
path that differs (``params/dense_1/w``) and both shapes/dtypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .sharding import abstract_array, leaves_by_path, path_name
from .train import FitProgress, TrainState

__all__ = ["CheckpointError", "DamagedCheckpointError", "DirectoryLock", "save_checkpoint",
           "restore_checkpoint", "restore_newest_intact", "latest_epoch", "saved_epochs"]

FORMAT = "jaxnet-fit-1"
LOCK_FILE = ".jaxnet-lock"
_STAGING = ".jaxnet-staging"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the run."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged: a checksum mismatch, or files orbax cannot read.

    Attributes: ``directory`` and ``epoch`` of the damaged checkpoint.
    """

    def __init__(self, message: str, directory: str, epoch: int):
        super().__init__(message)
        self.directory, self.epoch = directory, epoch


def _flatten(tree: Any) -> dict[str, Any]:
    return dict(leaves_by_path(tree))


def _arrays(tree: Any) -> dict[str, Any]:
    """The leaves by path; jax arrays stay as they are (sharded ones too: with several
    processes each writes its own shards, orbax's way), anything else becomes numpy."""
    return {k: v if isinstance(v, jax.Array) else np.asarray(v)
            for k, v in _flatten(tree).items()}


def _digest(a: Any) -> str | None:
    """SHA-256 of an array's dtype, shape and bytes (``None`` for an array this process
    cannot read whole)."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return None
    arr = np.ascontiguousarray(np.asarray(jax.device_get(a)))
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _digests(flat: dict[str, Any]) -> dict[str, str]:
    return {k: d for k, v in flat.items() if (d := _digest(v)) is not None}


def _json_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _short(e: BaseException) -> str:
    """An exception as one short line (TensorStore and orbax messages run to many lines)."""
    text = " ".join(str(e).split())
    for cut in (" [source locations=", " {", " Spec:"):
        if cut in text:
            text = text[:text.index(cut)]
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _drop_orbax_noise(hook):
    """An ``sys.unraisablehook`` that drops what orbax's reader threads leave behind after a
    failed read of a damaged checkpoint ("Event loop is closed", its abandoned read
    coroutines), already reported as one :class:`DamagedCheckpointError`, and passes on
    everything else."""
    def unraisable(info):
        value, obj = info.exc_value, repr(getattr(info, "object", ""))
        if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed") or \
                "_read_array_index" in obj:
            return
        hook(info)

    unraisable.jaxnet_filter = True
    return unraisable


@contextlib.contextmanager
def _quiet_orbax():
    """Silence the logging of orbax, absl and asyncio while reading: their messages about a
    damaged file (specs, "Event loop is closed") are replaced by one CheckpointError."""
    import logging

    if not getattr(sys.unraisablehook, "jaxnet_filter", False):
        sys.unraisablehook = _drop_orbax_noise(sys.unraisablehook)
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax", "jax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _manager(directory: str, keep: int = 2, create: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           create=create)
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "best": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


# --- locking --------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_owner(path: str) -> dict:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _held(path: str) -> bool:
    """Whether some process holds the ``flock`` of the lock file (a live writer does)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the flock just taken
    return False


def _stale(owner: dict, path: str) -> bool:
    """A lock is stale when its owner is gone: on this host, a pid that no longer runs or a
    lock file that nobody holds; from another host it is never assumed stale."""
    if owner.get("host") not in (None, socket.gethostname()):
        return False
    pid = owner.get("pid")
    if isinstance(pid, int) and not _alive(pid):
        return True
    return not _held(path)


def _ours(owner: dict) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


class DirectoryLock:
    """One writer per checkpoint directory: ``with DirectoryLock(directory): ...``.

    Creates ``directory`` if needed and the lock file ``directory/.jaxnet-lock``
    holding the owner's pid, host and start time (written whole, then linked into
    place), and holds an ``flock`` on it until released. A lock left by a process
    that died (on this host: its pid no longer runs, or nobody holds the file) is
    stale and taken over (``stale_owner`` then says whose it was). A live owner's
    lock raises :class:`CheckpointError` naming it.
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_FILE)
        self.stale_owner: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        import fcntl

        os.makedirs(self.directory, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(owner, f)
        fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    other = _read_owner(self.path)
                    if not _stale(other, self.path):
                        raise CheckpointError(
                            f"{self.directory} is in use by another run (pid "
                            f"{other.get('pid', '?')} on {other.get('host', '?')}, since "
                            f"{other.get('since', '?')}): one writer per checkpoint directory; "
                            f"wait for it, or use another directory (if that run is gone, "
                            f"delete {self.path})") from None
                    self.stale_owner = other
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
            else:
                raise CheckpointError(f"{self.directory}: could not take the lock {self.path}")
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(tmp)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if _ours(_read_owner(self.path)):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _check_writer(directory: str) -> None:
    """Refuse to write into a directory that another live process has locked."""
    path = os.path.join(directory, LOCK_FILE)
    if jax.process_count() > 1 or not os.path.exists(path):
        return  # with several processes, process 0 holds the lock for all
    owner = _read_owner(path)
    if not _ours(owner) and not _stale(owner, path):
        raise CheckpointError(f"{directory} is locked by another run (pid {owner.get('pid', '?')}"
                              f" on {owner.get('host', '?')}); one writer per checkpoint "
                              f"directory")


# --- atomic re-saves --------------------------------------------------------------------

def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(new: str, target: str, old: str) -> None:
    """Put the complete directory ``new`` at ``target`` (which exists); the previous one
    ends at ``old`` and is deleted."""
    if not _exchange(new, target):
        os.rename(target, old)
        os.rename(new, target)  # a crash between the two: _recover puts new in place
        new = old
    shutil.rmtree(new)


def _recover(directory: str) -> None:
    """Finish a re-save that a crash interrupted between its two renames, and clean the
    staging directory. Only process 0 changes anything."""
    staging = os.path.join(directory, _STAGING)
    if not os.path.isdir(staging) or jax.process_index() != 0:
        return
    for name in os.listdir(staging):
        if name.startswith("old-"):
            epoch = name[4:]
            target, new = os.path.join(directory, epoch), os.path.join(staging, epoch)
            if not os.path.exists(target):  # the epoch was between its old and new copy
                os.rename(new if os.path.isdir(new) else os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.sync_global_processes(name)


# --- save -------------------------------------------------------------------------------

def _best_tree(params: Any, model_state: Any, with_state: bool) -> Any:
    """What the "best" item stores: the params, or params and model state together."""
    return {"params": params, "model_state": model_state} if with_state else params


def save_checkpoint(directory: str, progress: FitProgress, meta: dict | None = None, *,
                    keep: int = 2) -> str:
    """Save ``progress`` as epoch ``progress.epoch`` under ``directory``; return its path.

    ``meta`` is any JSON-serialisable dict stored alongside (e.g. the run's
    configuration, to check on resume). Keeps the newest ``keep`` epochs.
    Every array's SHA-256 is stored with it. Saving an epoch that is already
    saved writes the new copy beside it and swaps the two, so that epoch is
    never missing. Raises :class:`CheckpointError` if another live process has
    locked the directory (:class:`DirectoryLock`).
    """
    import orbax.checkpoint as ocp

    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    directory = os.path.abspath(directory)
    _check_writer(directory)
    _recover(directory)
    state = _arrays(progress.state)
    items = {"state": ocp.args.StandardSave(state)}
    sums = {"state": _digests(state)}
    # a stateful net's best epoch is its params and model state together
    best_with_state = bool(jax.tree_util.tree_leaves(progress.best_state))
    if progress.best_params is not None:
        best_arrays = _arrays(_best_tree(progress.best_params, progress.best_state,
                                         best_with_state))
        items["best"] = ocp.args.StandardSave(best_arrays)
        sums["best"] = _digests(best_arrays)
    best = progress.best_val_loss
    body = {
        "format": FORMAT, "epoch": progress.epoch, "history": progress.history,
        "best_val_loss": None if math.isinf(best) else best, "best_epoch": progress.best_epoch,
        "bad_epochs": progress.bad_epochs, "has_best": progress.best_params is not None,
        "best_with_state": best_with_state, "meta": meta or {}, "sha256": sums}
    body = json.loads(json.dumps(body))  # the form it reads back in (tuples become lists)
    items["meta"] = ocp.args.JsonSave({**body, "meta_sha256": _json_digest(body)})
    args = ocp.args.Composite(**items)
    target = os.path.join(directory, str(progress.epoch))
    if not os.path.isdir(target):
        with _manager(directory, keep, create=True) as mngr:
            mngr.save(progress.epoch, args=args, force=True)
            mngr.wait_until_finished()
        return target
    staging = os.path.join(directory, _STAGING)  # beside it, then swapped in
    with _manager(staging, 1, create=True) as mngr:
        mngr.save(progress.epoch, args=args, force=True)
        mngr.wait_until_finished()
    if jax.process_index() == 0:
        _swap_in(os.path.join(staging, str(progress.epoch)), target,
                 os.path.join(staging, f"old-{progress.epoch}"))
        shutil.rmtree(staging, ignore_errors=True)
    _sync("jaxnet_checkpoint_swap")
    return target


# --- restore ----------------------------------------------------------------------------

def saved_epochs(directory: str) -> list[int]:
    """The completely saved epochs in ``directory``, oldest first (damaged ones included:
    :func:`restore_checkpoint` tells)."""
    if not os.path.isdir(directory):
        return []
    if jax.process_count() == 1:
        _recover(os.path.abspath(directory))
    with _quiet_orbax(), _manager(directory) as mngr:
        return sorted(mngr.all_steps())


def latest_epoch(directory: str) -> int | None:
    """The newest completely saved epoch in ``directory`` (``None`` if there is none)."""
    epochs = saved_epochs(directory)
    return epochs[-1] if epochs else None


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
    dtypes are used. Every array read is checked against the SHA-256 stored at
    save. Raises :class:`DamagedCheckpointError` (naming the epoch and the
    damaged array or file) for a damaged checkpoint, and :class:`CheckpointError`
    naming the first mismatching path, or when the checkpoint is missing.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no checkpoint directory")
    epochs = saved_epochs(directory)
    if epoch is None:
        if not epochs:
            raise CheckpointError(f"{directory}: no complete checkpoint in this directory")
        epoch = epochs[-1]
    elif epoch not in epochs:
        raise CheckpointError(f"{directory}: no checkpoint for epoch {epoch} (have "
                              f"{epochs or 'none'})")
    with _quiet_orbax(), _manager(directory) as mngr:
        return _restore(mngr, directory, template, epoch)


def _damaged_file(where: str, item: str) -> str | None:
    """What is wrong with the JSON files orbax keeps beside an item's arrays (missing, or not
    JSON), checked before orbax reads them: orbax's own errors for these are long or
    misleading ("'NoneType' object is not iterable")."""
    folder = os.path.join(where, item)
    names = ["_METADATA", "_sharding"]
    if os.path.isdir(os.path.join(folder, "array_metadatas")):
        names += [os.path.join("array_metadatas", n)
                  for n in sorted(os.listdir(os.path.join(folder, "array_metadatas")))]
    for name in names:
        path = os.path.join(folder, name)
        rel = os.path.join(item, name)
        if not os.path.exists(path):
            if name == "_METADATA":
                return f"the file {rel} is missing"
            continue
        try:
            with open(path, "rb") as f:
                json.loads(f.read().decode("utf-8"))
        except OSError as e:
            return f"the file {rel} cannot be read ({_short(e)})"
        except ValueError:
            return f"the file {rel} is not the JSON it should be (truncated, zeroed or altered)"
    return None


def _restore(mngr, directory: str, template: TrainState, epoch: int) -> tuple[FitProgress, dict]:
    import orbax.checkpoint as ocp

    where = os.path.join(directory, str(epoch))

    def damaged(what: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"{where}: the checkpoint of epoch {epoch} is damaged: "
                                      f"{what}", directory, epoch)

    try:
        meta = mngr.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many kinds for damaged files
        raise damaged(f"its JSON part ({os.path.join(where, 'meta')}) cannot be read "
                      f"({_short(e)})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{where}: not a jaxnet training checkpoint (format {found!r})")
    sums = meta.get("sha256")
    if sums is not None:  # checkpoints of earlier versions carry none
        body = {k: v for k, v in meta.items() if k != "meta_sha256"}
        if meta.get("meta_sha256") != _json_digest(body):
            raise damaged(f"its JSON part ({os.path.join(where, 'meta')}) does not match its "
                          f"checksum")
    want = _flatten(template)
    with_state = bool(meta.get("best_with_state"))
    best_template = _best_tree(template.params, template.model_state, with_state)
    want_best = _flatten(best_template)
    items = [("state", want)] + ([("best", want_best)] if meta["has_best"] else [])
    for item, _ in items:
        problem = _damaged_file(where, item)
        if problem:
            raise damaged(problem)
    try:
        stored_items = mngr.item_metadata(epoch)
    except Exception as e:
        raise damaged(f"the metadata of its arrays cannot be read ({_short(e)})") from e
    targets = {}
    for item, wanted in items:
        stored = stored_items[item]
        if stored is None:
            raise damaged(f"the metadata of its arrays ({item}/) cannot be read")
        stored = dict(getattr(stored, "tree", stored))
        _check_against(stored, wanted, where + (" (best params)" if item == "best" else ""))
        targets[item] = ocp.args.StandardRestore(jax.tree.map(abstract_array, wanted))
    try:
        restored = mngr.restore(epoch, args=ocp.args.Composite(**targets))
    except Exception as e:
        raise damaged(f"its arrays cannot be read ({_short(e)})") from e
    for item, _ in items:
        stored_sums = (sums or {}).get(item, {})
        for path, value in restored[item].items():
            if path in stored_sums and _digest(value) != stored_sums[path]:
                raise damaged(f"array '{path}'{' of the best params' if item == 'best' else ''} "
                              f"does not match the checksum written with it")
    state = _unflatten(template, restored.state)
    best = _unflatten(best_template, restored.best) if meta["has_best"] else None
    best, best_state = (best["params"], best["model_state"]) if with_state and best else (
        best, {} if best is not None else None)
    best_loss = meta["best_val_loss"]
    progress = FitProgress(state, int(meta["epoch"]), meta["history"], best,
                           math.inf if best_loss is None else float(best_loss),
                           int(meta["best_epoch"]), int(meta["bad_epochs"]), best_state)
    return progress, meta["meta"]


def restore_newest_intact(directory: str, template: TrainState) -> tuple[
        FitProgress, dict, list[DamagedCheckpointError]]:
    """Restore the newest epoch that reads back intact: ``(progress, meta, skipped)``, where
    ``skipped`` lists the errors of the newer, damaged epochs (empty when the newest is
    intact). A checkpoint that does not fit ``template`` is refused at once
    (:class:`CheckpointError`); if every epoch is damaged, the newest one's error is raised.
    """
    epochs = saved_epochs(directory)
    skipped: list[DamagedCheckpointError] = []
    for epoch in reversed(epochs):
        try:
            progress, meta = restore_checkpoint(directory, template, epoch=epoch)
        except DamagedCheckpointError as e:
            skipped.append(e)
            continue
        return progress, meta, skipped
    if skipped:
        first = skipped[0]
        raise DamagedCheckpointError(f"{first}; no older epoch is intact either "
                                     f"({', '.join(str(e.epoch) for e in skipped[1:]) or 'none'} "
                                     f"tried)", first.directory, first.epoch)
    return restore_checkpoint(directory, template) + ([],)  # raises: nothing saved
