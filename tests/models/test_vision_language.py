"""VisionLanguageModule on the bundled tiny tower and LLaMA: placement of image features, label masks,
adapters only on the LLM, text-only samples, and the stage-1 -> stage-2 projector hand-over."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from effilora_lightning import EffiLoRAConfig, LoRAConfig, VisionLanguageModule, VisualInstructionDataModule
from effilora_lightning.adapters import AdapterLinear, is_adapter_param
from effilora_lightning.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX

ROOT = Path(__file__).resolve().parents[2]
TOWER = dict(vision_tower="effilora-tiny-vit", vision_pretrained=str(ROOT / "data/tiny-clip/open_clip_model.safetensors"))


def _module(adapter=None, **kw) -> VisionLanguageModule:
    module = VisionLanguageModule(adapter=adapter, model_path=str(ROOT / "data/tiny-llama"), **TOWER, **kw)
    module.configure_model()
    return module


def _datamodule(**kw) -> VisualInstructionDataModule:
    args = dict(data_path=str(ROOT / "data/llava/llava_train.json"), image_folder=str(ROOT / "data/llava"),
                tokenizer_path=str(ROOT / "data/tiny-llama"), image_size=64, max_length=256, val_set_size=8,
                batch_size=8, eval_batch_size=8, system_prompt="")
    args.update(kw)
    return VisualInstructionDataModule(**args)


def test_adapters_only_on_the_llm_tower_frozen_projector_trains():
    module = _module(LoRAConfig(rank=4, target_modules="all-linear"))
    wrapped = [n for n, m in module.model.named_modules() if isinstance(m, AdapterLinear)]
    assert wrapped and all(n.startswith("language_model.") for n in wrapped)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not is_adapter_param(n)} == {
        n for n, _ in module.model.named_parameters() if n.startswith("mm_projector.")}
    assert not any(p.requires_grad for p in module.model.vision_tower.parameters())


def test_image_features_replace_the_placeholder_and_labels_mask_them():
    module = _module(EffiLoRAConfig(rank=4))
    model = module.model
    P = model.vision_tower.num_patches
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8], [9, 10, 11, 0]])  # sample 1 is text-only and padded
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 10, 11, -100]])
    images = torch.randn(1, 3, 64, 64)
    embeds, new_mask, new_labels = model.embed(ids, mask, torch.tensor([1, 0]), images, labels)
    assert embeds.shape[:2] == (2, 3 + P) and new_mask.tolist()[1] == [1] * 3 + [0] * P
    table = model.language_model.get_input_embeddings()
    feats = model.image_features(images)[0]
    torch.testing.assert_close(embeds[0, 1:1 + P], feats)
    torch.testing.assert_close(embeds[0, 0], table.weight[5])
    torch.testing.assert_close(embeds[0, 1 + P], table.weight[7])
    assert new_labels[0].tolist() == [-100] + [IGNORE_INDEX] * P + [7, 8]
    assert new_labels[1, :3].tolist() == [-100, 10, 11]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        model.embed(torch.tensor([[IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]]), torch.ones(1, 2, dtype=torch.long),
                    torch.tensor([1]), images)


def test_text_only_batch_still_runs_the_projector():
    module = _module(LoRAConfig(rank=4))
    ids = torch.tensor([[5, 6, 7]])
    out = module.model(ids, torch.ones_like(ids), torch.zeros(0, 3, 64, 64), torch.tensor([0]), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in module.model.mm_projector.parameters())


def test_stage1_trains_the_projector_only_and_stage2_loads_it(tmp_path):
    stage1 = _module(None, lr_projector=1e-3, export_dir=str(tmp_path / "stage1"))
    before = {n: p.detach().clone() for n, p in stage1.model.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(stage1, datamodule=_datamodule())
    changed = {n for n, p in stage1.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("mm_projector.")}
    file = tmp_path / "stage1" / "mm_projector.safetensors"
    stage2 = _module(EffiLoRAConfig(rank=4), projector_path=str(file))
    for (n, a), b in zip(stage1.model.mm_projector.state_dict().items(), stage2.model.mm_projector.state_dict().values()):
        assert torch.equal(a, b), n
    groups = {g["name"]: g["lr"] for g in stage2.param_groups()}
    assert groups["projector"] == 2e-5 and "shared_a" in groups and "b" in groups


def test_missing_stage1_projector_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No stage-1 projector at .*nope.safetensors"):
        _module(EffiLoRAConfig(rank=4), projector_path=str(tmp_path / "nope.safetensors"))
