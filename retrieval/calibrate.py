"""`taer calibrate`: run the model over each task's calibration prompts and write task patterns.

Every router logit of every MoE layer for every real (non-padding) calibration token feeds the
task's ``TaskStatsAccumulator``; the same pass tracks the largest expert outputs, from which "super
experts" are detected, and counts each prompt's own router choices on its query tokens (the tokens
a served request's prefill sees): the router check's profile (``retrieval/router_check.py``). The model runs from the store either whole (every expert resident) or
layer-streamed (``stream_layers``: one layer's experts resident at a time). Rows of every table are
the MoE layers in order; ``patterns.json`` records which decoder layers they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from expert_store.atomic import atomic_directory
from expert_store.errors import PatternError, TasksFileError
from expert_store.families import get_family
from expert_store.routing import own_choices
from expert_store.runtime import MoERuntime, RuntimeConfig, load_runtime
from expert_store.skeleton import moe_blocks
from expert_store.store import ExpertStore
from retrieval.patterns import PatternSet, build_pattern_set
from retrieval.router_check import RouterProfile, count_choices
from retrieval.tasks_file import CalibrationPrompt, load_labelled_queries, load_tasks_file
from retrieval.tcess import SuperExpertTracker, TaskStatsAccumulator, pool

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [B, S], attention_mask [B, S]


@dataclass(frozen=True, slots=True)
class CalibrationOptions:
    batch_size: int = 8
    max_length: int = 512
    stream_layers: bool = False
    device: str = "cpu"
    dtype: str | None = None
    ka: int | None = None
    threshold: float | None = None
    super_factor: float = 10.0
    keep_experts: Path | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2:
            raise TasksFileError(
                f"batch_size and max_length must be positive, got {self.batch_size}, {self.max_length}"
            )


def calibrate(
    store_dir: Path, tasks_file: Path, out_dir: Path, options: CalibrationOptions = CalibrationOptions()
) -> PatternSet:
    """Compute every task's pattern and the pooled ``general`` one; write them to ``out_dir``."""
    tasks = load_tasks_file(tasks_file)
    store = ExpertStore(store_dir)
    layout, fingerprint = store.layout, store.manifest.fingerprint
    store.close()
    always_keep = _read_keep_experts(options.keep_experts, layout.moe_layers, layout.num_experts)
    model = _CalibrationModel(store_dir, options)
    tokenizer = model.tokenizer
    rows = {layer: row for row, layer in enumerate(layout.moe_layers)}
    tracker = SuperExpertTracker(len(rows), layout.num_experts)
    accumulators, token_counts, choices, held_out = {}, {}, {}, {}
    for task in tqdm(tasks, desc="calibrating tasks", unit="task"):
        batches, query_lengths = tokenize(tokenizer, task.calibration, options.batch_size, options.max_length)
        accumulator = model.new_accumulator(options.ka)
        choices[task.name] = _no_choices(len(query_lengths), len(rows), layout.num_experts)
        model.run(batches, _observers(accumulator, tracker, rows, choices[task.name]), query_lengths)
        accumulators[task.name] = accumulator
        token_counts[task.name] = accumulator.num_tokens
    # The router check's profile: each query's own routing also as a text prompt without the chat
    # template (as /v1/completions sends it), and the held-out prompts' (its validation; they shape
    # no pattern).
    templated = bool(getattr(tokenizer, "chat_template", None))
    for task in tqdm(tasks, desc="routing queries as text prompts", unit="task", disable=not templated):
        if raw := _as_text_prompts(task.calibration, templated):
            choices[task.name] = torch.cat(
                [choices[task.name], _route_queries(model, tokenizer, raw, options, rows)]
            )
    held_out_tasks = [task for task in tasks if task.heldout_path is not None]
    for task in tqdm(
        held_out_tasks, desc="routing held-out prompts", unit="task", disable=not held_out_tasks
    ):
        prompts = load_labelled_queries(task.heldout_path)
        held_out[task.name] = torch.cat(
            [
                _route_queries(model, tokenizer, group, options, rows)
                for group in (prompts, _as_text_prompts(prompts, templated))
                if group
            ]
        )
    model.close()
    profile = _profile(choices, held_out)

    stats = {name: acc.finalize(options.threshold) for name, acc in accumulators.items()}
    general = pool(list(accumulators.values())).finalize(options.threshold)
    supers = tracker.super_experts(options.super_factor)
    always = {row: set(ids) for row, ids in always_keep.items()}
    for expert in supers:
        logger.info(
            "super expert: decoder layer %d, expert %d", layout.moe_layers[expert.layer], expert.expert
        )
    pattern_set = build_pattern_set(
        fingerprint,
        stats,
        general,
        super_experts=dict.fromkeys([*stats, "general"], supers),
        always_keep=always,
        metadata={
            "moe_layers": list(layout.moe_layers),
            "family": model.family.model_type,
            "tasks_file": str(Path(tasks_file).resolve()),
            "token_counts": token_counts,
            "stream_layers": options.stream_layers,
            "super_factor": options.super_factor,
            "max_length": options.max_length,
        },
    )
    with atomic_directory(out_dir) as tmp:
        pattern_set.save(tmp)
        profile.save(tmp)
    return pattern_set


def prompt_text(tokenizer, prompt: CalibrationPrompt, with_response: bool = True) -> str:
    """The text run through the model: chat-rendered when the prompt is chat, with its response
    (``with_response=False``: the query alone, as a request would render it)."""
    response = prompt.response if with_response else None
    messages = prompt.chat_messages()
    if messages is not None and getattr(tokenizer, "chat_template", None):
        if response is not None:
            messages = [*messages, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    text = prompt.prompt if prompt.prompt is not None else prompt.query_text
    return text + (response or "")


def tokenize(
    tokenizer, prompts: Sequence[CalibrationPrompt], batch_size: int, max_length: int
) -> tuple[list[Batch], list[int]]:
    """Right-padded batches, longest first so padding stays small, and for each of their rows in
    order the number of leading tokens that are the query alone (its prompt without the response)."""
    texts = sorted(
        ((prompt_text(tokenizer, p), prompt_text(tokenizer, p, with_response=False)) for p in prompts),
        key=lambda pair: len(pair[0]),
        reverse=True,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    batches, query_lengths = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = tokenizer(
            [full for full, _ in chunk],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        )
        batches.append((encoded["input_ids"], encoded["attention_mask"]))
        queries = tokenizer([query for _, query in chunk], add_special_tokens=False)["input_ids"]
        query_lengths.extend(min(len(ids), max_length) for ids in queries)
    return batches, query_lengths


class _CalibrationModel:
    """The store's model, whole or layer-streamed, with observers on every MoE block."""

    def __init__(self, store_dir: Path, options: CalibrationOptions) -> None:
        if options.stream_layers:
            from expert_store.streaming import StreamedModel

            self.streamed = StreamedModel(store_dir, options.device, options.dtype)
            self.model, self.store = self.streamed.model, self.streamed.store
            self.runtime: MoERuntime | None = None
        else:
            self.runtime = load_runtime(store_dir, RuntimeConfig(device=options.device, dtype=options.dtype))
            self.runtime.activate_all()
            self.model, self.store = self.runtime.model, self.runtime.store
        self.family = get_family(self.model.config.model_type)
        self._tokenizer = None
        self._mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None  # each token's query prompt number, or -1

    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.store.store_dir)
        return self._tokenizer

    def new_accumulator(self, ka: int | None) -> TaskStatsAccumulator:
        layout = self.store.layout
        gates = [block.gate.inner for block in moe_blocks(self.model).values()]
        if self.family.scoring == "sigmoid_group":
            return TaskStatsAccumulator(
                len(gates),
                layout.num_experts,
                layout.top_k,
                ka,
                scoring="sigmoid_bias",
                bias=[gate.e_score_correction_bias.float().cpu() for gate in gates],
                num_groups=gates[0].num_group,
                topk_groups=gates[0].topk_group,
            )
        return TaskStatsAccumulator(len(gates), layout.num_experts, layout.top_k, ka, scoring="softmax")

    @torch.no_grad()
    def run(
        self, batches: list[Batch], observers: tuple[Callable, Callable, Callable], query_lengths: list[int]
    ) -> None:
        """Every batch through the model. ``query_lengths``: each row's leading query tokens, in
        order over the batches; their own router choices go to the third observer with each
        token's row number."""
        on_router, on_expert, on_choices = observers
        blocks = moe_blocks(self.model).values()
        gates = {block.gate.layer: block.gate.inner for block in blocks}
        query_rows = _query_rows(batches, query_lengths)

        def router(layer, hidden, logits):
            on_router(layer, logits[self._mask].float().cpu())
            rows = self._rows[self._rows >= 0]
            on_choices(
                layer, own_choices(self.family, gates[layer], logits[self._rows >= 0]).cpu(), rows.cpu()
            )

        def expert(layer, expert_id, token_idx, output):
            keep = self._mask[token_idx]
            if keep.any():
                on_expert(layer, expert_id, output[keep].abs().max().float().item())

        for block in blocks:
            block.gate.observer, block.experts.output_observer = router, expert
        try:
            if self.runtime is None:
                masks = [mask.reshape(-1).bool().to(self.streamed.device) for _, mask in batches]
                rows = [r.to(self.streamed.device) for r in query_rows]

                def before_batch(index: int) -> None:
                    self._mask, self._rows = masks[index], rows[index]

                self.streamed.run(batches, before_batch=before_batch)
            else:
                for (ids, mask), rows in zip(batches, query_rows, strict=True):
                    self._mask = mask.reshape(-1).bool().to(self.runtime.device)
                    self._rows = rows.to(self.runtime.device)
                    self.model(
                        input_ids=ids.to(self.runtime.device), attention_mask=mask.to(self.runtime.device)
                    )
        finally:
            for block in blocks:
                block.gate.observer, block.experts.output_observer = None, None

    def close(self) -> None:
        (self.runtime or self.streamed).close()


def _as_text_prompts(prompts, templated: bool) -> list[CalibrationPrompt]:
    """The chat prompts' queries as plain text prompts (none without a chat template: the same text)."""
    return [CalibrationPrompt(prompt=p.query_text) for p in prompts if templated and p.chat_messages()]


def _route_queries(
    model, tokenizer, prompts, options: CalibrationOptions, rows: dict[int, int]
) -> torch.Tensor:
    """The own router choices [len(prompts), L, E] of ``prompts``' query tokens (in tokenize's order)."""
    batches, query_lengths = tokenize(tokenizer, prompts, options.batch_size, options.max_length)
    choices = _no_choices(len(query_lengths), len(rows), model.store.layout.num_experts)
    model.run(batches, _choice_observers(rows, choices), query_lengths)
    return choices


def _no_choices(num_prompts: int, num_layers: int, num_experts: int) -> torch.Tensor:
    return torch.zeros(num_prompts, num_layers, num_experts, dtype=torch.int32)


def _profile(choices: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor]) -> RouterProfile:
    """The router check's profile: every task's calibration prompts' choices (and held-out ones')."""
    tasks = tuple(choices)

    def labelled(tables: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if not tables:
            return None, None
        labels = [
            torch.full((len(table),), tasks.index(name), dtype=torch.int32) for name, table in tables.items()
        ]
        return torch.cat(labels), torch.cat(list(tables.values()))

    labels, table = labelled(choices)
    held_labels, held_table = labelled(held_out)
    return RouterProfile(tasks, labels, table, held_labels, held_table)


def _query_rows(batches: list[Batch], query_lengths: list[int]) -> list[torch.Tensor]:
    """Per batch, each flattened token's prompt number (over all batches) if it is a query token,
    else -1 [B*S]."""
    out, first = [], 0
    for ids, mask in batches:
        rows, length = ids.shape
        lengths = torch.tensor(query_lengths[first : first + rows]).unsqueeze(1)  # [B, 1]
        is_query = (torch.arange(length).unsqueeze(0) < lengths) & mask.bool()  # [B, S]
        number = torch.arange(first, first + rows).unsqueeze(1).expand(rows, length)
        out.append(torch.where(is_query, number, -1).reshape(-1))
        first += rows
    return out


def _observers(
    accumulator: TaskStatsAccumulator,
    tracker: SuperExpertTracker,
    rows: dict[int, int],
    choices: torch.Tensor,
):
    """The calibration pass's observers; ``choices`` [prompts, L, E] receives the router profile."""

    def on_router(layer: int, logits: torch.Tensor) -> None:
        accumulator.add(rows[layer], logits)

    def on_expert(layer: int, expert: int, max_abs: float) -> None:
        tracker.update(rows[layer], torch.tensor([max_abs]), expert_ids=torch.tensor([expert]))

    return on_router, on_expert, _choice_observers(rows, choices)[2]


def _choice_observers(rows: dict[int, int], choices: torch.Tensor):
    """Observers that record only the prompts' own router choices into ``choices`` [prompts, L, E]."""

    def on_choices(layer: int, ids: torch.Tensor, prompt_rows: torch.Tensor) -> None:
        choices[:, rows[layer]] += count_choices(ids, prompt_rows, choices.shape[0], choices.shape[2])

    return (lambda layer, logits: None), (lambda layer, expert, max_abs: None), on_choices


def _read_keep_experts(path: Path | None, moe_layers: Sequence[int], num_experts: int) -> dict[int, set[int]]:
    """``{"LAYER": [EXPERT, ...]}`` (decoder layer indices) -> row index -> expert ids."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise TasksFileError(f"cannot read --keep-experts file {path}: {error}") from error
    rows = {layer: row for row, layer in enumerate(moe_layers)}
    keep: dict[int, set[int]] = {}
    for layer, experts in data.items() if isinstance(data, dict) else []:
        if not str(layer).isdigit() or int(layer) not in rows:
            raise TasksFileError(f"{path}: {layer!r} is not an MoE layer (MoE layers: {list(moe_layers)})")
        bad = [e for e in experts if not isinstance(e, int) or not 0 <= e < num_experts]
        if bad:
            raise TasksFileError(f"{path}: layer {layer}: expert ids {bad} outside 0..{num_experts - 1}")
        keep[rows[int(layer)]] = set(experts)
    if not isinstance(data, dict):
        raise TasksFileError(f'{path}: expected a JSON object {{"LAYER": [EXPERT, ...]}}')
    return keep


def load_patterns_for_store(patterns_dir: Path, store_dir: Path) -> PatternSet:
    """Patterns checked against the store's model fingerprint."""
    store = ExpertStore(store_dir)
    try:
        return PatternSet.load(patterns_dir, expected_fingerprint=store.manifest.fingerprint)
    finally:
        store.close()


__all__ = [
    "CalibrationOptions",
    "PatternError",
    "calibrate",
    "load_patterns_for_store",
    "prompt_text",
    "tokenize",
]
