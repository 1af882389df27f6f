"""Runs a batch of sequences through the model: one prefill, then one token per step.

Prompts are left-padded into one batch with a KV cache; each step feeds the last token of every
live sequence. A finished sequence leaves the batch at once (its cache rows are dropped), and new
sequences join a running batch after their own prefill (``join``: the shorter side is left-padded,
as in a batch prefill). Every sequence carries its own routing restriction (a row of the per-layer
masks), so sequences that use different patterns share a batch and each is computed as it would be
alone. Samples of one request (``n > 1``) share its prefill: the prompt is computed once, then its
cache rows are copied, one per sample (``expand``).

Legend: B = sequences, S = positions, E = experts, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from expert_store.runtime import MoERuntime


class BatchRunner:
    """One batch's model state. ``step`` returns the next-token logits [B, V] of the live rows.

    ``prompts`` and ``row_masks`` hold one row per distinct prompt; ``expand`` (``None``: one row
    each) maps each sequence's row to its prompt's, and the first step copies the prefilled rows
    accordingly. The prefill keeps the last hidden states of the prompts in ``score_prompts`` (their
    indexes) so that :meth:`prompt_logits` can give their logits at every position; only the last
    position's logits are computed for the others (a vocabulary-wide row per position is large).
    """

    def __init__(
        self,
        runtime: MoERuntime,
        prompts: Sequence[list[int]],
        row_masks: dict[int, torch.Tensor],
        expand: Sequence[int] | None = None,
        score_prompts: Sequence[int] = (),
    ) -> None:
        self.runtime = runtime
        self.device = runtime.device
        self.row_masks = row_masks  # layer -> bool [B, E]
        self.prompt_rows = list(range(len(prompts))) if expand is None else list(expand)  # row -> prompt
        self._expand = None if self.prompt_rows == list(range(len(prompts))) else self.prompt_rows
        self._score_prompts = list(score_prompts)
        self.prompt_hidden: dict[int, torch.Tensor] = {}  # prompt -> last hidden states [S, H]
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
        model, score = self.runtime.model, self._score_prompts
        self._score_prompts = []  # the prefill only
        inputs = {
            "input_ids": self._pending,
            "attention_mask": self.attention_mask,
            "position_ids": positions,
            "cache": self.cache,
            "use_cache": True,
        }
        self.runtime.cache.set_row_masks(self.row_masks)
        try:
            if score:  # the decoder, then the head on the last positions only
                hidden = model.get_decoder()(**inputs).last_hidden_state  # [P, S, H]
                self.prompt_hidden = {row: hidden[row] for row in score}
                logits = model.get_output_embeddings()(hidden[:, -1, :])  # [B, V]
            else:
                logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]  # [B, V]
        finally:
            self.runtime.cache.set_row_masks(None)
        if self._expand is not None:  # after the prefill: one row per sample
            logits = logits[self._expand]
            self._copy_rows(self._expand)
            self._expand = None
        return logits

    @torch.inference_mode()
    def prompt_logits(self, prompt: int) -> torch.Tensor:
        """The logits at every position of prompt ``prompt`` [S, V] (left-padded as in the batch);
        then its hidden states are dropped."""
        return self.runtime.model.get_output_embeddings()(self.prompt_hidden.pop(prompt))

    def _copy_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self._pending = self._pending[index]
        self.row_masks = {layer: mask[index] for layer, mask in self.row_masks.items()}

    def append(self, tokens: Sequence[int]) -> None:
        """Queue each live row's sampled token for the next step."""
        self._pending = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # [B, 1]
        ones = torch.ones((self.num_rows, 1), dtype=self.attention_mask.dtype, device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not in ``rows`` (finished or aborted sequences)."""
        if len(rows) != self.num_rows:
            self._copy_rows(list(rows))

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
