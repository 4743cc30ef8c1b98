"""Cold token-cache builds split across the ranks of a node, and the one way a DataModule keys and loads a part.

On a node of N ranks a cold build is split (``load_or_build_sharded``): local rank i tokenizes the i-th
contiguous 1/N of the records into a part ``<key>.part<i>of<N>-<host>/`` (written and renamed like an entry),
and local rank 0 assembles the parts, in order, into the one entry: the rows concatenated, the metas merged by
the DataModule (sums of counts, lists concatenated), then the checks that need the whole split. The single
process runs the same code with one part, so N ranks write the very bytes one process writes. Every rank
agrees on each step through a collective (``agree``): an error on any rank makes every rank raise at the same
step, none is left waiting. A DataModule without a merge keeps the older way: local rank 0 builds it alone.

Within a rank, a part can be built in ``pieces`` side by side (``build_workers``): the part's slice cut again
into contiguous pieces, the last built by the rank itself, each other one by a forked copy of it, every piece
written to its own directory inside the part (``pieces.json`` lists them, in order, when all are done), which
the assembly reads as parts. Why forked processes: setup's serial half is Python (checks, rendering, labels,
rows), which one process runs on one core whatever the tokenizer does; a fork shares the parent's records
count, tokenizer and settings without pickling any of them, and each piece's rows go to disk, not through a
pipe (only an error comes back; ``datasets.map(num_proc=...)`` would pickle every batch of records to a worker
and its ids back). The bytes are the ones one process writes: a piece is a shard like a rank's. A forked piece
reads files and tokenizes, nothing else: no CUDA, no collective (as PyTorch's own forked DataLoader workers);
Python 3.12+ warns (DeprecationWarning) that forking a process with threads can deadlock, which it would if a
piece took a lock another thread held at the fork: the build's own threads (encoder, image checks) have ended by
then, each piece starts its own, and Python's logging locks are renewed in a forked child.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .memory import release_freed_memory
from .token_cache import (
    EntryBuilder,
    TokenRows,
    _build_into,
    _load_entry,
    _move_into_place,
    _remove_dead_writers,
    _temporary,
    cache_key,
    default_cache_dir,
    load_or_build,
    tokenizer_digest,
)

__all__ = ["Agree", "Shard", "build_pieces", "load_or_build_for", "load_or_build_on_node", "load_or_build_sharded"]

MIN_RECORDS_PER_PIECE = 20_000
"""``build_workers=None`` splits a rank's part only where each piece gets this many records: below it, a fork
and a second read of the file cost more than they save."""
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a build: which contiguous slice of the records this rank tokenizes."""

    index: int = 0
    count: int = 1

    def of(self, items: Sequence[Any]) -> Sequence[Any]:
        """This part's contiguous slice of ``items`` (the parts, in order, are ``items`` exactly)."""
        return items[len(items) * self.index // self.count: len(items) * (self.index + 1) // self.count]

    def split(self, pieces: int) -> list[Shard]:
        """This shard as ``pieces`` contiguous shards, in order: together they are exactly its slice."""
        return [Shard(self.index * pieces + j, self.count * pieces) for j in range(pieces)]


Agree = Callable[[bool, bool], bool]
"""``agree(flag, all)``: a collective over every rank: whether all (``all=True``) or any rank's flag is True."""


def _alone(flag: bool, all: bool) -> bool:  # noqa: A002 - Lightning's reduce_boolean_decision's name
    return flag


def _concatenate(parts: list[Path], directory: Path, name: str) -> None:
    """Row set ``name`` of ``parts``, in order, as one set in ``directory`` (the offsets shifted)."""
    for part_name in ("ids", "trained"):
        with open(directory / f"{name}.{part_name}.bin", "wb") as out:
            for part in parts:
                if (path := part / f"{name}.{part_name}.bin").exists():
                    with open(path, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
    total = 0
    with open(directory / f"{name}.offsets.bin", "wb") as out:
        np.zeros(1, np.int64).tofile(out)
        for part in parts:
            path = part / f"{name}.offsets.bin"
            offsets = np.fromfile(path, np.int64) if path.exists() else np.zeros(1, np.int64)
            (offsets[1:] + total).tofile(out)
            total += int(offsets[-1])


def _pieces_of(part: Path) -> list[Path]:
    """The directories holding ``part``'s rows: itself, or its pieces in order (a part built side by side)."""
    listing = part / "pieces.json"
    return [part / name for name in json.loads(listing.read_text())] if listing.exists() else [part]


def _assemble(parts: list[Path], final: Path, merge: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
    """The entry ``final`` from its ``parts`` (each one or more pieces): written beside it, renamed into place in
    one step."""
    parts = [piece for part in parts for piece in _pieces_of(part)]
    metas = [json.loads((part / "meta.json").read_text()) for part in parts]
    names = sorted({name for meta in metas for name in meta.pop("rows")})
    tmp = _temporary(final)
    tmp.mkdir(parents=True)
    try:
        meta = merge(metas)
        for name in names:
            _concatenate(parts, tmp, name)
        (tmp / "meta.json").write_text(json.dumps({**meta, "rows": names}))
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _part_path(final: Path, shard: Shard) -> Path:
    return final.parent / f"{final.name}.part{shard.index}of{shard.count}-{socket.gethostname()}"


def _build_part(final: Path, build: Callable[[EntryBuilder, Shard], dict[str, Any]], shard: Shard,
                pieces: list[Shard]) -> None:
    """This rank's part (``shard``, built as ``pieces``: itself, or split for processes side by side), written
    beside its place and renamed into it (a complete part left by a killed run of the same key, or written
    meanwhile by another job building it, holds the same rows: it is kept)."""
    part = _part_path(final, shard)
    _remove_dead_writers(part)
    if part.is_dir():
        return
    tmp = _temporary(part)
    if len(pieces) == 1:
        _build_into(tmp, lambda entry: build(entry, pieces[0]))
    else:
        _build_side_by_side(tmp, build, pieces)
    _move_into_place(tmp, part)


def _build_side_by_side(directory: Path, build: Callable[[EntryBuilder, Shard], dict[str, Any]],
                        pieces: list[Shard]) -> None:
    """Each of ``pieces`` into ``directory/piece<j>``: the last by this process, each other one by a forked copy of
    it; ``pieces.json`` lists them once every piece is done. A failed build raises the error of its first failed
    piece in file order (the error one process would meet first: the record it names is the same), after the
    others are stopped, and nothing is left of ``directory``."""
    directory.mkdir(parents=True)
    names = [f"piece{j}" for j in range(len(pieces))]
    forked: list[_ForkedPiece] = []
    try:
        with _fork_quietly():
            forked = [_ForkedPiece(directory / name, build, piece) for name, piece in zip(names, pieces[:-1])]
        try:
            _build_into(directory / names[-1], lambda entry: build(entry, pieces[-1]))
        except Exception:
            for piece in forked:  # an earlier piece's error comes first
                piece.wait()
            raise
        for piece in forked:
            piece.wait()
        (directory / "pieces.json").write_text(json.dumps(names))
    except BaseException:
        for piece in forked:
            piece.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise


class _fork_quietly:
    """Around a fork: the Rust tokenizer of a parent that has encoded prints a warning in each child and turns its
    threads off there; ``TOKENIZERS_PARALLELISM`` set for the fork says so up front (the parent keeps its own)."""

    def __enter__(self) -> None:
        self.before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def __exit__(self, *exc: object) -> None:
        if self.before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.before


class _ForkedPiece:
    """One piece built by a forked copy of this process; ``wait`` raises the error it sent back, or says how it
    died (killed: out of memory?)."""

    def __init__(self, directory: Path, build: Callable[[EntryBuilder, Shard], dict[str, Any]], piece: Shard) -> None:
        context = multiprocessing.get_context("fork")  # no pickling of `build` and what it holds (spawn would)
        self.directory, self.piece = directory, piece
        self._errors, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_build_piece, args=(send, directory, build, piece), daemon=True,
                                       name=f"effilora-build-{directory.name}")
        self.process.start()
        send.close()  # (the child holds its own end: a child that dies closes it, and recv sees EOF)

    def wait(self) -> None:
        try:
            error = self._errors.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"token cache: the process building {self.directory.name} of {self.directory.parent} "
                               f"(slice {self.piece.index + 1} of {self.piece.count} of the records) died with exit "
                               f"code {self.process.exitcode} before it finished (killed for memory? set "
                               "build_workers=1 to build in one process)") from None
        finally:
            self._errors.close()
        self.process.join()
        if error is not None:
            raise error

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        self._errors.close()


def _build_piece(errors: Any, directory: Path, build: Callable[[EntryBuilder, Shard], dict[str, Any]],
                 piece: Shard) -> None:
    """A forked process's work: the piece's rows, then None (done) or its error through ``errors``."""
    try:
        _build_into(directory, lambda entry: build(entry, piece))
        errors.send(None)
    except BaseException as err:  # noqa: BLE001 - sent to the parent, which raises it
        errors.send(_sendable(err))
    finally:
        errors.close()


def _sendable(error: BaseException) -> BaseException:
    """``error`` itself where it survives pickling (the parent raises the very type and message), else a
    RuntimeError carrying its type, message and traceback."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to pickle means: send text
        text = "".join(traceback.format_exception(error))
        return RuntimeError(f"token cache: a build process failed:\n{text}")


def build_pieces(shard: Shard, workers: int | None, records: Callable[[], int] | None = None,
                 cpu_sharers: int | None = None, min_per_piece: int = MIN_RECORDS_PER_PIECE) -> list[Shard]:
    """How this rank builds its ``shard`` of a cold part: the pieces that processes build side by side.

    ``workers``: how many (1: this process alone); ``None`` picks: the CPUs this process may run on, divided by
    the ranks that share them (``cpu_sharers``, default the node's ranks, ``shard.count``), at most
    ``MAX_AUTO_WORKERS``, and at most one piece per ``min_per_piece`` of this shard's records
    (``records()``: the whole part's; without it: 1). ``records`` is called before any fork, so that what it
    reads (a count of the file) is the forked processes' too.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"build_workers={workers}: must be >= 1 (or None to pick from the CPUs)")
    if workers is None:
        workers = max(1, min(MAX_AUTO_WORKERS, len(os.sched_getaffinity(0)) // (cpu_sharers or shard.count)))
        if workers > 1:
            per_rank = records() / shard.count if records is not None else 0
            workers = max(1, min(workers, int(per_rank // min_per_piece)))
    elif workers > 1 and records is not None:
        records()
    return shard.split(workers) if workers > 1 else [shard]


def _agreed(agree: Agree, error: Exception | None, what: str) -> None:
    """Every rank passes or every rank raises: its own error, or one saying that another rank failed."""
    if not agree(error is None, True):
        if error is not None:
            raise error
        raise RuntimeError(f"token cache: another rank failed while {what} (its error is in its log); "
                           "this rank stops too")


def load_or_build_sharded(
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    build: Callable[[EntryBuilder, Shard], dict[str, Any]],
    merge: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    shard: Shard = Shard(),
    agree: Agree = _alone,
    workers: int | None = 1,
    records: Callable[[], int] | None = None,
    cpu_sharers: int | None = None,
    min_per_piece: int = MIN_RECORDS_PER_PIECE,
) -> tuple[dict[str, TokenRows], dict[str, Any], bool]:
    """The entry ``key``, built when missing by the ranks of a node together (see the module docstring).

    ``build(entry, shard)`` writes the rows of ``shard``'s slice of the records and returns their meta;
    ``merge(metas)`` turns the parts' metas, in order, into the entry's (and raises for what is wrong with the
    whole split). ``shard`` is this rank's part on its node, ``agree`` the collective over every rank (each
    rank calls it the same number of times); ``workers``, ``records``, ``cpu_sharers``, ``min_per_piece``: how
    many processes build this rank's part side by side (``build_pieces``). ``cache_dir=None`` builds everything into a private temporary
    directory, removed at once (the memory maps keep the rows). Returns the rows, the meta and whether this
    process tokenized (its part of) them.
    """
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="effilora-tokens-") as private:
            return load_or_build_sharded(private, key, build, merge, workers=workers, records=records,
                                         # every rank builds it all, on its CPU share
                                         cpu_sharers=shard.count, min_per_piece=min_per_piece)
    final = Path(cache_dir) / key
    built = False
    if agree(not final.is_dir(), False):  # some rank lacks it: every rank builds its part
        error = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            _build_part(final, build, shard, build_pieces(shard, workers, records, cpu_sharers, min_per_piece))
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            error = err
        _agreed(agree, error, f"tokenizing its part of {final}")
        built = True
        if shard.index == 0:
            parts = [_part_path(final, Shard(i, shard.count)) for i in range(shard.count)]
            try:
                if not final.is_dir():
                    _remove_dead_writers(final)
                    _assemble(parts, final, merge)
                for part in parts:
                    shutil.rmtree(part, ignore_errors=True)
            except Exception as err:  # noqa: BLE001 - raised on every rank below
                if not final.is_dir():  # (else another job of this key assembled it and removed the parts meanwhile)
                    error = err
        _agreed(agree, error, f"assembling {final} from its parts")
    if not final.is_dir():
        raise RuntimeError(f"token cache entry {final} is missing after it was built: does every rank of this "
                           "node see the same cache_dir?")
    rows, meta = _load_entry(final)
    return rows, meta, built


def _node_of(trainer: Any) -> tuple[Shard, Agree]:
    """This rank's part on its node and the collective of a multi-process run (``trainer=None``: alone)."""
    if trainer is None or trainer.world_size <= 1:
        return Shard(), _alone
    ranks_per_node = getattr(trainer, "num_devices", None) or trainer.world_size // getattr(trainer, "num_nodes", 1)
    strategy = trainer.strategy
    return (Shard(trainer.local_rank, ranks_per_node),
            lambda flag, all: bool(strategy.reduce_boolean_decision(flag, all=all)))  # noqa: A002


def load_or_build_on_node(
    trainer: Any,
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    build: Callable[..., dict[str, Any]],
    name: str,
    merge: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    workers: int | None = 1,
    records: Callable[[], int] | None = None,
    min_per_piece: int = MIN_RECORDS_PER_PIECE,
) -> tuple[dict[str, TokenRows], dict[str, Any], bool]:
    """The entry for a DataModule's setup. With ``merge``: ``load_or_build_sharded``, the node's ranks each
    tokenizing their part (in ``build_pieces(workers, records)`` side by side). Without: local rank 0 of each
    node builds ``build(entry)`` alone, the other ranks wait; either way a failed build raises on every rank
    (``trainer=None`` builds alone)."""
    shard, agree = _node_of(trainer)
    if merge is not None:
        return load_or_build_sharded(cache_dir, key, build, merge, shard=shard, agree=agree, workers=workers,
                                     records=records, min_per_piece=min_per_piece)
    if agree is _alone:
        return load_or_build(cache_dir, key, build)
    error, result = None, None
    try:
        result = load_or_build(cache_dir, key, build, is_builder=shard.index == 0) if shard.index == 0 else None
    except Exception as err:  # noqa: BLE001 - raised on every rank below
        error = err
    _agreed(agree, error, f"building token cache entry {key} ({name})")
    return result or load_or_build(cache_dir, key, build, is_builder=False)


def load_or_build_for(datamodule: Any, part: str, build: Callable[..., dict[str, Any]], not_in_key: Iterable[str],
                      merge: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
                      records: Callable[[], int] | None = None, min_per_piece: int = MIN_RECORDS_PER_PIECE,
                      **key_parts: Any
                      ) -> tuple[dict[str, TokenRows], dict[str, Any]]:
    """One part of a DataModule through the cache, the one way both DataModules key and load their entries.

    The key hashes the DataModule's class and ``part``, ``key_parts`` (file digests, ...), every hyperparameter
    but ``not_in_key`` (those that cannot change the tokens: batch sizes, paths already in ``key_parts``, ...),
    the tokenizer's files and its pad token. ``datamodule`` needs ``hparams`` (with ``tokenizer_path``,
    ``cache_dir``, ``use_cache``), a loaded ``tokenizer`` and a ``built_cache`` dict, where whether this process
    built the part is recorded. With ``merge`` the ranks of a node split the build (``load_or_build_sharded``:
    ``build(entry, shard)``), each in ``hparams.build_workers`` processes side by side (``build_pieces``, which
    ``records`` and ``min_per_piece`` inform); without, ``build(entry)`` runs on local rank 0 alone."""
    hp = datamodule.hparams
    ignored = {*not_in_key, "cache_dir", "use_cache", "tokenizer_path", "build_workers"}  # (same bytes however built)
    key = cache_key(owner=f"{type(datamodule).__name__}.{part}", settings={k: v for k, v in hp.items() if k not in ignored},
                    tokenizer=tokenizer_digest(hp.tokenizer_path), pad=datamodule.tokenizer.pad_token, **key_parts)
    cache_dir = (hp.cache_dir or default_cache_dir()) if hp.use_cache else None
    rows, meta, built = load_or_build_on_node(getattr(datamodule, "trainer", None), cache_dir, key, build, part,
                                              merge, hp.get("build_workers", 1), records, min_per_piece)
    datamodule.built_cache[part] = built
    if built:
        release_freed_memory()  # the build's garbage: ~0.5 GB a rank would otherwise train with
    return rows, meta
