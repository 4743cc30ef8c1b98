"""Two processes over gloo on CPU: DDP, FSDP1 (FSDPStrategy, through the worker's CPU shim) and FSDP2
(AdapterModelParallelStrategy) match one process, agree on every selection, write adapter-only checkpoints,
resume exactly, and their adapters load in one process; an FSDP2 resume into another adapter is refused
naming the keys; plus a simulated two-node launch. A user's own PEFT LoRA module with EffiLoRACallback does
the same under DDP and FSDP2 (agreement with one process, exact resume).

Each case runs tests/distributed/worker.py under torchrun; one launch takes ~15-25 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
STEPS = 8  # two epochs of 4 steps; checkpoints at the epoch boundary resume exactly
STRATEGIES = ["ddp", "fsdp1", "fsdp2"]  # DDP: requires_grad freeze mode with find_unused_parameters


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    return env


def _launch(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
           str(WORKER), "--out", str(out), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _torchrun(out: Path, *args: str, nproc: int = 2) -> list[dict]:
    done = _launch(out, *args, nproc=nproc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _single(out: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--strategy", "single", *args],
                          env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "rank0.json").read_text())


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """The tiny model saved as a Hugging Face directory, so that runs load it like a real checkpoint."""
    from helpers import tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(layers=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint_dir) -> dict:
    return _single(tmp_path_factory.mktemp("single"), "--steps", str(STEPS), "--model-path", str(checkpoint_dir),
                   "--validate")


def _assert_same_run(ranks: list[dict], reference: dict, upto: int | None = None) -> None:
    from worker import CLIP

    for r in [*ranks, reference]:  # clipped by the GLOBAL norm (FSDP2: all shards together), in every step
        assert len(r["grad_norms"]) == len(r["losses"]) and all(abs(n - CLIP) <= 1e-4 * CLIP for n in r["grad_norms"])
    for r in ranks:
        assert r["units"] == reference["units"]  # clean names and global sizes, whatever the sharding
        if "val_loss" in r:  # full length: the same adapter and selection at the end, the same
            assert abs(r["val_loss"] - reference["val_loss"]) <= 1e-5  # validation loss afterwards
            assert r["flops_per_token"] == reference["flops_per_token"]  # and FLOPs per token (MFU)
        assert r["history"] == ranks[0]["history"]  # every rank selected the same units at every step
        assert r["history"] == reference["history"][: len(r["history"])]
        for a, b in zip(r["losses"], reference["losses"][: upto or len(r["losses"])]):
            assert abs(a - b) <= 1e-5, (r["losses"], reference["losses"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, checkpoint_dir) -> Callable[[str], tuple[Path, list[dict]]]:
    """Two ranks train STEPS steps with a checkpoint every 4 and export the adapter at the end (``export_dir``),
    once per strategy (its tests share the run). FSDP2 builds on the meta device and broadcasts rank 0's load
    into the shards; FSDP1 wraps with fsdp1_wrap_policy and exports from summon_full_params."""
    runs: dict[str, tuple[Path, list[dict]]] = {}

    def run(strategy: str) -> tuple[Path, list[dict]]:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(strategy)
            ranks = _torchrun(out / "run", "--strategy", strategy, "--steps", str(STEPS), "--ckpt-every", "4",
                              "--save", str(out / "export"), "--model-path", str(checkpoint_dir), "--validate")
            runs[strategy] = (out, ranks)
        return runs[strategy]

    return run


def _step4_checkpoint(out: Path) -> Path:
    return next((out / "run" / "ckpt").glob("*step=4*"))


def _adapter_shapes() -> dict[str, torch.Size]:
    """Key -> shape of every adapter tensor of the workers' module (``model.`` + the adapted LM's names)."""
    from helpers import tiny_llama
    from worker import adapter_config

    from effilora_lightning import apply_adapter
    from effilora_lightning.adapters import is_adapter_param

    model = tiny_llama(layers=4)
    apply_adapter(model, adapter_config())
    return {f"model.{k}": v.shape for k, v in model.state_dict().items() if is_adapter_param(k)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_one_process_and_save_the_adapter_once(strategy, trained, reference):
    out, ranks = trained(strategy)
    _assert_same_run(ranks, reference)
    # FSDP1: rank 1 read no weights and handed FSDP a meta model, filled from rank 0 by sync_module_states
    # (FSDP2's rank-0 load and broadcast happen inside configure_model; DDP loads on every rank)
    assert [r["built_on_meta"] for r in ranks] == ([False, True] if strategy == "fsdp1" else [False, False])
    assert abs(ranks[0]["checksum"] - reference["checksum"]) < 1e-4
    # saved once, atomically, with the full (gathered) tensors: loads in ONE process and matches
    from helpers import tiny_llama

    from effilora_lightning.adapters import is_adapter_param, load_adapter

    model = tiny_llama(layers=4)
    load_adapter(model, out / "export" / "adapter")
    total = sum(float(p.detach().double().abs().sum()) for n, p in model.named_parameters() if is_adapter_param(n))
    assert abs(total - reference["checksum"]) < 1e-4
    assert sorted(p.name for p in (out / "export").iterdir()) == ["adapter", "peft"]  # no temp dirs left


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoint_holds_the_adapter_weights_only(strategy, trained):
    """DDP and FSDP1 (state_dict_type='full'): one file, written by rank 0 with full tensors; FSDP2: a directory
    of shards whose metadata lists every tensor saved."""
    from torch.distributed.checkpoint import FileSystemReader

    out, _ = trained(strategy)
    ckpt = _step4_checkpoint(out)
    expected = _adapter_shapes()
    if strategy in ("ddp", "fsdp1"):
        assert ckpt.is_file()
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == expected
        (optimizer,) = checkpoint["optimizer_states"]
        assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(expected)  # adapter params only
        return
    assert ckpt.is_dir()
    entries = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model = {k.removeprefix("state_dict."): v.size for k, v in entries.items() if k.startswith("state_dict.")}
    assert model == expected  # global shapes: the shards of all ranks together, and not one base key
    optimizer = {k.removeprefix("optimizer_0.state.").rsplit(".", 1)[0] for k in entries
                 if k.startswith("optimizer_0.state.")}
    assert optimizer and optimizer <= set(expected)  # AdamW state exists for adapter parameters only
    assert {k.split(".")[0] for k in entries} == {"state_dict", "optimizer_0"}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_after_step_4_equals_the_uninterrupted_run(strategy, trained, reference, tmp_path, checkpoint_dir):
    """"Kill" after step 4, resume from the step-4 checkpoint: same selections and losses as uninterrupted."""
    out, _ = trained(strategy)
    resumed = _torchrun(tmp_path / "resumed", "--strategy", strategy, "--steps", str(STEPS),
                        "--resume", str(_step4_checkpoint(out)), "--model-path", str(checkpoint_dir))
    for r in resumed:
        assert r["global_step"] == STEPS
        assert r["history"] == reference["history"]
        assert len(r["losses"]) == STEPS - 4
        for a, b in zip(r["losses"], reference["losses"][4:]):
            assert abs(a - b) <= 1e-5, (r["losses"], reference["losses"][4:])


def test_fsdp2_resume_into_another_adapter_is_refused_naming_the_keys(trained, tmp_path, checkpoint_dir):
    """Rank 8 instead of 4: the strategy refuses before loading anything. Every rank runs the same check on the
    same metadata; torchrun stops the others at the first failure, so only rank 0's report is asserted."""
    out, _ = trained("fsdp2")
    ckpt = _step4_checkpoint(out)
    done = _launch(tmp_path / "wrong", "--strategy", "fsdp2", "--steps", str(STEPS), "--adapter-rank", "8",
                   "--resume", str(ckpt), "--model-path", str(checkpoint_dir))
    assert done.returncode != 0
    log = [line.removeprefix("[rank0]: ") for line in (done.stdout + done.stderr).splitlines()
           if line.startswith("[rank0]: ")]  # the ranks' reports may interleave line by line
    start = log.index(f"ValueError: The checkpoint {ckpt} does not fit this model's adapter:")
    assert log[start + 1].startswith("  15 keys of another shape (checkpoint vs model): "
                                     "model.effilora_shared_a.down_proj (4, 64) vs (8, 64), ")
    assert log[start + 2].startswith("It holds ")  # which adapter the checkpoint holds (strategies.describe_adapter)
    assert log[start + 3].startswith("Resume with the adapter configuration the checkpoint was trained with")
    assert not (tmp_path / "wrong").exists()  # no rank got as far as training and writing its results


def test_fsdp2_bf16_all_gather_with_activation_checkpointing(tmp_path, reference, checkpoint_dir):
    """The multinode recipe's settings on 2 ranks: weights all-gathered and computed in bf16 while the sharded
    adapter masters stay fp32, non-reentrant checkpointing recomputes each layer once in backward, gradients
    clipped by the global norm, and both ranks still select the same units."""
    steps = 4
    ranks = _torchrun(tmp_path / "bf16", "--strategy", "fsdp2", "--steps", str(steps), "--param-dtype", "bfloat16",
                      "--checkpointing", "--model-path", str(checkpoint_dir))
    from worker import CLIP

    for r in ranks:
        assert r["compute_dtypes"] == ["torch.bfloat16"] and r["adapter_dtypes"] == ["torch.float32"]
        assert r["layer0_forwards"] == 2 * steps  # forward + recomputation in backward, every step
        assert r["history"] == ranks[0]["history"]
        assert all(abs(n - CLIP) <= 1e-4 * CLIP for n in r["grad_norms"])
        for a, b in zip(r["losses"], reference["losses"][:steps], strict=True):
            assert abs(a - b) <= 0.05 * abs(b)  # bf16 matmuls: close to the fp32 run, not equal
    assert reference["compute_dtypes"] == ["torch.float32"] and reference["layer0_forwards"] == STEPS


def test_simulated_two_node_ddp_grad_drop_launch_matches_one_process(tmp_path, reference, checkpoint_dir):
    """Two launches on loopback as node 0 and node 1 (one process each, num_nodes=2), plain DDP (no
    find_unused_parameters) with the callback's grad_drop mode."""
    port = _port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), "--out", str(tmp_path / "nodes"),
               "--strategy", "ddp", "--steps", "4", "--num-nodes", "2", "--freeze-mode", "grad_drop",
               "--model-path", str(checkpoint_dir)]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / "nodes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["world"] for r in ranks} == {2}
    _assert_same_run(ranks, reference)


@pytest.fixture(scope="module")
def peft_reference(tmp_path_factory) -> dict:
    return _single(tmp_path_factory.mktemp("peft_single"), "--project", "peft", "--steps", str(STEPS))


@pytest.fixture(scope="module")
def peft_trained(tmp_path_factory) -> Callable[[str], tuple[Path, list[dict]]]:
    """A user's own module around AutoModelForCausalLM + PEFT LoRA with EffiLoRACallback (worker's PeftProject),
    2 ranks, a checkpoint every 4 steps; once per strategy. FSDP2: Lightning's own ModelParallelStrategy, the module
    fully_shards each decoder layer and the root itself."""
    runs: dict[str, tuple[Path, list[dict]]] = {}

    def run(strategy: str) -> tuple[Path, list[dict]]:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(f"peft_{strategy}")
            runs[strategy] = out, _torchrun(out / "run", "--project", "peft", "--strategy", strategy,
                                            "--steps", str(STEPS), "--ckpt-every", "4")
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_peft_lora_project_two_ranks_agree_and_match_one_process(strategy, peft_trained, peft_reference):
    _, ranks = peft_trained(strategy)
    assert peft_reference["description"].startswith("EffiLoRACallback: 4 units (layer) of PEFT LoRA lora_B")
    for r in ranks:
        assert r["world"] == 2 and r["sharded"] == (strategy == "fsdp2")  # FSDP2: each rank holds half of each B
        assert r["units"] == peft_reference["units"]
        assert r["history"] == ranks[0]["history"] == peft_reference["history"]  # every rank, every step
        assert sum(r["history"][0]) == 2
        for a, b in zip(r["losses"], peft_reference["losses"], strict=True):
            assert abs(a - b) <= 1e-5, (r["losses"], peft_reference["losses"])
        assert abs(r["checksum"] - peft_reference["checksum"]) < 1e-4  # the same lora_A / lora_B at the end


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_peft_lora_project_resumes_after_step_4_exactly(strategy, peft_trained, peft_reference, tmp_path):
    out, _ = peft_trained(strategy)
    resumed = _torchrun(tmp_path / "resumed", "--project", "peft", "--strategy", strategy, "--steps", str(STEPS),
                        "--resume", str(_step4_checkpoint(out)))
    for r in resumed:
        assert r["global_step"] == STEPS and r["history"] == peft_reference["history"]
        for a, b in zip(r["losses"], peft_reference["losses"][4:], strict=True):
            assert abs(a - b) <= 1e-5, (r["losses"], peft_reference["losses"][4:])
        assert abs(r["checksum"] - peft_reference["checksum"]) < 1e-4


def test_torch_is_cpu_capable_of_gloo():
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available()
