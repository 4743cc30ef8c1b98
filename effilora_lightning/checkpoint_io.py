"""Checkpoint files: written next to their target, read with an error that names the file, orphans removed.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction, and fsspec's local file system writes the
whole file to ``tempfile.mkstemp()`` (in TMPDIR) before moving it into place: a kill -9 mid-write leaves a
partial file in TMPDIR that no run will ever find again (and a move across file systems is a copy, not atomic).
``AtomicCheckpointIO`` writes ``.<name>.tmp-<pid>`` beside the target instead, fsyncs it and renames it over the
target (atomic on one file system); the next save into that directory removes temp files left by dead writers.

Resuming from ``last.ckpt`` after a kill between Lightning's two writes of one step (the top-k file first,
then ``last.ckpt``) leaves a top-k file newer than ``last.ckpt`` that the restored ModelCheckpoint state does
not know about: Lightning only ever removes files its state names, so with ``save_top_k: 1`` it would stay
for good (and the resumed run writes the same step as ``...-v1.ckpt``). ``remove_orphaned_checkpoints`` removes
such files when a run resumes from its ModelCheckpoint's own last checkpoint, naming each one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["AtomicCheckpointIO", "check_checkpoint_file", "install_checkpoint_io", "remove_orphaned_checkpoints"]

_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


def _local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse a ``.ckpt`` that is not a whole ``torch.save`` archive (cut short, empty, or another format).

    ``torch.save`` writes a zip archive whose directory sits at the very end, so a file cut short at any point
    has none. Reading that directory is cheap: no tensor is loaded.
    """
    file = Path(path)
    if not file.is_file():
        return  # a sharded checkpoint (a directory) or a missing file: the strategy says so
    size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"The checkpoint {file} ({size} bytes) is not a complete checkpoint file ({err}): it was probably cut "
            "short (disk full, or the run was killed while writing it). Resume from another checkpoint (last.ckpt "
            "is only replaced once a new one is complete), or drop ckpt_path to start a new run."
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes beside the target and names a broken file when loading.

    Remote paths (``s3://`` ...) take Lightning's own path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(target.parent)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if _local(path):
            check_checkpoint_file(str(path).removeprefix("file://"))
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            if "weights_only" in str(err):
                raise
            raise ValueError(f"The checkpoint {path} cannot be read ({type(err).__name__}: {err}). Resume from "
                             "another checkpoint, or drop ckpt_path to start a new run.") from err


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` files whose writer is no longer running on this machine; return them."""
    removed = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        match = _TEMP.match(entry.name)
        if match and entry.is_file() and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's running process
    return True


def install_checkpoint_io(strategy: Any) -> None:
    """Give ``strategy`` an AtomicCheckpointIO where it would use Lightning's plain TorchCheckpointIO.

    A CheckpointIO of the user's own (or a wrapping one, such as AsyncCheckpointIO) is left alone.
    """
    if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the getter makes Lightning's default when unset
        strategy.checkpoint_io = AtomicCheckpointIO()


def remove_orphaned_checkpoints(trainer: Any) -> list[Path]:
    """After resuming from a ModelCheckpoint's last checkpoint: remove the untracked files it holds that are
    newer than that checkpoint (written by the interrupted run after it, see the module docstring).

    Only rank 0 removes; resuming from any other file (a deliberate branch from an older step) removes nothing.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    resumed = trainer.ckpt_path
    if resumed is None or not _local(resumed) or not Path(resumed).is_file() or not trainer.is_global_zero:
        return []
    resumed = Path(resumed).resolve()
    callbacks = [c for c in trainer.checkpoint_callbacks
                 if isinstance(c, ModelCheckpoint) and c.dirpath is not None and _local(c.dirpath)]
    tracked = {resumed} | {Path(p).resolve() for c in callbacks for p in _tracked(c) if p}  # by any of them
    removed: list[Path] = []
    for callback in callbacks:
        removed += _remove_orphans(callback, resumed, tracked)
    return removed


def _tracked(callback: Any) -> list[str]:
    return [callback.best_model_path, callback.kth_best_model_path, callback.last_model_path,
            *callback.best_k_models]


def _remove_orphans(callback: Any, resumed: Path, tracked_paths: set[Path]) -> list[Path]:
    directory = Path(callback.dirpath).resolve()
    if resumed.parent != directory or not resumed.name.startswith(callback.CHECKPOINT_NAME_LAST):
        return []
    since = resumed.stat().st_mtime
    orphans = [f for f in sorted(directory.glob(f"*{callback.FILE_EXTENSION}"))
               if f.is_file() and f.resolve() not in tracked_paths and f.stat().st_mtime > since]
    for orphan in orphans:
        orphan.unlink()
        rank_zero_warn(f"Removed {orphan}: written after {resumed.name} by the run this one resumes, and unknown "
                       "to the checkpoint state restored from it, so ModelCheckpoint would have kept it for good "
                       f"(save_top_k={callback.save_top_k}).")
    return orphans
