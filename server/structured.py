"""Constrained decoding (structured outputs): the output must match a JSON schema, any JSON object, or
a regex. A ``GrammarCompiler`` per tokenizer compiles constraints; a ``Matcher`` per sequence says
which tokens may come next and advances on the sampled one.

The grammar engine is llguidance: one wheel with no dependencies (xgrammar pulls in triton; outlines-core
turns schemas into regexes, which cannot nest to any depth, so it has no "any JSON object"), built from
any fast Hugging Face tokenizer. With Qwen2's 151,936-wide vocabulary on a 2-core CPU it computed a
mask in 5-10 us per token (median; xgrammar 20-28 us, outlines-core 184-194 us) and compiled a 4-field
schema in 3-7 ms and a 2.6 KB schema nested 5 deep in 2-3 ms (xgrammar 22-28 and 34-38 ms,
outlines-core 0.2-0.4 s and 3.9-6.8 s); a 64 KB schema of 1,000 fields compiled in 58 ms.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch

from expert_store.errors import RequestError

ConstraintKind = Literal["json_object", "json_schema", "regex"]
RESPONSE_FORMAT_PARAM = "response_format"
TGI_GRAMMAR_PARAM = "parameters.grammar"
MAX_CONSTRAINT_BYTES = 64 * 1024
"""A schema or regex longer than this, serialized, is refused: compiling one must not stall the server."""
DEFAULT_CACHE_SIZE = 64
_DESCRIPTIONS = {
    "json_object": "the JSON object grammar",
    "json_schema": "the JSON schema",
    "regex": "the regex",
}
_VALUE_TYPES = {"json_object": type(None), "json_schema": dict, "regex": str}
_COMPACT_JSON = {"whitespace_flexible": False}
_ECHO = re.compile(r"\d+ \|")  # llguidance quotes the grammar's source under its errors: "1 | start: ..."


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """What the output must match: kind is "json_object" (any JSON object), "json_schema" (value: the
    schema as a dict; {} is any JSON value) or "regex" (value: a pattern in Rust regex syntax, matched
    against the whole output). Plain data: picklable, so it crosses to Ray replicas."""

    kind: ConstraintKind
    value: Any = None
    param: str = field(default=RESPONSE_FORMAT_PARAM, compare=False)  # the request field, for errors

    def __post_init__(self) -> None:
        if self.kind not in _VALUE_TYPES:
            raise ValueError(f"unknown constraint kind {self.kind!r}; expected one of {sorted(_VALUE_TYPES)}")
        if not isinstance(self.value, _VALUE_TYPES[self.kind]):
            raise ValueError(f"a {self.kind} constraint needs a {_VALUE_TYPES[self.kind].__name__} value")


@dataclass(frozen=True, slots=True, eq=False)
class CompiledGrammar:
    """A constraint compiled for one tokenizer; ``initial`` is never advanced, each sequence gets a copy."""

    key: str
    initial: llguidance.LLMatcher


class Matcher:
    """One sequence's place in its grammar. Not thread-safe: one sequence, one thread."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, num_words: int) -> None:
        self._matcher, self.vocab_size = matcher, vocab_size
        self._bitmask = torch.zeros(num_words, dtype=torch.int32)  # bit i of word w: token 32 w + i
        self._bitmask_is_current = False

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size] on the CPU: the tokens allowed next (EOS once the grammar is complete)."""
        return _unpack(self._current_bitmask(), self.vocab_size)

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place, on a [vocab_size] row on any device.
        RuntimeError if no token is allowed."""
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits of shape {tuple(logits.shape)}; expected ({self.vocab_size},)")
        # The packed mask is 32 times smaller than a bool one: check it, move it, unpack it there.
        bitmask = self._current_bitmask()
        if not bool(bitmask.any()):
            raise RuntimeError("the grammar allows no next token")
        bitmask = bitmask.to(logits.device)
        logits.masked_fill_(~_unpack(bitmask, self.vocab_size), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past ``token``; a token the mask did not allow is a bug, raised as RuntimeError."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} is not allowed by the grammar: {self._matcher.get_error()}")
        self._bitmask_is_current = False

    @property
    def is_done(self) -> bool:
        """The grammar is complete and only EOS may follow: the sequence can stop now."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def _current_bitmask(self) -> torch.Tensor:
        if not self._bitmask_is_current:
            # Drops the GIL; bounded by llguidance's per-step fuel, past which the matcher errs.
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
            if self._matcher.is_error():
                raise RuntimeError(f"the grammar cannot go on: {self._matcher.get_error()}")
            self._bitmask_is_current = True
        return self._bitmask


class GrammarCompiler:
    """Bound to one tokenizer and the model's vocabulary size (the logits' width, which may exceed
    ``len(tokenizer)``; the ids past the tokenizer are never allowed). Compiles constraints and keeps
    the last ``max_cached`` compiled, keyed by their canonical JSON. Thread-safe.

    ``eos_token_ids``: the ids that end a sequence, allowed once the grammar is complete (default:
    the tokenizer's EOS). Building costs about 2 s for a 150k vocabulary: make one at start-up.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        eos_token_ids: Sequence[int] | None = None,
        max_cached: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.vocab_size, self._max_cached = vocab_size, max_cached
        self._tokenizer = _ll_tokenizer(tokenizer, max(vocab_size, len(tokenizer)), eos_token_ids)
        self._num_words = (self._tokenizer.vocab_size + 31) // 32
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, constraint: OutputConstraint) -> None:
        """Compile ``constraint`` (or find it cached); RequestError naming its ``param`` if it cannot be."""
        self.compile(constraint)

    def matcher(self, constraint: OutputConstraint) -> Matcher:
        """A fresh matcher at the start of ``constraint``'s grammar (compiled first if not cached)."""
        compiled = self.compile(constraint)
        return Matcher(compiled.initial.deep_copy(), self.vocab_size, self._num_words)

    def compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        """The compiled grammar of ``constraint``, from the cache when it is there."""
        param = constraint.param
        key = _canonical_key(constraint, param)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        # Outside the lock: llguidance drops the GIL while it builds, and a slow schema must not hold
        # up the engine thread's look-ups of cached ones.
        compiled = CompiledGrammar(key, self._build(constraint, param))
        with self._lock:
            compiled = self._cache.setdefault(key, compiled)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return compiled

    def _build(self, constraint: OutputConstraint, param: str) -> llguidance.LLMatcher:
        if constraint.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(constraint.value)
        else:
            schema = {"type": "object"} if constraint.kind == "json_object" else constraint.value
            # Compact JSON: with any whitespace allowed, a small model can emit newlines until
            # max_tokens and never close the object.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT_JSON)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            what = _DESCRIPTIONS[constraint.kind]
            raise RequestError(f"{param}: {what} cannot be used: {_one_line(matcher.get_error())}", param)
        return matcher


def _canonical_key(constraint: OutputConstraint, param: str) -> str:
    what = _DESCRIPTIONS[constraint.kind]
    try:
        key = json.dumps(
            [constraint.kind, constraint.value], sort_keys=True, separators=(",", ":"), allow_nan=False
        )
    except (TypeError, ValueError, RecursionError) as error:
        raise RequestError(f"{param}: {what} is not plain JSON ({error})", param) from None
    size = len(key.encode())
    if size > MAX_CONSTRAINT_BYTES:
        raise RequestError(
            f"{param}: {what} is {size:,} bytes serialized, over the limit of {MAX_CONSTRAINT_BYTES:,}; "
            "send a smaller one",
            param,
        )
    return key


def _ll_tokenizer(
    tokenizer: Any, n_vocab: int, eos_token_ids: Sequence[int] | None
) -> llguidance.LLTokenizer:
    eos = list(eos_token_ids) if eos_token_ids is not None else tokenizer.eos_token_id
    if eos is None or eos == []:
        raise ValueError("the tokenizer has no EOS token: pass eos_token_ids to the GrammarCompiler")
    if tokenizer.backend_tokenizer.decoder is not None:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos)
    # Without a decoder, llguidance cannot tell how tokens map to bytes; each token is then its text.
    pieces = _PieceTokenizer(tokenizer, n_vocab)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(pieces), n_vocab=n_vocab, eos_token=eos)


class _PieceTokenizer:
    """What ``llguidance.TokenizerWrapper`` reads, for a tokenizer without a decoder (word or
    character level): each token's bytes are its text; ids past the tokenizer are special."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        padding = [f"<|padding {i}|>" for i in range(len(tokenizer), n_vocab)]
        self.tokens = [piece.encode() for piece in pieces + padding]
        self.special_token_ids = sorted({*tokenizer.all_special_ids, *range(len(tokenizer), n_vocab)})

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def _unpack(bitmask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # W = 32-bit words, V = tokens
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [W, 32]
    return bits.view(-1)[:num_tokens].bool()  # [V]


def _one_line(message: str) -> str:
    """llguidance's error without its caret and source-echo lines, on one line."""
    lines = (line.strip() for line in message.splitlines())
    return " ".join(line for line in lines if line and not set(line) <= {"^"} and not _ECHO.match(line))


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string"}
    return names.get(type(value), "array" if isinstance(value, list) else "object")
