"""CausalLMModule: a Hugging Face causal LM (LLaMA-3 first) fine-tuned with any adapter method, scored on the
commonsense tasks. Everything task-agnostic (building, injecting, sharding, optimizer groups, schedule,
checkpoints, export, the selection and monitor callbacks) is FineTuneModule's; this module adds:

    build_base_model     load from a local directory (never a download) or build from a config dict
    training_step        teacher-forced loss (labels already -100 where they must not count); before the
                         first packed batch's loss, a check that the model keeps packed samples apart
    validation_step      loss batches -> val_loss; generation batches -> per-task accuracy
    test_step            generation on every eval task -> per-task table and average

With an EffiLoRA adapter the module adds ``EffiLoRACallback`` itself (``configure_callbacks``), so switching
methods in YAML is one line: the adapter's ``class_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..adapters.export import check_safetensors_file
from ..data.batch import generation_prompt, is_generation_batch, is_packed, model_inputs, num_samples
from ..data.commonsense_prompts import TASKS, extract_answer
from .evaluation import GenerationEvalModule
from .packed_attention import SDPA_PACKED

__all__ = ["CausalLMModule", "load_causal_lm"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(
    model_path: str | None, model_config: dict[str, Any] | None, dtype: str, seed: int, meta: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """From a local Hugging Face directory (``local_files_only``), or built from a config dict (random init).

    ``meta=True`` builds the architecture only, on the meta device (no weights read, no memory used).
    ``attn_implementation``: transformers' (None: its default), ``sdpa_packed`` included (``packed_attention``).
    """
    torch_dtype = _DTYPES[dtype]
    attn = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if model_path is not None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"No model at {path} (config.json missing). Models load from local directories only; no download "
                "is attempted. Point model_path at a Hugging Face checkpoint directory (e.g. data/checkpoints/tiny-llama)."
            )
        if meta:
            with torch.device("meta"):
                config = AutoConfig.from_pretrained(str(path), local_files_only=True)
                return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **attn)
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors_file(weights)  # a truncated shard, named, before transformers reads it
        try:
            return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype, **attn)
        except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as err:
            raise ValueError(f"The model in {path} cannot be loaded: {type(err).__name__}: {err}") from err
    if model_config is None:
        raise ValueError("Give model_path (a local checkpoint directory) or model_config (a config dict).")
    cfg = dict(model_config)
    config = AutoConfig.for_model(cfg.pop("model_type", "llama"), **cfg)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **attn)


def check_keeps_packed_samples_apart(model: Any, input_ids: torch.Tensor, atol: float = 1e-3) -> None:
    """Raise unless ``model`` computes a sample packed after another as it computes the sample alone.

    Packed batches (``data.batch.pack``) rely on Hugging Face's masking reading sample boundaries from the
    ``position_ids`` restarts; a model or transformers version that does not would let every sample attend to
    the ones before it in its row, silently. Two short pieces of the batch's own tokens, one forward each, no
    gradient: run by every rank on its first packed batch (the same collectives on each, under FSDP)."""
    ids = input_ids.flatten()[:5].view(1, -1)
    if ids.shape[1] < 5:
        return
    second = ids[:, 3:]
    positions = torch.tensor([[0, 1, 2, 0, 1]], device=ids.device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 3:].float()
        alone = model(input_ids=second, position_ids=positions[:, 3:], use_cache=False).logits.float()
    if not torch.allclose(packed, alone, atol=atol, rtol=1e-2):
        gap = float((packed - alone).abs().max())
        impl = _attention_of(model)
        raise ValueError(
            f"pack_sequences: this model (attn_implementation={impl!r}) does not keep packed samples apart: a "
            f"sample's logits change by up to {gap:.3g} when another precedes it in the row. Use a Hugging Face "
            "model whose attention reads packed position_ids (LLaMA with sdpa, eager or flash_attention_2, "
            "transformers >= 4.53), set model.attn_implementation: sdpa_packed (it attends each sample on its own), "
            "or set data.pack_sequences: false.")


def _attention_of(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


class CausalLMModule(GenerationEvalModule):
    """Adapter fine-tuning of a causal LM, with generation-based accuracy on the commonsense tasks.

    Takes FineTuneModule's arguments (``adapter``, ``model_path`` or ``model_config``, learning rates, the
    ``reducer`` block, ``export_dir``, ...); see ``effilora_lightning.models.finetune``.
    """

    tasks = TASKS

    def build_base_model(self, meta: bool = False) -> PreTrainedModel:
        """The frozen base LM (on the meta device if asked)."""
        hp = self.hparams
        return load_causal_lm(hp.model_path, hp.model_config, hp.dtype, hp.init_seed, meta=meta,
                              attn_implementation=hp.attn_implementation)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if is_packed(batch) and not self.__dict__.get("_packing_checked"):  # the first packed batch, once
            check_keeps_packed_samples_apart(self.language_model(self.model), batch["input_ids"])
            self.__dict__["_packing_checked"] = True
        segments = _attention_of(self.language_model(self.model)) == SDPA_PACKED  # its samples' lengths, no sync
        return self.lm_loss(batch["labels"], **model_inputs(batch, segments))  # padded or packed (``data.batch``)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._lm_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=num_samples(batch))
        self.log_padding_fraction(batch)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if is_generation_batch(batch):
            self.score(batch, self.val_accuracy)
            return
        loss = self._lm_loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, add_dataloader_idx=False, batch_size=num_samples(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.score(batch, self.test_accuracy)

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy (or beam) generation from left-padded prompts; returns prompt + generation decoded per row.

        The prompt is decoded too, as LLM-Adapters' commonsense_evaluate.py does: the answer is read from the
        segment right after the PROMPT's "### Response:" up to the next one the model may write
        (``templates.response_text``); decoding the new tokens alone would read past a repeated marker.
        """
        tok = self.require_tokenizer()
        prompt_ids, prompt_mask = generation_prompt(batch)  # (B, P) each, left-padded
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask,
            max_new_tokens=self.hparams.max_new_tokens, num_beams=self.hparams.num_beams, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        width = prompt_ids.shape[1]  # (B, width + new tokens): prompts are left-padded
        starts = (width - prompt_mask.sum(dim=1)).tolist()  # one host copy per batch
        return tok.batch_decode([row[start:] for row, start in zip(out, starts)], skip_special_tokens=True)

    def is_correct(self, task: str, text: str, answer: str) -> bool:
        """The first answer-pattern match of the task in the response, case-insensitive (LLM-Adapters)."""
        return (extract_answer(task, text) or "").lower() == answer.lower()
