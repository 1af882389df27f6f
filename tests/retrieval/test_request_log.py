"""Reading a request log for `taer discover`: OpenAI request bodies or plain lines, errors by line."""

from __future__ import annotations

import json

import pytest

from expert_store.errors import DiscoveryError
from retrieval.request_log import read_request_log
from retrieval.tasks_file import CalibrationPrompt, ChatMessage


def _jsonl(path, *bodies) -> str:
    path.write_text("\n".join(b if isinstance(b, str) else json.dumps(b) for b in bodies) + "\n")
    return path


def test_chat_and_completions_bodies_give_their_prompts(tmp_path):
    log = _jsonl(
        tmp_path / "log.jsonl",
        {
            "model": "m",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "user", "content": [{"type": "text", "text": "Reverse"}, {"type": "image_url"}]},
            ],
        },
        {"model": "m", "prompt": "Add 2 and 3."},
        {"model": "m", "prompt": ["one", "two", " "]},
        {
            "custom_id": "r1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "from a batch file"}]},
        },
    )
    read = read_request_log(log)
    assert read.texts == ["Reverse", "Add 2 and 3.", "one", "two", "from a batch file"]
    assert [p.line for p in read.prompts] == [1, 2, 3, 3, 4]
    assert read.prompts[0].prompt.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "first question"),
        ChatMessage("user", "Reverse"),  # the assistant turn had no text
    )
    assert read.prompts[1].prompt == CalibrationPrompt(prompt="Add 2 and 3.")


def test_text_log_and_repeats(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("Reverse abc.\n\nSort 321.\nReverse abc.\n{not json, but a text log}\n")
    read = read_request_log(log)
    assert read.texts == ["Reverse abc.", "Sort 321.", "{not json, but a text log}"]
    assert read.num_repeats == 1 and [p.line for p in read.prompts] == [1, 3, 5]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', '{"prompt": "ok2"', ""], r"log.jsonl:2: not JSON"),
        (['{"prompt": "ok"}', "[1, 2]"], r"log.jsonl:2: expected a JSON object"),
        (
            ['{"prompt": "ok"}', '{"model": "m", "input": "x"}'],
            r"log.jsonl:2: a request body needs 'messages'",
        ),
        (['{"prompt": [1, 2, 3]}'], r"log.jsonl:1: 'prompt' is token ids"),
        (['{"prompt": "  "}'], r"log.jsonl:1: 'prompt' is empty"),
        (['{"messages": [{"role": "system", "content": "x"}]}'], r"log.jsonl:1: no user message"),
        (['{"messages": []}'], r"log.jsonl:1: 'messages' must be a non-empty list"),
        (['{"messages": [{"role": "user", "content": 3}]}'], r"log.jsonl:1: message 0: 'content'"),
    ],
)
def test_bad_lines_name_the_line(tmp_path, lines, message):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(lines))
    with pytest.raises(DiscoveryError, match=message):
        read_request_log(log)


def test_missing_empty_and_binary_logs(tmp_path):
    with pytest.raises(DiscoveryError, match="not found"):
        read_request_log(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DiscoveryError, match="the log is empty"):
        read_request_log(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"a prompt\nanother\n\xff\xfe\x00\n")
    with pytest.raises(DiscoveryError, match=r"bin.txt:3: not UTF-8"):
        read_request_log(tmp_path / "bin.txt")
    (tmp_path / "ctl.txt").write_bytes(b"a prompt\nx\x00y\n")
    with pytest.raises(DiscoveryError, match=r"ctl.txt:2: control characters"):
        read_request_log(tmp_path / "ctl.txt")
