"""One short fit of a tiny LLaMA on ONE GPU through the product's strategies; test_gpu_fsdp.py launches it.

    python -m torch.distributed.run --nproc_per_node 1 tests/gpu/fsdp_worker.py --strategy fsdp2 --out DIR ...

``single``: Lightning's default strategy on one device; ``fsdp2``: AdapterModelParallelStrategy (FSDP2, sharded
adapter-only checkpoints); ``fsdp1``: Lightning's FSDPStrategy (use_orig_params, full state dict). Both FSDP runs
set up an NCCL process group of world size 1. CausalLMModule builds, injects, shards, checkpoints, validates
after fit and exports the adapter as it does for users. Writes DIR/result.json: losses, selections, dtypes,
what the strategy made of the model, the logged perf/* metrics, the checkpoint and export paths. A separate
process per run: a hang or a crash in NCCL fails one test (after its timeout), not the whole session.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from gpu_helpers import MemoryLogger  # noqa: E402

from effilora_lightning import CausalLMModule, EffiLoRAConfig  # noqa: E402
from effilora_lightning.adapters import is_adapter_param  # noqa: E402
from effilora_lightning.adapters.base import unwrapped_name  # noqa: E402
from effilora_lightning.strategies import AdapterModelParallelStrategy  # noqa: E402

BATCH = 8


def adapter_config() -> EffiLoRAConfig:
    return EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"])


class Tokens(Dataset):
    """Equal-length, unpadded random sequences (vocabulary of tests/helpers.tiny_llama)."""

    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.ids = torch.randint(1, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class Record(Callback):
    """Each step's loss; in which dtype layer 0's frozen q_proj computes (FSDP2: its all-gathered weight)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.compute_dtypes: set[str] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        for name, m in pl_module.model.named_modules():  # FSDP1 wraps the Linear: hook the Linear itself
            clean = unwrapped_name(name + ".").rstrip(".")  # FSDP1: "...base_layer._fsdp_wrapped_module" too
            if clean.endswith("layers.0.self_attn.q_proj.base_layer") and type(m) is torch.nn.Linear:
                m.register_forward_pre_hook(lambda mod, args: self.compute_dtypes.add(str(mod.weight.dtype)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def adapter_checksum(module: CausalLMModule) -> float:
    """Sum of |adapter values| over the full tensors (world size 1: a shard is the whole tensor)."""
    total = 0.0
    for name, p in module.model.named_parameters():
        if is_adapter_param(name):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            total += float(full.detach().double().abs().sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["single", "fsdp1", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", default="float32", help="the base weights' dtype (CausalLMModule.dtype)")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--param-dtype", default=None, help="FSDP2 all-gather/compute dtype (fsdp_param_dtype)")
    ap.add_argument("--peak-flops", type=float, required=True)
    ap.add_argument("--no-export", action="store_true", help="no export_dir (the adapter export at the end of fit)")
    ap.add_argument("--accelerator", default="gpu", help="cpu: single and fsdp2 (gloo) only, to check this script")
    args = ap.parse_args()
    out = Path(args.out)
    strategy = {
        "single": "auto",
        "fsdp2": AdapterModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
                                              save_distributed_checkpoint=True),
        "fsdp1": FSDPStrategy(use_orig_params=True, state_dict_type="full"),
    }[args.strategy]
    module = CausalLMModule(
        adapter=adapter_config(), model_path=args.model_path, dtype=args.dtype, learning_rate=1e-2, weight_decay=0.1,
        scheduler="constant", fsdp_param_dtype=args.param_dtype,
        export_dir=None if args.no_export else str(out / "export"),
        reducer={"keep_ratio": 0.5, "warmup_steps": 0, "heatmap": False, "log_every_n_steps": 1,
                 "peak_flops": args.peak_flops},
    )
    record, logger = Record(), MemoryLogger()
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.steps, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, strategy=strategy, precision=args.precision, max_steps=args.steps,
        callbacks=[record, checkpoint], logger=logger, gradient_clip_val=1.0, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out, use_distributed_sampler=False,
    )
    loader = DataLoader(Tokens(), batch_size=BATCH, shuffle=False)
    trainer.fit(module, loader)
    reducer = module.reducer
    root = trainer.strategy.model
    from torch.distributed.fsdp import FullyShardedDataParallel

    result = {
        "strategy": type(trainer.strategy).__name__,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "root_device": str(trainer.strategy.root_device),
        "losses": record.losses,
        "history": torch.stack(reducer.history).int().tolist(),
        "checksum": adapter_checksum(module),
        "compute_dtypes": sorted(record.compute_dtypes),
        "adapter_dtypes": sorted({str(p.dtype) for n, p in module.model.named_parameters() if is_adapter_param(n)}),
        "adapter_devices": sorted({p.device.type for n, p in module.model.named_parameters() if is_adapter_param(n)}),
        "dtensor_params": sum(type(p).__name__ == "DTensor" for p in module.model.parameters()),
        "fsdp1_root": isinstance(root, FullyShardedDataParallel),
        "fsdp1_units": sum(isinstance(m, FullyShardedDataParallel) for m in root.modules()),
        "mfu": logger.values("perf/mfu"),
        "peak_memory_mb": logger.values("perf/peak_memory_mb"),
        "checkpoints": sorted(str(p) for p in (out / "ckpt").iterdir()),
    }
    (validated,) = trainer.validate(module, loader, verbose=False)  # FSDP1: through the fit's root wrapper
    result["val_loss"] = float(validated["val_loss"])
    result["export"] = sorted(p.name for p in (out / "export").iterdir()) if (out / "export").is_dir() else []
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
