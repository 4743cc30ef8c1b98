"""build_projector: LLaVA-1.5's mlp2x_gelu and LLaVA-1's linear, per patch, and a clear error otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effilora_lightning.models.projector import build_projector


def test_mlp2x_gelu_layout_and_shape():
    proj = build_projector("mlp2x_gelu", 24, 40)
    assert [type(m) for m in proj] == [nn.Linear, nn.GELU, nn.Linear]
    assert (proj[0].in_features, proj[0].out_features, proj[2].in_features, proj[2].out_features) == (24, 40, 40, 40)
    assert sum(p.numel() for p in proj.parameters()) == 24 * 40 + 40 + 40 * 40 + 40
    x = torch.randn(2, 7, 24)  # (B, patches, d_vision)
    out = proj(x)
    assert out.shape == (2, 7, 40)
    torch.testing.assert_close(out, proj[2](torch.nn.functional.gelu(proj[0](x))))


def test_linear_acts_on_each_patch_alone():
    proj = build_projector("linear", 24, 40)
    assert isinstance(proj, nn.Linear) and sum(p.numel() for p in proj.parameters()) == 24 * 40 + 40
    x = torch.randn(1, 5, 24)
    torch.testing.assert_close(proj(x)[:, 3], proj(x[:, 3]))


def test_unknown_kind_and_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown projector kind 'mlp3x_gelu'; choose one of mlp2x_gelu, linear"):
        build_projector("mlp3x_gelu", 24, 40)
    with pytest.raises(ValueError, match="d_vision=0, d_llm=40"):
        build_projector("linear", 0, 40)
