"""The contract between the HTTP layer and the engine that owns the model.

The HTTP layer (``server/app.py``, ``server/serving.py``, ``server/serving_tgi.py`` and
``server/request_run.py``) turns a request into a :class:`GenerationRequest`, iterates
:meth:`Engine.generate`, and turns the :class:`GenerationOutput` objects into OpenAI or TGI
responses. It knows nothing else about the
engine. The real engine (model thread, scheduler, retrieval) and ``tests/server/fake_engine.py`` both
implement :class:`Engine`.

Rules of the contract, in one place:

- The HTTP layer tokenises: it applies the chat template and encodes the prompt with
  :attr:`Engine.tokenizer`, checks ``len(prompt_token_ids) + sampling.max_tokens <= max_model_len``,
  checks ``taer.task`` against :meth:`Engine.task_names`, and only then calls
  :meth:`Engine.generate`. Detokenisation and stop strings are the engine's job.
- ``generate`` is an async generator: calling it starts nothing; the engine may raise
  :class:`QueueFullError` (HTTP 429),
  :class:`EngineNotReadyError` (503),
  :class:`~expert_store.errors.UnknownTaskError` (404) or
  :class:`~expert_store.errors.RequestError` (its ``status``, 400 by default) from the first
  ``__anext__`` at the latest. Any other exception is a server fault (500, logged).
- Outputs are deltas, each of one sample (``index``, ``0 <= index < sampling.n``). A sample's last
  output, and only that one, has ``finished=True`` and a ``finish_reason``; the iterator ends right
  after the last sample's last output (with ``n == 1``: after the one finished output).
- The HTTP layer stops iterating early when the client disconnects, the request times out or the
  response fails. It then calls ``await engine.abort(request_id)`` and then ``aclose()`` on the
  iterator (when it has one), shielded from cancellation. The engine must free the request's
  resources on either signal. A pending ``__anext__`` may also be cancelled (``CancelledError``
  thrown into the generator) before those calls. An ``abort`` finish the client did not cause
  (say, a shutdown) is answered 503.
- Nothing in the engine blocks the event loop: torch, FAISS and the encoder run in the engine's own
  thread; ``generate`` only awaits results handed over from it (for example through an
  ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``).
- Introspection only reads: :meth:`Engine.describe`, :meth:`Engine.pattern_tables` and
  :meth:`Engine.preview_route` (the web page's data, ``server/taer_routes.py``). ``preview_route``
  routes a text exactly as ``generate`` would (off the event loop) but generates and loads nothing.
  ``server/introspection.py`` implements the last two for an engine with a pattern router.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from expert_store.errors import RequestError, TaerError
from expert_store.modes import MODES, Mode

if TYPE_CHECKING:
    from retrieval.overview import PatternTables
    from server.introspection import RoutePreview
    from server.metrics import EngineMetrics
    from server.structured import OutputConstraint


class QueueFullError(TaerError):
    """The engine's waiting queue is full; the client should retry later (HTTP 429)."""


class EngineNotReadyError(TaerError):
    """The engine is still loading, or ended a request it did not finish (HTTP 503)."""


FinishReason = Literal["stop", "length", "abort"]
"""``stop``: an end-of-sequence token or a stop string; ``length``: ``max_tokens`` or the context
ran out; ``abort``: the request was aborted (by :meth:`Engine.abort` or an engine shutdown)."""

MAX_STOP_STRINGS = 16
REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""Bounds on the repetition penalty: the penalised logits stay finite in float32 (5e-324 divided
them into infinities, and sampling failed on the NaN probabilities that followed)."""
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_N = 16
"""Samples per request (``n``): each is a running sequence, and a batch holds at most
``max_batch_size`` of them."""
MAX_LOGPROBS = 20
"""Alternatives per token in ``logprobs``/``prompt_logprobs`` (OpenAI's bound for ``top_logprobs``)."""
GREEDY_BELOW_TEMPERATURE = 1e-5
"""A temperature this small decodes greedily, as vLLM does: dividing the logits by it would
overflow them to infinity, and the distribution it asks for is the argmax anyway."""


@dataclass(slots=True)
class SamplingParams:
    """How to pick the next token. Validated on construction; a bad field raises
    :class:`RequestError` whose ``param`` names it.

    ``temperature`` below :data:`GREEDY_BELOW_TEMPERATURE` (0 included) means greedy decoding
    (``top_p``, ``top_k`` and ``seed`` are then irrelevant). ``top_k == 0`` turns top-k off; ``top_p == 1`` turns nucleus sampling off.
    ``repetition_penalty`` is the multiplicative (CTRL / Hugging Face) penalty; 1 turns it off.
    ``stop`` strings end generation and are not part of the returned text. ``ignore_eos`` keeps
    generating past the end-of-sequence token until ``max_tokens``.

    ``n`` samples are drawn from one prefill; with a ``seed``, sample ``i`` uses ``seed + i``.
    ``logprobs`` (``None``: off) asks for each generated token's log probability and the
    ``logprobs`` most likely alternatives; ``prompt_logprobs`` the same for the prompt's tokens
    (the first has none). Log probabilities are the model's own distribution under the request's
    routing, before the repetition penalty, temperature, top-k/top-p and any output constraint
    (vLLM's default, ``raw_logprobs``). ``max_tokens == 0`` generates nothing and is only allowed
    with ``prompt_logprobs`` (scoring a prompt). ``constraint`` restricts the output to a JSON
    schema or a regular expression (``server/structured.py``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: OutputConstraint | None = None

    def __post_init__(self) -> None:
        _check_int(self.max_tokens, "max_tokens", minimum=0)
        _check_int(self.n, "n", minimum=1, maximum=MAX_N)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, minimum=0, maximum=MAX_LOGPROBS)
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise RequestError(
                "max_tokens = 0 generates nothing; it is only allowed when scoring the prompt (echo "
                "with logprobs)",
                param="max_tokens",
            )
        _check_number(self.temperature, "temperature", minimum=0.0)
        _check_number(self.top_p, "top_p", minimum=0.0, inclusive_minimum=False, maximum=1.0)
        _check_int(self.top_k, "top_k", minimum=0)
        if self.seed is not None:
            _check_int(self.seed, "seed", minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
        low, high = REPETITION_PENALTY_RANGE
        _check_number(self.repetition_penalty, "repetition_penalty", minimum=low, maximum=high)
        self.stop = check_stop_strings(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True, slots=True)
class TaerOptions:
    """The client's say in expert selection (the ``taer`` request field).

    ``task`` forces a pattern instead of retrieving one; ``mode`` overrides the server's mode. Both
    ``None`` means: retrieve the task, use the server's mode. ``task`` with ``mode="full"`` is
    refused because the full model uses no pattern. Whether ``task`` exists is the engine's call
    (:meth:`Engine.task_names`); the HTTP layer checks it before generating.
    """

    task: str | None = None
    mode: Mode | None = None

    def __post_init__(self) -> None:
        if self.task is not None and (not isinstance(self.task, str) or not self.task.strip()):
            raise RequestError("taer.task must be a non-empty task name", param="taer.task")
        if self.mode is not None:
            check_mode(self.mode)
        if self.task is not None and self.mode == "full":
            raise RequestError(
                "taer.task cannot be combined with mode 'full' (the full model uses no pattern)",
                param="taer.task",
            )


@dataclass(slots=True)
class GenerationRequest:
    """One generation, as the engine sees it.

    ``prompt_token_ids`` is the whole prompt, chat template applied. ``retrieval_text`` is what
    retrieval embeds to choose a task: the last user message of a chat, or the prompt.
    ``arrival_time`` is ``time.monotonic()`` when the HTTP layer accepted the request (for
    scheduling fairness and latency metrics; never shown to clients).
    """

    request_id: str
    prompt_token_ids: list[int]
    retrieval_text: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    taer: TaerOptions = field(default_factory=TaerOptions)
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class RoutingInfo:
    """What served a request: reported in the ``taer`` response field and ``x-taer-*`` headers.

    ``task`` is the pattern used (``None`` when the full model served it). ``similarity`` is the
    cosine similarity of the best retrieval match and ``confidence`` the vote's confidence, both
    ``None`` when no retrieval ran (task forced, or mode ``full``). ``experts_loaded`` counts the
    experts copied to the device for this request; ``experts_reused`` those already resident.
    ``replica`` is the model replica that served it (a cluster's; ``None`` in one process).

    The router check's findings, ``None`` when it did not run (a task the client forced, the full
    model, the fallback, or the check turned off): ``retrieved_task`` is the task retrieval chose,
    ``checked_task`` the task whose calibration prompts the prompt's own routing fits best, ``rerouted``
    whether the request left the retrieved pattern for the checked task's (``mode`` ``pruned``) or
    for exact mode, and ``coverage`` the share of the prompt's own router choices inside the
    retained set of the pattern that served it.
    """

    task: str | None
    mode: Mode
    similarity: float | None = None
    confidence: float | None = None
    experts_loaded: int = 0
    experts_reused: int = 0
    replica: str | None = None
    retrieved_task: str | None = None
    checked_task: str | None = None
    rerouted: bool | None = None
    coverage: float | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log probability, and the most likely alternatives at its position (``top``:
    ``(token_id, logprob)`` pairs, most likely first; as many as the request asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class GenerationOutput:
    """One step of a generation, as :meth:`Engine.generate` yields it.

    ``text`` and ``token_ids`` are deltas since the previous output. ``text`` never contains any
    part of a stop string; it may be empty while the engine holds text back (a possible stop string
    forming, an incomplete UTF-8 character) or when the output only carries ``routing``.
    ``token_ids`` holds every generated token, including an end-of-sequence token and the tokens
    that formed a stop string. ``prompt_tokens`` and ``completion_tokens`` are running totals
    (``completion_tokens`` counts every generated token). ``finish_reason`` is set exactly when
    ``finished``; ``stop_reason`` is the stop string that matched (``None`` for an
    end-of-sequence token or another finish reason). ``routing`` must be set on the first output;
    later outputs may leave it ``None``.

    ``index`` is the sample (of ``sampling.n``) the output belongs to; each sample has its own
    totals. ``logprobs`` is one entry per ``token_ids`` entry when the request asked for them;
    ``prompt_logprobs`` (one entry per prompt token, the first ``None``) comes on each sample's
    first output when asked for.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    routing: RoutingInfo | None = None
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the HTTP layer uses (``PreTrainedTokenizerBase`` fits)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def __len__(self) -> int:
        """The vocabulary's size: token ids are ``0 <= id < len(tokenizer)``."""
        ...

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, add_generation_prompt: bool, tokenize: bool
    ) -> Any:
        """With ``tokenize=False``: the prompt text. Raises ``ValueError`` without a template."""
        ...


class ModelFacts:
    """The contract's ``tokenizer``, ``model_name`` and ``max_model_len``, read from ``self.parts``
    (what the engine loaded; it raises :class:`EngineNotReadyError` while loading)."""

    parts: Any

    @property
    def tokenizer(self) -> Tokenizer:
        return self.parts.tokenizer

    @property
    def model_name(self) -> str:
        return self.parts.model_name

    @property
    def max_model_len(self) -> int:
        return self.parts.max_model_len


class Engine(Protocol):
    """What the HTTP layer needs from the engine. See the module docstring for the rules.

    ``tokenizer``, ``model_name``, ``max_model_len``, ``task_names``, ``describe``,
    ``pattern_tables`` and ``preview_route`` are only used once ``is_ready`` is true (the HTTP
    layer answers 503 before that).
    """

    @property
    def is_ready(self) -> bool:
        """False while loading (the HTTP layer answers 503); cheap, called on every request."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def model_name(self) -> str:
        """The model's own name, served unless the settings give another."""
        ...

    @property
    def max_model_len(self) -> int:
        """Context length in tokens: prompt plus generated tokens never exceed it."""
        ...

    async def start(self, metrics: EngineMetrics | None) -> None:
        """Called once from the app's lifespan before serving. Returns promptly: loading may go on
        in the engine's thread, with ``is_ready`` false until it is done. The engine reports its
        own figures (queue length, expert loads, ...) through ``metrics`` (``None`` where the
        engine's figures come from elsewhere: a cluster's replicas report their own)."""
        ...

    async def shutdown(self) -> None:
        """Called once when the app stops: abort what runs, stop the engine thread."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Yield outputs as tokens come (implemented as ``async def`` with ``yield``)."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds. Idempotent; unknown or finished ids are ignored."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine is broken (for example its thread died); return if healthy."""
        ...

    def task_names(self) -> list[str]:
        """The tasks that have a pattern, i.e. the valid values of ``taer.task``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable state for ``GET /v1/taer/patterns``: tasks, resident experts per
        layer, cache statistics."""
        ...

    def pattern_tables(self) -> PatternTables:
        """For ``GET /v1/taer/tcess``: per task (``general`` included) its TCESS [layer][expert] and
        retained experts per layer under the budget; the super experts."""
        ...

    async def preview_route(self, text: str, options: TaerOptions) -> RoutePreview:
        """Where a request with ``retrieval_text=text`` and ``taer=options`` would go, and which of
        its experts are not resident now; nothing is generated or loaded. May raise
        :class:`~expert_store.errors.UnknownTaskError`."""
        ...


# Validation: the one set of rules, which the HTTP edge (server/protocol.py) and the server's
# defaults (server/settings.py) also apply --------------------------------------------------------


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """``stop`` as a tuple: at most :data:`MAX_STOP_STRINGS`, none empty."""
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
    if not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop strings must be non-empty strings", param="stop")
    return stop


def check_mode(mode: object) -> None:
    if mode not in MODES:
        raise RequestError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}", param="taer.mode")


def _check_int(value: object, name: str, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", param=name)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise RequestError(f"{name} must be {bound}, got {value}", param=name)


def _check_number(
    value: object,
    name: str,
    *,
    minimum: float,
    inclusive_minimum: bool = True,
    maximum: float | None = None,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", param=name)
    too_low = value < minimum if inclusive_minimum else value <= minimum
    if too_low or (maximum is not None and value > maximum):
        low = f">= {minimum}" if inclusive_minimum else f"> {minimum}"
        bound = low if maximum is None else f"{low} and <= {maximum}"
        raise RequestError(f"{name} must be {bound}, got {value}", param=name)
