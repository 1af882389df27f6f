"""Runs a batch of sequences through the model: one prefill, then one token per step.

Prompts are left-padded into one batch with a KV cache; each step feeds the last token of every
live sequence. A finished sequence leaves the batch at once (its cache rows are dropped). Every
sequence carries its own routing restriction (a row of the per-layer masks), so sequences that use
different patterns share a batch and each is computed exactly as it would be alone.

Legend: B = sequences, S = positions, E = experts, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

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
