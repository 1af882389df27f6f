"""The training stream: endless, deterministic batches of chat-rendered prompt + answer + end token.

Problems are drawn fresh from each task's generator, skipping every problem the suite reserves for
calibration, evaluation or held-out use, and worded only with the training phrasings. Tasks take turns
so every batch is balanced across tasks (which lets the router's load-balancing loss, taken per batch,
balance experts across tasks rather than within each task).

Sequences are packed several to a row, with position ids restarting at each sequence: transformers
then builds a block-diagonal causal mask, so packed sequences never see each other. Prompts differ in
length by a factor of three, and padding them to the longest in a batch would waste about 45% of the
compute.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from demo.suite import SuiteSizes, reserved_problems
from demo.tasks import TASKS, Instance, TaskSpec

IGNORE_INDEX = -100
LossOn = Literal["answer", "all"]


@dataclass(frozen=True, slots=True)
class Sequence:
    """One training sequence: token ids, and the index of the first one the loss is taken on."""

    ids: list[int]
    first_label: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Model inputs with the labels the loss reads. R = rows, T = row length.

    Packed batches have no attention mask (position ids delimit the sequences); padded ones do.
    """

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T], IGNORE_INDEX where no loss is taken
    attention_mask: torch.Tensor | None = None  # [R, T]

    def model_inputs(self) -> dict[str, object]:
        """Keyword arguments for the model's forward.

        No cache: transformers only derives the block-diagonal mask of packed rows without one.
        """
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "labels": self.labels,
            "use_cache": False,
        }
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def _rows(rows: list[list[Sequence]], length: int, pad_id: int) -> Batch:
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for sequence in row:
            ids = torch.tensor(sequence.ids)
            end = start + len(ids)
            input_ids[r, start:end] = ids
            position_ids[r, start:end] = torch.arange(len(ids))
            labels[r, start + sequence.first_label : end] = ids[sequence.first_label :]
            start = end
        # The tail is a sequence of its own (positions from 0), so it stays out of the last one's block.
        position_ids[r, start:] = torch.arange(length - start)
    return Batch(input_ids, position_ids, labels)


def pack(sequences: list[Sequence], row_length: int, pad_id: int) -> Batch:
    """Sequences packed first-fit into rows of ``row_length`` (longer when one sequence needs it)."""
    length = max(row_length, *(len(s.ids) for s in sequences))
    rows: list[list[Sequence]] = []
    room: list[int] = []
    for sequence in sequences:
        fits = next((r for r, free in enumerate(room) if free >= len(sequence.ids)), None)
        if fits is None:
            rows.append([])
            room.append(length)
            fits = len(rows) - 1
        rows[fits].append(sequence)
        room[fits] -= len(sequence.ids)
    return _rows(rows, length, pad_id)


def pad(sequences: list[Sequence], pad_id: int) -> Batch:
    """One sequence per row, right-padded, with an attention mask (the unpacked reference)."""
    length = max(len(s.ids) for s in sequences)
    batch = _rows([[s] for s in sequences], length, pad_id)
    mask = torch.tensor([[1] * len(s.ids) + [0] * (length - len(s.ids)) for s in sequences])
    return Batch(batch.input_ids, batch.position_ids, batch.labels, mask)


def prompt_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The text the chat template puts before and after a single user message (with generation prompt).

    Rendering once and concatenating is exact for a template that inserts the content verbatim, and
    far cheaper than a Jinja render per training example.
    """
    sentinel = "\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.count(sentinel) == 1, "the chat template must insert the user content once, verbatim"
    prefix, suffix = rendered.split(sentinel)
    return prefix, suffix


class TrainingStream:
    """Deterministic batches for ``seed``; the same seed and tokenizer give the same batches."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        seed: int,
        batch_size: int,
        sizes: SuiteSizes | None = None,
        loss_on: LossOn = "answer",
        row_length: int = 128,
        tasks: tuple[TaskSpec, ...] = TASKS,
    ) -> None:
        self.tokenizer, self.batch_size, self.loss_on, self.tasks = tokenizer, batch_size, loss_on, tasks
        self.row_length = row_length
        sizes = sizes or SuiteSizes()
        self.reserved = {
            spec.name: {i.values for split in reserved_problems(spec, seed, sizes).values() for i in split}
            for spec in tasks
        }
        self.rng = random.Random(f"taer-demo:{seed}:train")
        self.prefix, self.suffix = prompt_affixes(tokenizer)
        self.num_drawn = 0

    def draw(self, spec: TaskSpec) -> Instance:
        """A training problem of ``spec``: never one reserved for another split."""
        while True:
            instance = spec.sample(self.rng)
            if instance.values not in self.reserved[spec.name]:
                return instance

    def texts(self) -> list[tuple[str, str]]:
        """The next batch as (rendered prompt, answer + end token) pairs."""
        pairs = []
        for _ in range(self.batch_size):
            spec = self.tasks[self.num_drawn % len(self.tasks)]
            self.num_drawn += 1
            instance = self.draw(spec)
            query = instance.render(self.rng.choice(spec.phrasings))
            pairs.append((self.prefix + query + self.suffix, instance.answer + self.tokenizer.eos_token))
        return pairs

    def sequences(self) -> list[Sequence]:
        """The next batch's sequences, tokenized, in draw order."""
        pairs = self.texts()
        encode = self.tokenizer
        prompts = encode([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        answers = encode([a for _, a in pairs], add_special_tokens=False)["input_ids"]
        # With loss on every token, the first one still has no label: nothing in its row predicts it.
        return [
            Sequence(prompt + answer, 1 if self.loss_on == "all" else len(prompt))
            for prompt, answer in zip(prompts, answers, strict=True)
        ]

    def next_batch(self) -> Batch:
        """The next batch, packed."""
        return pack(self.sequences(), self.row_length, self.tokenizer.pad_token_id)
