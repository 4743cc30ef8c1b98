"""A cold build in pieces side by side (``build_workers``): forked copies of the process each build a contiguous
piece of the rank's part; the entry is the one process's byte for byte, and a failed or killed piece stops the
build with its own error, leaving nothing behind."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from pathlib import Path

import pytest
from test_token_cache import TINY, _entries, _llava_mix, _split_files

from effilora_lightning.data import CommonsenseDataModule, VisualInstructionDataModule, node_build
from effilora_lightning.data.images import BadRecordError
from effilora_lightning.data.node_build import Shard, build_pieces, load_or_build_sharded
from effilora_lightning.data.visual_build import SplitBuilder

ITEMS = list(range(11))


def build_items(entry, shard: Shard) -> dict:
    """Rows [i, i + 1] for this shard's items; the meta says which process built which items."""
    mine = list(shard.of(ITEMS))
    for i in mine:
        entry.rows("tokens").add([i, i + 1], [True, i % 2 == 0])
    return {"items": mine, "pids": [os.getpid()] * len(mine)}


def merge_items(parts: list[dict]) -> dict:
    return {key: [x for part in parts for x in part[key]] for key in ("items", "pids")}


def left_in(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("workers", [2, 3])
def test_pieces_built_by_forked_processes_are_the_entry_one_process_writes(tmp_path, workers):
    alone_rows, alone_meta, _ = load_or_build_sharded(tmp_path / "one", "k", build_items, merge_items)
    rows, meta, built = load_or_build_sharded(tmp_path / "many", "k", build_items, merge_items, workers=workers)
    assert built and meta["items"] == alone_meta["items"] == ITEMS
    rows_only = lambda cache: {k: v for k, v in _entries(cache).items() if not k.endswith("meta.json")}  # noqa: E731
    assert rows_only(tmp_path / "many") == rows_only(tmp_path / "one") and len(rows_only(tmp_path / "one")) == 3
    assert [rows["tokens"].ids_of(i).tolist() for i in ITEMS] == [[i, i + 1] for i in ITEMS]
    assert len(set(meta["pids"])) == workers and meta["pids"][-1] == os.getpid()  # the last piece: this process
    assert set(alone_meta["pids"]) == {os.getpid()}
    assert left_in(tmp_path / "many") == ["k"] and multiprocessing.active_children() == []


def test_without_a_cache_the_pieces_go_to_a_private_directory_that_is_gone_after(tmp_path, monkeypatch):
    monkeypatch.setattr(node_build.tempfile, "tempdir", str(tmp_path))
    rows, meta, built = load_or_build_sharded(None, "k", build_items, merge_items, workers=2)
    assert built and meta["items"] == ITEMS and len(set(meta["pids"])) == 2
    assert rows["tokens"].labels_of(3).tolist() == [3, -100] and rows["tokens"].labels_of(4).tolist() == [4, 5]
    assert list(tmp_path.iterdir()) == []


def test_shard_split_cuts_exactly_the_shard_into_contiguous_pieces():
    for n in (0, 1, 5, 11, 97):
        items = list(range(n))
        for count in (1, 2, 3):
            for index in range(count):
                shard = Shard(index, count)
                for pieces in (1, 2, 3, 5):
                    parts = [list(p.of(items)) for p in shard.split(pieces)]
                    assert [x for p in parts for x in p] == list(shard.of(items))
                    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_build_workers_none_picks_the_cpu_share_and_needs_enough_records(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    counted = []

    def records(n):
        return lambda: counted.append(n) or n

    per = node_build.MIN_RECORDS_PER_PIECE
    assert build_pieces(Shard(0, 2), None, records(100 * per)) == Shard(0, 2).split(4)  # 8 CPUs / 2 ranks
    assert build_pieces(Shard(1, 2), None, records(5 * per)) == Shard(1, 2).split(2)  # 2.5 pieces' worth per rank
    assert build_pieces(Shard(), None, records(per + 1)) == [Shard()]
    assert build_pieces(Shard(), None, records(100 * per)) == Shard().split(node_build.MAX_AUTO_WORKERS)
    assert build_pieces(Shard(), None, None) == [Shard()]  # nothing says the part is large
    assert build_pieces(Shard(0, 8), None, records(100 * per)) == [Shard(0, 8)]  # 1 CPU a rank: never counted
    assert counted == [100 * per, 5 * per, per + 1, 100 * per]
    assert build_pieces(Shard(), 3, records(1)) == Shard().split(3)  # asked for: split however small (counted too)
    assert build_pieces(Shard(), 1, records(1)) == [Shard()]
    assert counted[-1] == 1 and len(counted) == 5
    with pytest.raises(ValueError, match="build_workers=0: must be >= 1"):
        build_pieces(Shard(), 0)


def test_an_error_in_a_forked_piece_is_raised_as_it_is_and_nothing_is_left(tmp_path):
    def build(entry, shard):
        entry.rows("tokens").add([1])
        if shard.index == 0:  # the first piece: a forked process
            raise BadRecordError("missing_image", f"sample 'r1': image x.png is missing (piece pid {os.getpid()})")
        return {"items": [], "pids": []}

    with pytest.raises(BadRecordError, match="sample 'r1': image x.png is missing") as caught:
        load_or_build_sharded(tmp_path, "k", build, merge_items, workers=2)
    assert caught.value.kind == "missing_image" and f"pid {os.getpid()})" not in str(caught.value)
    assert left_in(tmp_path) == [] and multiprocessing.active_children() == []


def test_an_error_that_cannot_be_pickled_comes_back_as_its_text(tmp_path):
    class Local(Exception):  # a local class does not pickle
        pass

    def build(entry, shard):
        if shard.index == 0:
            raise Local("record 7 is odd")
        return {"items": [], "pids": []}

    with pytest.raises(RuntimeError, match=r"(?s)a build process failed.*Local: record 7 is odd"):
        load_or_build_sharded(tmp_path, "k", build, merge_items, workers=2)
    assert left_in(tmp_path) == []


def test_a_forked_piece_that_dies_stops_the_build_with_its_exit_code(tmp_path):
    def build(entry, shard):
        if shard.index == 0:
            entry.rows("tokens").add([1])
            os._exit(7)  # as the kernel's OOM killer would leave it, with no word sent back
        return {"items": [], "pids": []}

    with pytest.raises(RuntimeError, match=r"piece0 .* died with exit code 7 .*build_workers=1"):
        load_or_build_sharded(tmp_path, "k", build, merge_items, workers=2)
    assert left_in(tmp_path) == []


def test_an_interrupt_in_this_process_stops_the_forked_pieces(tmp_path):
    started = multiprocessing.get_context("fork").Event()

    def build(entry, shard):
        if shard.index == 0:
            started.set()
            threading.Event().wait(60)  # would outlive the test unless stopped
            return {}
        started.wait(30)
        raise KeyboardInterrupt  # Ctrl-C while the pieces are built

    with pytest.raises(KeyboardInterrupt):
        load_or_build_sharded(tmp_path, "k", build, merge_items, workers=2)
    assert multiprocessing.active_children() == [] and left_in(tmp_path) == []


def test_bad_record_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(BadRecordError("unreadable_image", "sample 'a': image a.png does not decode")))
    assert isinstance(error, BadRecordError) and error.kind == "unreadable_image"
    assert str(error) == "sample 'a': image a.png does not decode"


# ----------------------------------------------------------------------------------------- the DataModules


def _pids_of_builds(monkeypatch, cls, name: str, log: Path) -> None:
    """Record in ``log`` the process of every build call (a forked piece appends its own line)."""
    real = getattr(cls, name)

    def logged(self, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, logged)


def test_llava_built_by_three_processes_is_what_one_process_writes(tmp_path, monkeypatch):
    root = _llava_mix(tmp_path)
    kw = {"image_size": 16, "template": "vicuna_v1", "max_length": 200, "val_set_size": 5, "on_bad_record": "skip"}
    alone = VisualInstructionDataModule(str(root / "train.json"), str(root / "images"), str(TINY),
                                        cache_dir=str(tmp_path / "c1"), build_workers=1, **kw)
    alone.setup("fit")
    _pids_of_builds(monkeypatch, SplitBuilder, "build", tmp_path / "pids")
    many = VisualInstructionDataModule(str(root / "train.json"), str(root / "images"), str(TINY),
                                       cache_dir=str(tmp_path / "c3"), build_workers=3, **kw)
    many.setup("fit")
    pids = (tmp_path / "pids").read_text().split()
    # train and val, 3 pieces each: the last piece of each by this process, the others by 2 forks per part
    assert len(pids) == 6 and len(set(pids)) == 5 and pids.count(str(os.getpid())) == 2
    assert _entries(tmp_path / "c3") == _entries(tmp_path / "c1")
    assert many.stats == alone.stats and alone.stats["train"]["missing_image"] and alone.stats["train"]["too_long"]
    for split in ("train", "val"):
        assert [s.name for s in many.datasets[split].samples] == [s.name for s in alone.datasets[split].samples]
    uncached = VisualInstructionDataModule(str(root / "train.json"), str(root / "images"), str(TINY),
                                           use_cache=False, build_workers=2, **kw)
    uncached.setup("fit")
    assert [s.name for s in uncached.datasets["train"].samples] == [s.name for s in alone.datasets["train"].samples]


def test_llava_bad_record_in_a_forked_piece_names_the_sample_as_one_process_does(tmp_path):
    root = _llava_mix(tmp_path)
    kw = {"image_size": 16, "template": "vicuna_v1", "max_length": 200}
    errors = []
    for workers in (1, 2):
        dm = VisualInstructionDataModule(str(root / "train.json"), str(root / "images"), str(TINY),
                                         cache_dir=str(tmp_path / f"c{workers}"), build_workers=workers, **kw)
        with pytest.raises(BadRecordError) as caught:
            dm.setup("fit")
        errors.append((type(caught.value), caught.value.kind, str(caught.value)))
        assert left_in(tmp_path / f"c{workers}") == []
    assert errors[0] == errors[1] and "'r1'" in errors[0][2] and errors[0][1] == "missing_image"


def test_commonsense_built_by_two_processes_is_what_one_process_writes(tmp_path, monkeypatch):
    settings = {"eval_tasks": ["boolq"], "on_bad_record": "skip", "cutoff_len": 40, "val_set_size": 6}
    alone = CommonsenseDataModule(**_split_files(tmp_path), **settings, cache_dir=str(tmp_path / "c1"), build_workers=1)
    alone.setup("fit")
    _pids_of_builds(monkeypatch, CommonsenseDataModule, "_build_train_val", tmp_path / "pids")
    many = CommonsenseDataModule(**_split_files(tmp_path), **settings, cache_dir=str(tmp_path / "c2"), build_workers=2)
    many.setup("fit")
    assert len(set((tmp_path / "pids").read_text().split())) == 2
    assert _entries(tmp_path / "c2") == _entries(tmp_path / "c1")
    assert (many.num_truncated_train, many.num_skipped) == (alone.num_truncated_train, alone.num_skipped)
    assert alone.num_truncated_train and alone.num_skipped


def test_the_records_per_piece_threshold_is_the_callers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert build_pieces(Shard(), None, lambda: 399_999, min_per_piece=200_000) == [Shard()]
    assert build_pieces(Shard(), None, lambda: 400_000, min_per_piece=200_000) == Shard().split(2)


def test_commonsense_auto_build_workers_uses_its_own_threshold(tmp_path, monkeypatch):
    """build_workers=None: the commonsense threshold (200k records a piece, not the node default) decides; with it
    lowered to 4 records the same tiny file is built by 8 CPUs' worth of processes, and writes the same bytes."""
    from effilora_lightning.data import commonsense

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert commonsense.MIN_RECORDS_PER_PIECE > node_build.MIN_RECORDS_PER_PIECE
    settings = {"eval_tasks": ["boolq"], "on_bad_record": "skip", "cutoff_len": 40, "val_set_size": 6}
    _pids_of_builds(monkeypatch, CommonsenseDataModule, "_build_train_val", tmp_path / "pids")
    CommonsenseDataModule(**_split_files(tmp_path), **settings, cache_dir=str(tmp_path / "c1")).setup("fit")
    assert len(set((tmp_path / "pids").read_text().split())) == 1
    monkeypatch.setattr(commonsense, "MIN_RECORDS_PER_PIECE", 4)
    (tmp_path / "pids").unlink()
    CommonsenseDataModule(**_split_files(tmp_path), **settings, cache_dir=str(tmp_path / "c2")).setup("fit")
    assert len(set((tmp_path / "pids").read_text().split())) > 2
    assert _entries(tmp_path / "c2") == _entries(tmp_path / "c1")


@pytest.mark.parametrize("cls", ["commonsense", "llava"])
def test_build_workers_below_one_is_refused_at_construction(tmp_path, cls):
    with pytest.raises(ValueError, match="build_workers must be >= 1"):
        if cls == "commonsense":
            CommonsenseDataModule(**_split_files(tmp_path), build_workers=0)
        else:
            VisualInstructionDataModule("x.json", "images", str(TINY), build_workers=0)
