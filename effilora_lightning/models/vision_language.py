"""VisionLanguageModule: LLaVA-style visual instruction tuning — open_clip tower + projector + LLaMA + adapter.

Stage 1 (``adapter: null``): only the projector trains. Stage 2: projector (its own lr) + adapter, loading the
stage-1 projector from ``projector_path``. The vision tower and the LLM base are always frozen; adapters never
touch the tower or the projector (``exclude_vision``). Building, sharding (FSDP2 and FSDP1 load the checkpoints
on rank 0 only, every other rank builds on the meta device), optimizer groups and checkpoints are
FineTuneModule's; the model itself is ``llava_model.LlavaModel``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters.export import save_adapter
from ..data.batch import generation_prompt, is_generation_batch
from ..data.visual_dataset import VISUAL_TASK
from ..distributed.fsdp2 import root_unsharded
from ..distributed.names import full_cpu
from ..distributed.private import attached_trainer
from .causal_lm import load_causal_lm
from .evaluation import GenerationEvalModule
from .llava_model import LlavaModel, load_projector, match_embedding_scale
from .projector import build_projector
from .settings import check_settings
from .vision_tower import VisionTower

__all__ = ["LlavaModel", "VisionLanguageModule"]

PROJECTOR_PREFIX = "mm_projector."
TASK = VISUAL_TASK


class VisionLanguageModule(GenerationEvalModule):
    """LLaVA-style training: frozen open_clip tower, trainable projector, adapted (or frozen) LLaMA.

    Args (besides FineTuneModule's):
        adapter: the LLM's adapter for stage 2; None for stage 1 (projector only).
        vision_tower: open_clip architecture name (``ViT-L-14-336`` for LLaVA-1.5, ``effilora-tiny-vit`` demo).
        vision_pretrained: local weight FILE of the tower (never a hub tag); None = random init.
        select_layer: tower block whose patch features are used (-2 = second to last, as LLaVA).
        projector: ``mlp2x_gelu`` (LLaVA-1.5) or ``linear``.
        projector_path: stage-1 projector (``mm_projector.safetensors``) to start from.
        lr_projector: learning rate of the projector (stage 1: 1e-3; stage 2: 2e-5).
        train_projector: False freezes the projector too.
    """

    requires_adapter = False
    tasks = (TASK,)

    def __init__(
        self,
        adapter: Any = None,
        vision_tower: str = "ViT-L-14-336",
        vision_pretrained: str | None = None,
        select_layer: int = -2,
        projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu",
        projector_path: str | None = None,
        lr_projector: float = 2e-5,
        train_projector: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(adapter=adapter, **kwargs)
        self.save_hyperparameters(ignore=["adapter"])
        check_settings(type(self).__name__, self.hparams)  # lr_projector, select_layer

    # ------------------------------------------------------------------ building
    def build_base_model(self, meta: bool = False) -> LlavaModel:
        """LLM + tower + projector. ``meta``: the architecture only (no weights read), for ranks that receive
        rank 0's weights; the tower still reads its weight file's sidecar, which decides its activation."""
        hp = self.hparams
        llm = load_causal_lm(hp.model_path, hp.model_config, hp.dtype, hp.init_seed, meta=meta,
                             attn_implementation=hp.attn_implementation)
        with torch.device("meta") if meta else contextlib.nullcontext():
            tower = VisionTower(hp.vision_tower, hp.vision_pretrained, hp.select_layer, load_weights=not meta)
            with torch.random.fork_rng(devices=[]):  # seeded: every rank and every fresh run start alike
                torch.manual_seed(hp.init_seed)
                proj = build_projector(hp.projector, tower.hidden_size, llm.config.hidden_size)
        if hp.projector_path and not meta:
            load_projector(proj, hp.projector_path)
        elif not meta:
            match_embedding_scale(proj, llm.get_input_embeddings().weight)
        return LlavaModel(llm, tower, proj)

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.language_model

    def after_adapter(self, model: nn.Module) -> None:
        model.mm_projector.requires_grad_(self.hparams.train_projector)

    def extra_fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """The vision tower's transformer blocks: each its own FSDP group (FSDP2) or unit (FSDP1), so the frozen
        tower is gathered one block at a time instead of whole with the root."""
        return model.vision_tower.blocks()

    def check_inputs_fit_model(self) -> None:
        """Besides the token ids: the datamodule's image size is the tower's (checked once the tower exists, at
        the end of configure_model, so a mismatch fails before step 1 instead of in its first forward)."""
        super().check_inputs_fit_model()
        dm = getattr(attached_trainer(self), "datamodule", None)
        size = getattr(getattr(dm, "hparams", None), "image_size", None)
        tower_size = self.model.vision_tower.image_size if self.model is not None else None
        if size is not None and tower_size is not None and int(size) != int(tower_size):
            raise ValueError(f"data.image_size={size} but the vision tower {self.hparams.vision_tower} expects "
                             f"{tower_size}: set data.init_args.image_size: {tower_size}.")

    # ------------------------------------------------------------------ steps
    def _batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["image_counts"],
                          labels=batch["labels"]).loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._batch_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self.log_padding_fraction(batch)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self._batch_loss(batch), prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        if is_generation_batch(batch):
            self.score(batch, self.val_accuracy)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.score(batch, self.test_accuracy)

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy generation from the left-padded prompts with their images spliced in."""
        tok = self.require_tokenizer()
        with root_unsharded(self.model):  # FSDP2: embed and generate do not go through model(...)
            prompt_ids, prompt_mask = generation_prompt(batch)  # (B, P) each, left-padded
            embeds, mask, _ = self.model.embed(prompt_ids, prompt_mask, batch["image_counts"], batch["images"],
                                               left_pad=True)
            out = self.model.language_model.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=self.hparams.max_new_tokens,
                num_beams=self.hparams.num_beams, do_sample=False, pad_token_id=tok.pad_token_id,
                eos_token_id=_stop_ids(tok),
            )
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    def is_correct(self, task: str, text: str, answer: str) -> bool:
        """Exact match after lower-casing, trimming a final period and collapsing whitespace."""
        return _normalise(text) == _normalise(answer)

    def log_test_accuracy(self, results: dict[str, Any]) -> None:
        self.log("test_acc", results["average"])

    # ------------------------------------------------------------------ optimisation, checkpoints, export
    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups() if self.adapter is not None else []
        proj = [p for n, p in self.named_parameters() if PROJECTOR_PREFIX in n]
        if self.hparams.train_projector:
            groups.append({"name": "projector", "params": proj, "lr": self.hparams.lr_projector})
        return groups

    def keep_in_checkpoint(self, key: str) -> bool:
        return PROJECTOR_PREFIX in key

    def export(self, out: Path) -> None:
        """``mm_projector.safetensors`` and, in stage 2, the adapter (every rank gathers, rank 0 writes)."""
        state = {k: full_cpu(v) for k, v in self.model.mm_projector.state_dict().items()}
        if self.trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out / "mm_projector.safetensors"))
        if self.adapter is not None:
            save_adapter(self.model, out / "adapter")


def _stop_ids(tok: Any) -> list[int]:
    ids = [tok.eos_token_id]
    eot = tok.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tok.get_vocab() else None
    return ids + ([eot] if eot is not None else [])


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())
