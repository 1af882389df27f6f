"""The real engine in tests: start it on a config, and word requests in the pipeline's chat format."""

from __future__ import annotations

import asyncio

from server.engine import TaerEngine
from server.engine_api import GenerationRequest, SamplingParams
from server.loading import ServeConfig, load_engine_parts
from server.metrics import Metrics


async def started_engine(config: ServeConfig, metrics: Metrics | None = None, **kwargs) -> TaerEngine:
    """A running engine on ``config`` (``kwargs`` go to TaerEngine), ready to generate."""
    engine = TaerEngine(lambda: load_engine_parts(config), **kwargs)
    await engine.start((metrics or Metrics()).engine)
    await asyncio.to_thread(engine.wait_ready, 60)
    assert engine.is_ready
    return engine


def chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt tokens of one user message with the generation prompt, as the chat API builds them."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(prompt, add_special_tokens=False)


def greedy_request(tokenizer, name: str, text: str, max_tokens: int) -> GenerationRequest:
    """Exactly ``max_tokens`` greedy tokens for one user message (the end token does not stop it)."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return GenerationRequest(name, chat_ids(tokenizer, text), text, sampling)
