"""What taer must know about each MoE family beyond what transformers' own modules tell it.

The model's module tree (built on the meta device) says which layers are MoE layers and the
experts' shapes; a family adds the on-disk names of per-expert tensors, renames from older
checkpoint layouts, and how its router scores experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from expert_store.errors import UnsupportedFamilyError

Scoring = Literal["softmax", "sigmoid_group"]


@dataclass(frozen=True, slots=True)
class Family:
    """How one model family lays out and routes its experts.

    ``expert_pattern`` matches a per-expert tensor name in a checkpoint and captures
    (layer, expert, projection); ``projections`` maps the captured projection to gate/up/down.
    ``renames`` turn older checkpoint prefixes into the module names of transformers 5.
    """

    model_type: str
    scoring: Scoring
    expert_pattern: re.Pattern[str]
    projections: dict[str, str]
    renames: tuple[tuple[str, str], ...] = ()
    # Softmax routers: renormalise the top-k probabilities (Mixtral always does; others follow
    # ``config.norm_topk_prob``) and whether the weights are cast back to the logits' dtype.
    always_norm_topk: bool = False
    weights_in_logits_dtype: bool = True

    def canonical_name(self, name: str) -> str:
        for old, new in self.renames:
            name = name.replace(old, new)
        return name

    def match_expert(self, name: str) -> tuple[int, int, str] | None:
        """(layer, expert, 'gate'|'up'|'down') for a per-expert tensor name, else None."""
        found = self.expert_pattern.fullmatch(self.canonical_name(name))
        if found is None:
            return None
        layer, expert, proj = found.groups()
        return int(layer), int(expert), self.projections[proj]


_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_MIXTRAL = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3)\.weight")

FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("qwen3_moe", "softmax", _PER_EXPERT, _PROJ),
    "qwen2_moe": Family("qwen2_moe", "softmax", _PER_EXPERT, _PROJ),
    "olmoe": Family("olmoe", "softmax", _PER_EXPERT, _PROJ),
    "mixtral": Family(
        "mixtral",
        "softmax",
        _MIXTRAL,
        {"w1": "gate", "w3": "up", "w2": "down"},
        renames=((".block_sparse_moe.", ".mlp."),),
        always_norm_topk=True,
        weights_in_logits_dtype=False,
    ),
    # DeepSeek-V3 scores experts with a sigmoid; selection adds e_score_correction_bias and is
    # limited to the best groups. Its routing lives in expert_store/routing.py.
    "deepseek_v3": Family("deepseek_v3", "sigmoid_group", _PER_EXPERT, _PROJ),
}


def get_family(model_type: str) -> Family:
    """The family for a config's ``model_type``; an error lists the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedFamilyError(
            f"model_type {model_type!r} is not a supported MoE family (supported: {supported})"
        ) from None
