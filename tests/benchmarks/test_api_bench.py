"""`taer bench api`: the stream timing and the paired summaries on fixed numbers, the stream reader
on a canned response, the grammar timing on the tiny tokenizer, and one short run against a real
`taer serve` of the tiny pipeline."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from bench_fixtures import tiny_bench

from benchmarks.api_constrained import (
    SCHEMA,
    ConstrainedSettings,
    constrained_summary,
    json_verdict,
    time_grammar_mask,
)
from benchmarks.api_constrained import bodies as constrained_bodies
from benchmarks.api_features import ApiSettings, api_targets, run_api, settings_from
from benchmarks.api_features_render import render
from benchmarks.api_samples import ArmRun, SamplesSettings, samples_summary
from benchmarks.api_samples import bodies as samples_bodies
from benchmarks.api_timing import (
    Streamed,
    first_arm,
    matched_per_token,
    paired_ratios,
    spread,
    stream_chat,
)
from benchmarks.serving import BenchInputs
from server.cli import build_parser


def streamed(events: list[float], tokens: int, text: str = "", prompt_tokens: int = 10) -> Streamed:
    return Streamed((tuple(events),), (text,), ("stop",), prompt_tokens, tokens)


def test_per_token_time_is_first_to_last_token_over_the_gaps():
    stream = streamed([0.100, 0.110, 0.125, 0.130], tokens=4)
    assert stream.per_token_s == pytest.approx(0.030 / 3)
    assert stream.median_gap_s == pytest.approx(0.010)
    assert stream.first_token_s == stream.every_first_token_s == 0.100
    # Fewer events than tokens (a token without text): still the first to last token's time.
    assert streamed([0.1, 0.2], tokens=5).per_token_s == pytest.approx(0.1 / 4)
    assert streamed([0.1], tokens=1).per_token_s is None and streamed([0.1], tokens=1).median_gap_s is None
    two = Streamed(((0.1, 0.2), (0.3, 0.4)), ("a", "b"), ("stop", "stop"), 10, 4)
    assert two.per_token_s is None and two.every_first_token_s == 0.3


def test_matched_length_compares_the_same_positions():
    long = streamed([0.0, 0.010, 0.020, 0.030, 0.100, 0.200], tokens=6)  # slowed after its 4th token
    short = streamed([0.0, 0.011, 0.022, 0.033], tokens=4)
    first, second = matched_per_token(long, short)
    assert (first, second) == (pytest.approx(0.010), pytest.approx(0.011))
    assert matched_per_token(long, streamed([0.1], tokens=1)) == (None, None)


def test_ratios_are_paired_and_spread_leaves_out_what_was_not_measured():
    assert paired_ratios([2.0, None, 3.0, 1.0], [1.0, 1.0, None, 0.0]) == [2.0]
    with pytest.raises(ValueError, match="3 numerators but 2"):
        paired_ratios([1.0, 1.0, 1.0], [1.0, 1.0])
    summary = spread([3.0, None, 1.0, 2.0, 5.0, 4.0])
    assert summary == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0, "max": 5.0, "count": 5}
    assert spread([None])["count"] == 0 and spread([])["median"] is None


def test_arms_take_turns_going_first():
    orders = [first_arm(round_, index) for round_ in range(4) for index in range(3)]
    assert orders.count(0) == orders.count(1) == 6
    assert [first_arm(r, 0) for r in range(4)] == [0, 1, 0, 1]  # and from round to round


def test_the_arms_differ_only_in_what_is_compared():
    pair = constrained_bodies("Add 3 to 4.", ConstrainedSettings(max_tokens=9, temperature=0.0))
    constrained = dict(pair["constrained"])
    assert constrained.pop("response_format")["json_schema"]["schema"] == SCHEMA
    assert constrained == pair["free"] and "ignore_eos" not in constrained
    arms = samples_bodies("p", seed=7, settings=SamplesSettings(samples=3, max_tokens=5))
    (one,) = arms["one"]
    assert one["n"] == 3 and one["seed"] == 7 and one["ignore_eos"]
    assert [b["seed"] for b in arms["separate"]] == [7, 8, 9]
    assert all({**b, "seed": 7, "n": 3} == one for b in arms["separate"])


def test_json_verdict_parses_then_validates():
    assert json_verdict('{"answer":42}', SCHEMA) == (True, True)
    assert json_verdict('{"answer":"42"}', SCHEMA) == (True, False)
    assert json_verdict('{"answer":4,"x":1}', SCHEMA) == (True, False)  # additionalProperties: false
    assert json_verdict('{"answer":4', SCHEMA) == (False, False)  # cut at max_tokens


def test_constrained_summary_pairs_requests_in_order():
    constrained = [
        streamed([0.0, 0.011, 0.022], 3, '{"answer":1}'),
        streamed([0.0, 0.033], 4, '{"answer":12'),
    ]
    free = [streamed([0.0, 0.010, 0.020], 3, "1"), streamed([0.010], 1, "")]
    summary = constrained_summary(constrained, free)
    assert summary["pairs"] == 2 and summary["ratio"]["count"] == 1  # one free arm had a single token
    assert summary["ratio"]["median"] == pytest.approx(1.1)  # over the same three events
    assert summary["whole_answer_ratio"]["median"] == pytest.approx(1.1)
    assert (summary["parsed"], summary["valid"]) == (1, 1)
    assert summary["arms"]["free"]["finish_reasons"] == {"stop": 2}


def arm(
    tokens: int, wall_s: float, first_tokens: list[float], texts: list[str], prompt_tokens: int
) -> ArmRun:
    per_stream = len(texts) // len(first_tokens)
    streams = tuple(
        Streamed(
            tuple((t,) for _ in range(per_stream)),
            tuple(texts[i * per_stream : (i + 1) * per_stream]),
            ("length",) * per_stream,
            prompt_tokens,
            tokens // len(first_tokens),
        )
        for i, t in enumerate(first_tokens)
    )
    return ArmRun(streams, wall_s)


def test_samples_summary_compares_one_request_with_the_separate_ones():
    rounds = [
        {
            "one": arm(32, 0.2, [0.05], ["a", "b", "c", "d"], prompt_tokens=30),
            "separate": arm(32, 0.4, [0.05, 0.06, 0.07, 0.12], ["a", "b", "x", "d"], prompt_tokens=30),
        },
        {
            "one": arm(32, 0.3, [0.06], ["e", "f", "g", "h"], prompt_tokens=30),
            "separate": arm(32, 0.3, [0.05, 0.06, 0.07, 0.12], ["e", "f", "g", "h"], prompt_tokens=30),
        },
    ]
    summary = samples_summary(rounds)
    assert summary["samples"] == 4 and summary["rounds"] == 2
    assert summary["wall_ratio"]["median"] == pytest.approx(0.75)  # median of 0.5 and 1.0
    assert summary["tokens_per_s_ratio"]["min"] == pytest.approx(1.0)
    assert summary["tokens_per_s_ratio"]["max"] == pytest.approx(2.0)
    assert summary["every_first_token_ratio"]["max"] == pytest.approx(0.5)
    assert summary["arms"]["one"]["prompt_tokens"]["median"] == 30
    assert summary["arms"]["separate"]["prompt_tokens"]["median"] == 120
    assert (summary["samples_equal_to_separate"], summary["samples_compared"]) == (7, 8)


def test_stream_reader_times_each_sample_and_reads_usage():
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": '{"a'}}]},
        {"choices": [{"index": 1, "delta": {"content": "{"}}]},
        {"choices": [{"index": 0, "delta": {"content": '":1}'}, "finish_reason": "stop"}]},
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def read() -> Streamed:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:1") as client:
            return await stream_chat(client, {"messages": [], "n": 2})

    result = asyncio.run(read())
    assert seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}
    assert result.texts == ('{"a":1}', "{") and result.finish_reasons == ("stop", "length")
    assert [len(e) for e in result.token_event_s] == [2, 2]  # the role chunks carry no token
    assert (result.prompt_tokens, result.completion_tokens) == (7, 5)


def test_stream_reader_raises_on_an_error_status():
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json={"error": {"message": "no"}}))

    async def read() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:1") as client:
            await stream_chat(client, {"messages": []})

    with pytest.raises(RuntimeError, match="HTTP 400"):
        asyncio.run(read())


def test_grammar_timing_replays_a_valid_answer_on_the_served_tokenizer():
    mask = time_grammar_mask(tiny_bench().store, repeats=3)
    assert mask["vocab_size"] == 96 and mask["tokens"] == len('{"answer":42}')
    assert mask["per_token_s"]["count"] == 3 and mask["per_token_s"]["median"] > 0
    assert mask["compile_s"] > 0


def test_cli_registers_the_benchmark_and_its_sizes():
    args = build_parser().parse_args(["bench", "api", "--quick", "--rounds", "5", "--samples", "2"])
    assert args.func.__module__ == "benchmarks.api_features"
    settings = settings_from(args)
    assert settings.constrained.rounds == 5 and settings.constrained.max_tokens == 16  # QUICK's
    assert settings.samples.samples == 2 and settings.samples.rounds == 2
    assert settings_from(build_parser().parse_args(["bench", "api"])) == ApiSettings()


def test_targets_read_the_median_paired_ratio():
    assert api_targets({"constrained": {"ratio": spread([1.05, 1.2, 1.0])}})[0]["met"] is True
    assert api_targets({"constrained": {"ratio": spread([1.15])}})[0]["met"] is False
    assert api_targets({"constrained": {"ratio": spread([])}})[0]["met"] is None


@pytest.mark.slow
def test_a_short_run_against_a_real_server(tmp_path):
    bench = tiny_bench()
    settings = ApiSettings(
        constrained=ConstrainedSettings(rounds=1, max_tokens=40, mask_repeats=2),
        samples=SamplesSettings(rounds=1, max_tokens=4),
    )
    inputs = BenchInputs(bench.store, bench.patterns, bench.checkpoint, bench.tasks)
    result = run_api(inputs, settings, tmp_path, slots_per_layer=8)
    constrained, samples = result["constrained"], result["samples"]
    assert constrained["pairs"] == 2 and constrained["arms"]["constrained"]["requests"] == 2
    # Every constrained output that stopped (its grammar complete, not cut at max_tokens) validates.
    stopped = constrained["arms"]["constrained"]["finish_reasons"].get("stop", 0)
    assert constrained["valid"] == constrained["parsed"] == stopped, constrained["examples"]
    assert all(text.startswith('{"answer":') for text in constrained["examples"]["constrained"])
    assert samples["arms"]["one"]["tokens"]["median"] == samples["arms"]["separate"]["tokens"]["median"] == 16
    one, separate = (samples["arms"][a]["prompt_tokens"]["median"] for a in ("one", "separate"))
    assert separate == 4 * one
    assert samples["samples_equal_to_separate"] == 4  # sample i seeded seed + i: the same draws
    assert "### Constrained decoding" in render(result)
