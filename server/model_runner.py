"""Runs a batch of sequences through the model: one prefill, then one token per step.

Prompts are left-padded into one batch with a KV cache; each step feeds the last token of every
live sequence. A finished sequence leaves the batch at once (its cache rows are dropped), and new
sequences join a running batch after their own prefill (``join``: the shorter side is left-padded,
as in a batch prefill). Every sequence carries its own routing restriction (a row of the per-layer
masks), so sequences that use different patterns share a batch and each is computed as it would be
alone.

Legend: B = sequences, S = positions, E = experts, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from expert_store.runtime import MoERuntime


class BatchRunner:
    """One batch's model state. ``step`` returns the next-token logits [B, V] of the live rows."""

    def __init__(
        self, runtime: MoERuntime, prompts: Sequence[list[int]], row_masks: dict[int, torch.Tensor]
    ) -> None:
        self.runtime = runtime
        self.device = runtime.device
        self.row_masks = row_masks  # layer -> bool [B, E]
        self.cache = DynamicCache(config=runtime.model.config)
        length = max(len(p) for p in prompts)
        pad = 0
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        self.attention_mask = mask.to(self.device)  # [B, S]
        self._pending = ids.to(self.device)  # the tokens the next forward consumes [B, s]

    @property
    def num_rows(self) -> int:
        return self.attention_mask.shape[0]

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        positions = (self.attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [B, S]
        positions = positions[:, -self._pending.shape[1] :]
        self.runtime.cache.set_row_masks(self.row_masks)
        try:
            out = self.runtime.model(
                input_ids=self._pending,
                attention_mask=self.attention_mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self.runtime.cache.set_row_masks(None)
        return out.logits[:, -1, :]  # [B, V]

    def append(self, tokens: Sequence[int]) -> None:
        """Queue each live row's sampled token for the next step."""
        self._pending = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # [B, 1]
        ones = torch.ones((self.num_rows, 1), dtype=self.attention_mask.dtype, device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not in ``rows`` (finished or aborted sequences)."""
        if len(rows) == self.num_rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self._pending = self._pending[index]
        self.row_masks = {layer: mask[index] for layer, mask in self.row_masks.items()}

    @property
    def can_join(self) -> bool:
        """Whether other rows can be merged in: only plain growing caches (a sliding-window or
        quantized cache layer keeps state that left-padding would not shift)."""
        return all(type(layer) is DynamicLayer and layer.is_initialized for layer in self.cache.layers)

    def join(self, other: BatchRunner) -> None:
        """Append ``other``'s rows (prefilled, each with its next token queued) after this batch's.

        Both sides hold one key/value position fewer than their attention mask (the queued token is
        not yet in the cache); the shorter side is left-padded with masked positions, exactly what a
        batch prefill of prompts of different lengths holds.
        """
        assert self.can_join and other.can_join, "join needs plain growing caches on both sides"
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        pads = (width - self.attention_mask.shape[1], width - other.attention_mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, pads[0]), _left_pad(theirs.keys, pads[1])]
            )  # [B, H, S, D]
            mine.values = torch.cat([_left_pad(mine.values, pads[0]), _left_pad(theirs.values, pads[1])])
        masks = (self.attention_mask, other.attention_mask)
        self.attention_mask = torch.cat(
            [_left_pad(m, pad, dim=1) for m, pad in zip(masks, pads, strict=True)]
        )
        self._pending = torch.cat([self._pending, other._pending])  # [B, 1]
        self.row_masks = {
            layer: torch.cat([mask, other.row_masks[layer]]) for layer, mask in self.row_masks.items()
        }


def _left_pad(tensor: torch.Tensor, count: int, dim: int = -2) -> torch.Tensor:
    """``count`` zeros before ``tensor`` along ``dim`` (masked positions: their values never count)."""
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
