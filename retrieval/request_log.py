"""A request log read into prompts: what `taer discover` clusters.

Two shapes, told apart by the first non-blank line:

- JSONL (the first line starts with ``{``): one OpenAI request body a line. A chat completions body
  (``messages``; a message's ``content`` a string or a list of parts, whose ``text`` parts are
  joined) gives its conversation, embedded by its last user message; a completions body
  (``prompt``: a string, or a list of strings, each a prompt) gives its prompt. A line of an OpenAI
  batch input file (``{"custom_id", "method", "url", "body"}``) is read by its ``body``. Other keys
  (``model``, ``temperature``, ...) are ignored.
- Text: every non-blank line is one prompt.

Every error names the file and line. A prompt logged twice is kept once (the clusters should say
which kinds of work there are, not how often one request was repeated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expert_store.errors import DiscoveryError
from retrieval.tasks_file import CalibrationPrompt, ChatMessage


@dataclass(frozen=True, slots=True)
class LoggedPrompt:
    """One distinct prompt of the log and the line it was first seen on."""

    prompt: CalibrationPrompt
    line: int

    @property
    def text(self) -> str:
        """What is embedded: the last user message, or the prompt."""
        return self.prompt.query_text


@dataclass(frozen=True, slots=True)
class RequestLog:
    """The distinct prompts of a log, in the order first seen, and how many repeats were dropped."""

    path: Path
    prompts: tuple[LoggedPrompt, ...]
    num_repeats: int

    @property
    def texts(self) -> list[str]:
        return [logged.text for logged in self.prompts]


def read_request_log(path: str | Path) -> RequestLog:
    """Read ``path`` (see the module docstring); :class:`DiscoveryError` naming the line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise DiscoveryError(f"request log {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DiscoveryError(
            f"{path}:{line}: not UTF-8 text; a log is JSONL or one prompt per line"
        ) from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DiscoveryError(f"{path}: the log is empty; give JSONL request bodies or one prompt per line")
    is_jsonl = numbered[0][1].lstrip().startswith("{")
    seen: dict[CalibrationPrompt, LoggedPrompt] = {}
    repeats = 0
    for number, line in numbered:
        where = f"{path}:{number}"
        for prompt in _jsonl_prompts(line, where) if is_jsonl else [_text_prompt(line, where)]:
            if prompt in seen:
                repeats += 1
            else:
                seen[prompt] = LoggedPrompt(prompt, number)
    return RequestLog(path, tuple(seen.values()), repeats)


def _text_prompt(line: str, where: str) -> CalibrationPrompt:
    if any(ord(c) < 32 and c != "\t" for c in line):
        raise DiscoveryError(f"{where}: control characters in a text log line; is this a binary file?")
    return CalibrationPrompt(prompt=line)


def _jsonl_prompts(line: str, where: str) -> list[CalibrationPrompt]:
    try:
        body = json.loads(line)
    except json.JSONDecodeError as error:
        raise DiscoveryError(
            f"{where}: not JSON ({error.msg}); a JSONL log has one request body per line"
        ) from None
    if not isinstance(body, dict):
        raise DiscoveryError(f"{where}: expected a JSON object (a request body), got {type(body).__name__}")
    if "messages" not in body and "prompt" not in body and isinstance(body.get("body"), dict):
        body = body["body"]  # a line of an OpenAI batch input file
    if "messages" in body:
        return [CalibrationPrompt(messages=_messages(body["messages"], where))]
    if "prompt" in body:
        return [CalibrationPrompt(prompt=text) for text in _completion_prompts(body["prompt"], where)]
    raise DiscoveryError(
        f"{where}: a request body needs 'messages' (chat completions) or 'prompt' (completions); "
        f"this one has {sorted(body)}"
    )


def _messages(messages: Any, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(messages, list) or not messages:
        raise DiscoveryError(f"{where}: 'messages' must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DiscoveryError(f"{where}: message {i} must be an object with a string 'role'")
        text = _content_text(message.get("content"), f"{where}: message {i}")
        if text is not None:  # an assistant turn of tool calls only has no text to keep
            parsed.append(ChatMessage(message["role"], text))
    users = [m for m in parsed if m.role == "user"]
    if not users or not users[-1].content.strip():
        raise DiscoveryError(f"{where}: no user message with text; discovery embeds the last user message")
    return tuple(parsed)


def _content_text(content: Any, where: str) -> str | None:
    """A message's text: the string, or its text parts joined by newlines (images and audio left out)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if all(isinstance(text, str) for text in texts):
            return "\n".join(texts) if texts else None
    raise DiscoveryError(f"{where}: 'content' must be a string or a list of content parts")


def _completion_prompts(prompt: Any, where: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(prompts, list) and prompts and all(isinstance(p, int) for p in prompts):
        raise DiscoveryError(f"{where}: 'prompt' is token ids; discovery needs the text, log it as text")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DiscoveryError(f"{where}: 'prompt' must be a string or a list of strings")
    kept = [p for p in prompts if p.strip()]
    if not kept:
        raise DiscoveryError(f"{where}: 'prompt' is empty")
    return kept
