"""Cold token-cache builds split across the ranks of a node, and the one way a DataModule keys and loads a part.

On a node of N ranks a cold build is split (``load_or_build_sharded``): local rank i tokenizes the i-th
contiguous 1/N of the records into a part ``<key>.part<i>of<N>-<host>/`` (written and renamed like an entry),
and local rank 0 assembles the parts, in order, into the one entry: the rows concatenated, the metas merged by
the DataModule (sums of counts, lists concatenated), then the checks that need the whole split. The single
process runs the same code with one part, so N ranks write the very bytes one process writes. Every rank
agrees on each step through a collective (``agree``): an error on any rank makes every rank raise at the same
step, none is left waiting. A DataModule without a merge keeps the older way: local rank 0 builds it alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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

__all__ = ["Agree", "Shard", "load_or_build_for", "load_or_build_on_node", "load_or_build_sharded"]


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
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _part_path(final: Path, shard: Shard) -> Path:
    return final.parent / f"{final.name}.part{shard.index}of{shard.count}-{socket.gethostname()}"


def _build_part(final: Path, build: Callable[[EntryBuilder, Shard], dict[str, Any]], shard: Shard) -> None:
    """This rank's part, written beside its place and renamed into it (a complete part left by a killed run of
    the same key, or written meanwhile by another job building it, holds the same rows: it is kept)."""
    part = _part_path(final, shard)
    _remove_dead_writers(part)
    if part.is_dir():
        return
    tmp = _temporary(part)
    _build_into(tmp, lambda entry: build(entry, shard))
    _move_into_place(tmp, part)


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
    if built:
        release_freed_memory()  # the build's garbage: ~0.5 GB a rank would otherwise train with
    return rows, meta
