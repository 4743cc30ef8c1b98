"""The multimodal projector: maps vision tower patch features into the LLM's embedding space.

LLaVA-1.5 uses `mlp2x_gelu` (Linear(d_vision, d_llm), GELU, Linear(d_llm, d_llm)); LLaVA-1 used a single
`linear` layer. Both act on every patch independently: (B, P, d_vision) -> (B, P, d_llm).
"""

from __future__ import annotations

from torch import nn

__all__ = ["PROJECTOR_KINDS", "build_projector"]

PROJECTOR_KINDS: tuple[str, ...] = ("mlp2x_gelu", "linear")


def build_projector(kind: str, d_vision: int, d_llm: int) -> nn.Module:
    """A freshly initialised projector of the given kind.

    Raises:
        ValueError: unknown `kind`, or a non-positive dimension.
    """
    if d_vision <= 0 or d_llm <= 0:
        raise ValueError(f"projector dimensions must be positive, got d_vision={d_vision}, d_llm={d_llm}")
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(d_vision, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))
    if kind == "linear":
        return nn.Linear(d_vision, d_llm)
    raise ValueError(f"unknown projector kind {kind!r}; choose one of {', '.join(PROJECTOR_KINDS)}")
