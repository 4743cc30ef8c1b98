"""The token cache: keyed by everything that changes the tokens, written atomically, built by the ranks of a node
together (each its part) into what one process writes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from effilora_lightning.data import CommonsenseDataModule, VisualInstructionDataModule
from effilora_lightning.data.commonsense_examples import _PROBES
from effilora_lightning.data.commonsense_prompts import build_train_prompt
from effilora_lightning.data.token_cache import default_cache_dir, load_or_build

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
PROBE_TEXTS = {*_PROBES, *(build_train_prompt(p, "") for p in _PROBES), *build_train_prompt("\0", "").split("\0")}
"""What ``PromptTokens`` tokenizes to check its split, once per setup whatever the data: not counted as work."""


def rec(instruction: str, answer: str = "true") -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def commonsense_files(root: Path, train: list | None = None) -> dict[str, str]:
    (root / "dataset" / "boolq").mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps(train or [rec("is the sky blue?"), rec("is fire cold?", "false")]))
    (root / "dataset" / "boolq" / "test.json").write_text(json.dumps([rec("is it?")]))
    return {"data_path": str(root / "train.json"), "dataset_dir": str(root / "dataset"), "tokenizer_path": str(TINY)}


def commonsense(root: Path, cache: Path, **kw) -> CommonsenseDataModule:
    files = commonsense_files(root) if not (root / "train.json").exists() else {
        "data_path": str(root / "train.json"), "dataset_dir": str(root / "dataset"), "tokenizer_path": str(TINY)}
    dm = CommonsenseDataModule(**(files | kw), eval_tasks=["boolq"], cache_dir=str(cache))
    dm.setup("fit")
    return dm


def rows_of(dm: CommonsenseDataModule) -> list[tuple[list[int], list[int]]]:
    return [(dm._train[i]["input_ids"].tolist(), dm._train[i]["labels"].tolist()) for i in range(len(dm._train))]


def test_a_second_setup_reads_the_cache_and_sees_the_same_samples(tmp_path):
    first = commonsense(tmp_path, tmp_path / "cache")
    second = commonsense(tmp_path, tmp_path / "cache")
    assert first.built_cache == {"train": True, "test": True} and second.built_cache == {"train": False, "test": False}
    assert rows_of(first) == rows_of(second)
    uncached = CommonsenseDataModule(**commonsense_files(tmp_path / "u"), eval_tasks=["boolq"], use_cache=False)
    uncached.setup("fit")
    assert rows_of(uncached) == rows_of(first)


@pytest.mark.parametrize("change", [
    {"cutoff_len": 9}, {"train_on_inputs": False}, {"reference_whitespace": True}, {"add_eos": False},
    {"val_set_size": 1}, {"seed": 7}, {"pad_token": "<|reserved_special_token_1|>"},
], ids=lambda c: next(iter(c)))
def test_every_setting_that_changes_the_tokens_is_in_the_key(tmp_path, change):
    commonsense(tmp_path, tmp_path / "cache")
    changed = commonsense(tmp_path, tmp_path / "cache", **change)
    assert changed.built_cache["train"] is True
    assert commonsense(tmp_path, tmp_path / "cache", batch_size=3).built_cache["train"] is False  # not a token setting


def test_changed_data_or_tokenizer_files_never_meet_a_stale_entry(tmp_path):
    commonsense(tmp_path, tmp_path / "cache")
    commonsense_files(tmp_path, train=[rec("is the sky green?", "false"), rec("is fire cold?", "false")])
    changed = commonsense(tmp_path, tmp_path / "cache")
    assert changed.built_cache["train"] is True and changed.built_cache["test"] is False
    assert "green" in changed.tokenizer.decode(changed._train[0]["input_ids"])
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer / name).write_bytes((TINY / name).read_bytes())
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 12345}))
    assert commonsense(tmp_path, tmp_path / "cache", tokenizer_path=str(tokenizer)).built_cache["train"] is True


def llava_files(root: Path) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(root / "images" / "a.png")
    turns = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    (root / "train.json").write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": turns},
                                                 {"id": "b", "conversations": turns[:0] + [
                                                     {"from": "human", "value": "Hi"},
                                                     {"from": "gpt", "value": "hello"}]}]))
    return root


def llava(root: Path, cache: Path, **kw) -> VisualInstructionDataModule:
    kw = {"image_size": 16, "template": "vicuna_v1", "max_length": 512} | kw
    dm = VisualInstructionDataModule(str(root / "train.json"), str(root / "images"), str(TINY),
                                     cache_dir=str(cache), val_data_path=str(root / "train.json"), **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("change", [{"template": "llama3"}, {"max_length": 200}, {"system_prompt": "Be brief."},
                                    {"image_mode": "resize"}, {"on_bad_record": "skip"}],
                         ids=lambda c: next(iter(c)))
def test_llava_settings_are_in_the_key_and_the_test_split_reuses_validation(tmp_path, change):
    root = llava_files(tmp_path)
    first = llava(root, tmp_path / "cache")
    assert first.built_cache == {"train": True, "val": True}  # test = val: same records, same dataset
    assert first.datasets["test"] is first.datasets["val"]
    assert llava(root, tmp_path / "cache").built_cache == {"train": False, "val": False}
    assert llava(root, tmp_path / "cache", **change).built_cache["train"] is True


def test_the_llava_cache_holds_exactly_what_setup_checked(tmp_path):
    root = llava_files(tmp_path)
    first, second = llava(root, tmp_path / "cache"), llava(root, tmp_path / "cache")
    for split in ("train", "val"):
        a, b = first.datasets[split], second.datasets[split]
        assert [s.name for s in a.samples] == [s.name for s in b.samples] == ["a", "b"]
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
            assert torch.equal(x["images"], y["images"])
    assert first.stats == second.stats


def test_the_default_location_is_a_user_cache_never_the_dataset(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFILORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "effilora_lightning" / "data"
    monkeypatch.setenv("EFFILORA_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


_SLOW_WRITER = """
import sys, time
from effilora_lightning.data.token_cache import load_or_build
def build(entry):
    rows = entry.rows("tokens")
    rows.add([1, 2, 3])
    print("writing", flush=True)
    time.sleep(60)
    return {}
load_or_build(sys.argv[1], "k", build)
"""


def test_a_writer_killed_mid_write_leaves_no_entry_and_the_next_run_rebuilds(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not (tmp_path / "k").exists() and len(list(tmp_path.glob("k.tmp-*"))) == 1  # half an entry, not in place

    def build(entry):
        entry.rows("tokens").add([4, 5], [True, False])
        return {"note": "rebuilt"}

    rows, meta, built = load_or_build(tmp_path, "k", build)
    assert built and meta["note"] == "rebuilt" and rows["tokens"].ids_of(0).tolist() == [4, 5]
    assert rows["tokens"].labels_of(0).tolist() == [4, -100]
    assert list(tmp_path.glob("k.tmp-*")) == []  # the dead writer's directory is gone
    assert load_or_build(tmp_path, "k", build)[2] is False


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def build(entry):
        entry.rows("tokens").add([1])
        raise ValueError("record 3 is bad")

    with pytest.raises(ValueError, match="record 3 is bad"):
        load_or_build(tmp_path, "k", build)
    assert list(tmp_path.iterdir()) == []


def _llava_mix(root: Path) -> Path:
    """40 records: with an image, text-only, a missing image (skipped), too long for max_length (counted)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(root / "images" / "a.png")
    records = []
    for i in range(40):
        turns = [{"from": "human", "value": f"<image>\nWhat is {i}?"}, {"from": "gpt", "value": "blue " * (i % 7)}]
        image = {0: "a.png", 1: "missing.png"}.get(i % 4)
        if image is None:
            turns[0]["value"] = f"Say {i}" + " and more" * (i % 9) * 12
        records.append({"id": f"r{i}", "conversations": turns} | ({"image": image} if image else {}))
    (root / "train.json").write_text(json.dumps(records))
    return root


def test_llava_parts_of_three_threads_assemble_into_what_one_process_writes(tmp_path):
    """Three stand-in ranks (threads, a Barrier as the collective) split the LLaVA build: uneven slices of a
    file with skipped and too-long records; the entries are the one process's byte for byte."""
    import threading

    root = _llava_mix(tmp_path)
    kw = {"image_size": 16, "template": "vicuna_v1", "max_length": 200, "val_set_size": 5, "on_bad_record": "skip"}
    alone = VisualInstructionDataModule(str(root / "train.json"), str(root / "images"), str(TINY),
                                        cache_dir=str(tmp_path / "c1"), **kw)
    alone.setup("fit")
    assert alone.stats["train"]["too_long"] and alone.stats["train"]["missing_image"]
    barrier, flags, results = threading.Barrier(3), [None] * 3, {}

    def rank(r: int) -> None:
        def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
            flags[r] = decision
            barrier.wait()
            agreed = builtins_all(flags) if all else any(flags)
            barrier.wait()
            return agreed

        dm = VisualInstructionDataModule(str(root / "train.json"), str(root / "images"), str(TINY),
                                         cache_dir=str(tmp_path / "c3"), **kw)
        dm.trainer = SimpleNamespace(world_size=3, local_rank=r, global_rank=r, num_devices=3,
                                     strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision))
        dm.setup("fit")
        results[r] = dm

    builtins_all = all
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2]
    assert _entries(tmp_path / "c3") == _entries(tmp_path / "c1")
    for dm in results.values():
        assert dm.stats == alone.stats and dm.built_cache == alone.built_cache
        assert [s.name for s in dm.datasets["train"].samples] == [s.name for s in alone.datasets["train"].samples]


# ------------------------------------------------------------------------------------- two ranks on one node


def _split_files(root: Path) -> dict[str, str]:
    """A training file with one bad record (skipped) and some records longer than the cutoff (truncated)."""
    train = [rec(f"question {i}: " + "very long words " * (i % 5) * 4, "true" if i % 2 else "false") for i in range(40)]
    files = commonsense_files(root, train + [{"instruction": "no output"}])
    (root / "dataset" / "boolq" / "test.json").write_text(json.dumps([rec(f"test {i}?") for i in range(9)]))
    return files


_SPLIT_SETTINGS = {"eval_tasks": ["boolq"], "on_bad_record": "skip", "cutoff_len": 40, "val_set_size": 6}


def _entries(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def _rank(rank: int, world: int, port: int, roots: list[tuple[str, int | None]]) -> None:
    """Setup of one rank, once per (root, rank that fails to tokenize) in ``roots``: one spawn for all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import effilora_lightning.data.commonsense_examples as commonsense_module
    import effilora_lightning.data.tokenizer as tokenizer_module

    real = tokenizer_module.encode_texts

    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        flag = torch.tensor(int(decision))
        dist.all_reduce(flag)
        return bool(flag == world) if all else bool(flag)

    trainer = SimpleNamespace(world_size=world, local_rank=rank, global_rank=rank, num_devices=world,
                              strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision))
    for root, fail_on in roots:
        texts = []

        def counted(tok, batch, offsets=False, fail=rank == fail_on, texts=texts):
            if fail:
                raise ValueError(f"rank {rank} cannot tokenize")
            texts.extend(t for t in batch if t not in PROBE_TEXTS)  # PromptTokens' check: once per rank, fixed
            return real(tok, batch, offsets)

        # every text goes through encode_texts: the outputs here, the prompts in EncodeAhead (one batch each)
        commonsense_module.encode_texts = tokenizer_module.encode_texts = counted
        dm = CommonsenseDataModule(**_split_files(Path(root)) if rank == 0 else {
            "data_path": f"{root}/train.json", "dataset_dir": f"{root}/dataset", "tokenizer_path": str(TINY)},
            **_SPLIT_SETTINGS, cache_dir=f"{root}/cache")
        dist.barrier()  # rank 0 has written the files
        dm.trainer = trainer
        try:
            dm.setup("fit")
            result = {"texts": len(texts), "built": dm.built_cache, "rows": rows_of(dm),
                      "counts": [dm.num_truncated_train, dm.num_skipped, dm.num_fully_masked],
                      "test": [dm._test[i]["input_ids"].tolist() for i in range(len(dm._test))]}
        except Exception as err:  # noqa: BLE001 - what each rank raised is the test's subject
            result = {"error": f"{type(err).__name__}: {err}"}
        Path(root, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int | None, tuple[Path, dict, dict]]:
    """Both ranks' results of a setup that works (key None) and of setups where rank 0 or rank 1 fails."""
    roots = {fail_on: tmp_path_factory.mktemp(f"fail{fail_on}") for fail_on in (None, 0, 1)}
    port = 29500 + os.getpid() % 1000
    context = mp.start_processes(_rank, args=(2, port, [(str(r), f) for f, r in roots.items()]), nprocs=2,
                                 start_method="spawn", join=False)
    for _ in range(180):  # a rank left waiting in a collective would never end: give up after 3 minutes
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("a rank is still waiting after the other one ended")
    return {f: (r, *(json.loads((r / f"rank{k}.json").read_text()) for k in (0, 1))) for f, r in roots.items()}


@pytest.mark.distributed
def test_on_one_node_the_ranks_split_the_build_and_write_what_one_process_writes(tmp_path, two_ranks):
    texts = []
    import effilora_lightning.data.commonsense_examples as commonsense_module
    import effilora_lightning.data.tokenizer as tokenizer_module

    real = tokenizer_module.encode_texts
    commonsense_module.encode_texts = tokenizer_module.encode_texts = \
        lambda tok, batch, offsets=False: texts.extend(t for t in batch if t not in PROBE_TEXTS) or \
        real(tok, batch, offsets)
    try:
        alone = CommonsenseDataModule(**_split_files(tmp_path), **_SPLIT_SETTINGS, cache_dir=str(tmp_path / "c1"))
        alone.setup("fit")
    finally:
        commonsense_module.encode_texts = tokenizer_module.encode_texts = real
    assert 0 < alone.num_truncated_train < len(alone._train) and alone.num_skipped  # the counts are not trivial
    root, r0, r1 = two_ranks[None]
    assert r0["built"] == r1["built"] == {"train": True, "test": True}
    for r in (r0, r1):  # each rank tokenized about half of what the one process did
        assert 0.35 * len(texts) <= r["texts"] <= 0.65 * len(texts), (r["texts"], len(texts))
    assert r0["rows"] == r1["rows"] == [list(row) for row in rows_of(alone)] and r0["test"] == r1["test"]
    counts = [alone.num_truncated_train, {str(root / "train.json"): 1}, alone.num_fully_masked]
    assert r0["counts"] == r1["counts"] == counts  # summed over the parts, the skipped record counted once
    assert _entries(root / "cache") == _entries(tmp_path / "c1")  # byte for byte, and no part left behind


@pytest.mark.distributed
@pytest.mark.parametrize("fail_on", [0, 1])
def test_an_error_on_one_rank_stops_both_and_leaves_no_entry(two_ranks, fail_on):
    root, *results = two_ranks[fail_on]
    assert "cannot tokenize" in results[fail_on]["error"]
    assert "another rank failed" in results[1 - fail_on]["error"]
    assert not [p for p in (root / "cache").iterdir() if ".part" not in p.name]  # no entry, whole or half


def _job_building_with_another(cache_dir: str, barrier, results) -> None:
    """One independent job (its own one-rank node) building entry "k"; ``barrier``: both jobs are mid-build."""
    from effilora_lightning.data.node_build import load_or_build_sharded

    def build(entry, shard):
        barrier.wait(timeout=60)
        entry.rows("train").add_masked([7, 8, 9], 1)
        return {"rows_built": 1}

    rows, meta, _ = load_or_build_sharded(cache_dir, "k", build, lambda metas: metas[0])
    results.put((list(rows["train"].ids_of(0)), meta))


def test_two_jobs_building_the_same_entry_at_once_both_get_it(tmp_path):
    """Two runs on one host with one cache dir (two benchmark workers did this and the second crashed renaming its
    part onto the first's): whoever renames second keeps the first's identical bytes and goes on."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    jobs = [ctx.Process(target=_job_building_with_another, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert [results.get(timeout=5) for _ in jobs] == [([7, 8, 9], {"rows_built": 1, "rows": ["train"]})] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no part or temporary directory left behind


@pytest.mark.parametrize("code, raises", [(errno.ENOTEMPTY, False), (errno.EEXIST, False), (errno.EACCES, True)])
def test_a_copy_that_landed_first_counts_even_when_it_is_gone_again(tmp_path, monkeypatch, code, raises):
    """The race the two-job test hit once: the other job's part was in place when this job renamed (ENOTEMPTY),
    then that job assembled its entry and removed the part before this job looked. The rename's answer decides:
    another copy landed first, so this one is dropped and the build goes on; any other failure raises."""
    from effilora_lightning.data import token_cache

    tmp, final = tmp_path / "k.part0of1.tmp", tmp_path / "k.part0of1"
    tmp.mkdir()

    def rename(src, dst):
        raise OSError(code, os.strerror(code), str(src), None, str(dst))

    monkeypatch.setattr(token_cache.os, "rename", rename)
    if raises:
        with pytest.raises(OSError):
            token_cache._move_into_place(tmp, final)
    else:
        token_cache._move_into_place(tmp, final)
    assert not tmp.exists() and not final.exists()


@pytest.mark.parametrize("flush_tokens", [1, 7, 1 << 19])
def test_the_writer_s_files_do_not_depend_on_its_batch_size_and_it_holds_at_most_one_batch(tmp_path, monkeypatch,
                                                                                          flush_tokens):
    """TokenRowsWriter flushes every ``_FLUSH_TOKENS`` ids (memory: 36 bytes a held token): the files are the
    same whatever that size, and no more than one row past it is ever held."""
    import numpy as np

    from effilora_lightning.data.token_cache import TokenRowsWriter

    g = np.random.default_rng(0)
    rows = [g.integers(0, 128_256, int(n)).tolist() for n in g.integers(1, 40, 200)]

    def write(directory: Path) -> dict[str, bytes]:
        directory.mkdir()
        writer, held = TokenRowsWriter(directory, "x"), []
        for i, ids in enumerate(rows):
            writer.add_masked(ids, min(i % 5, len(ids))) if i % 2 else writer.add(ids, [t % 2 == 0 for t in ids])
            held.append(len(writer._ids))
        writer.close()
        assert max(held) < TokenRowsWriter._FLUSH_TOKENS + 40
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}

    want = write(tmp_path / "default")
    monkeypatch.setattr(TokenRowsWriter, "_FLUSH_TOKENS", flush_tokens)
    got = write(tmp_path / "patched")
    assert got == want and len(want["x.ids.bin"]) == 4 * sum(map(len, rows))
    assert np.fromfile(tmp_path / "patched" / "x.offsets.bin", np.int64)[-1] == sum(map(len, rows))
