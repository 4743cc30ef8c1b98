"""VisionLanguageModule: LLaVA-style visual instruction tuning — open_clip tower + projector + LLaMA + adapter.

    images (N, 3, S, S) ─► VisionTower (frozen, no grad) ─► (N, P, d_vision) ─► mm_projector ─► (N, P, d_llm)
    input_ids with IMAGE_TOKEN_INDEX placeholders ─► text embeddings, each placeholder replaced by its P features
    ─► LLaMA (+ adapter on the LLM only) ─► loss on assistant tokens

Stage 1 (``adapter: null``): only the projector trains. Stage 2: projector (its own lr) + adapter, loading the
stage-1 projector from ``projector_path``. The vision tower and the LLM base are always frozen; adapters never
touch the tower or the projector (``exclude_vision``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..adapters import AdapterConfig, apply_adapter
from ..adapters.export import full_cpu, read_safetensors, save_adapter
from ..data.batch import generation_prompt, is_generation_batch, pad
from ..data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..losses import find_loss_head
from ..metrics import TaskAccuracy
from .causal_lm import CausalLMModule, load_causal_lm
from .projector import build_projector
from .settings import check_settings
from .sharding import gathered_for_export, root_unsharded, shard_model
from .vision_tower import VisionTower

__all__ = ["LlavaModel", "VisionLanguageModule"]

PROJECTOR_PREFIX = "mm_projector."
TASK = "vqa"


class LlavaModel(nn.Module):
    """The assembled model: ``language_model`` (a HF causal LM), ``vision_tower``, ``mm_projector``."""

    def __init__(self, language_model: PreTrainedModel, vision_tower: VisionTower, projector: nn.Module) -> None:
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.mm_projector = projector

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, d_llm). N = 0 still runs the projector (every parameter takes part)."""
        feats = self.vision_tower(images)  # (N, P, d_vision), no grad
        proj_dtype = next(self.mm_projector.parameters()).dtype
        return self.mm_projector(feats.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_counts: torch.Tensor,
              images: torch.Tensor, labels: torch.Tensor | None = None, left_pad: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace every placeholder by its image's P feature rows; re-pad. Returns (embeds, mask, labels)."""
        feats = self.image_features(images)  # (N, P, D)
        table = self.language_model.get_input_embeddings()
        rows, masks, labs = [], [], []
        offset = 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids = input_ids[b][keep]  # (t,) real tokens of sample b
            lab = labels[b][keep] if labels is not None else None
            n_img = int(image_counts[b])
            emb, lab_out = _splice(ids, lab, feats[offset:offset + n_img], table)
            offset += n_img
            rows.append(emb)
            labs.append(lab_out)
            masks.append(torch.ones(emb.shape[0], dtype=attention_mask.dtype, device=emb.device))
        side = "left" if left_pad else "right"
        embeds = pad(rows, 0.0, side)  # (B, T', D)
        mask = pad(masks, 0, side)  # (B, T')
        out_labels = pad(labs, IGNORE_INDEX, side) if labels is not None else None
        if feats.shape[0] == 0:  # text-only batch: keep the projector in the graph with a zero contribution
            embeds = embeds + feats.sum() * 0.0
        return embeds, mask, out_labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor,
                image_counts: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> Any:
        embeds, mask, labels = self.embed(input_ids, attention_mask, image_counts, images, labels)
        head = find_loss_head(self.language_model) if labels is not None else None
        if head is None:
            return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        with head.computing_loss(labels):  # chunked: the head returns the mean loss as HF's `logits`
            loss = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        return CausalLMOutputWithPast(loss=loss)


def _splice(ids: torch.Tensor, labels: torch.Tensor | None, feats: torch.Tensor, table: nn.Embedding
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sample: text embeddings with each IMAGE_TOKEN_INDEX position replaced by (P, D) features."""
    where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(where) != feats.shape[0]:
        raise ValueError(f"{len(where)} image placeholders but {feats.shape[0]} images in one sample.")
    text = table(ids.clamp_min(0))  # (t, D); placeholders embedded as id 0, then replaced
    parts, lab_parts, start = [], [], 0
    for i, pos in enumerate(where):
        parts += [text[start:pos], feats[i].to(text.dtype)]
        if labels is not None:
            lab_parts += [labels[start:pos], labels.new_full((feats.shape[1],), IGNORE_INDEX)]
        start = pos + 1
    parts.append(text[start:])
    if labels is not None:
        lab_parts.append(labels[start:])
    return torch.cat(parts), (torch.cat(lab_parts) if labels is not None else None)


class VisionLanguageModule(CausalLMModule):
    """LLaVA-style training: frozen open_clip tower, trainable projector, adapted (or frozen) LLaMA.

    Args (besides CausalLMModule's):
        adapter: the LLM's adapter for stage 2; None for stage 1 (projector only).
        vision_tower: open_clip architecture name (``ViT-L-14-336`` for LLaVA-1.5, ``effilora-tiny-vit`` demo).
        vision_pretrained: local weight FILE of the tower (never a hub tag); None = random init.
        select_layer: tower block whose patch features are used (-2 = second to last, as LLaVA).
        projector: ``mlp2x_gelu`` (LLaVA-1.5) or ``linear``.
        projector_path: stage-1 projector (``mm_projector.safetensors``) to start from.
        lr_projector: learning rate of the projector (stage 1: 1e-3; stage 2: 2e-5).
        train_projector: False freezes the projector too.
        image_size: must match the datamodule's preprocessing (checked at setup when given).
    """

    requires_adapter = False

    def __init__(
        self,
        adapter: AdapterConfig | None = None,
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
        self.val_accuracy = TaskAccuracy([TASK])
        self.test_accuracy = TaskAccuracy([TASK])

    def _configure_model(self) -> None:  # CausalLMModule.configure_model: once, then check_inputs_fit_model
        self._check_strategy()
        hp = self.hparams
        llm = load_causal_lm(hp.model_path, hp.model_config, hp.dtype, hp.init_seed)
        tower = VisionTower(hp.vision_tower, hp.vision_pretrained, hp.select_layer)
        with torch.random.fork_rng(devices=[]):  # seeded: every rank and every fresh run start alike
            torch.manual_seed(hp.init_seed)
            proj = build_projector(hp.projector, tower.hidden_size, llm.config.hidden_size)
        if hp.projector_path:
            _load_projector(proj, hp.projector_path)
        else:
            _match_embedding_scale(proj, llm.get_input_embeddings().weight)
        model = LlavaModel(llm, tower, proj)
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        if self.adapter is not None:
            self.adapter_report = apply_adapter(model, self.adapter)
            rank_zero_info(str(self.adapter_report))
        self._install_loss_head(llm)
        model.mm_projector.requires_grad_(hp.train_projector)
        if hp.gradient_checkpointing:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            shard_model(model, mesh["data_parallel"], hp.fsdp_param_dtype, extra_units=self.extra_fsdp_units())
        fsdp1 = self._fsdp1_strategy()
        if fsdp1 is not None:
            self._configure_fsdp1(fsdp1, rank0_load=False)

    def extra_fsdp_units(self) -> list[nn.Module]:
        """The vision tower's transformer blocks: each its own FSDP group (FSDP2) or unit (FSDP1), so the frozen
        tower is gathered one block at a time instead of whole with the root."""
        return self.model.vision_tower.blocks()

    def check_inputs_fit_model(self) -> None:
        """Besides the token ids: the datamodule's image size is the tower's (checked once the tower exists, at
        the end of configure_model, so a mismatch fails before step 1 instead of in its first forward)."""
        super().check_inputs_fit_model()
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
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
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch["sample_id"]))
        self.log_padding_fraction(batch)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self._batch_loss(batch), prog_bar=True, sync_dist=True, batch_size=len(batch["sample_id"]))
        if is_generation_batch(batch):
            self._score(batch, self.val_accuracy)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._score(batch, self.test_accuracy)

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy generation from the left-padded prompts with their images spliced in."""
        tok = self._require_tokenizer()
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

    def _score(self, batch: dict[str, Any], metric: TaskAccuracy) -> None:
        texts = self.generate_answers(batch)
        correct = [_normalise(t) == _normalise(a) for t, a in zip(texts, batch["answer"])]
        metric.update(batch["task"], torch.tensor(correct, device=self.device), batch["sample_id"])

    def on_test_epoch_end(self) -> None:
        results = self.test_accuracy.compute()
        counts = self.test_accuracy.counts()
        self.log("test_acc", results["average"])
        self._report_test(results, counts)

    # ------------------------------------------------------------------ optimisation, checkpoints, export
    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups() if self.adapter is not None else []
        proj = [p for n, p in self.named_parameters() if PROJECTOR_PREFIX in n]
        if self.hparams.train_projector:
            groups.append({"name": "projector", "params": proj, "lr": self.hparams.lr_projector})
        return groups

    def keep_in_checkpoint(self, key: str) -> bool:
        return PROJECTOR_PREFIX in key

    def on_train_end(self) -> None:
        if self.hparams.export_dir is None:
            return
        out = Path(self.hparams.export_dir)
        with gathered_for_export(self.trainer.strategy.model):
            # every rank gathers (FSDP2 DTensors: a collective), rank 0 writes
            state = {k: full_cpu(v) for k, v in self.model.mm_projector.state_dict().items()}
            if self.trainer.is_global_zero:
                out.mkdir(parents=True, exist_ok=True)
                save_file(state, str(out / "mm_projector.safetensors"))
            if self.adapter is not None:
                save_adapter(self.model, out / "adapter")
        rank_zero_info(f"Projector{' and adapter' if self.adapter else ''} written to {out}")


def _load_projector(projector: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"No stage-1 projector at {file}: run stage 1 first (it writes "
                                "<export_dir>/mm_projector.safetensors) or drop projector_path.")
    state = read_safetensors(file)
    own = projector.state_dict()
    for k, v in state.items():
        if k not in own or own[k].shape != v.shape:
            raise ValueError(f"{file}: '{k}' {tuple(v.shape)} does not fit this projector "
                             f"({tuple(own[k].shape) if k in own else 'missing'}); same vision tower and LLM?")
    projector.load_state_dict(state)


@torch.no_grad()
def _match_embedding_scale(projector: nn.Module, embeddings: torch.Tensor) -> None:
    """Shrink a fresh projector's last layer to the LLM's embedding scale.

    A default-initialised projector emits tokens of RMS ~1 while LLM token embeddings are far smaller
    (0.02 on a freshly initialised LLaMA): image tokens would drown the text until stage 1 rescales them.
    """
    last = [m for m in projector.modules() if isinstance(m, nn.Linear)][-1]
    scale = float(embeddings.float().pow(2).mean().sqrt())
    last.weight.mul_(scale)
    if last.bias is not None:
        last.bias.mul_(scale)


def _stop_ids(tok: Any) -> list[int]:
    ids = [tok.eos_token_id]
    eot = tok.convert_tokens_to_ids("<|eot_id|>") if "<|eot_id|>" in tok.get_vocab() else None
    return ids + ([eot] if eot is not None else [])


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())

