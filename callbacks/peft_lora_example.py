"""EffiLoRACallback in a Lightning project that already uses PEFT LoRA: add the callback, nothing else changes.

    .venv/bin/python callbacks/peft_lora_example.py           # ~10 s on a laptop CPU

The LightningModule is written the way PEFT users write one (``get_peft_model`` around an
``AutoModelForCausalLM``; built from a config here, ``from_pretrained(local_dir)`` for a real one). Each optimizer
step the callback ranks the active adapter's ``lora_B`` per decoder layer and trains only the top half; lora_A
trains every step. PEFT's ``save_pretrained`` and ``merge_and_unload`` work on the result as before.
"""

from __future__ import annotations

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig

from effilora_lightning import EffiLoRACallback, adapter_parameters
from effilora_lightning.callbacks import EfficiencyMonitor


class MyPeftLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
        self.model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
        self.model.print_trainable_parameters()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # every adapter parameter from step 0 (by name: a B the callback froze is still in)
        return torch.optim.AdamW(adapter_parameters(self), lr=1e-3, weight_decay=0.01)


def main(max_steps: int = 20) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 256, (64, 32))), batch_size=8)
    callback = EffiLoRACallback(keep_ratio=0.5, warmup_steps=2, log_every_n_steps=5)
    monitor = EfficiencyMonitor(log_every_n_steps=5)  # perf/*: tokens/s, memory (and MFU on a known GPU)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=[callback, monitor], log_every_n_steps=5,
                        default_root_dir="logs/peft_lora_example", enable_checkpointing=False)
    module = MyPeftLM()
    trainer.fit(module, data)
    print("selection per step (rows: steps, columns: layers):")
    print(torch.stack(callback.history).int())
    module.model.save_pretrained("logs/peft_lora_example/adapter")  # PEFT's own format, loads with from_pretrained


if __name__ == "__main__":
    main()
