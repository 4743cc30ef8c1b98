"""release_freed_memory: the C heap's free pages go back to the OS after a cold data build (glibc)."""

from __future__ import annotations

import sys

import pytest

from effilora_lightning.data import memory, node_build


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trims_on_linux():
    assert memory.release_freed_memory() is True


def test_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is False


def test_a_built_part_trims_a_loaded_one_does_not(tmp_path, monkeypatch):
    """Trimming walks the heap: only after a build, which is what leaves ~0.5 GB of garbage behind."""
    from test_commonsense import module

    calls = []
    monkeypatch.setattr(node_build, "release_freed_memory", lambda: calls.append(1) or True)
    module(tmp_path / "a", cache_dir=str(tmp_path / "cache"))
    built = len(calls)
    module(tmp_path / "a", cache_dir=str(tmp_path / "cache"))
    assert built == 2 and len(calls) == built  # train+val and test parts built once, then loaded
