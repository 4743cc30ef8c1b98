"""A token cache the DataModules build once and every rank memory-maps: ragged int32 token rows on disk.

Why not Hugging Face ``datasets`` or LitData: what we store is two flat arrays per split (token ids and a
trained flag per token) plus row offsets and a little JSON. raw files written batch by batch + ``numpy.memmap``
do exactly that with no new dependency, no Arrow schema and no per-row Python objects; N ranks share the
page cache instead of holding N private copies. (``datasets`` would add pyarrow and its own cache rules for
the same two arrays; LitData's chunked streaming pays off for object storage, which these sets do not need.)

Layout of one entry, ``<cache_dir>/<key>/``::

    meta.json                   everything that is not a token row (sample ids, answers, counts, ...)
    <name>.ids.bin              (total,) int32   the rows, one after another (raw, native byte order)
    <name>.trained.bin          (total,) uint8   1 where the token is trained on (its label is its id)
    <name>.offsets.bin          (rows + 1,) int64 row r is [offsets[r], offsets[r + 1])

The key hashes everything that changes the tokens (see ``cache_key``): a changed input never meets a stale
entry. An entry is written into a temporary directory beside its final place and renamed into place in one
step, so a run killed while writing leaves no half entry (the next run removes the temporary directory of a
dead writer and builds again).

On a node of N ranks a cold build is split (``load_or_build_sharded``): local rank i tokenizes the i-th
contiguous 1/N of the records into a part ``<key>.part<i>of<N>-<host>/`` (written and renamed like an entry),
and local rank 0 assembles the parts, in order, into the one entry: the rows concatenated, the metas merged by
the DataModule (sums of counts, lists concatenated), then the checks that need the whole split. The single
process runs the same code with one part, so N ranks write the very bytes one process writes. Every rank
agrees on each step through a collective (``agree``): an error on any rank makes every rank raise at the same
step, none is left waiting. A DataModule without a merge keeps the older way: local rank 0 builds it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CACHE_VERSION", "EntryBuilder", "Shard", "TokenRows", "TokenRowsWriter", "cache_key", "default_cache_dir",
           "file_digest", "load_or_build", "load_or_build_for", "load_or_build_on_node", "load_or_build_sharded",
           "tokenizer_digest"]

CACHE_VERSION = 2  # 2: visual sample_ids are record indices, the string ids are "names"
"""Bumped whenever what the DataModules write into an entry changes meaning."""

_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece")


def default_cache_dir() -> Path:
    """``$EFFILORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/effilora_lightning/data`` (``~/.cache`` by default):
    a user's cache, never the dataset's own folder."""
    if os.environ.get("EFFILORA_CACHE_DIR"):
        return Path(os.environ["EFFILORA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effilora_lightning" / "data"


def file_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b of the file's bytes (about 1 GB/s: a second for llava_v1_5_mix665k.json)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_digest(directory: str | os.PathLike[str]) -> str:
    """Digest of the tokenizer files of a checkpoint directory (not its weights)."""
    directory = Path(directory)
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name.startswith(_TOKENIZER_FILE_PREFIXES):
            digest.update(path.name.encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    """A short hash of every part (JSON-serialisable, order-independent), with the cache version."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ the rows


@dataclass(frozen=True)
class TokenRows:
    """Ragged token rows with a trained flag per token (arrays in memory or memory-mapped)."""

    ids: np.ndarray  # (total,) int32
    trained: np.ndarray  # (total,) uint8
    offsets: np.ndarray  # (rows + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(rows,) int64 tokens per row."""
        return np.diff(self.offsets)

    def ids_of(self, row: int) -> np.ndarray:
        return self.ids[self.offsets[row]: self.offsets[row + 1]]

    def labels_of(self, row: int, ignore_index: int = -100) -> np.ndarray:
        """(length,) int64: the id where trained, ``ignore_index`` elsewhere."""
        span = slice(self.offsets[row], self.offsets[row + 1])
        return np.where(self.trained[span] != 0, self.ids[span], ignore_index).astype(np.int64)

    @staticmethod
    def load(directory: Path, name: str) -> TokenRows:
        def array(part: str, dtype: type) -> np.ndarray:
            path = directory / f"{name}.{part}.bin"
            return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)

        return TokenRows(array("ids", np.int32), array("trained", np.uint8), array("offsets", np.int64))


class TokenRowsWriter:
    """Appends rows to three files of an entry, a batch at a time: a build holds one batch, never a split."""

    _FLUSH_TOKENS = 1 << 22

    def __init__(self, directory: Path, name: str) -> None:
        self._files = {part: open(directory / f"{name}.{part}.bin", "wb") for part in ("ids", "trained", "offsets")}
        self._ids: list[int] = []
        self._trained: list[int] = []
        self._offsets: list[int] = [0]
        self._total = 0
        self.rows = 0

    def add(self, ids: Sequence[int], trained: Iterable[bool] | None = None) -> None:
        """One row; ``trained=None`` trains every token."""
        self._ids.extend(ids)
        self._trained.extend([1] * len(ids) if trained is None else trained)
        self._total += len(ids)
        self._offsets.append(self._total)
        self.rows += 1
        if len(self._ids) >= self._FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if len(self._trained) != len(self._ids):
            raise ValueError("a row's trained flags and its ids differ in length")
        np.asarray(self._ids, np.int32).tofile(self._files["ids"])
        np.asarray(self._trained, np.uint8).tofile(self._files["trained"])
        np.asarray(self._offsets, np.int64).tofile(self._files["offsets"])
        self._ids, self._trained, self._offsets = [], [], []

    def close(self) -> None:
        self._flush()
        for f in self._files.values():
            f.close()


class EntryBuilder:
    """What a build writes into: ``rows(name)`` gives a writer per set of rows; ``meta`` is saved as JSON."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._writers: dict[str, TokenRowsWriter] = {}

    def rows(self, name: str) -> TokenRowsWriter:
        if name not in self._writers:
            self._writers[name] = TokenRowsWriter(self.directory, name)
        return self._writers[name]

    def finish(self, meta: dict[str, Any]) -> None:
        for writer in self._writers.values():
            writer.close()
        (self.directory / "meta.json").write_text(json.dumps({**meta, "rows": sorted(self._writers)}))


# ------------------------------------------------------------------------------------------- build or load


def _load_entry(directory: Path) -> tuple[dict[str, TokenRows], dict[str, Any]]:
    meta = json.loads((directory / "meta.json").read_text())
    return {name: TokenRows.load(directory, name) for name in meta["rows"]}, meta


def _remove_dead_writers(final: Path) -> None:
    """Temporary directories of this entry left by writers on this host that no longer run (killed)."""
    host = socket.gethostname()
    for tmp in final.parent.glob(f"{final.name}.tmp-*"):
        try:
            pid, _, tmp_host = tmp.name.rsplit(".tmp-", 1)[1].split("-", 2)
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if tmp_host == host:
                shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _build_into(directory: Path, build: Callable[[EntryBuilder], dict[str, Any]]) -> None:
    directory.mkdir(parents=True)
    entry = EntryBuilder(directory)
    try:
        entry.finish(build(entry))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _temporary(final: Path) -> Path:
    """Where a writer of ``final`` writes: named by its pid and host so that a dead writer's can be found."""
    return final.parent / f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"


def load_or_build(
    cache_dir: str | os.PathLike[str] | None,
    key: str,
    build: Callable[[EntryBuilder], dict[str, Any]],
    *,
    is_builder: bool = True,
    barrier: Callable[[], None] | None = None,
) -> tuple[dict[str, TokenRows], dict[str, Any], bool]:
    """The entry ``key``: memory-mapped from ``cache_dir`` when it is there, else built (by the builder only,
    the other ranks waiting at ``barrier``), written atomically and memory-mapped. ``cache_dir=None`` builds
    into a private temporary directory every time (removed at once; the maps keep the data). Returns the rows,
    the meta and whether this process built them.

    ``build(entry)`` writes its rows through ``entry.rows(name).add(...)`` and returns the JSON-serialisable
    meta.
    """
    if cache_dir is None:
        directory = Path(tempfile.mkdtemp(prefix="effilora-tokens-")) / "entry"
        try:
            _build_into(directory, build)
            rows, meta = _load_entry(directory)
        finally:
            shutil.rmtree(directory.parent, ignore_errors=True)
        return rows, meta, True
    final = Path(cache_dir) / key
    built = False
    if not final.is_dir() and is_builder:
        _remove_dead_writers(final)
        tmp = _temporary(final)
        _build_into(tmp, build)
        try:
            os.rename(tmp, final)  # atomic: the entry appears whole or not at all
        except OSError:  # another node's builder got there first (shared file system)
            shutil.rmtree(tmp, ignore_errors=True)
        built = True
    if barrier is not None:
        barrier()
    if not final.is_dir():
        raise RuntimeError(f"token cache entry {final} is missing after the builder's barrier: does every rank of "
                           "this node see the same cache_dir?")
    rows, meta = _load_entry(final)
    return rows, meta, built


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a build: which contiguous slice of the records this rank tokenizes."""

    index: int = 0
    count: int = 1

    def of(self, items: Sequence[Any]) -> Sequence[Any]:
        """This part's contiguous slice of ``items`` (the parts, in order, are ``items`` exactly)."""
        return items[len(items) * self.index // self.count: len(items) * (self.index + 1) // self.count]


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


def _assemble(parts: list[Path], final: Path, merge: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
    """The entry ``final`` from its ``parts``: written beside it, renamed into place in one step."""
    metas = [json.loads((part / "meta.json").read_text()) for part in parts]
    names = sorted({name for meta in metas for name in meta.pop("rows")})
    tmp = _temporary(final)
    tmp.mkdir(parents=True)
    try:
        meta = merge(metas)
        for name in names:
            _concatenate(parts, tmp, name)
        (tmp / "meta.json").write_text(json.dumps({**meta, "rows": names}))
        try:
            os.rename(tmp, final)
        except OSError:  # another node's builder got there first (shared file system)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _part_path(final: Path, shard: Shard) -> Path:
    return final.parent / f"{final.name}.part{shard.index}of{shard.count}-{socket.gethostname()}"


def _build_part(final: Path, build: Callable[[EntryBuilder, Shard], dict[str, Any]], shard: Shard) -> None:
    """This rank's part, written beside its place and renamed into it (a complete part left by a killed run of
    the same key holds the same rows: it is kept)."""
    part = _part_path(final, shard)
    _remove_dead_writers(part)
    if part.is_dir():
        return
    tmp = _temporary(part)
    _build_into(tmp, lambda entry: build(entry, shard))
    os.rename(tmp, part)


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
) -> tuple[dict[str, TokenRows], dict[str, Any], bool]:
    """The entry ``key``, built when missing by the ranks of a node together (see the module docstring).

    ``build(entry, shard)`` writes the rows of ``shard``'s slice of the records and returns their meta;
    ``merge(metas)`` turns the parts' metas, in order, into the entry's (and raises for what is wrong with the
    whole split). ``shard`` is this rank's part on its node, ``agree`` the collective over every rank (each
    rank calls it the same number of times). ``cache_dir=None`` builds everything in one private part.
    Returns the rows, the meta and whether this process tokenized (its part of) them.
    """
    if cache_dir is None:
        def whole(entry: EntryBuilder) -> dict[str, Any]:
            return merge([json.loads(json.dumps(build(entry, Shard())))])

        return load_or_build(None, key, whole)
    final = Path(cache_dir) / key
    built = False
    if agree(not final.is_dir(), False):  # some rank lacks it: every rank builds its part
        error = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            _build_part(final, build, shard)
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
) -> tuple[dict[str, TokenRows], dict[str, Any], bool]:
    """The entry for a DataModule's setup. With ``merge``: ``load_or_build_sharded``, the node's ranks each
    tokenizing their part. Without: local rank 0 of each node builds ``build(entry)`` alone, the other ranks
    wait; either way a failed build raises on every rank (``trainer=None`` builds alone)."""
    shard, agree = _node_of(trainer)
    if merge is not None:
        return load_or_build_sharded(cache_dir, key, build, merge, shard=shard, agree=agree)
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
                      merge: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None, **key_parts: Any
                      ) -> tuple[dict[str, TokenRows], dict[str, Any]]:
    """One part of a DataModule through the cache, the one way both DataModules key and load their entries.

    The key hashes the DataModule's class and ``part``, ``key_parts`` (file digests, ...), every hyperparameter
    but ``not_in_key`` (those that cannot change the tokens: batch sizes, paths already in ``key_parts``, ...),
    the tokenizer's files and its pad token. ``datamodule`` needs ``hparams`` (with ``tokenizer_path``,
    ``cache_dir``, ``use_cache``), a loaded ``tokenizer`` and a ``built_cache`` dict, where whether this process
    built the part is recorded. With ``merge`` the ranks of a node split the build (``load_or_build_sharded``:
    ``build(entry, shard)``); without, ``build(entry)`` runs on local rank 0 alone."""
    hp = datamodule.hparams
    ignored = {*not_in_key, "cache_dir", "use_cache", "tokenizer_path"}
    key = cache_key(owner=f"{type(datamodule).__name__}.{part}", settings={k: v for k, v in hp.items() if k not in ignored},
                    tokenizer=tokenizer_digest(hp.tokenizer_path), pad=datamodule.tokenizer.pad_token, **key_parts)
    cache_dir = (hp.cache_dir or default_cache_dir()) if hp.use_cache else None
    rows, meta, built = load_or_build_on_node(getattr(datamodule, "trainer", None), cache_dir, key, build, part,
                                              merge)
    datamodule.built_cache[part] = built
    return rows, meta
