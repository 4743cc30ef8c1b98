"""Shared fixtures: tiny LLaMA models built from a config (CPU, seeded, seconds)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the DataModules' token cache: one fresh folder per test session (subprocesses inherit it), never ~/.cache
os.environ.setdefault("EFFILORA_CACHE_DIR", tempfile.mkdtemp(prefix="effilora-test-cache-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_llama():
    from helpers import tiny_llama as build

    return build
