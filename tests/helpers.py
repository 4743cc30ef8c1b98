"""Builders the tests share: a tiny LLaMA from a config, a plain LightningModule that is not ours."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def tiny_llama_config(layers: int = 2, hidden: int = 32, vocab: int = 128, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **kw,
    )


def tiny_llama(layers: int = 2, hidden: int = 32, vocab: int = 128, seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(layers, hidden, vocab, **kw))
    return model.eval()


class TokenDataset(Dataset):
    """Fixed random token sequences with a few padding positions: deterministic, no shuffling needed."""

    def __init__(self, n: int = 32, length: int = 12, vocab: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::3, -2:] = 0  # every third sample has two padding tokens

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def token_loader(batch_size: int = 4, **kw) -> DataLoader:
    return DataLoader(TokenDataset(**kw), batch_size=batch_size, shuffle=False)


def plain_module(adapter_config=None, lr: float = 1e-2, weight_decay: float = 0.1, layers: int = 4, **model_kw):
    """A LightningModule written the way a user would, knowing nothing of our modules."""
    import lightning.pytorch as pl

    from effilora_lightning import apply_adapter

    class UserModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None
            self.adapter_config = adapter_config

        def configure_model(self) -> None:
            if self.model is None:
                self.model = tiny_llama(layers=layers, **model_kw)
                self.model.train()
                if self.adapter_config is not None:
                    apply_adapter(self.model, self.adapter_config)

        def training_step(self, batch, batch_idx):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = self.model(**batch, labels=labels).loss
            self.log("train_loss", loss, on_step=True, prog_bar=False)
            return loss

        def configure_optimizers(self):
            params = [p for n, p in self.model.named_parameters() if "effilora_" in n or "lora_" in n]
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    return UserModule()
