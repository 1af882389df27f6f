"""The HTTP layer with a real Hugging Face tokenizer (built in memory, no hub), as the real engine
will hand it one: the chat template renders, and template failures are the client's 400."""

from __future__ import annotations

import pytest
from api_helpers import app_client, assert_openai_error, chat_body
from fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz <|>\n"]
    model = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


async def test_chat_with_a_hugging_face_tokenizer(hf_tokenizer):
    engine = FakeEngine(tokenizer=hf_tokenizer)
    async with app_client(engine) as client:
        response = await client.post("/v1/chat/completions", json=chat_body("hi there"))
        assert response.status_code == 200, response.text
        expected = hf_tokenizer.encode("<|user|>hi there\n<|assistant|>", add_special_tokens=False)
        assert engine.requests[-1].prompt_token_ids == expected
        assert response.json()["usage"]["prompt_tokens"] == len(expected)
        assert (await client.post("/v1/completions", json={"prompt": "abc"})).status_code == 200
        assert engine.requests[-1].prompt_token_ids == hf_tokenizer.encode("abc")


@pytest.mark.parametrize("template", [None, "{{ raise_exception('roles must alternate') }}"])
async def test_a_template_that_cannot_render_is_a_400(hf_tokenizer, template):
    hf_tokenizer.chat_template = template
    try:
        async with app_client(FakeEngine(tokenizer=hf_tokenizer)) as client:
            response = await client.post("/v1/chat/completions", json=chat_body("hi"))
            error = assert_openai_error(response, 400, "messages")
            assert "/v1/completions" in error["message"]
    finally:
        hf_tokenizer.chat_template = TEMPLATE
