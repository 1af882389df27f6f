"""Expert-memory policies side by side on the same prompts (part 1 of `taer bench all`).

At equal expert memory (the same slots per layer):

- (a) ``pruned``: taer pruned mode with the retrieved pattern;
- (b) ``prefetch``: taer exact mode, the retrieved pattern loaded first, misses loaded on demand
  (evicting experts outside the pattern before its own);
- (c) ``lru``: exact mode, every expert loaded on demand with LRU eviction and no prediction (the
  mixtral-offloading policy);
- (d) ``resident``: every expert resident (the memory-unconstrained reference, one slot per expert).

Every policy decodes the same prompts (tasks interleaved, as mixed traffic arrives), one at a time,
greedily, up to the same number of new tokens, with the same torch threads. Each policy runs on a
fresh runtime whose experts were all read once (page cache warm, checksums done), so the numbers are
a server's steady state, not a cold start.

Legend: S = positions, V = vocabulary.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from benchmarks.policies_render import targets

logger = logging.getLogger(__name__)

POLICIES: dict[str, str] = {
    "pruned": "(a) taer pruned, retrieved pattern",
    "prefetch": "(b) taer exact, pattern as prefetch",
    "lru": "(c) exact, on-demand + LRU, no prediction",
    "resident": "(d) all experts resident",
}


@dataclass(frozen=True, slots=True)
class BenchPrompt:
    """One prompt: its task, chat messages, reference answer (None: unscored) and retrieval text."""

    task: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    answer: str | None

    @property
    def query(self) -> str:
        return next(content for role, content in reversed(self.messages) if role == "user")

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True, slots=True)
class Generation:
    tokens: list[int]
    prefill_seconds: float  # prompt forward and the first token
    decode_seconds: float  # every later token


@dataclass(frozen=True, slots=True)
class _Row:
    prompt: BenchPrompt
    task: str | None  # the retrieved task, for (a) and (b)
    retrieval_s: float
    activation_s: float
    generation: Generation


@dataclass(slots=True)
class _Arm:
    """One policy at one budget: its own runtime, router and counters."""

    policy: str
    keep: float
    slots: int
    runtime: object
    router: object
    before: object  # CacheStats when the timed prompts began
    rows: list[_Row] = field(default_factory=list)


@dataclass(slots=True)
class PolicyResult:
    """One policy at one memory budget, summed over the prompts."""

    policy: str
    label: str
    keep: float  # fraction of experts that fit in the slots
    slots_per_layer: int
    expert_memory_bytes: int
    prompts: int
    generated_tokens: int
    decode_tokens_per_s: float
    ttft_ms_mean: float
    ttft_ms_p50: float
    retrieval_ms_mean: float
    activation_ms_mean: float
    expert_loads: int
    expert_misses: int
    loads_per_token: float
    bytes_per_token: float
    misses_per_token: float
    load_ms_per_token: float  # time spent copying experts into slots, per generated token
    hit_rate: float
    accuracy: float | None
    retrieval_accuracy: float | None
    outputs: list[list[int]]


def interleaved_prompts(tasks_file: Path, per_task: int, split: str = "eval") -> list[BenchPrompt]:
    """``per_task`` labelled prompts of every task in ``tasks_file``, round-robin across tasks."""
    from demo.suite import load_suite

    suite = load_suite(tasks_file)
    by_task = [
        [
            BenchPrompt(name, tuple((m.role, m.content) for m in e.messages), e.answer)
            for e in task.split(split)[:per_task]
        ]
        for name, task in suite.tasks.items()
    ]
    return [group[i] for i in range(per_task) for group in by_task if i < len(group)]


def slots_for(keep: float, num_experts: int, top_k: int) -> int:
    """Slots per layer holding ``keep`` of the experts (never fewer than top-k)."""
    return min(num_experts, max(top_k, math.ceil(keep * num_experts - 1e-9)))


@torch.inference_mode()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> Generation:
    """Greedy decoding of one prompt ``input_ids`` [1, S] with a KV cache, stopping at an eos id."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits  # [1, 1, V]
    token = int(logits[0, -1].argmax())
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and token not in eos_ids:
        step = torch.tensor([[token]], device=input_ids.device)  # [1, 1]
        logits = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    return Generation(tokens, prefill, time.perf_counter() - start)


def warm(runtime) -> None:
    """Read every expert once (page cache, checksums), a slot's worth at a time."""
    layout, slots = runtime.layout, runtime.num_slots
    for start in range(0, layout.num_experts, slots):
        chunk = list(range(start, min(start + slots, layout.num_experts)))
        runtime.activate({layer: chunk for layer in layout.moe_layers}, "exact")


class PolicyRunner:
    """Runs the policies of one store over one prompt list (prompt ids are tokenized once)."""

    def __init__(self, store_dir: Path, patterns, index, prompts: Sequence[BenchPrompt], max_new_tokens: int):
        from expert_store.manifest import Manifest
        from expert_store.runtime import RuntimeConfig, load_runtime

        self.store_dir = Path(store_dir)
        self.patterns = patterns
        self.index = index
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.layout = Manifest.load(self.store_dir).layout
        probe = load_runtime(self.store_dir, RuntimeConfig(slots_per_layer=self.layout.top_k))
        self.tokenizer = probe.tokenizer
        eos = probe.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        probe.close()
        self.prompt_ids = [self._encode(p) for p in self.prompts]

    def _encode(self, prompt: BenchPrompt) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(prompt.chat(), add_generation_prompt=True, tokenize=False)
        return torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])  # [1, S]

    def run(self, arms: Sequence[tuple[str, float]]) -> list[PolicyResult]:
        """Every (policy, keep) arm over the prompts, taking turns prompt by prompt, so that load from
        other processes on the machine falls on every arm alike."""
        opened = [self._open(policy, keep) for policy, keep in arms]
        for prompt, ids in zip(
            tqdm(self.prompts, desc="policies", unit="prompt"), self.prompt_ids, strict=True
        ):
            for arm in opened:
                arm.rows.append(self._step(arm, prompt, ids))
        return [self._close(arm) for arm in opened]

    def _open(self, policy: str, keep: float) -> _Arm:
        from expert_store.runtime import RuntimeConfig, load_runtime
        from retrieval.selection import Budget
        from retrieval.service import PatternRouter

        layout = self.layout
        slots = (
            layout.num_experts if policy == "resident" else slots_for(keep, layout.num_experts, layout.top_k)
        )
        runtime = load_runtime(self.store_dir, RuntimeConfig(slots_per_layer=slots))
        router = PatternRouter(self.patterns, Budget(experts_per_layer=slots), self.index)
        warm(runtime)
        if policy == "resident":
            runtime.activate_all()
        elif policy == "lru":
            runtime.activate({}, "exact")
        greedy(runtime.model, self.prompt_ids[0], 2, self.eos_ids)  # first-call allocations, untimed
        keep = 1.0 if policy == "resident" else keep
        return _Arm(policy, keep, slots, runtime, router, runtime.cache.stats.copy())

    def _step(self, arm: _Arm, prompt: BenchPrompt, ids: torch.Tensor) -> _Row:
        from retrieval.service import RouteRequest

        retrieval = activation = 0.0
        task = None
        if arm.policy in ("pruned", "prefetch"):
            start = time.perf_counter()
            route = arm.router.route([RouteRequest(prompt.query)])[0]
            retrieval = time.perf_counter() - start
            start = time.perf_counter()
            arm.runtime.activate(route.selection, "pruned" if arm.policy == "pruned" else "exact")
            activation = time.perf_counter() - start
            task = route.task
        generation = greedy(arm.runtime.model, ids, self.max_new_tokens, self.eos_ids)
        return _Row(prompt, task, retrieval, activation, generation)

    def _close(self, arm: _Arm) -> PolicyResult:
        stats = arm.runtime.cache.stats - arm.before
        capacity = arm.runtime.cache.capacity_bytes
        arm.runtime.close()
        return self._summarise(arm.policy, arm.keep, arm.slots, capacity, arm.rows, stats)

    def _summarise(self, policy, keep, slots, capacity, rows: list[_Row], stats) -> PolicyResult:
        from demo.tasks import scorer_for

        gens = [r.generation for r in rows]
        tokens = sum(len(g.tokens) for g in gens)
        ttft = [(r.retrieval_s + r.activation_s + r.generation.prefill_seconds) * 1e3 for r in rows]
        scored = [r for r in rows if r.prompt.answer is not None]
        correct = sum(
            scorer_for(r.prompt.task)(self._text(r.generation.tokens), r.prompt.answer) for r in scored
        )
        routed = [(r.prompt.task, r.task) for r in rows if r.task is not None]
        return PolicyResult(
            policy=policy,
            label=POLICIES[policy],
            keep=keep,
            slots_per_layer=slots,
            expert_memory_bytes=capacity,
            prompts=len(rows),
            generated_tokens=tokens,
            decode_tokens_per_s=sum(len(g.tokens) - 1 for g in gens)
            / max(sum(g.decode_seconds for g in gens), 1e-9),
            ttft_ms_mean=sum(ttft) / len(ttft),
            ttft_ms_p50=sorted(ttft)[len(ttft) // 2],
            retrieval_ms_mean=1e3 * sum(r.retrieval_s for r in rows) / len(rows),
            activation_ms_mean=1e3 * sum(r.activation_s for r in rows) / len(rows),
            expert_loads=stats.loads,
            expert_misses=stats.misses,
            loads_per_token=stats.loads / tokens,
            bytes_per_token=stats.bytes_loaded / tokens,
            misses_per_token=stats.misses / tokens,
            load_ms_per_token=1e3 * stats.load_seconds / tokens,
            hit_rate=stats.hit_rate,
            accuracy=correct / len(scored) if scored else None,
            retrieval_accuracy=sum(a == b for a, b in routed) / len(routed) if routed else None,
            outputs=[g.tokens for g in gens],
        )

    def _text(self, tokens: list[int]) -> str:
        kept = tokens[:-1] if tokens and tokens[-1] in self.eos_ids else tokens
        return self.tokenizer.decode(kept, skip_special_tokens=True)


def run_policies(
    store_dir: Path,
    patterns_dir: Path,
    prompts: Sequence[BenchPrompt],
    keeps: Sequence[float] = (0.5, 0.25),
    max_new_tokens: int = 16,
    threads: int = 1,
    encoder: Path | None = None,
) -> dict:
    """Every policy at every ``keep``, plus the all-resident reference; JSON-ready."""
    from retrieval.calibrate import load_patterns_for_store

    patterns = load_patterns_for_store(patterns_dir, store_dir)
    index = _load_index(patterns_dir, encoder)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runner = PolicyRunner(store_dir, patterns, index, prompts, max_new_tokens)
        arms = [("resident", 1.0)] + [(p, keep) for keep in keeps for p in ("pruned", "prefetch", "lru")]
        reference, *rest = [asdict(r) for r in runner.run(arms)]
        budgets = [{"keep": keep, "policies": rest[3 * i : 3 * i + 3]} for i, keep in enumerate(keeps)]
    finally:
        torch.set_num_threads(previous)
    result = {
        "settings": {
            "prompts": len(prompts),
            "tasks": sorted({p.task for p in prompts}),
            "max_new_tokens": max_new_tokens,
            "torch_threads": threads,
            "num_experts": runner.layout.num_experts,
            "top_k": runner.layout.top_k,
            "moe_layers": len(runner.layout.moe_layers),
            "retrieval": "semantic index" if index is not None else "none (general pattern)",
        },
        "reference": reference,
        "budgets": budgets,
    }
    result["targets"] = targets(result)
    return result


def _load_index(patterns_dir: Path, encoder: Path | None):
    from retrieval.build import INDEX_SUBDIR

    directory = Path(patterns_dir) / INDEX_SUBDIR
    if not directory.exists():
        logger.warning("no retrieval index in %s: policies (a) and (b) use the general pattern", patterns_dir)
        return None
    from retrieval.encoder import Encoder
    from retrieval.index import TaskIndex

    return TaskIndex.load(directory, Encoder.load(encoder))
