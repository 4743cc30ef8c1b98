"""On one GPU, world size 1 over NCCL: FSDP2 (AdapterModelParallelStrategy) and FSDP1 (FSDPStrategy) through
CausalLMModule, as a user's torchrun launch drives them, against the same fit on Lightning's single-device
strategy. Each run is tests/gpu/fsdp_worker.py under torchrun in its own process (see there)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_helpers import GPU_MARKS, dense_bf16_peak

pytestmark = GPU_MARKS

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")
STEPS = 6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="4")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def fit(out: Path, model_path: Path, strategy: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_port()}",
           str(WORKER), "--strategy", strategy, "--out", str(out), "--model-path", str(model_path),
           "--steps", str(STEPS), "--peak-flops", str(dense_bf16_peak()), *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-6000:])
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """The tiny model saved as a Hugging Face directory: loaded the way a real checkpoint is."""
    from helpers import tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(layers=4, hidden=64).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, model_path) -> dict:
    """fp32, Lightning's single-device strategy: the reference."""
    return fit(tmp_path_factory.mktemp("single"), model_path, "single")


def _common_checks(r: dict, exported: bool = True) -> None:
    assert r["root_device"].startswith("cuda") and r["adapter_devices"] == ["cuda"]
    assert len(r["losses"]) == STEPS and all(torch.isfinite(torch.tensor(r["losses"])))
    assert len(r["history"]) == STEPS and all(sum(h) == 2 for h in r["history"])  # 2 of 4 layers per step
    assert r["adapter_dtypes"] == ["torch.float32"]
    assert len(r["mfu"]) == STEPS and all(0.0 < v < 1.0 for v in r["mfu"]), r["mfu"]
    assert r["peak_memory_mb"] and all(v > 0 for v in r["peak_memory_mb"])
    assert torch.isfinite(torch.tensor(r["val_loss"]))
    assert ("adapter" in r["export"]) == exported, r["export"]
    assert len(r["checkpoints"]) == 1


def test_single_device_reference_runs(single):
    _common_checks(single)
    assert single["backend"] is None and single["compute_dtypes"] == ["torch.float32"]


def _adapter_keys() -> set[str]:
    """The checkpoint keys of the workers' adapter: ``model.`` + the adapted LM's adapter parameter names."""
    from fsdp_worker import adapter_config
    from helpers import tiny_llama

    from effilora_lightning import apply_adapter
    from effilora_lightning.adapters import is_adapter_param

    model = tiny_llama(layers=4, hidden=64)
    apply_adapter(model, adapter_config())
    return {f"model.{k}" for k in model.state_dict() if is_adapter_param(k)}


def test_fsdp2_nccl_world_size_1_matches_one_device_and_saves_adapter_only_shards(tmp_path, model_path, single):
    from torch.distributed.checkpoint import FileSystemReader

    r = fit(tmp_path, model_path, "fsdp2")
    _common_checks(r)
    assert r["strategy"] == "AdapterModelParallelStrategy" and r["backend"] == "nccl" and r["world"] == 1
    assert r["dtensor_params"] > 0  # fully_shard'ed: parameters are DTensors on the 1-GPU mesh
    assert r["compute_dtypes"] == ["torch.float32"]
    for a, b in zip(r["losses"], single["losses"], strict=True):  # the same fp32 arithmetic, sharded 1 way
        assert abs(a - b) <= 1e-4 * abs(b), (r["losses"], single["losses"])
    assert r["history"] == single["history"]
    assert abs(r["checksum"] - single["checksum"]) <= 1e-4 * single["checksum"]
    (ckpt,) = map(Path, r["checkpoints"])
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()
    entries = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    saved = {k.removeprefix("state_dict.") for k in entries if k.startswith("state_dict.")}
    assert saved == _adapter_keys()  # every adapter tensor, and not one base weight


def test_fsdp2_bf16_all_gather_computes_in_bf16_with_fp32_adapters(tmp_path, model_path, single):
    """The multinode recipe's FSDP2 settings (32-true, fsdp_param_dtype bfloat16) on one GPU."""
    r = fit(tmp_path, model_path, "fsdp2", "--param-dtype", "bfloat16")
    _common_checks(r)
    assert r["compute_dtypes"] == ["torch.bfloat16"]
    for a, b in zip(r["losses"], single["losses"], strict=True):  # bf16 matmuls: close, not equal
        assert abs(a - b) <= 0.05 * abs(b), (r["losses"], single["losses"])


def test_fsdp1_one_gpu_bf16_base_fp32_adapters_trains_checkpoints_validates(tmp_path, model_path, single):
    """FSDPStrategy with a bf16 base and fp32 adapters under bf16-mixed (one dtype per unit: the product's
    fsdp1_wrap_policy), gradient clipping through the root's clip_grad_norm_, validation after fit through the
    fit's root wrapper, adapter-only full checkpoint written by rank 0. (The export at the end of fit: below.)"""
    r = fit(tmp_path, model_path, "fsdp1", "--dtype", "bfloat16", "--precision", "bf16-mixed", "--no-export")
    _common_checks(r, exported=False)
    assert r["strategy"] == "FSDPStrategy" and r["backend"] == "nccl" and r["world"] == 1
    assert r["fsdp1_root"] and r["fsdp1_units"] > 4  # root + frozen leaves + decoder layers
    assert r["compute_dtypes"] == ["torch.bfloat16"]
    for a, b in zip(r["losses"], single["losses"], strict=True):  # bf16 base and matmuls against fp32
        assert abs(a - b) <= 0.05 * abs(b), (r["losses"], single["losses"])
    (ckpt,) = map(Path, r["checkpoints"])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == _adapter_keys()  # one file, full tensors, the adapter only


def test_fsdp1_one_gpu_exports_the_adapter_at_the_end_of_fit(tmp_path, model_path):
    r = fit(tmp_path, model_path, "fsdp1", "--dtype", "bfloat16", "--precision", "bf16-mixed")
    assert "adapter" in r["export"]
