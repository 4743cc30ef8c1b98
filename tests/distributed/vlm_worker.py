"""One VisionLanguageModule run for tests/distributed/test_vision_language_fsdp.py, by torchrun (2 ranks, FSDP2)
or plainly (1 process): the bundled tiny LLaMA and tiny open_clip tower with EffiLoRA, on synthetic image batches.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/vlm_worker.py --strategy fsdp2 --out DIR
    python tests/distributed/vlm_worker.py --strategy single --out DIR

Writes DIR/rank<r>.json: the global mean loss of every step, whether configure_model left the model on the meta
device before sharding (ranks that receive rank 0's weights), and a checksum of the trained weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import GLOBAL_BATCH, Record, _write_and_tear_down  # noqa: E402

from effilora_lightning import EffiLoRAConfig, SelectionConfig, VisionLanguageModule  # noqa: E402
from effilora_lightning.adapters import is_adapter_param  # noqa: E402
from effilora_lightning.data.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from effilora_lightning.strategies import AdapterModelParallelStrategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOWER = ROOT / "data" / "checkpoints" / "tiny-clip" / "open_clip_model.safetensors"


class ImageTokens(Dataset):
    """Equal-length samples, one image each (placeholder at position 1), loss on every text token after it."""

    def __init__(self, n: int = 16, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 128, (n, length), generator=g)
        self.ids[:, 1] = IMAGE_TOKEN_INDEX
        self.images = torch.randn(n, 3, 64, 64, generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        labels = ids.clone()
        labels[:2] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "images": self.images[i],
                "image_counts": torch.tensor(1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["single", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    world = 2 if args.strategy == "fsdp2" else 1
    module = VisionLanguageModule(
        adapter=EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]), model_path=str(ROOT / "data/checkpoints/tiny-llama"),
        vision_tower="effilora-tiny-vit", vision_pretrained=str(TOWER), learning_rate=1e-2, lr_projector=1e-3,
        selection=SelectionConfig(keep_ratio=0.5, warmup_steps=1), heatmap=False,
    )
    built_on_meta: list[bool] = []
    build = module._build_adapted

    def recording_build(meta: bool = False):
        model = build(meta)
        built_on_meta.append(meta)
        return model

    module._build_adapted = recording_build
    strategy = (AdapterModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
                if world > 1 else "auto")
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=args.steps, callbacks=[record],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.out, use_distributed_sampler=False)
    data = ImageTokens()
    rank = trainer.global_rank
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    trainer.fit(module, DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler, shuffle=False))
    trained = {n: p for n, p in module.model.named_parameters() if is_adapter_param(n) or "mm_projector." in n}
    checksum = sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().abs().sum())
                   for p in trained.values())
    out = {"rank": rank, "losses": record.losses, "built_on_meta": built_on_meta, "checksum": checksum,
           "history": torch.stack(module.reducer.history).int().tolist()}
    _write_and_tear_down(args.out, rank, out)


if __name__ == "__main__":
    main()
