"""The engine contract's dataclasses, the settings, and the fake engine's own behaviour."""

from __future__ import annotations

import inspect

import pytest
from fake_engine import EOS_ID, FakeEngine, FakeEngineConfig

from expert_store.errors import RequestError, TaerError
from server.engine_api import Engine, GenerationRequest, SamplingParams, TaerOptions
from server.settings import SamplingDefaults, ServerSettings


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.01}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
    ],
)
def test_sampling_params_name_the_bad_field(fields, param):
    with pytest.raises(RequestError) as caught:
        SamplingParams(**fields)
    assert caught.value.param == param
    assert param in str(caught.value)


def test_sampling_params_defaults_and_greedy():
    params = SamplingParams(stop=["a"])  # type: ignore[arg-type]
    assert params.stop == ("a",)
    assert not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"mode": "turbo"}, "taer.mode"),
        ({"task": " "}, "taer.task"),
        ({"task": "sort", "mode": "full"}, "taer.task"),
    ],
)
def test_taer_options_name_the_bad_field(fields, param):
    with pytest.raises(RequestError) as caught:
        TaerOptions(**fields)
    assert caught.value.param == param


@pytest.mark.parametrize(
    "fields",
    [
        {"port": 70000},
        {"max_queue": 0},
        {"max_body_bytes": 10},
        {"request_timeout_s": 0},
        {"api_key": ""},
        {"defaults": SamplingDefaults()} | {"host": ""},
    ],
)
def test_settings_are_checked(fields):
    with pytest.raises(TaerError, match="invalid server setting"):
        ServerSettings(**fields)


@pytest.mark.parametrize("fields", [{"top_p": 0}, {"temperature": -1}, {"max_tokens": 0}, {"top_k": -1}])
def test_sampling_defaults_are_checked(fields):
    with pytest.raises(TaerError, match="defaults"):
        SamplingDefaults(**fields)


def test_settings_are_slotted():
    with pytest.raises(AttributeError):
        ServerSettings().typo = 1  # type: ignore[attr-defined]


def test_fake_engine_has_every_engine_member():
    members = {name for name, _ in inspect.getmembers(Engine) if not name.startswith("_")}
    assert members <= set(dir(FakeEngine))
    assert inspect.isasyncgenfunction(FakeEngine.generate)


def _request(text: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest("r1", [1, *map(ord, text)], text, SamplingParams(**sampling))  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fake_engine_outputs(anyio_backend):
    engine = FakeEngine()
    outputs = [o async for o in engine.generate(_request("abcab", stop=("ab",), max_tokens=10))]
    assert "".join(o.text for o in outputs) == ""  # "ab" is the stop string, right at the start
    assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_reason == "ab"
    outputs = [o async for o in engine.generate(_request("xabcab", stop=("abd",), max_tokens=10))]
    assert [o.text for o in outputs] == ["x", "", "", "abc", "", "", "ab"]  # held back while "abd" may form
    assert outputs[-1].token_ids == [EOS_ID]
    assert [o.completion_tokens for o in outputs] == [1, 2, 3, 4, 5, 6, 7]
    assert all(o.finished == (o is outputs[-1]) for o in outputs)
    outputs = [o async for o in engine.generate(_request("ab", ignore_eos=True, max_tokens=5))]
    assert "".join(o.text for o in outputs) == "ababa"
    assert outputs[-1].finish_reason == "length"
    assert outputs[0].routing is not None


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fake_engine_abort(anyio_backend):
    engine = FakeEngine(FakeEngineConfig(token_delay_s=0.01))
    outputs = engine.generate(_request("x" * 50))
    first = await anext(outputs)
    await engine.abort(first.request_id)
    rest = [o async for o in outputs]
    assert rest[-1].finish_reason == "abort"
    assert len(rest) < 5
    assert engine.aborted == ["r1"] and engine.num_running == 0
