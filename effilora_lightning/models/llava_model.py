"""LlavaModel: the assembled LLaVA-style model, and the stage-1 projector's load and initial scale.

    images (N, 3, S, S) -> VisionTower (frozen, no grad) -> (N, P, d_vision) -> mm_projector -> (N, P, d_llm)
    input_ids with IMAGE_TOKEN_INDEX placeholders -> text embeddings, each placeholder replaced by its P features
    -> language_model (a Hugging Face causal LM; adapters go there only) -> loss on assistant tokens
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..adapters.export import read_safetensors
from ..data.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, pad
from ..losses import find_loss_head
from .vision_tower import VisionTower

__all__ = ["LlavaModel", "load_projector", "match_embedding_scale"]


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


def load_projector(projector: nn.Module, path: str) -> None:
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
def match_embedding_scale(projector: nn.Module, embeddings: torch.Tensor) -> None:
    """Shrink a fresh projector's last layer to the LLM's embedding scale.

    A default-initialised projector emits tokens of RMS ~1 while LLM token embeddings are far smaller
    (0.02 on a freshly initialised LLaMA): image tokens would drown the text until stage 1 rescales them.
    """
    last = [m for m in projector.modules() if isinstance(m, nn.Linear)][-1]
    scale = float(embeddings.float().pow(2).mean().sqrt())
    last.weight.mul_(scale)
    if last.bias is not None:
        last.bias.mul_(scale)
