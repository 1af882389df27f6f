"""Runs a batch of sequences through the model: one prefill, then one token per step.

Prompts are left-padded into one batch with a KV cache; each step feeds the last token of every
live sequence. A finished sequence leaves the batch at once (its cache rows are dropped), and new
sequences join a running batch after their own prefill (``join``: the shorter side is left-padded,
as in a batch prefill). Every sequence carries its own routing restriction (a row of the per-layer
masks), so sequences that use different patterns share a batch and each is computed as it would be
alone. Samples of one request (``n > 1``) share its prefill: the prompt is computed once, then its
cache rows are copied, one per sample (``expand``). For the prompts the router check looks at, the
prefill also counts every prompt token's own router choices, before any routing restriction
(``router_choices``).

Legend: B = sequences, S = positions, E = experts, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from expert_store.routing import own_choices
from expert_store.runtime import MoERuntime
from retrieval.router_check import count_choices


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
        check_prompts: Sequence[int] = (),
    ) -> None:
        self.runtime = runtime
        self.device = runtime.device
        self.row_masks = row_masks  # layer -> bool [B, E]
        self.prompt_rows = list(range(len(prompts))) if expand is None else list(expand)  # row -> prompt
        self._expand = None if self.prompt_rows == list(range(len(prompts))) else self.prompt_rows
        self._score_prompts = list(score_prompts)
        self.prompt_hidden: dict[int, torch.Tensor] = {}  # prompt -> last hidden states [S, H]
        self._check_prompts = list(check_prompts)
        self.router_choices: dict[int, torch.Tensor] = {}  # prompt -> own router choices [L, E]
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
        model, score, check = self.runtime.model, self._score_prompts, self._check_prompts
        self._score_prompts, self._check_prompts = [], []  # the prefill only
        counter = _ChoiceCounter(self.runtime, self.attention_mask, check) if check else None
        inputs = {
            "input_ids": self._pending,
            "attention_mask": self.attention_mask,
            "position_ids": positions,
            "cache": self.cache,
            "use_cache": True,
        }
        self.runtime.cache.set_row_masks(self.row_masks)
        if counter is not None:
            self.runtime.set_router_observer(counter)
        try:
            if score:  # the decoder, then the head on the last positions only
                hidden = model.get_decoder()(**inputs).last_hidden_state  # [P, S, H]
                self.prompt_hidden = {row: hidden[row] for row in score}
                logits = model.get_output_embeddings()(hidden[:, -1, :])  # [B, V]
            else:
                logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]  # [B, V]
        finally:
            self.runtime.cache.set_row_masks(None)
            if counter is not None:
                self.runtime.set_router_observer(None)
        if counter is not None:
            choices = counter.choices
            self.router_choices = {row: choices[row] for row in check}
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


class _ChoiceCounter:
    """A router observer for one prefill: per prompt row, how often each expert is among a prompt
    token's own top-k in each MoE layer (``choices`` [P, L, E]), before the row's routing mask.

    Each layer's logits of the counted tokens are kept as they come; the top-k and the counting run
    once over all layers when ``choices`` is read (a few large operations instead of many small ones).
    """

    def __init__(self, runtime: MoERuntime, attention_mask: torch.Tensor, rows: Sequence[int]) -> None:
        self.gates = {gate.layer: gate for gate in runtime.gates()}
        self.moe_layers = runtime.layout.moe_layers
        self.num_prompts, length = attention_mask.shape
        self.num_experts = runtime.layout.num_experts
        counted = torch.zeros(self.num_prompts, dtype=torch.bool, device=attention_mask.device)
        counted[list(rows)] = True
        tokens = (attention_mask.bool() & counted[:, None]).reshape(-1)  # [T]: real tokens of counted rows
        self.everything = bool(tokens.all())  # then no token needs picking out
        self.positions = tokens.nonzero().squeeze(1)  # [t]
        self.prompt_of = self.positions // length  # [t]
        self.logits: dict[int, torch.Tensor] = {}  # layer -> [t, E]

    def __call__(self, layer: int, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        self.logits[layer] = logits if self.everything else logits.index_select(0, self.positions)

    @property
    def choices(self) -> torch.Tensor:
        gates = [self.gates[layer] for layer in self.moe_layers]
        if all(gate.family.scoring != "sigmoid_group" for gate in gates):  # one top-k for all layers
            stacked = torch.stack([self.logits[layer] for layer in self.moe_layers])  # [L, t, E]
            ids = torch.topk(stacked, gates[0].top_k, dim=-1).indices  # [L, t, K]
        else:
            ids = torch.stack(
                [own_choices(g.family, g.inner, self.logits[g.layer]) for g in gates]
            )  # [L, t, K]
        layers = torch.arange(len(gates), device=ids.device)[:, None]  # [L, 1]
        rows = layers * self.num_prompts + self.prompt_of[None, :]  # [L, t]: (layer, prompt) pairs
        counts = count_choices(
            ids.reshape(-1, ids.shape[-1]), rows.reshape(-1), len(gates) * self.num_prompts, self.num_experts
        )
        return (
            counts.reshape(len(gates), self.num_prompts, self.num_experts).transpose(0, 1).cpu()
        )  # [P, L, E]


def _left_pad(tensor: torch.Tensor, count: int, dim: int = -2) -> torch.Tensor:
    """``count`` zeros before ``tensor`` along ``dim`` (masked positions: their values never count)."""
    if count == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
