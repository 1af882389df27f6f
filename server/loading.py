"""Building the engine's parts from a store and a patterns directory, under a memory budget; and
the router alone again, from the patterns directory as it is now, for a reload."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from expert_store.errors import BudgetError, PatternError, TaerError
from expert_store.modes import MODES, Fallback, Mode
from expert_store.runtime import (
    RuntimeConfig,
    load_runtime,
    runtime_dtype,
    slot_bytes_per_expert,
    slots_for_budget,
)
from expert_store.store import ExpertStore
from retrieval.build import INDEX_SUBDIR
from retrieval.calibrate import load_patterns_for_store
from retrieval.router_check import PROFILE_FILE, RouterProfile
from retrieval.selection import Budget
from retrieval.service import PatternRouter
from server.engine_core import EngineParts

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """What `taer serve` loads. At most one of ``keep`` and ``experts_per_layer``; ``expert_memory``
    (bytes for every MoE layer's slots together) sets the slots, and the budget when neither is given."""

    store_dir: Path
    patterns_dir: Path
    keep: float | None = None
    experts_per_layer: int | None = None
    expert_memory: int | None = None
    slots_per_layer: int | None = None
    mode: Mode = "pruned"
    device: str = "cpu"
    dtype: str | None = None
    encoder: Path | None = None
    encoder_dtype: str = "auto"
    adaptive: bool = False
    merge_close_calls: bool = False
    fallback: Fallback = "general"  # what serves a query like nothing stored (retrieval/service.py)
    router_check: bool = True  # check retrieved patterns against the prompt's own routing (engine)

    @property
    def torch_dtype_name(self) -> str | None:
        """bfloat16 by default on a GPU; the store's own dtype on the CPU."""
        if self.dtype is None and self.device.startswith("cuda"):
            return "bfloat16"
        return self.dtype

    def __post_init__(self) -> None:
        if self.keep is not None and self.experts_per_layer is not None:
            raise BudgetError("give either --keep or --experts-per-layer, not both")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise BudgetError(f"--keep must be in (0, 1], got {self.keep}")
        if self.mode not in MODES:
            raise BudgetError(f"unknown mode {self.mode!r}; use {', '.join(MODES[:-1])} or {MODES[-1]}")


def plan_budget(config: ServeConfig, store: ExpertStore, bytes_per_expert: int) -> tuple[Budget, int]:
    """(selection budget, slots per layer) for this store, whose experts take ``bytes_per_expert``
    in a slot."""
    layout = store.layout
    slots = config.slots_per_layer
    if config.expert_memory is not None:
        slots = slots_for_budget(layout, bytes_per_expert, config.expert_memory)
    if config.keep is not None:
        budget = Budget(keep=config.keep)
    elif config.experts_per_layer is not None:
        budget = Budget(experts_per_layer=config.experts_per_layer)
    elif slots is not None:
        budget = Budget(experts_per_layer=slots)
    else:
        budget = Budget(keep=0.5)
    per_layer = budget.per_layer(layout.num_experts)
    if per_layer < layout.top_k:
        raise BudgetError(
            f"the budget keeps {per_layer} experts per layer, fewer than top-k = {layout.top_k}"
        )
    slots = slots or per_layer
    if slots < per_layer:
        raise BudgetError(
            f"the budget keeps {per_layer} experts per layer but the expert memory holds only {slots}; "
            "lower --keep or raise --expert-memory"
        )
    return budget, min(slots, layout.num_experts)


def _plan(config: ServeConfig) -> tuple[Budget, int]:
    """``plan_budget`` for the store, its slots as the runtime will hold them (8-bit experts as
    stored, scales included; others in the runtime's dtype)."""
    store = ExpertStore(config.store_dir)
    try:
        dtype = runtime_dtype(store, config.torch_dtype_name)
        return plan_budget(config, store, slot_bytes_per_expert(store, dtype))
    finally:
        store.close()


def patterns_held_at_once(config: ServeConfig) -> int:
    """How many patterns the slots hold at once if their retained sets were disjoint (at least 1;
    patterns that share experts fit more)."""
    budget, slots = _plan(config)
    store = ExpertStore(config.store_dir)
    try:
        per_layer = budget.per_layer(store.layout.num_experts)
    finally:
        store.close()
    return max(1, slots // per_layer)


def tasks_per_replica(config: ServeConfig, num_replicas: int) -> int:
    """How many tasks each of ``num_replicas`` replicas keeps as its own under task affinity: as
    many patterns as its slots hold at once, and at least an equal share of the tasks (``general``
    counted), so that every task keeps a home replica and a replica's slots switch only among its
    own tasks instead of all of them."""
    patterns = load_patterns_for_store(config.patterns_dir, config.store_dir)
    share = -(-(len(patterns.tasks) + 1) // max(1, num_replicas))
    return max(patterns_held_at_once(config), share)


def check_serve_config(config: ServeConfig) -> None:
    """The cheap checks, before the server starts: store, patterns of this model, budget."""
    load_patterns_for_store(config.patterns_dir, config.store_dir)
    _plan(config)


def load_engine_parts(config: ServeConfig, *, with_index: bool = True) -> EngineParts:
    """The single process's engine, or (``with_index=False``) a cluster replica's, whose requests
    arrive routed by the ingress: it needs the patterns but not the encoder."""
    budget, slots = _plan(config)
    router = load_router(config, budget, with_index=with_index)
    runtime = load_runtime(
        config.store_dir,
        RuntimeConfig(device=config.device, dtype=config.torch_dtype_name, slots_per_layer=slots),
    )
    tokenizer = runtime.tokenizer
    eos = runtime.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if config.mode == "pruned":  # warm the slots with the general pattern
        runtime.cache.prefetch(router.selection("general"))
    return EngineParts(
        runtime=runtime,
        router=router,
        tokenizer=tokenizer,
        model_name=_model_name(runtime.store, config),
        max_model_len=_max_model_len(runtime.model.config),
        eos_token_ids=frozenset(eos_ids),
    )


@dataclass(frozen=True, slots=True)
class RoutingParts:
    """What a cluster's ingress serves with: retrieval and the tokenizer, no model weights."""

    router: PatternRouter
    tokenizer: object
    model_name: str
    max_model_len: int
    slots_per_layer: int


def load_routing_parts(config: ServeConfig) -> RoutingParts:
    from transformers import AutoConfig, AutoTokenizer

    patterns = load_patterns_for_store(config.patterns_dir, config.store_dir)
    budget, slots = _plan(config)
    store = ExpertStore(config.store_dir)
    try:
        model_name = _model_name(store, config)
    finally:
        store.close()
    return RoutingParts(
        router=_router(config, patterns, budget, _load_index(config)),
        tokenizer=AutoTokenizer.from_pretrained(config.store_dir),
        model_name=model_name,
        max_model_len=_max_model_len(AutoConfig.from_pretrained(config.store_dir)),
        slots_per_layer=slots,
    )


def load_router(
    config: ServeConfig, budget: Budget, *, with_index: bool = True, encoder=None
) -> PatternRouter:
    """The patterns of ``config.patterns_dir`` (made for this store's model) under ``budget``, with
    their retrieval index and, in pruned mode, the router check fitted on their
    ``router_check.safetensors``. Checked whole: every pattern yields its retained set and every task
    the index retrieves has a pattern; any fault is a :class:`TaerError` naming it. ``encoder``: one
    already loaded, used when the index was built with it (a reload need not load it again)."""
    patterns = load_patterns_for_store(config.patterns_dir, config.store_dir)
    router = _router(config, patterns, budget, _load_index(config, encoder) if with_index else None)
    for task in router.task_names:
        router.selection(task)
    if router.index is not None:
        missing = sorted(set(router.index.tasks) - set(router.task_names))
        if missing:
            raise PatternError(
                f"the retrieval index in {config.patterns_dir} retrieves task(s) {', '.join(missing)}, "
                "which the patterns lack; rebuild it from the same tasks file (`taer index`)"
            )
    if config.router_check and config.mode == "pruned":
        _enable_router_check(router, config.patterns_dir)
    return router


def reload_router(config: ServeConfig, current: PatternRouter) -> PatternRouter:
    """:func:`load_router` again, under ``current``'s budget and reusing its encoder."""
    encoder = current.index.encoder if current.index is not None else None
    return load_router(config, current.budget, encoder=encoder)


def _router(config: ServeConfig, patterns, budget: Budget, index) -> PatternRouter:
    return PatternRouter(
        patterns,
        budget,
        index,
        config.mode,
        adaptive=config.adaptive,
        merge_close_calls=config.merge_close_calls,
        fallback=config.fallback,
    )


def _enable_router_check(router: PatternRouter, patterns_dir: Path) -> None:
    profile = RouterProfile.load(patterns_dir)
    if profile is None:
        logger.warning(
            "router check off: %s has no %s (patterns calibrated before the check existed); "
            "re-run `taer calibrate` to turn it on",
            patterns_dir,
            PROFILE_FILE,
        )
        return
    router.enable_check(profile)


def _model_name(store: ExpertStore, config: ServeConfig) -> str:
    return Path(store.manifest.source or config.store_dir).name


def _max_model_len(hf_config) -> int:
    return int(getattr(hf_config, "max_position_embeddings", 4096))


def _load_index(config: ServeConfig, reuse=None):
    directory = Path(config.patterns_dir) / INDEX_SUBDIR
    if not directory.exists():
        logger.warning(
            "no retrieval index in %s: every request uses the general pattern", config.patterns_dir
        )
        return None
    from retrieval.encoder import Encoder
    from retrieval.index import TaskIndex

    if reuse is not None and _built_with(directory, reuse):
        return TaskIndex.load(directory, reuse)
    spec = config.encoder if config.encoder is not None else index_encoder(directory)
    return TaskIndex.load(directory, Encoder.load(spec, dtype=config.encoder_dtype))


def _built_with(directory: Path, encoder) -> bool:
    """Whether the index in ``directory`` records ``encoder`` as the one it was built with."""
    from retrieval.encoder import EncoderFingerprint
    from retrieval.index_io import read_metadata

    try:
        return EncoderFingerprint.parse(read_metadata(directory)["encoder"]).matches(encoder.fingerprint)
    except (TaerError, KeyError, TypeError, ValueError):
        return False  # TaskIndex.load says what is wrong with it


def index_encoder(directory: Path) -> str | None:
    """The encoder an index records, when taer knows it by name (``None``: the default, or a model
    directory the user must pass again with ``--encoder``; the index refuses a mismatch either way)."""
    from retrieval.encoder import EncoderFingerprint
    from retrieval.encoder_sources import named_encoders
    from retrieval.index_io import read_metadata

    try:
        built_with = EncoderFingerprint.parse(read_metadata(directory)["encoder"]).name
    except (TaerError, KeyError, TypeError, ValueError):
        return None  # TaskIndex.load says what is wrong with it
    return next((named.name for named in named_encoders() if named.name == built_with), None)
