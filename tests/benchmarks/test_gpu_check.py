"""benchmarks/gpu_check.py --dry-run end to end on the CPU: the script that will meet the GPU has run here.

Every step (environment, pytest -m gpu, speed, demo, loss_memory, optimizer, packing) must write its JSON (the
environment's into summary.json) with status ok; on the CPU every GPU test skips, which counts as ok. Two to three minutes on the 2-core box (each step is a child process
importing torch and friends, and loss_memory.py starts one per variant), hence ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.slow


def _gpu_check():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check_out")
    work = tmp_path_factory.mktemp("gpu_check_work")
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run", "--work", str(work)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    return out, done


def test_every_step_writes_its_json_with_status_ok(dry_run):
    out, done = dry_run
    gc = _gpu_check()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert gc.OWN_FILE == [s for s in gc.STEPS if s != "environment"] and not (out / "environment.json").exists()
    for step in gc.STEPS:
        result = summary["environment"] if step == "environment" else json.loads((out / f"{step}.json").read_text())
        assert result["step"] == step and result["seconds"] >= 0
        expected = "ok" if step != "loss_memory" or gc.LOSS_MEMORY.is_file() else "skipped"
        assert result["status"] == expected, (step, {k: result.get(k) for k in ("status", "error", "output_tail")})
    assert summary["dry_run"] is True and set(summary["steps"]) == set(gc.STEPS)
    assert (out / "log.txt").is_file()
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files from $OUT


def test_each_step_reports_what_it_measured(dry_run):
    out, _ = dry_run
    gc = _gpu_check()
    env = json.loads((out / "summary.json").read_text())["environment"]
    assert env["problems"] == [] and env["probe"]["import_errors"] == {}
    assert env["probe"]["lightning_cli_signatures"] is True  # jsonargparse[signatures], as LightningCLI needs

    pytest_gpu = json.loads((out / "pytest_gpu.json").read_text())["report"]
    counts = pytest_gpu["counts"]
    assert counts["total"] > 0 and counts.get("failed", 0) == counts.get("error", 0) == 0
    if not _cuda():  # on the CPU every GPU test is collected and skipped, with the reason
        assert counts.get("skipped", 0) == counts["total"]
        assert all("needs a CUDA device" in t["message"] for t in pytest_gpu["tests"] if "tests.gpu" in t["test"])
    assert any(t["test"].startswith("tests.gpu.test_gpu_fsdp") for t in pytest_gpu["tests"])

    speed = json.loads((out / "speed.json").read_text())
    assert [r["method"] for r in speed["rows"]] == gc.SPEED_METHODS
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in speed["rows"])
    assert all(0 < r["mfu_4n"] for r in speed["rows"])  # against the dry run's made-up peak
    assert set(speed["target"]) >= {"overhead_vs_peft", "memory_ok", "mfu_4n", "mfu_ok"}

    demo = json.loads((out / "demo.json").read_text())
    assert "bf16-mixed" in demo["config"] and sum(demo["test_results"]["counts"].values()) == 16  # 2 per task
    assert 0.0 <= demo["test_results"]["accuracy"]["average"] <= 1.0
    assert demo["accuracy_table"].splitlines()[0] == "| task | accuracy (%) | n |"
    assert "| average |" in demo["accuracy_table"]
    assert demo["metrics"]["val_acc"] and "perf/tokens_per_sec" in demo["metrics"]["last"]

    optimizer = json.loads((out / "optimizer.json").read_text())["sets"]
    assert set(optimizer) == {"demo-effilora-r8"}  # the dry run's one set; on the GPU all three
    r = optimizer["demo-effilora-r8"]
    assert r["foreach_bit_identical"] and 0 < r["fused_max_abs_diff"] < 1e-6
    assert r["for_loop_over_fused"]["median"] > 0 and set(r["ms_per_step_median"]) == {"fused", "foreach", "for_loop"}

    packing = json.loads((out / "packing.json").read_text())["ratios_over_random"]
    assert set(packing) == {"grouped", "packed", "packed_1x", "packed_one_row"}
    assert all(r["ratio_median"] > 0 and r["position_ceiling"] >= 1.0 for r in packing.values())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
