"""`taer calibrate`: run the model over each task's calibration prompts and write task patterns.

Every router logit of every MoE layer for every real (non-padding) calibration token feeds the
task's ``TaskStatsAccumulator``; the same pass tracks the largest expert outputs, from which "super
experts" are detected. The model runs from the store either whole (every expert resident) or
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
from expert_store.runtime import MoERuntime, RuntimeConfig, load_runtime
from expert_store.skeleton import moe_blocks
from expert_store.store import ExpertStore
from retrieval.patterns import PatternSet, build_pattern_set
from retrieval.tasks_file import CalibrationPrompt, load_tasks_file
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
    accumulators, token_counts = {}, {}
    for task in tqdm(tasks, desc="calibrating tasks", unit="task"):
        batches = tokenize(tokenizer, task.calibration, options.batch_size, options.max_length)
        accumulator = model.new_accumulator(options.ka)
        model.run(batches, _observers(accumulator, tracker, rows))
        accumulators[task.name] = accumulator
        token_counts[task.name] = accumulator.num_tokens
    model.close()

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
    return pattern_set


def prompt_text(tokenizer, prompt: CalibrationPrompt) -> str:
    """The text run through the model: chat-rendered when the prompt is chat, with its response."""
    messages = prompt.chat_messages()
    if messages is not None and getattr(tokenizer, "chat_template", None):
        if prompt.response is not None:
            messages = [*messages, {"role": "assistant", "content": prompt.response}]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt.response is None
        )
    text = prompt.prompt if prompt.prompt is not None else prompt.query_text
    return text + (prompt.response or "")


def tokenize(
    tokenizer, prompts: Sequence[CalibrationPrompt], batch_size: int, max_length: int
) -> list[Batch]:
    """Right-padded batches, longest first so padding stays small."""
    texts = sorted((prompt_text(tokenizer, p) for p in prompts), key=len, reverse=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        )
        batches.append((encoded["input_ids"], encoded["attention_mask"]))
    return batches


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
    def run(self, batches: list[Batch], observers: tuple[Callable, Callable]) -> None:
        on_router, on_expert = observers
        blocks = moe_blocks(self.model).values()

        def router(layer, hidden, logits):
            on_router(layer, logits[self._mask].float().cpu())

        def expert(layer, expert_id, token_idx, output):
            keep = self._mask[token_idx]
            if keep.any():
                on_expert(layer, expert_id, output[keep].abs().max().float().item())

        for block in blocks:
            block.gate.observer, block.experts.output_observer = router, expert
        try:
            if self.runtime is None:
                masks = [mask.reshape(-1).bool().to(self.streamed.device) for _, mask in batches]
                self.streamed.run(batches, before_batch=lambda index: setattr(self, "_mask", masks[index]))
            else:
                for ids, mask in batches:
                    self._mask = mask.reshape(-1).bool().to(self.runtime.device)
                    self.model(
                        input_ids=ids.to(self.runtime.device), attention_mask=mask.to(self.runtime.device)
                    )
        finally:
            for block in blocks:
                block.gate.observer, block.experts.output_observer = None, None

    def close(self) -> None:
        (self.runtime or self.streamed).close()


def _observers(accumulator: TaskStatsAccumulator, tracker: SuperExpertTracker, rows: dict[int, int]):
    def on_router(layer: int, logits: torch.Tensor) -> None:
        accumulator.add(rows[layer], logits)

    def on_expert(layer: int, expert: int, max_abs: float) -> None:
        tracker.update(rows[layer], torch.tensor([max_abs]), expert_ids=torch.tensor([expert]))

    return on_router, on_expert


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
