"""``server.sampling`` against transformers' own logits processors: the distribution it samples
from must be the one that RepetitionPenalty -> Temperature -> TopK -> TopP gives in ``generate``.

The distribution is read off exactly by catching the probabilities handed to ``torch.multinomial``.
Legend: V = vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from expert_store.errors import RequestError
from server import sampling
from server.engine_api import SamplingParams

VOCAB = 50
SEEN = [3, 7, 7, 11, 20, 49]


def _logits(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=generator) * 3  # [V], both signs, no ties


def _reference_probs(logits: torch.Tensor, params: SamplingParams, seen: list[int]) -> torch.Tensor:
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    input_ids = torch.tensor([seen or [0]])  # [1, S]
    scores = processors(input_ids, logits.clone()[None, :])  # [1, V]
    return torch.softmax(scores[0], dim=-1)


def _sampled_probs(
    monkeypatch, logits: torch.Tensor, params: SamplingParams, seen: list[int]
) -> torch.Tensor:
    caught: list[torch.Tensor] = []

    def multinomial(probs, num_samples, generator=None):
        caught.append(probs.clone())
        return torch.zeros(num_samples, dtype=torch.long)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    sampling.next_token(logits.clone(), params, seen, sampling.make_generator(params))
    (probs,) = caught
    return probs


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.8),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.6, top_k=8, top_p=0.95, repetition_penalty=1.2),
    SamplingParams(temperature=1.1, repetition_penalty=0.8),
]


@pytest.mark.parametrize(
    "params", CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}"
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_distribution_is_transformers(monkeypatch, params, seed):
    logits = _logits(seed)
    expected = _reference_probs(logits, params, SEEN)
    actual = _sampled_probs(monkeypatch, logits, params, SEEN)
    assert torch.equal(actual > 0, expected > 0)  # the same tokens survive the filters
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.0, 1.5, 4.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_choice_is_the_penalised_argmax(penalty, seed):
    logits = _logits(seed)
    seen = [int(torch.argmax(logits)), *SEEN]  # penalise the unpenalised winner too
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)])
    expected = int(torch.argmax(processors(torch.tensor([seen]), logits.clone()[None, :])[0]))
    params = SamplingParams(temperature=0.0, repetition_penalty=penalty)
    assert sampling.make_generator(params) is None
    assert sampling.next_token(logits.clone(), params, seen, None) == expected


def test_a_seeded_request_samples_the_same_tokens():
    logits = _logits(5)
    params = SamplingParams(temperature=1.0, top_k=20, seed=1234)
    first = [sampling.next_token(logits, params, [], g) for g in [sampling.make_generator(params)] * 20]
    second = [sampling.next_token(logits, params, [], g) for g in [sampling.make_generator(params)] * 20]
    assert first == second


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-320, seed=1),
        SamplingParams(temperature=1e308, seed=-5),
        SamplingParams(temperature=1.0, repetition_penalty=0.01, seed=-(2**63)),
        SamplingParams(temperature=1.0, repetition_penalty=100.0, seed=2**64 - 1),
    ],
)
def test_extreme_but_allowed_parameters_pick_a_token(params):
    logits = torch.linspace(-1e3, 1e3, 50)  # [V]
    token = sampling.next_token(logits.clone(), params, [1, 2, 49], sampling.make_generator(params))
    assert 0 <= token < 50
    if params.temperature < 1e-5:
        assert token == 49  # greedy


@pytest.mark.parametrize("penalty", [5e-324, 0.0099, 100.5])
def test_a_repetition_penalty_outside_the_range_is_refused(penalty):
    with pytest.raises(RequestError) as caught:
        SamplingParams(repetition_penalty=penalty)
    assert caught.value.param == "repetition_penalty"
