"""The PreMoe paper's own task matcher: router signatures of the first MoE layer, matched by L2.

Definitions (what ``build_router_signatures`` and ``RouterMatcher.match`` compute):

- A prompt is rendered as a request: the user message through the tokenizer's chat template with the
  generation prompt and no response (a plain prompt when the tokenizer has no template), tokenized
  without special tokens and cut at ``max_length`` tokens, exactly as calibration renders it.
- Its *signature* is the mean, over the prompt's tokens, of the router probabilities of the first MoE
  layer: softmax of the router logits over all experts (for sigmoid routers, DeepSeek-V3, the sigmoid
  scores normalised to sum to one, as :func:`retrieval.tcess.router_probs`). A vector [E] summing to
  one. Probabilities rather than raw logits, so that prompts whose logits differ only by a shift
  (softmax-invariant) look alike. The forward pass stops right after that router runs: nothing past it
  is computed and no expert is loaded.
- A task's signature is the mean of its calibration prompts' signatures.
- A query matches the task whose signature is nearest in L2. Its ``confidence`` is
  ``1 - d_best / d_second`` (0 when the two nearest tasks are equally far, 1 with a single task or an
  exact hit); below ``min_confidence`` the ``general`` pattern serves instead.

On disk (``PATTERNS_DIR/router_matcher``): ``signatures.safetensors`` (``signatures`` [T, E] float32)
and ``signatures.json`` (format version, the store's model fingerprint, tasks in row order, the decoder
layer, prompt counts, settings). Loading refuses signatures of another model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from expert_store.errors import PatternError
from expert_store.families import get_family
from expert_store.runtime import MoERuntime
from retrieval.calibrate import prompt_text
from retrieval.tasks_file import GENERAL, CalibrationPrompt, ChatMessage, TaskSpec
from retrieval.tcess import router_probs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUBDIR = "router_matcher"
TENSORS_FILE = "signatures.safetensors"
META_FILE = "signatures.json"
DEFINITION = "mean over prompt tokens of router probabilities at the first MoE layer"

# Legend: B = prompts in a batch, S = tokens, E = experts, T = tasks, Q = queries.


class RouterMatch(NamedTuple):
    """The task a query's router signature is nearest to, its L2 distance and the match confidence."""

    task: str
    distance: float
    confidence: float


@dataclass(frozen=True, eq=False)
class RouterSignatures:
    """Every task's signature [T, E] for one model (``fingerprint``), at decoder layer ``layer``."""

    fingerprint: str
    tasks: tuple[str, ...]
    signatures: Tensor  # [T, E] float32
    layer: int
    num_prompts: dict[str, int] = field(default_factory=dict)
    max_length: int = 512
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.signatures.dim() != 2 or self.signatures.shape[0] != len(self.tasks) or not self.tasks:
            raise PatternError(
                f"router signatures of shape {tuple(self.signatures.shape)} do not fit {len(self.tasks)} task(s)"
            )

    def save(self, directory: str | Path) -> Path:
        """Write ``signatures.safetensors`` and ``signatures.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"signatures": self.signatures.float().contiguous()}, str(directory / TENSORS_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "tasks": list(self.tasks),
            "layer": self.layer,
            "num_prompts": self.num_prompts,
            "max_length": self.max_length,
            "definition": DEFINITION,
            "created": self.created,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected_fingerprint: str | None = None) -> RouterSignatures:
        """Reopen saved signatures; refuse a missing or malformed directory or another model's."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            signatures = load_file(str(directory / TENSORS_FILE))["signatures"]
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise PatternError(
                f"cannot read router signatures in {directory} ({error}); rebuild them with "
                "`taer eval STORE --patterns DIR --retrieve --matcher router`"
            ) from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise PatternError(
                f"{directory}: router signatures format {meta.get('format_version')}, expected {FORMAT_VERSION}"
            )
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise PatternError(
                f"router signatures in {directory} belong to model {meta['fingerprint']!r}, not "
                f"{expected_fingerprint!r}; delete the directory to rebuild them for this model"
            )
        return cls(
            fingerprint=meta["fingerprint"],
            tasks=tuple(meta["tasks"]),
            signatures=signatures.float(),
            layer=int(meta["layer"]),
            num_prompts={str(k): int(v) for k, v in meta.get("num_prompts", {}).items()},
            max_length=int(meta.get("max_length", 512)),
            created=str(meta.get("created", "")),
        )


class _FirstRouterDone(Exception):
    """Raised from the router observer to end the forward pass once the first MoE router has run."""


def request_text(tokenizer, query: str) -> str:
    """A query as the model sees a request: one user message, chat-rendered with the generation prompt."""
    return prompt_text(tokenizer, CalibrationPrompt(messages=(ChatMessage("user", query),)))


@torch.inference_mode()
def prompt_signatures(
    runtime: MoERuntime, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 512
) -> Tensor:
    """[N, E] signatures of already rendered ``texts`` (see the module docstring), in input order."""
    tokenizer = runtime.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    first = runtime.layout.moe_layers[0]
    gate = next(g for g in runtime.gates() if g.layer == first)
    scoring = (
        "sigmoid_bias"
        if get_family(runtime.model.config.model_type).scoring == "sigmoid_group"
        else "softmax"
    )
    captured: list[Tensor] = []

    def observer(layer: int, hidden: Tensor, logits: Tensor) -> None:
        captured.append(logits)
        raise _FirstRouterDone

    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    saved, gate.observer = gate.observer, observer
    rows = []
    try:
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            ).to(runtime.device)
            mask = encoded["attention_mask"]  # [B, S]
            captured.clear()
            with contextlib.suppress(_FirstRouterDone):
                runtime.model(input_ids=encoded["input_ids"], attention_mask=mask, use_cache=False)
            assert captured, "the first MoE layer's router did not run"
            probs = router_probs(captured[0].float(), scoring).view(*mask.shape, -1)  # [B, S, E]
            weights = mask.unsqueeze(-1).float()  # [B, S, 1]
            rows.append(((probs * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)).cpu())  # [B, E]
    finally:
        gate.observer = saved
        tokenizer.padding_side = padding_side
    return torch.cat(rows) if rows else torch.zeros(0, runtime.layout.num_experts)


def build_router_signatures(
    runtime: MoERuntime,
    tasks: Sequence[TaskSpec],
    *,
    batch_size: int = 32,
    max_length: int = 512,
) -> RouterSignatures:
    """Each task's signature: the mean signature of its calibration prompts, rendered as requests."""
    tokenizer = runtime.tokenizer
    means, counts = [], {}
    for spec in tasks:
        if not spec.calibration:
            raise PatternError(
                f"task {spec.name!r} has no calibration prompts to build a router signature from"
            )
        texts = [prompt_text(tokenizer, dataclasses.replace(p, response=None)) for p in spec.calibration]
        signatures = prompt_signatures(runtime, texts, batch_size=batch_size, max_length=max_length)  # [N, E]
        means.append(signatures.mean(dim=0))
        counts[spec.name] = len(texts)
    return RouterSignatures(
        fingerprint=runtime.store.manifest.fingerprint,
        tasks=tuple(spec.name for spec in tasks),
        signatures=torch.stack(means),  # [T, E]
        layer=runtime.layout.moe_layers[0],
        num_prompts=counts,
        max_length=max_length,
    )


class RouterMatcher:
    """Matches query texts to tasks by the L2 distance between router signatures."""

    def __init__(
        self,
        runtime: MoERuntime,
        signatures: RouterSignatures,
        *,
        min_confidence: float = 0.0,
        batch_size: int = 32,
    ) -> None:
        fingerprint = runtime.store.manifest.fingerprint
        if signatures.fingerprint != fingerprint:
            raise PatternError(
                f"router signatures of model {signatures.fingerprint!r} cannot match for model {fingerprint!r}"
            )
        if signatures.signatures.shape[1] != runtime.layout.num_experts:
            raise PatternError(
                f"router signatures have {signatures.signatures.shape[1]} experts, the model "
                f"{runtime.layout.num_experts}"
            )
        self.runtime = runtime
        self.signatures = signatures
        self.min_confidence = min_confidence
        self.batch_size = batch_size

    def match(self, texts: Sequence[str]) -> list[RouterMatch]:
        """One match per query text (the user message), in order."""
        if not texts:
            return []
        rendered = [request_text(self.runtime.tokenizer, text) for text in texts]
        queries = prompt_signatures(
            self.runtime, rendered, batch_size=self.batch_size, max_length=self.signatures.max_length
        )  # [Q, E]
        distances = torch.cdist(queries.double(), self.signatures.signatures.double())  # [Q, T]
        return [self._decide(row) for row in distances]

    def _decide(self, distances: Tensor) -> RouterMatch:
        ordered, order = distances.sort()  # [T]
        best = float(ordered[0])
        second = float(ordered[1]) if len(ordered) > 1 else float("inf")
        confidence = 1.0 if second == float("inf") or second <= 0 else 1.0 - best / second
        task = self.signatures.tasks[int(order[0])]
        return RouterMatch(GENERAL if confidence < self.min_confidence else task, best, confidence)


def ensure_router_signatures(
    runtime: MoERuntime, patterns_dir: str | Path, tasks: Sequence[TaskSpec], *, max_length: int = 512
) -> RouterSignatures:
    """The signatures saved under ``PATTERNS_DIR/router_matcher``, built and saved first if missing."""
    directory = Path(patterns_dir) / SUBDIR
    fingerprint = runtime.store.manifest.fingerprint
    if (directory / META_FILE).exists():
        return RouterSignatures.load(directory, expected_fingerprint=fingerprint)
    logger.info("building router signatures for %d task(s) into %s", len(tasks), directory)
    signatures = build_router_signatures(runtime, tasks, max_length=max_length)
    signatures.save(directory)
    return signatures
