"""The byte-level tokenizer and chat template, as saved files loaded by AutoTokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from demo.data import prompt_affixes
from demo.tokenizer import EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("text", ["Reverse the word 'kitemo'.", "12 * 7 = ?\n", "héllo wörld ✓ 日本", ""])
def test_round_trips_any_text_one_token_per_byte(saved, text):
    ids = saved(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert saved.decode(ids) == text


def test_special_tokens_are_single_ids(saved):
    assert (saved.pad_token, saved.eos_token) == (PAD_TOKEN, EOS_TOKEN)
    assert (saved.pad_token_id, saved.eos_token_id) == (0, 1)
    for token in ROLE_TOKENS:
        assert len(saved(token, add_special_tokens=False)["input_ids"]) == 1
    assert saved.padding_side == "left"


def test_chat_template_renders(saved):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Add 2 and 3."}]
    prompt = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|system|>\nbe brief\n<|user|>\nAdd 2 and 3.\n<|assistant|>\n"
    without = saved.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == "<|system|>\nbe brief\n<|user|>\nAdd 2 and 3.\n"
    turn = [*messages, {"role": "assistant", "content": "5"}]
    rendered = saved.apply_chat_template(turn, tokenize=False)
    # A training sequence (generation prompt + answer + end) is exactly the rendered conversation's prefix.
    assert rendered == prompt + "5" + EOS_TOKEN + "\n"


def test_prompt_affixes_match_the_template(saved):
    prefix, suffix = prompt_affixes(saved)
    assert (prefix, suffix) == ("<|user|>\n", "\n<|assistant|>\n")
