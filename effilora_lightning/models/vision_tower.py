"""A frozen open_clip vision tower that returns patch features from an intermediate layer (LLaVA-style).

    images (B, 3, H, W) -> open_clip ViT blocks 0..L-1 -> block `select_layer` output, CLS dropped
                                                          -> (B, num_patches, hidden_size)

LLaVA-1.5 takes CLIP ViT-L/14 at 336 px from the second-to-last block (24 x 24 = 576 patch tokens of width
1024); `select_layer=-2` is that block here too (open_clip counts blocks the way Hugging Face's
`hidden_states[-2]` does once the embedding output is left out).

Only the vision tower is built (open_clip's own `_build_vision_tower`, the function `CLIP.__init__` calls),
so the text tower never takes memory and a config with a Hugging Face text model never reaches for the
network. Weights come from a local FILE only:

- OpenAI's TorchScript archives (`ViT-L-14-336px.pt`), open_clip checkpoints (`.bin`, `.pt`, `.pth`) and
  `.safetensors`; keys under `visual.` are taken, a vision-only state dict (no `visual.` prefix) is taken whole.
- A directory, a hub tag ("openai") or a missing path is an error that names the path: nothing is downloaded.
- A file that does not fit the architecture is an error that names both.

Preprocessing (`image_size`, `image_mean`, `image_std`) and QuickGELU are decided, in order, by:
1. an explicit argument (`image_size`, `force_quick_gelu`);
2. an `open_clip_config.json` next to the weight file (open_clip's own hub layout: `model_cfg.quick_gelu`,
   `preprocess_cfg.mean/std`), which `data/scripts/make_tiny_clip.py` writes for the bundled tower;
3. open_clip's registry of published weights for the architecture, when all of them agree (ViT-L-14-336 has
   only OpenAI weights: QuickGELU and the OpenAI mean/std);
4. the architecture config (`quick_gelu`, default False) and open_clip's default OpenAI mean/std.
OpenAI weights run with GELU instead of QuickGELU give features that are silently wrong, hence step 3.

The bundled tiny architecture `effilora-tiny-vit` (64 px, 8 px patches, 3 blocks of width 64: 64 patch
tokens) is registered with open_clip from `open_clip_configs/effilora-tiny-vit.json` on import, so
`open_clip.create_model("effilora-tiny-vit")` works as well.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from open_clip.model import _build_vision_tower, resize_pos_embed
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["TINY_VIT", "VisionTower"]

log = logging.getLogger(__name__)

TINY_VIT = "effilora-tiny-vit"
"""Name of the bundled tiny architecture (demo and tests)."""

_CONFIG_DIR = Path(__file__).resolve().parent / "open_clip_configs"
_SIDECAR = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NO_PATCHES = (
    "open_clip architecture {model_name!r} builds a {kind}, which has no patch tokens; "
    "use a ViT architecture (e.g. ViT-L-14-336)"
)

open_clip.add_model_config(_CONFIG_DIR)


class VisionTower(nn.Module):
    """Frozen open_clip vision tower returning `(B, num_patches, hidden_size)` features of one block.

    Args:
        model_name: an open_clip architecture name (`open_clip.list_models()`), e.g. "ViT-L-14-336", or
            "effilora-tiny-vit".
        pretrained: path to a local weight FILE, or None for a random init (tests).
        select_layer: which block's output to return, Python-style index (-2: second to last, as LLaVA).
        image_size: input size override; learned position embeddings of a loaded file are interpolated.
        force_quick_gelu: True/False to force the activation; None decides as the module docstring says.
        load_weights: False builds the architecture only (e.g. on the meta device, for ranks that receive rank
            0's weights); ``pretrained``'s sidecar still decides the activation and normalisation.

    Raises:
        FileNotFoundError: `pretrained` does not exist.
        ValueError: `pretrained` is a directory or a hub tag, the file does not fit the architecture, the
            architecture is unknown or has no patch tokens, or `select_layer` is out of range.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        select_layer: int = -2,
        image_size: int | None = None,
        force_quick_gelu: bool | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        model_cfg = _architecture_config(model_name)
        weights = _resolve_weight_file(model_name, pretrained)
        sidecar = _read_sidecar(weights)
        self.quick_gelu = _decide_quick_gelu(model_name, model_cfg, sidecar, weights, force_quick_gelu)
        vision_cfg = dict(model_cfg["vision_cfg"], timm_model_pretrained=False)  # never download timm weights
        if image_size is not None:
            vision_cfg["image_size"] = image_size
        self.model_name = model_name
        self.visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=self.quick_gelu)
        if weights is not None and load_weights:
            _load_visual_weights(self.visual, weights, model_name, interpolate_pos=image_size is not None)
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.hidden_size, self.num_patches, num_blocks, self.image_size = _geometry(self.visual, model_name)
        self.select_layer = select_layer
        self._block_index = _block_index(select_layer, num_blocks, model_name)
        _drop_blocks_after(self.visual, self._block_index)
        self.image_mean, self.image_std = _decide_mean_std(model_name, sidecar, weights)
        log.info(
            "vision tower %s (%s): %d patches x %d from block %d of %d, quick_gelu=%s, mean=%s std=%s",
            model_name, weights or "random init", self.num_patches, self.hidden_size, self._block_index,
            num_blocks, self.quick_gelu, self.image_mean, self.image_std,
        )

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the tower's weights; images are cast to it."""
        return next(self.visual.parameters()).dtype

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks that run (those up to ``select_layer``), in order: the units to shard."""
        transformer = getattr(self.visual, "transformer", None)
        return list(getattr(transformer, "resblocks", []))

    def train(self, mode: bool = True) -> VisionTower:
        """Keep the frozen tower in eval mode (no patch dropout) whatever the parent module asks."""
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Patch features of the selected block, CLS (prefix) tokens dropped, no autograd graph. An empty batch
        (a text-only training batch) gives (0, num_patches, hidden_size), so the projector still runs."""
        if images.shape[0] == 0:
            return torch.zeros(0, self.num_patches, self.hidden_size, dtype=self.dtype, device=images.device)
        out = self.visual.forward_intermediates(
            images.to(self.dtype),  # (B, 3, H, W)
            indices=[self._block_index],
            stop_early=True,  # blocks after the selected one are never run
            intermediates_only=True,
            output_fmt="NLC",
        )
        return out["image_intermediates"][0]  # (B, num_patches, hidden_size)


def _architecture_config(model_name: str) -> dict[str, Any]:
    """open_clip's config for a registered architecture name, or a ValueError listing the known names."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None or ":" in model_name:
        raise ValueError(
            f"unknown open_clip architecture {model_name!r} (hub/local-dir schemas are not supported: "
            f"pass an architecture name and a weight file). Known: {', '.join(open_clip.list_models())}"
        )
    if isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        raise ValueError(_NO_PATCHES.format(model_name=model_name, kind="ModifiedResNet"))
    return cfg


def _resolve_weight_file(model_name: str, pretrained: str | None) -> Path | None:
    """The local weight file to load, after refusing directories, hub tags and missing paths."""
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.is_dir():
        raise ValueError(
            f"vision tower pretrained={pretrained!r} is a directory; pass the weight FILE inside it "
            f"(one of {', '.join(_WEIGHT_SUFFIXES)}). No download is attempted."
        )
    if path.is_file():
        return path.resolve()  # absolute: a file named like a tag ("openai") must never be read as one
    if pretrained in list_pretrained_tags_by_model(model_name):
        raise ValueError(
            f"vision tower pretrained={pretrained!r} is an open_clip hub tag for {model_name!r}, not a local "
            f"file. No download is attempted: fetch the weights yourself and pass the path of the file."
        )
    raise FileNotFoundError(
        f"vision tower weight file not found: {path} (architecture {model_name!r}). No download is attempted."
    )


def _read_sidecar(weights: Path | None) -> dict[str, Any]:
    """`open_clip_config.json` next to the weight file ({} when absent): carries quick_gelu and mean/std."""
    if weights is None or not (weights.parent / _SIDECAR).is_file():
        return {}
    sidecar_path = weights.parent / _SIDECAR
    try:
        return json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {sidecar_path} next to the vision tower weights: {err}") from err


def _registry_consensus(model_name: str, key: str) -> Any | None:
    """The value of `key` shared by every published weight set of `model_name` in open_clip, else None."""
    values = {repr(get_pretrained_cfg(model_name, tag).get(key)) for tag in list_pretrained_tags_by_model(model_name)}
    if len(values) != 1:
        return None
    return get_pretrained_cfg(model_name, list_pretrained_tags_by_model(model_name)[0]).get(key)


def _decide_quick_gelu(
    model_name: str, model_cfg: dict[str, Any], sidecar: dict[str, Any], weights: Path | None, force: bool | None
) -> bool:
    """QuickGELU on/off: explicit > sidecar > registry consensus (files only) > architecture config."""
    if force is not None:
        return force
    if "quick_gelu" in sidecar.get("model_cfg", {}):
        return bool(sidecar["model_cfg"]["quick_gelu"])
    if weights is not None and _registry_consensus(model_name, "quick_gelu") is not None:
        return bool(_registry_consensus(model_name, "quick_gelu"))
    openai_among_others = "openai" in list_pretrained_tags_by_model(model_name)
    if weights is not None and openai_among_others and not model_cfg.get("quick_gelu"):
        log.warning(
            "%s has OpenAI and non-OpenAI weights in open_clip; using GELU for %s. OpenAI weights need "
            "force_quick_gelu=True.", model_name, weights,
        )
    return bool(model_cfg.get("quick_gelu", False))


def _decide_mean_std(
    model_name: str, sidecar: dict[str, Any], weights: Path | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation the weights were trained with: sidecar > registry consensus > OpenAI default."""
    pre = sidecar.get("preprocess_cfg", {})
    if "mean" in pre and "std" in pre:
        return tuple(map(float, pre["mean"])), tuple(map(float, pre["std"]))
    mean, std = _registry_consensus(model_name, "mean"), _registry_consensus(model_name, "std")
    if weights is not None and mean is not None and std is not None:
        return tuple(map(float, mean)), tuple(map(float, std))
    return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a weight file: safetensors, a TorchScript archive (OpenAI), or a torch.save'd dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        # OpenAI's releases are TorchScript; torch.load(weights_only=True) refuses them, jit.load runs no pickle
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _load_visual_weights(visual: nn.Module, path: Path, model_name: str, interpolate_pos: bool) -> None:
    """Load the `visual.*` tensors of `path` strictly into `visual`; name file and architecture on mismatch."""
    try:
        state = _read_state_dict(path)
    except Exception as err:  # a corrupt or foreign file: say which one
        raise ValueError(f"cannot read vision tower weights {path}: {err}") from err
    if not any(k.startswith("visual.") for k in state):
        state = {f"visual.{k}": v for k, v in state.items()}  # a vision-only state dict
    state = {k: v for k, v in state.items() if k.startswith("visual.")}
    try:
        if interpolate_pos:
            resize_pos_embed(state, SimpleNamespace(visual=visual))
        visual.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()}, strict=True)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"vision tower weights {path} do not match open_clip architecture {model_name!r}; pass the "
            f"architecture the file was trained for. Details: {_short(err)}"
        ) from err


def _short(err: Exception, limit: int = 600) -> str:
    """First `limit` characters of an error message (load_state_dict lists every key)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _geometry(visual: nn.Module, model_name: str) -> tuple[int, int, int, int]:
    """(hidden_size, num_patches, num_blocks, image_size) of a ViT tower; other towers have no patch tokens."""
    if isinstance(visual, VisionTransformer):
        grid_h, grid_w = visual.grid_size
        return visual.transformer.width, grid_h * grid_w, len(visual.transformer.resblocks), visual.image_size[0]
    if isinstance(visual, TimmModel) and hasattr(visual.trunk, "patch_embed"):
        trunk = visual.trunk
        return trunk.num_features, trunk.patch_embed.num_patches, len(trunk.blocks), trunk.patch_embed.img_size[0]
    raise ValueError(_NO_PATCHES.format(model_name=model_name, kind=type(visual).__name__))


def _drop_blocks_after(visual: nn.Module, block_index: int) -> None:
    """Blocks after the selected one never run: free them (ViT-L/14-336 at -2: one block, 12.6M parameters)."""
    if isinstance(visual, VisionTransformer):
        visual.transformer.prune_intermediate_layers([block_index])


def _block_index(select_layer: int, num_blocks: int, model_name: str) -> int:
    """Absolute block index of a Python-style `select_layer`, validated against the tower depth."""
    index = select_layer + num_blocks if select_layer < 0 else select_layer
    if not 0 <= index < num_blocks:
        raise ValueError(
            f"select_layer={select_layer} is out of range for {model_name!r}, which has {num_blocks} blocks "
            f"(valid: {-num_blocks}..{num_blocks - 1})"
        )
    return index
