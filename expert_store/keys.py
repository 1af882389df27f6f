"""Small value types that cross module boundaries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class ExpertKey:
    """One routed expert of one MoE layer. ``layer`` is the decoder layer index in the model."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"layer {self.layer}, expert {self.expert}"
