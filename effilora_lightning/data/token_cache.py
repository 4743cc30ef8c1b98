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

On a node of N ranks the ranks split a cold build: ``node_build.py``.
"""

from __future__ import annotations

import errno
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

__all__ = ["CACHE_VERSION", "EntryBuilder", "TokenRows", "TokenRowsWriter", "cache_key", "default_cache_dir",
           "file_digest", "load_or_build", "tokenizer_digest"]

CACHE_VERSION = 3
"""Bumped whenever what the DataModules write into an entry changes meaning. 2: visual sample_ids are record
indices, the string ids are "names"; 3: a visual ``val_set_size`` split is drawn over the records that parse
(skipped JSON Lines lines had shifted it and shrunk the held-out part)."""

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
    """Appends rows to three files of an entry, a batch at a time: a build holds one batch, never a split.

    A batch is 512k tokens: held as Python ints it costs 36 bytes a token (the int object and the list's pointer),
    18 MiB; the 4M of before held 140 MiB at the peak of a cold build. Smaller batches are no slower to write
    (converting a short list is faster), and ``array`` buffers, which hold 4 bytes a token, were 35 % slower to
    fill (``array.extend`` checks every int)."""

    _FLUSH_TOKENS = 1 << 19

    def __init__(self, directory: Path, name: str) -> None:
        self._files = {part: open(directory / f"{name}.{part}.bin", "wb") for part in ("ids", "trained", "offsets")}
        self._ids: list[int] = []
        self._trained = bytearray()  # one 0/1 byte per token, as the file holds them
        self._offsets: list[int] = [0]
        self._total = 0
        self.rows = 0

    def add(self, ids: Sequence[int], trained: Iterable[bool] | None = None) -> None:
        """One row; ``trained=None`` trains every token."""
        if trained is None:
            self.add_masked(ids, 0)
            return
        self._trained.extend(trained)
        self._append(ids)

    def add_masked(self, ids: Sequence[int], untrained: int) -> None:
        """One row whose first ``untrained`` tokens are not trained and the rest are (no per-token Python)."""
        self._trained += b"\0" * untrained + b"\1" * (len(ids) - untrained)
        self._append(ids)

    def _append(self, ids: Sequence[int]) -> None:
        self._ids.extend(ids)
        self._total += len(ids)
        self._offsets.append(self._total)
        self.rows += 1
        if len(self._ids) >= self._FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if len(self._trained) != len(self._ids):
            raise ValueError("a row's trained flags and its ids differ in length")
        np.asarray(self._ids, np.int32).tofile(self._files["ids"])
        self._files["trained"].write(self._trained)
        np.asarray(self._offsets, np.int64).tofile(self._files["offsets"])
        self._ids, self._trained, self._offsets = [], bytearray(), []

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


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final`` in one step. Where another process got there first (an
    independent job on this host or a node on a shared file system, building the same key: the same bytes),
    theirs is kept and ``tmp`` dropped; any other failure raises. "There first" is the rename's own answer
    (ENOTEMPTY / EEXIST), not a later look: that copy may be gone already when it was a part that the other job
    has assembled into its entry and removed meanwhile."""
    try:
        os.rename(tmp, final)  # atomic: the directory appears whole or not at all
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) and not final.is_dir():
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
        _move_into_place(tmp, final)
        built = True
    if barrier is not None:
        barrier()
    if not final.is_dir():
        raise RuntimeError(f"token cache entry {final} is missing after the builder's barrier: does every rank of "
                           "this node see the same cache_dir?")
    rows, meta = _load_entry(final)
    return rows, meta, built
