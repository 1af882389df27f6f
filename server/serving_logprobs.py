"""Log probabilities in the OpenAI response shapes: chat's ``logprobs.content`` entries, and the
legacy completions' parallel lists.

A token is shown as the text it decodes to on its own (as vLLM shows it); a token that is part of
a multi-byte character decodes to U+FFFD. Several tokens can decode to the same text: in the
completions' ``top_logprobs`` dictionaries the most likely of them is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.engine_api import Tokenizer, TokenLogprob
from server.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


class TokenTexts:
    """Token id -> its text, cached (one per tokenizer)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **_top(entry.token_id, entry.logprob, texts),
                top_logprobs=[TopLogprob(**_top(token, logprob, texts)) for token, logprob in entry.top],
            )
            for entry in entries
        ]
    )


def completion_logprobs(
    token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], texts: TokenTexts, offset: int = 0
) -> CompletionLogprobs:
    """``entries[i]`` scores ``token_ids[i]`` (``None``: no score, the prompt's first token).
    ``text_offset`` counts characters from ``offset``, token text by token text."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = texts(token_id)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for token, logprob in (*entry.top, (entry.token_id, entry.logprob)):  # the chosen token too
            top.setdefault(texts(token), logprob)
        result.top_logprobs.append(top)
    return result


def _top(token_id: int, logprob: float, texts: TokenTexts) -> dict:
    text = texts(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
