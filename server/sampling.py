"""Choosing the next token for each sequence of a batch: repetition penalty, temperature, top-k,
top-p, and a per-request generator so a seeded request is reproducible whatever it is batched with.

Legend: V = vocabulary.
"""

from __future__ import annotations

import torch

from server.engine_api import SamplingParams


def make_generator(params: SamplingParams, index: int = 0) -> torch.Generator | None:
    """Sample ``index``'s generator: seeded with ``seed + index`` when the request has a seed."""
    if params.is_greedy:
        return None
    generator = torch.Generator()
    generator.manual_seed((params.seed + index) % (2**63) if params.seed is not None else torch.seed())
    return generator


def next_token(
    logits: torch.Tensor, params: SamplingParams, seen: list[int], generator: torch.Generator | None
) -> int:
    """One token from one sequence's logits [V]."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(set(seen)), device=logits.device)
        picked = logits[ids]
        # Out of place: ``logits`` is a row of the batch's, made under inference mode (in place is
        # refused there, and would change the batch's logits).
        logits = logits.index_put(
            (ids,),
            torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty),
        )
    if params.is_greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = (
            cumulative - torch.softmax(sorted_logits, dim=-1) > params.top_p
        )  # keep the token crossing top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
