"""VisionLanguageModule under FSDP2 on two gloo ranks equals one process, and gets FineTuneModule's rank-0
loading: rank 1 builds the LLaVA model on the meta device only (it never reads a weight file) and receives
rank 0's weights. tests/distributed/vlm_worker.py runs each side (~30 s per launch on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import _env, _port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("vlm_worker.py")


def _run(cmd: list[str], out: Path, ranks: int) -> list[dict]:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_fsdp2_two_ranks_match_one_process_and_only_rank0_reads_weights(tmp_path):
    (single,) = _run([sys.executable, str(WORKER), "--strategy", "single", "--out", str(tmp_path / "single")],
                     tmp_path / "single", 1)
    ranks = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
                  str(WORKER), "--strategy", "fsdp2", "--out", str(tmp_path / "fsdp2")], tmp_path / "fsdp2", 2)
    assert single["built_on_meta"] == [False]
    assert ranks[0]["built_on_meta"] == [True, False]  # the sharded skeleton, then the real model to broadcast
    assert ranks[1]["built_on_meta"] == [True]  # never a real build: no checkpoint read on rank 1
    for r in ranks:
        assert r["history"] == single["history"]
        assert r["losses"] == pytest.approx(single["losses"], abs=1e-5)
        assert r["checksum"] == pytest.approx(single["checksum"], rel=1e-6)
