"""EffiLoRACallback in a Lightning project that knows nothing of effilora_lightning's modules.

    .venv/bin/python callbacks/effilora_example.py            # ~10 s on a laptop CPU

A user's own LightningModule adapts a LLaMA-architecture model (built from a config here; use
``AutoModelForCausalLM.from_pretrained(local_dir)`` for a real one) in ``configure_model``, optimizes every
adapter parameter from step 0, and lets the callback decide each step which layers' B train.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from effilora_lightning import EffiLoRACallback, EffiLoRAConfig, adapter_parameters, apply_adapter
from effilora_lightning.adapters import save_adapter
from effilora_lightning.callbacks import EfficiencyMonitor


class MyLitLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model: LlamaForCausalLM | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        self.model = LlamaForCausalLM(config)
        # inject BEFORE any sharding; everything but the adapter is frozen
        print(apply_adapter(self.model, EffiLoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # every adapter parameter by NAME, not by requires_grad: the callback toggles B every step and never adds
        # param groups
        return torch.optim.AdamW(adapter_parameters(self), lr=1e-3, weight_decay=0.01)


def main(max_steps: int = 20) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 256, (64, 32))), batch_size=8)
    callback = EffiLoRACallback(keep_ratio=0.5, importance="taylor", selection="sample", warmup_steps=2,
                                log_every_n_steps=5)
    monitor = EfficiencyMonitor(log_every_n_steps=5)  # perf/*: tokens/s, memory (and MFU on a known GPU)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=[callback, monitor], log_every_n_steps=5,
                        default_root_dir="logs/callback_example", enable_checkpointing=False)
    module = MyLitLM()
    trainer.fit(module, data)
    print("selection per step (rows: steps, columns: layers):")
    print(torch.stack(callback.history).int())
    save_adapter(module.model, "logs/callback_example/adapter")


if __name__ == "__main__":
    main()
