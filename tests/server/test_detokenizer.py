"""``server.detokenizer`` with a real byte-level BPE tokenizer (the demo's, one token per UTF-8 byte,
built offline): stop strings split across tokens, multi-byte characters split across tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from demo.tokenizer import build_tokenizer
from server.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte_tokenizer")
    build_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _run(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str | None, str]:
    """Push ``text`` token by token: the deltas, the stop that matched, what flush() releases."""
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token_id in _ids(tokenizer, text):
        delta = detok.push(token_id)
        deltas.append(delta.text)
        if delta.stop is not None:
            return deltas, delta.stop, ""
    return deltas, None, detok.flush()


@pytest.mark.parametrize(
    "text", ["héllo wörld", "price: 5€ each", "日本語のテキスト", "ok 👍🏽 done", "ascii only"]
)
def test_multibyte_characters_split_across_tokens_are_released_whole(tokenizer, text):
    assert len(_ids(tokenizer, text)) == len(text.encode("utf-8"))  # really one token per byte
    deltas, stop, rest = _run(tokenizer, text)
    assert stop is None
    assert "".join(deltas) + rest == text
    assert all("\ufffd" not in delta for delta in deltas)
    # Each character is released with its last byte: never before, never later.
    encoded, released = text.encode("utf-8"), ""
    for num_bytes, delta in enumerate(deltas, start=1):
        released += delta
        assert released == encoded[:num_bytes].decode("utf-8", errors="ignore")


@pytest.mark.parametrize(
    ("text", "stop", "before"),
    [
        ("The answer is 42.\nQ: next", ("\nQ:",), "The answer is 42."),
        ("abcSTOPdef", ("STOP",), "abc"),
        ("café au lait", ("é au",), "caf"),  # the stop starts inside a two-byte character
        ("x → y → z", ("→ z",), "x → y "),
        ("one END two STOP", ("STOP", "END"), "one "),  # the earliest match wins
    ],
)
def test_stop_strings_split_across_tokens(tokenizer, text, stop, before):
    deltas, matched, _ = _run(tokenizer, text, stop)
    assert text[len(before) :].startswith(matched)
    assert "".join(deltas) == before
    assert all(s not in "".join(deltas) for s in stop)


def test_a_partial_stop_is_held_back_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, ("STOP",))
    released = "".join(detok.push(t).text for t in _ids(tokenizer, "go ST"))
    assert released == "go "  # "ST" might still become "STOP"
    released += "".join(detok.push(t).text for t in _ids(tokenizer, "AY"))
    assert released == "go STAY"  # it did not
    tail = "".join(detok.push(t).text for t in _ids(tokenizer, " STO"))
    assert tail == " "
    assert detok.flush() == "STO"  # the end of the sequence releases the held-back prefix


def test_special_tokens_are_skipped(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(t).text for t in [*_ids(tokenizer, "hi"), tokenizer.eos_token_id])
    assert text + detok.flush() == "hi"
