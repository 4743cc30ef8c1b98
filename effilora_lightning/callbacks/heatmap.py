"""A PNG of which units trained at which optimizer step (dark = trained), drawn with Pillow only."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

__all__ = ["write_selection_heatmap"]

_MAX_COLS = 1200
_MARGIN_LEFT, _MARGIN_TOP = 150, 24


def write_selection_heatmap(history: torch.Tensor, unit_names: list[str], path: str | Path) -> Path:
    """history: (steps, units) bool. Long runs are averaged into at most 1200 columns (grey = partly trained)."""
    steps, units = history.shape
    share = history.float().t()  # (U, S): 1.0 = trained
    if steps > _MAX_COLS:  # average consecutive steps into columns
        bins = torch.linspace(0, steps, _MAX_COLS + 1).long()
        share = torch.stack([share[:, a:b].mean(1) for a, b in zip(bins[:-1].tolist(), bins[1:].tolist())], 1)
    cols = share.shape[1]
    cell_w, cell_h = max(1, min(12, _MAX_COLS // cols)), max(4, min(24, 480 // units))
    grey = (255 - share * 215).to(torch.uint8)  # trained -> dark
    img = Image.fromarray(grey.repeat_interleave(cell_h, 0).repeat_interleave(cell_w, 1).numpy(), mode="L")
    canvas = Image.new("L", (max(_MARGIN_LEFT + img.width + 10, 460), _MARGIN_TOP + img.height + 20), 255)
    canvas.paste(img, (_MARGIN_LEFT, _MARGIN_TOP))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"EffiLoRA selection: {units} units x {steps} steps (dark = trained)", fill=0)
    for u, name in enumerate(unit_names):
        if cell_h >= 8 or u % max(1, 8 // cell_h) == 0:
            draw.text((4, _MARGIN_TOP + u * cell_h), name[-22:], fill=0)
    draw.text((_MARGIN_LEFT, _MARGIN_TOP + img.height + 4), f"step 0 .. {steps - 1}", fill=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("RGB").save(path)
    return path
