"""VisionTower on the tiny open_clip architecture: shapes, CLS dropped, layer choice, frozen, weight files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from effilora_lightning.models.vision_tower import TINY_VIT, VisionTower

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tower() -> VisionTower:
    torch.manual_seed(0)
    return VisionTower(TINY_VIT)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def manual_blocks(tower: VisionTower, images: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Embeddings (CLS first) through the first n blocks, computed by hand from the open_clip modules."""
    x = tower.visual._embeds(images)  # (B, 1 + P, D)
    for block in tower.visual.transformer.resblocks[:n_blocks]:
        x = block(x)
    return x


def test_output_is_patch_tokens_of_second_to_last_block(tower, images):
    out = tower(images)
    assert (tower.hidden_size, tower.num_patches, tower.image_size) == (64, 64, 64)
    assert out.shape == (2, 64, 64)  # (B, (64 / 8) ** 2 patches, width)
    with torch.no_grad():
        ref = manual_blocks(tower, images, 2)  # 3 blocks: -2 is the output of block 1
    assert ref.shape[1] == 65
    torch.testing.assert_close(out, ref[:, 1:])  # CLS (position 0) dropped
    assert len(tower.visual.transformer.resblocks) == 2  # the last block never runs: not even kept


def test_empty_batch_gives_zero_rows(tower):
    out = tower(torch.zeros(0, 3, 64, 64))
    assert out.shape == (0, 64, 64) and out.dtype == torch.float32


def test_layer_selection_changes_the_output(images):
    torch.manual_seed(0)
    last = VisionTower(TINY_VIT, select_layer=-1)
    torch.manual_seed(0)
    second = VisionTower(TINY_VIT, select_layer=1)  # same as -2
    assert not torch.allclose(last(images), second(images))
    with torch.no_grad():
        torch.testing.assert_close(last(images), manual_blocks(last, images, 3)[:, 1:])
    with pytest.raises(ValueError, match="select_layer=3 is out of range for 'effilora-tiny-vit', which has 3 blocks"):
        VisionTower(TINY_VIT, select_layer=3)


def test_frozen_no_grad_and_stays_in_eval(tower, images):
    assert all(not p.requires_grad for p in tower.parameters())
    x = images.clone().requires_grad_(True)
    out = tower(x)
    assert not out.requires_grad and out.grad_fn is None
    tower.train()
    assert tower.training and not tower.visual.training
    assert not hasattr(tower, "text") and not hasattr(tower.visual, "token_embedding")  # only the vision tower


def full_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """Every `visual.*` tensor of a randomly initialised tiny open_clip model, as a weight file holds them."""
    torch.manual_seed(seed)
    return {f"visual.{k}": v.contiguous() for k, v in open_clip.create_model(TINY_VIT).visual.state_dict().items()}


def test_weights_round_trip_and_mismatch_names_file_and_architecture(images, tmp_path):
    state = full_state()
    save_file(state, str(tmp_path / "tower.safetensors"))
    for layer in (-1, -2):
        loaded = VisionTower(TINY_VIT, pretrained=str(tmp_path / "tower.safetensors"), select_layer=layer)
        assert all(torch.equal(v, state[f"visual.{k}"]) for k, v in loaded.visual.state_dict().items())
        assert len(loaded.visual.state_dict()) == len(state) - (12 if layer == -2 else 0)  # block 2 dropped
    state["visual.conv1.weight"] = state["visual.conv1.weight"][:32]  # a narrower tower's patch embedding
    save_file(state, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match=r"narrow\.safetensors do not match open_clip architecture 'effilora-tiny"):
        VisionTower(TINY_VIT, pretrained=str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match=r"tower\.safetensors do not match open_clip architecture 'ViT-S-32'"):
        VisionTower("ViT-S-32", pretrained=str(tmp_path / "tower.safetensors"))


def test_openai_torchscript_archive_loads(images, tmp_path):
    torch.manual_seed(2)
    clip = open_clip.create_model(TINY_VIT, force_quick_gelu=True).eval()  # full CLIP, text tower included
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but OpenAI's releases are TorchScript
        torch.jit.save(torch.jit.script(clip), str(tmp_path / "ViT-tiny.pt"))
    tower = VisionTower(TINY_VIT, pretrained=str(tmp_path / "ViT-tiny.pt"), force_quick_gelu=True)
    assert tower.quick_gelu
    torch.testing.assert_close(tower.visual.conv1.weight, clip.visual.conv1.weight)
    with torch.no_grad():
        ref = clip.visual.forward_intermediates(images, indices=[1], intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(tower(images), ref["image_intermediates"][0], atol=1e-5, rtol=1e-5)


def test_sidecar_config_sets_quick_gelu_and_mean_std(tower, tmp_path):
    save_file(full_state(), str(tmp_path / "w.safetensors"))
    sidecar = {"model_cfg": {"quick_gelu": True},
               "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(sidecar))
    loaded = VisionTower(TINY_VIT, pretrained=str(tmp_path / "w.safetensors"))
    assert loaded.quick_gelu and type(loaded.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert (loaded.image_mean, loaded.image_std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert not VisionTower(TINY_VIT, pretrained=str(tmp_path / "w.safetensors"), force_quick_gelu=False).quick_gelu
    assert tower.image_mean == tuple(open_clip.OPENAI_DATASET_MEAN) and not tower.quick_gelu  # random init default


def test_weights_decide_quick_gelu_and_mean_std_from_open_clips_registry(caplog):
    from effilora_lightning.models.vision_tower import _decide_mean_std, _decide_quick_gelu

    weights = Path("/weights/model.pt")
    cfg = open_clip.get_model_config("ViT-L-14-336")
    assert _decide_quick_gelu("ViT-L-14-336", cfg, {}, weights, None)  # only OpenAI weights exist for it
    assert not _decide_quick_gelu("ViT-L-14-336", cfg, {}, None, None)  # random init: the config's GELU
    assert not _decide_quick_gelu("ViT-L-14-336", cfg, {}, weights, False)  # explicit wins
    assert not _decide_quick_gelu("ViT-L-14", open_clip.get_model_config("ViT-L-14"), {}, weights, None)
    assert "OpenAI weights need force_quick_gelu=True" in caplog.text  # ViT-L-14 has OpenAI and LAION weights
    assert _decide_mean_std("ViT-B-16-SigLIP", {}, weights) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    openai = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert _decide_mean_std("ViT-L-14-336", {}, weights) == openai


def test_no_download_for_directories_tags_or_missing_files(tmp_path):
    with pytest.raises(ValueError, match=f"pretrained='{tmp_path}' is a directory.*No download is attempted"):
        VisionTower(TINY_VIT, pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="'openai' is an open_clip hub tag for 'ViT-L-14-336'.*No download"):
        VisionTower("ViT-L-14-336", pretrained="openai")
    with pytest.raises(FileNotFoundError, match=r"weight file not found: .*nope\.pt .*No download is attempted"):
        VisionTower(TINY_VIT, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Q-99'"):
        VisionTower("ViT-Q-99")
    with pytest.raises(ValueError, match="'RN50' builds a ModifiedResNet, which has no patch tokens"):
        VisionTower("RN50")


@pytest.mark.skipif(not (ROOT / "data/checkpoints/tiny-clip/open_clip_model.safetensors").is_file(),
                    reason="run data/scripts/make_tiny_clip.py")
def test_bundled_tiny_clip_weights_load():
    tower = VisionTower(TINY_VIT, pretrained=str(ROOT / "data/checkpoints/tiny-clip/open_clip_model.safetensors"))
    assert (tower.num_patches, tower.hidden_size, tower.quick_gelu) == (64, 64, False)
    assert tower.image_mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    out = tower(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 64, 64) and torch.isfinite(out).all()
