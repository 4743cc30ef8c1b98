"""One training run of a tiny LLaMA for the distributed tests; launched by torchrun (2 ranks) or plainly (1 rank).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py --strategy fsdp2 --out DIR
    python tests/distributed/worker.py --strategy single --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py --project peft --strategy ddp --out DIR

Writes DIR/rank<r>.json: the global mean loss of every step, the EffiLoRA selection of every step, and a
checksum of the adapter (``--project peft``: a user's own LightningModule around AutoModelForCausalLM + PEFT LoRA
with EffiLoRACallback, instead of CausalLMModule with EffiLoRA); optionally exports the adapter (``--save DIR``: DIR/adapter, DIR/peft, as
CausalLMModule's ``export_dir`` does) and writes checkpoints (``--ckpt-every``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_llama_config  # noqa: E402

from effilora_lightning import CausalLMModule, EffiLoRACallback, EffiLoRAConfig, adapter_parameters  # noqa: E402
from effilora_lightning.adapters import is_adapter_param  # noqa: E402
from effilora_lightning.models.sharding import decoder_layers  # noqa: E402
from effilora_lightning.strategies import AdapterModelParallelStrategy  # noqa: E402

GLOBAL_BATCH = 8
CLIP = 1e-3  # gradient_clip_val of every run: below every step's gradient norm, so clipping always acts


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) on CPU, for tests. Three checks stand in the way, neither in FSDP1 itself:
    Lightning refuses the CPU accelerator for exactly ``FSDPStrategy`` (a type check: a subclass passes), and it
    passes ``device_id=root_device.index``, None on CPU, from which torch infers "no accelerator" unless the
    device is given (and torch's ``sync_module_states`` refuses CPU tensors, which only NCCL could not
    broadcast). Everything else (wrapping, sharding, gradient reduce-scatter, full-state checkpoints) is
    Lightning's and torch's own code."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # sync_module_states (rank-0 load) insists on GPU tensors, for NCCL; gloo broadcasts CPU tensors as well
        with mock.patch.object(FullyShardedDataParallel, "__init__", _init_on_cpu), \
                mock.patch("torch.distributed.fsdp._init_utils._check_module_states_for_sync_module_states"):
            return super()._setup_model(model)

    def optimizer_state(self, optimizer) -> dict:
        """A third CPU-only gap, in torch: gathering FSDP1's full optimizer state with offload_to_cpu (as Lightning
        asks) takes each state's ``.cpu()``, a copy on GPU but the gathered buffer itself on CPU, and that buffer
        is reused for the next state: exp_avg would come back equal to exp_avg_sq. Without offload it clones."""
        with mock.patch("lightning.pytorch.strategies.fsdp._get_full_state_dict_context", _optim_state_on_device):
            return super().optimizer_state(optimizer)


def _optim_state_on_device(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    return FullyShardedDataParallel.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


_fsdp_init = FullyShardedDataParallel.__init__


def _init_on_cpu(self, module: torch.nn.Module, *args, device_id=None, **kwargs) -> None:
    _fsdp_init(self, module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


def adapter_config(rank: int = 4) -> EffiLoRAConfig:
    """The adapter every run trains (the tests build the same one to know its keys)."""
    return EffiLoRAConfig(rank=rank, target_modules=["q_proj", "v_proj", "down_proj"])


class Tokens(Dataset):
    """Equal-length, unpadded sequences: every rank's mean loss has the same token count."""

    def __init__(self, n: int = 32, length: int = 16) -> None:
        self.ids = torch.randint(1, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class Record(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []  # global norm of the adapter gradients the optimizer stepped with

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        self.losses.append(float(loss))
        self.grad_norms.append(_global_grad_norm(pl_module))


def _global_grad_norm(pl_module) -> float:
    """The gradients the optimizer just stepped with (zeroed only when the next step starts), all shards
    together: a rank that clipped by its LOCAL shard norm leaves a global norm != CLIP."""
    total = torch.zeros((), dtype=torch.float64)
    for p in pl_module.parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            total += grad.double().pow(2).sum()
    return float(_sum_flat_shards(pl_module, total).sqrt())


def _sum_flat_shards(pl_module, local: torch.Tensor) -> torch.Tensor:
    """FSDP1 (use_orig_params) leaves each rank a flat slice of every parameter: sum the slices' sums."""
    if isinstance(pl_module.trainer.strategy, FSDPStrategy):
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return local


class Probe(Callback):
    """Layer 0 from the inside: how often its attention runs forward and in which dtype its q_proj weight computes."""

    def __init__(self) -> None:
        self.layer0_forwards = 0
        self.compute_dtypes: set[str] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        layer = decoder_layers(pl_module.model)[0]
        layer.self_attn.register_forward_pre_hook(self._count)  # the layer's own hook misses HF's recompute
        layer.self_attn.q_proj.base_layer.register_forward_pre_hook(self._dtype)

    def _count(self, module, args) -> None:
        self.layer0_forwards += 1

    def _dtype(self, module, args) -> None:
        self.compute_dtypes.add(str(module.weight.dtype))  # FSDP2: the all-gathered (unsharded) weight


def adapter_checksum(module: CausalLMModule) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for name, p in module.model.named_parameters():
        if is_adapter_param(name):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            total += full.detach().double().abs().sum()
    return float(_sum_flat_shards(module, total))


class PeftProject(pl.LightningModule):
    """A user's fine-tuning module that knows nothing of effilora_lightning but the callback and adapter_parameters:
    AutoModelForCausalLM + peft.get_peft_model, and (ModelParallelStrategy) fully_shard per decoder layer, then root."""

    def __init__(self, model_path: str | None) -> None:
        super().__init__()
        self.model_path = model_path
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)  # the same lora_A init on every rank (FSDP2 does not broadcast it)
        base = (AutoModelForCausalLM.from_pretrained(self.model_path) if self.model_path
                else AutoModelForCausalLM.from_config(tiny_llama_config(layers=4)))
        self.model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(adapter_parameters(self), lr=1e-2, weight_decay=0.1)


def run_peft_project(args: argparse.Namespace, world: int) -> dict:
    """Train PeftProject under the chosen strategy; the results the tests compare across launches."""
    strategy = {
        "single": "auto",
        "ddp": DDPStrategy(find_unused_parameters=args.freeze_mode == "requires_grad", process_group_backend="gloo"),
        "fsdp2": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, process_group_backend="gloo"),
    }[args.strategy]
    callback = EffiLoRACallback(keep_ratio=0.5, warmup_steps=0, freeze_mode=args.freeze_mode, heatmap=False,
                                granularity=args.granularity)
    record = Record()
    callbacks: list[Callback] = [callback, record]
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=Path(args.out) / "ckpt", save_last=True,
                                         every_n_train_steps=args.ckpt_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=args.steps, callbacks=callbacks, logger=False,
        enable_checkpointing=bool(args.ckpt_every), enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=args.out, use_distributed_sampler=False,
    )
    module = PeftProject(args.model_path)
    trainer.fit(module, _loader(world), ckpt_path=args.resume)
    return {
        "world": world, "rank": trainer.global_rank, "losses": record.losses, "checksum": adapter_checksum(module),
        "history": torch.stack(callback.history).int().tolist(), "global_step": trainer.global_step,
        "units": dict(zip(callback.units.names, callback.units.numel.tolist())),
        "sharded": hasattr(callback.units.params[0], "to_local"), "description": callback.description,
    }


def _loader(world: int) -> DataLoader:
    """This rank's part of every global batch, unshuffled: the global batch equals the 1-process batch."""
    rank = int(os.environ.get("RANK", "0"))
    sampler = DistributedSampler(Tokens(), num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    return DataLoader(Tokens(), batch_size=GLOBAL_BATCH // world, sampler=sampler, shuffle=False)


def _write_and_tear_down(out_dir: str, rank: int, out: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    if dist.is_initialized():  # tear down together: a rank exiting while its peer's gloo threads still talk to
        dist.barrier()  # it can abort the peer at interpreter exit (seen once as SIGABRT after a DDP resume)
        dist.destroy_process_group()
    # Then leave without the interpreter's finalization: even after the barrier and destroy_process_group, a
    # loaded 2-core box saw rank 0 abort there ("terminate called without an active exception", SIGABRT, after
    # its results were written; the FSDP2 PEFT run of 2026-12-04), a teardown race inside torch's C++ threads
    # (pytorch/pytorch#179291 describes its gloo form), not this project's. The results are on disk already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["single", "ddp", "fsdp1", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--freeze-mode", default="requires_grad")
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--save", default=None)
    ap.add_argument("--validate", action="store_true", help="trainer.validate after fit (val_loss in the results)")
    ap.add_argument("--num-nodes", type=int, default=1)
    ap.add_argument("--model-path", default=None, help="a checkpoint directory (FSDP2: meta init + rank-0 load)")
    ap.add_argument("--adapter-rank", type=int, default=4)
    ap.add_argument("--param-dtype", default=None, help="FSDP2 all-gather/compute dtype (fsdp_param_dtype)")
    ap.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    ap.add_argument("--project", choices=["causal_lm", "peft"], default="causal_lm",
                    help="causal_lm: CausalLMModule with EffiLoRA; peft: PeftProject (PEFT LoRA + EffiLoRACallback)")
    ap.add_argument("--granularity", default="layer", help="--project peft: the callback's granularity")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.project == "peft":
        out = run_peft_project(args, world)
        _write_and_tear_down(args.out, out["rank"], out)
        return
    strategy = {
        "single": "auto",
        "ddp": DDPStrategy(find_unused_parameters=args.freeze_mode == "requires_grad", process_group_backend="gloo"),
        "fsdp1": CPUFSDPStrategy(use_orig_params=True, state_dict_type="full", process_group_backend="gloo"),
        "fsdp2": AdapterModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                              process_group_backend="gloo", save_distributed_checkpoint=True),
    }[args.strategy]
    module = CausalLMModule(
        adapter=adapter_config(args.adapter_rank),
        model_path=args.model_path,
        model_config=None if args.model_path else {"model_type": "llama", **tiny_llama_config(layers=4).to_dict()},
        learning_rate=1e-2, weight_decay=0.1, scheduler="constant",
        fsdp_param_dtype=args.param_dtype, gradient_checkpointing=args.checkpointing, export_dir=args.save,
        reducer={"keep_ratio": 0.5, "warmup_steps": 0, "freeze_mode": args.freeze_mode, "heatmap": False,
                 "granularity": "module"},  # one unit per B: under FSDP1 some rank holds none of a B's elements
    )
    built_on_meta: list[bool] = []  # what configure_model left before sharding: meta on ranks that read nothing
    configure = module.configure_model

    def configure_and_look() -> None:
        configure()
        built_on_meta.append(any(p.is_meta for p in module.model.parameters()))

    module.configure_model = configure_and_look
    record, probe = Record(), Probe()
    callbacks: list[Callback] = [record, probe]
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=Path(args.out) / "ckpt", save_last=True,
                                         every_n_train_steps=args.ckpt_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world // args.num_nodes, num_nodes=args.num_nodes, strategy=strategy,
        max_steps=args.steps, callbacks=callbacks, gradient_clip_val=CLIP, logger=False, enable_checkpointing=bool(args.ckpt_every),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out,
        use_distributed_sampler=False,  # ours below, unshuffled: the global batch equals the 1-process batch
    )
    loader = _loader(world)
    trainer.fit(module, loader, ckpt_path=args.resume)  # with --save, on_train_end exports the adapter there
    reducer = module.reducer
    out = {
        "world": world, "losses": record.losses, "grad_norms": record.grad_norms, "checksum": adapter_checksum(module),
        "history": torch.stack(reducer.history).int().tolist(), "global_step": trainer.global_step,
        "built_on_meta": built_on_meta[0], "layer0_forwards": probe.layer0_forwards,
        "compute_dtypes": sorted(probe.compute_dtypes),
        "adapter_dtypes": sorted({str(p.dtype) for n, p in module.model.named_parameters() if is_adapter_param(n)}),
        "units": dict(zip(reducer.units.names, reducer.units.numel.tolist())),  # global sizes, clean names
        "flops_per_token": module.monitor.flops_per_token(module),  # what the MFU divides by (collective)
    }
    if args.validate:  # then evaluate in the same process, as test_after_fit does (FSDP1: through the fit's
        # root wrapper); after reading the parameters: FSDP2 leaves its root group unsharded after an eval forward
        (validated,) = trainer.validate(module, loader, verbose=False)
        out["val_loss"] = validated["val_loss"]
    _write_and_tear_down(args.out, trainer.global_rank, out)


if __name__ == "__main__":
    main()
