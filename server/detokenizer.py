"""Incremental detokenisation with stop strings.

Text is released as soon as it can no longer change: an incomplete UTF-8 character, or a tail that
could still grow into a stop string, is held back. A matched stop string ends the sequence and is
never part of the text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    stop: str | None = None  # the stop string that matched, if any


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already released
        self._max_stop = max((len(s) for s in stop), default=0)

    def push(self, token_id: int) -> Delta:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stop:
            match = self._find_stop(text)
            if match is not None:
                index, stop = match
                delta = text[self.emitted : index] if index > self.emitted else ""
                self.emitted = max(self.emitted, index)
                return Delta(delta, stop)
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        safe -= self._stop_prefix_length(text[:safe])
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return Delta(delta)

    def flush(self) -> str:
        """What was held back, at the end of a sequence that did not stop on a stop string."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        start = max(0, self.emitted - self._max_stop)
        found = [(text.find(stop, start), stop) for stop in self.stop]
        found = [(index, stop) for index, stop in found if index >= 0]
        return min(found) if found else None

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
